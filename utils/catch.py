"""Catch: a pixel sanity game for the whole agent, registered with Gymnasium as `drama/Catch-v0`.

A ball falls down one of 8 columns, one row (of 16) per step; a paddle on the bottom row moves left, stays or
moves right (actions 0, 1, 2), one column per step. When the ball reaches the bottom row (after 15 steps) the
episode ends with reward +1 if the paddle is under it, -1 otherwise. Observations are 64x64x3 uint8 frames: a
white 8x4 ball and a blue 8x4 paddle on black. The ball's column and the paddle's start column are drawn
uniformly from the env's seeded generator at reset, so an episode is a function of the seed and the actions.

Returns, in closed form:
- optimal: +1. The paddle is at most 7 columns from the ball and has 15 steps to get there.
- any policy that ignores the observations (random, a constant action, any fixed action sequence): the ball's
  column is uniform over the 8 columns and independent of the paddle's path, so P(catch) = 1/8 exactly and
  the expected return is 2 * (1/8) - 1 = -0.75.
So a return above -0.75 (beyond sampling noise) can only come from reading the pixels.
"""

import gymnasium as gym
import numpy as np

COLUMNS, ROWS, CELL_WIDTH, CELL_HEIGHT = 8, 16, 8, 4  # 8 x 16 cells of 8 x 4 pixels: a 64 x 64 frame
BALL_COLOR, PADDLE_COLOR = (255, 255, 255), (64, 160, 255)
RANDOM_RETURN = 2 / COLUMNS - 1  # -0.75
OPTIMAL_RETURN = 1.0
EPISODE_LENGTH = ROWS - 1  # 15 steps


class Catch(gym.Env):
    """Catch the falling ball: Discrete(3) actions (left, stay, right), Box(64, 64, 3) uint8 observations."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, render_mode: str | None = None):
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(3)
        self.observation_space = gym.spaces.Box(0, 255, (ROWS * CELL_HEIGHT, COLUMNS * CELL_WIDTH, 3), np.uint8)
        self.ball_row = self.ball_column = self.paddle_column = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.ball_row = 0
        self.ball_column = int(self.np_random.integers(COLUMNS))
        self.paddle_column = int(self.np_random.integers(COLUMNS))
        return self._frame(), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"Catch has actions 0 (left), 1 (stay) and 2 (right), got {action!r}")
        self.paddle_column = min(max(self.paddle_column + int(action) - 1, 0), COLUMNS - 1)
        self.ball_row += 1
        terminated = self.ball_row == ROWS - 1
        reward = (1.0 if self.paddle_column == self.ball_column else -1.0) if terminated else 0.0
        return self._frame(), reward, terminated, False, {}

    def render(self) -> np.ndarray:
        return self._frame()

    def _frame(self) -> np.ndarray:
        frame = np.zeros(self.observation_space.shape, np.uint8)  # (64, 64, 3)
        self._paint(frame, self.ball_row, self.ball_column, BALL_COLOR)
        self._paint(frame, ROWS - 1, self.paddle_column, PADDLE_COLOR)  # drawn last: a caught ball is under it
        return frame

    @staticmethod
    def _paint(frame: np.ndarray, row: int, column: int, color: tuple[int, int, int]) -> None:
        frame[row * CELL_HEIGHT : (row + 1) * CELL_HEIGHT, column * CELL_WIDTH : (column + 1) * CELL_WIDTH] = color


gym.register("drama/Catch-v0", entry_point=Catch)
