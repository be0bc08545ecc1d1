"""Environments as CleanRL `make_env` thunks: Atari100k for `ALE/...` ids, 64x64 frames for other pixel envs.

Atari100k protocol (Kaiser et al. 2020, "Model-Based Reinforcement Learning for Atari"; DRAMA Sec. 3, as in
STORM): frameskip 4 with a max-pool over the last two frames, 64x64 RGB observations, minimal action set,
no sticky actions, no noop/fire reset, no reward clipping, 108k-frame (27k agent-step) episodes.
A lost life is reported in `info["life_loss"]` but does not end the episode.

Any other registered Gymnasium id with a Discrete action space and image observations (an (H, W, 3) uint8
observation space, or frames from `render_mode="rgb_array"`) gets its frames resized to 64x64 RGB uint8 with
Gymnasium's wrappers: no frameskip, no life loss, the env's own time limit. The project's sanity game
`drama/Catch-v0` (utils/catch.py) is one.
"""

import difflib
import importlib
from collections.abc import Callable

import ale_py
import gymnasium as gym
import numpy as np
from PIL import Image

import utils.catch  # noqa: F401  (registers drama/Catch-v0)
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


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def is_ale_entry_point(env_id: str) -> bool:
    """An ALE game registered under another id (PongNoFrameskip-v4, Pong-v4)."""
    return env_id in gym.registry and "ale_py" in str(gym.registry[env_id].entry_point)


def check_env_id(env_id: str) -> None:
    """Raise a one-line `UserError` unless `env_id` is a registered `ALE/<Game>-v5` id or another registered id."""
    valid = [e for e in gym.registry if e.startswith("ALE/") and e.endswith("-v5")]
    module, _, name = env_id.rpartition(":")  # "minigrid:MiniGrid-Empty-5x5-v0": import minigrid first (as gym.make)
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(f"{env_id}: cannot import {module} ({error}): pip install it") from None
    if env_id in valid or (not is_atari(name) and name in gym.registry and not is_ale_entry_point(name)):
        return
    close = difflib.get_close_matches(game_of(env_id), [e[4:-3] for e in valid], n=1)  # ALE/Krul-v5 -> Krull
    hint = f" Did you mean 'ALE/{close[0]}-v5'?" if close else ""
    if is_atari(env_id) or is_ale_entry_point(env_id):  # Atari games run under the Atari100k protocol only
        raise UserError(f"Unknown env id '{env_id}': expected a registered 'ALE/<Game>-v5' id.{hint} List them with: "
                        f"{LIST_IDS_CMD}")  # fmt: skip
    raise UserError(
        f"Unknown env id '{env_id}': expected an 'ALE/<Game>-v5' id or another registered Gymnasium id with image "
        f"observations (drama/Catch-v0; 'package:EnvId' imports the package that registers EnvId).{hint}"
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
        return resize_frame(self._frames.max(axis=0), self.size)  # (210, 160, 3) max-pooled -> (64, 64, 3) uint8

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


def is_image_space(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and space.shape[2:] == (3,)


def resize_frame(frame: np.ndarray, size: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, area-averaged (as the Atari frames)."""
    if frame.shape[:2] == (size, size):
        return frame
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BOX))


class NoLifeLoss(gym.Wrapper):
    """`info["life_loss"] = False` on every step: envs other than Atari have no lives."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, {**info, "life_loss": False}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, "life_loss": False}


def make_pixel_env(env_id: str) -> gym.Env:
    """A non-Atari env with 64x64x3 uint8 observations: its own image observations, or its rendered frames
    (made with `render_mode="rgb_array"`, which also serves `--capture-video`)."""
    env = gym.make(env_id, render_mode="rgb_array")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise UserError(f"{env_id} has a {type(env.action_space).__name__} action space: DRAMA needs Discrete actions")
    if not is_image_space(env.observation_space):
        env.reset(seed=0)
        try:
            frame = env.render()
        except NotImplementedError:
            frame = None
        if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8):
            env.close()
            raise UserError(
                f"{env_id} has neither (H, W, 3) uint8 observations nor rgb_array frames: DRAMA needs images"
            )
        env = gym.wrappers.AddRenderObservation(env, render_only=True)  # the observation is the rendered frame
    resized = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    env = gym.wrappers.TransformObservation(env, resize_frame, resized)
    return NoLifeLoss(env)


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
    """Return a thunk building one env (the caller does `env.reset(seed=seed)`): Atari100k for `ALE/` ids,
    64x64 frames of any other pixel env (`sticky_actions` and `max_episode_frames` apply to Atari only).

    `max_episode_frames` is in raw frames (108k = 27k agent steps); it ends the episode with
    `truncated=True`. Env `idx == 0` records full-resolution videos when `capture_video` is set.
    """
    check_env_id(env_id)

    def thunk() -> gym.Env:
        record = capture_video and idx == 0
        if is_atari(env_id):
            env = gym.make(
                env_id,
                frameskip=1,
                repeat_action_probability=0.25 if sticky_actions else 0.0,
                full_action_space=False,
                max_num_frames_per_episode=max_episode_frames,
                render_mode="rgb_array" if record else None,
            )
            env = Atari100kWrapper(env)
        else:
            env = make_pixel_env(env_id)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if record:
            env = gym.wrappers.RecordVideo(env, video_dir or f"videos/{run_name}")
        env.action_space.seed(seed)
        return env

    return thunk
