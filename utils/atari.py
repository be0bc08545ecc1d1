"""Atari100k environment: ALE v5 games with the DRAMA / STORM preprocessing, as a CleanRL `make_env` thunk.

Protocol (Kaiser et al. 2020, "Model-Based Reinforcement Learning for Atari"; DRAMA Sec. 3, as in STORM):
frameskip 4 with a max-pool over the last two frames, 64x64 RGB observations, minimal action set,
no sticky actions, no noop/fire reset, no reward clipping, 108k-frame (27k agent-step) episodes.
A lost life is reported in `info["life_loss"]` but does not end the episode.
"""

import difflib
from collections.abc import Callable

import ale_py
import gymnasium as gym
import numpy as np
from PIL import Image

from utils import UserError, game_of

gym.register_envs(ale_py)

ATARI100K_GAMES = (
    "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
    "ChopperCommand", "CrazyClimber", "DemonAttack", "Freeway", "Frostbite", "Gopher", "Hero",
    "Jamesbond", "Kangaroo", "Krull", "KungFuMaster", "MsPacman", "Pong", "PrivateEye", "Qbert",
    "RoadRunner", "Seaquest", "UpNDown",
)  # fmt: skip
LIST_IDS_CMD = (
    'python -c "import gymnasium as gym, ale_py; gym.register_envs(ale_py); '
    "print([e for e in gym.registry if e.startswith('ALE/')])\""
)


def check_env_id(env_id: str) -> None:
    """Raise a one-line `UserError` unless `env_id` is a registered `ALE/<Game>-v5` id."""
    valid = [e for e in gym.registry if e.startswith("ALE/") and e.endswith("-v5")]
    if env_id in valid:
        return
    close = difflib.get_close_matches(game_of(env_id), [e[4:-3] for e in valid], n=1)  # ALE/Krul-v5 -> Krull
    hint = f" Did you mean 'ALE/{close[0]}-v5'?" if close else ""
    raise UserError(
        f"Unknown env id '{env_id}': expected a registered 'ALE/<Game>-v5' id.{hint} List them with: {LIST_IDS_CMD}"
    )


class Atari100kWrapper(gym.Wrapper):
    """Atari100k preprocessing on top of a raw `frameskip=1` ALE v5 env.

    Each agent step repeats the action `action_repeat` times, sums every reward, and returns the
    pixel-wise max of the last two raw frames, area-resized to (size, size, 3) uint8. The episode ends
    only at game over (`terminated`) or at the ALE frame limit (`truncated`); `info["life_loss"]` is
    True on the step where `info["lives"]` dropped (also on the game-over step if a life went there).

    In a vector env use `autoreset_mode=gym.vector.AutoresetMode.SAME_STEP`: every step is then a real
    transition (obs_t, a_t, r_t, terminated_t) and the done env's step info (its `episode` statistics
    and its `life_loss`) is in `infos["final_info"]`, while the top-level info of that env is the reset's.
    """

    def __init__(self, env: gym.Env, action_repeat: int = 4, size: int = 64):
        super().__init__(env)
        self.action_repeat, self.size = action_repeat, size
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.metadata = {**env.metadata, "render_fps": 60 // action_repeat}  # videos play at game speed
        self._frames = np.zeros((2, *env.observation_space.shape), np.uint8)  # (2, 210, 160, 3) last 2 frames
        self._lives = 0

    def _obs(self) -> np.ndarray:
        pooled = self._frames.max(axis=0)  # (210, 160, 3)
        image = Image.fromarray(pooled).resize((self.size, self.size), Image.Resampling.BOX)
        return np.asarray(image)  # (64, 64, 3) uint8

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        frame, info = self.env.reset(seed=seed, options=options)
        self._frames[:] = frame
        self._lives = info["lives"]
        info["life_loss"] = False
        return self._obs(), info

    def step(self, action):
        total_reward = 0.0
        for _ in range(self.action_repeat):
            frame, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            self._frames[0] = self._frames[1]
            self._frames[1] = frame
            if terminated or truncated:  # game over, or the frame limit fell inside this repeat
                break
        info["life_loss"] = bool(info["lives"] < self._lives)
        self._lives = info["lives"]
        return self._obs(), total_reward, terminated, truncated, info


def make_env(
    env_id: str,
    seed: int,
    idx: int,
    capture_video: bool,
    run_name: str,
    sticky_actions: bool = False,
    max_episode_frames: int = 108_000,
    video_dir: str | None = None,
) -> Callable[[], gym.Env]:
    """Return a thunk building one Atari100k env (the caller does `env.reset(seed=seed)`).

    `max_episode_frames` is in raw frames (108k = 27k agent steps); it ends the episode with
    `truncated=True`. Env `idx == 0` records full-resolution videos when `capture_video` is set.
    """
    check_env_id(env_id)

    def thunk() -> gym.Env:
        record = capture_video and idx == 0
        env = gym.make(
            env_id,
            frameskip=1,
            repeat_action_probability=0.25 if sticky_actions else 0.0,
            full_action_space=False,
            max_num_frames_per_episode=max_episode_frames,
            render_mode="rgb_array" if record else None,
        )
        env = Atari100kWrapper(env)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if record:
            env = gym.wrappers.RecordVideo(env, video_dir or f"videos/{run_name}")
        env.action_space.seed(seed)
        return env

    return thunk
