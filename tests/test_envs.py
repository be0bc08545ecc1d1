"""Non-Atari pixel envs: the sanity game drama/Catch-v0 and a third-party env (MiniGrid) through make_env."""

import gymnasium as gym
import numpy as np
import pytest

from utils import UserError
from utils.atari import check_env_id, make_env
from utils.catch import EPISODE_LENGTH, OPTIMAL_RETURN, RANDOM_RETURN, Catch


def play(env, policy, episodes: int, seed: int = 0) -> np.ndarray:
    """Returns of `episodes` episodes of policy(obs, t) on env (statistics from RecordEpisodeStatistics)."""
    returns = []
    obs, _ = env.reset(seed=seed)
    for _ in range(episodes):
        done, t = False, 0
        while not done:
            obs, _, terminated, truncated, info = env.step(policy(obs, t))
            done, t = terminated or truncated, t + 1
        returns.append(info["episode"]["r"])
        assert info["episode"]["l"] == EPISODE_LENGTH
        obs, _ = env.reset()
    return np.array(returns)


def optimal_action(obs: np.ndarray, t: int) -> int:
    """Read the ball's and the paddle's columns off the pixels; move towards the ball."""
    white = obs.min(-1) > 200  # (64, 64)
    blue = (obs[..., 2] > 200) & (obs[..., 0] < 100)
    ball, paddle = np.flatnonzero(white.any(0)).mean(), np.flatnonzero(blue.any(0)).mean()
    return 1 + int(np.sign(ball - paddle))


def test_catch_frames_and_determinism():
    env = make_env("drama/Catch-v0", 0, 0, False, "test")()
    obs, info = env.reset(seed=7)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and not info["life_loss"]
    assert env.action_space == gym.spaces.Discrete(3)
    actions = [0, 2, 2, 1, 0] * 3
    trajectories = []
    for _ in range(2):
        frames = [env.reset(seed=7)[0]]
        frames += [env.step(a)[0] for a in actions]
        trajectories.append(np.stack(frames))
    np.testing.assert_array_equal(trajectories[0], trajectories[1])
    starts = {Catch().reset(seed=seed)[0].tobytes() for seed in range(20)}
    assert len(starts) > 10  # the seed draws the ball's and the paddle's columns


def test_catch_rewards_in_closed_form():
    env = make_env("drama/Catch-v0", 0, 0, False, "test")()
    np.testing.assert_array_equal(play(env, optimal_action, 200), OPTIMAL_RETURN)  # the pixels suffice: always +1
    rng = np.random.default_rng(0)
    blind_policies = {
        "random": lambda obs, t: int(rng.integers(3)),
        "always left": lambda obs, t: 0,
        "always stay": lambda obs, t: 1,
        "always right": lambda obs, t: 2,
        "fixed sequence": lambda obs, t: (0, 2, 2, 1)[t % 4],
    }
    episodes = 4000
    stderr = np.sqrt(1 - RANDOM_RETURN**2) / np.sqrt(episodes)  # returns are +-1: var = 1 - mean^2
    for name, policy in blind_policies.items():
        mean = play(env, policy, episodes, seed=1).mean()
        assert abs(mean - RANDOM_RETURN) < 4 * stderr, (name, mean)
        # far below the learning test's bar, random + 60% of (optimal - random) = 0.3
        assert mean < RANDOM_RETURN + 0.1 * (OPTIMAL_RETURN - RANDOM_RETURN), (name, mean)


def test_catch_reward_only_at_the_end():
    env = Catch()
    env.reset(seed=0)
    rewards, terminations = [], []
    for _ in range(EPISODE_LENGTH):
        _, reward, terminated, truncated, _ = env.step(1)
        rewards.append(reward)
        terminations.append(terminated)
        assert not truncated
    assert rewards[:-1] == [0.0] * (EPISODE_LENGTH - 1) and rewards[-1] in (-1.0, 1.0)
    assert terminations == [False] * (EPISODE_LENGTH - 1) + [True]
    with pytest.raises(ValueError, match="actions 0"):
        env.step(3)


def test_minigrid_frames_through_make_env():
    pytest.importorskip("minigrid")
    env = make_env("minigrid:MiniGrid-Empty-5x5-v0", 0, 0, False, "test")()
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and obs.std() > 0 and not info["life_loss"]
    assert isinstance(env.action_space, gym.spaces.Discrete)
    first = obs
    obs, *_ = env.step(2)  # forward: the agent moves, the frame changes
    assert obs.shape == (64, 64, 3) and not np.array_equal(obs, first)
    returns = []
    env.reset(seed=0)
    for _ in range(500):
        _, _, terminated, truncated, info = env.step(int(env.action_space.sample()))
        if terminated or truncated:
            returns.append(info["episode"]["r"])
            env.reset()
    assert returns, "MiniGrid's own time limit ends its episodes"


class VectorObs(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        return np.zeros(4, np.float32), {}


class ContinuousActions(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode


gym.register("drama-test/VectorObs-v0", entry_point=VectorObs)
gym.register("drama-test/ContinuousActions-v0", entry_point=ContinuousActions)


def test_non_image_or_non_discrete_envs_fail_in_one_line():
    with pytest.raises(UserError, match="needs images"):
        make_env("drama-test/VectorObs-v0", 0, 0, False, "test")()
    with pytest.raises(UserError, match="needs Discrete actions"):
        make_env("drama-test/ContinuousActions-v0", 0, 0, False, "test")()
    with pytest.raises(UserError, match="Unknown env id 'drama/Cach-v0'"):
        check_env_id("drama/Cach-v0")
    with pytest.raises(UserError, match="cannot import nosuchpackage"):
        check_env_id("nosuchpackage:Thing-v0")
    check_env_id("drama/Catch-v0")


def test_evaluate_skips_human_normalisation_outside_atari():
    from utils.evaluate import evaluate

    class Blind:
        def reset(self, num_envs):
            self.rng = np.random.default_rng(0)

        def act(self, obs, episode_start, greedy=False):
            return self.rng.integers(3, size=len(obs))

    results = evaluate(Blind(), "drama/Catch-v0", episodes=8, seed=0, num_envs=2)
    assert results["hns"] is None and len(results["returns"]) == 8
    assert set(results["returns"]) <= {-1.0, 1.0} and results["lengths"] == [EPISODE_LENGTH] * 8
