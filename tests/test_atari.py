"""Atari100k wrapper tests on real ALE games (Pong, Breakout); each checks one protocol rule."""

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from utils import UserError
from utils.atari import ATARI100K_GAMES, check_env_id, make_env

PONG, BREAKOUT = "ALE/Pong-v5", "ALE/Breakout-v5"
PONG_PLAYER_Y = 51  # RAM byte of the right (agent's) paddle's y position in Pong
PONG_UP, PONG_DOWN = 2, 3  # minimal-set indices of RIGHT / LEFT, which move Pong's paddle up / down


def _env(env_id: str, seed: int = 0, **kwargs) -> gym.Env:
    return make_env(env_id, seed, idx=0, capture_video=False, run_name="test", **kwargs)()


def _raw_env(env_id: str) -> gym.Env:
    return gym.make(env_id, frameskip=1, repeat_action_probability=0.0, max_num_frames_per_episode=108_000)


def _resize(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((64, 64), Image.Resampling.BOX))


@pytest.mark.parametrize("env_id, n_actions", [(PONG, 6), (BREAKOUT, 4)])
def test_spaces_and_obs(env_id, n_actions):
    env = _env(env_id)
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert env.action_space == gym.spaces.Discrete(n_actions)  # minimal action set
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and obs in env.observation_space
    assert info["life_loss"] is False and "lives" in info
    for _ in range(10):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        assert isinstance(reward, float) and not terminated and not truncated
    assert obs.std() > 0  # a real picture, not a blank frame


def test_max_pool_and_reward_sum_match_raw_env():
    """Replay the same actions frame by frame on a raw env: obs = resize(max(last 2 frames)), reward = sum of 4."""
    env, raw = _env(PONG), _raw_env(PONG)
    obs, _ = env.reset(seed=3)
    frame, _ = raw.reset(seed=3)
    assert np.array_equal(obs, _resize(frame))
    rng = np.random.default_rng(0)
    pool_mattered, early_rewards, n_rewards = 0, 0, 0
    for _ in range(300):
        action = int(rng.integers(6))
        obs, reward, terminated, truncated, _ = env.step(action)
        frames, raw_reward = [frame], 0.0
        for k in range(4):
            frame, r, *_ = raw.step(action)
            frames.append(frame)
            raw_reward += r
            early_rewards += r != 0 and k < 3
        assert np.array_equal(obs, _resize(np.maximum(frames[-2], frames[-1])))
        assert reward == raw_reward
        pool_mattered += not np.array_equal(obs, _resize(frames[-1]))
        n_rewards += raw_reward != 0
        assert not (terminated or truncated)
    assert pool_mattered > 0  # the max-pool changes the picture, so the check above is not vacuous
    assert n_rewards >= 3 and early_rewards > 0  # points were scored, some not on a repeat's last frame


def test_life_loss_does_not_end_episode():
    env = _env(BREAKOUT)
    _, info = env.reset(seed=0)
    lives, losses, steps_after_first_loss = info["lives"], 0, 0
    assert lives == 5 and info["life_loss"] is False
    rng = np.random.default_rng(0)
    for _ in range(5000):
        _, _, terminated, truncated, info = env.step(int(rng.integers(4)))
        assert info["life_loss"] == (info["lives"] < lives)
        steps_after_first_loss += losses > 0
        if info["life_loss"]:
            losses += 1
            assert terminated == (info["lives"] == 0)  # only the last life ends the episode
        lives = info["lives"]
        assert not truncated
        if terminated:
            break
    assert terminated and lives == 0 and losses == 5
    assert steps_after_first_loss > 10  # the game went on after the first lost life


def _hold(action: int, steps: int = 20) -> tuple[np.ndarray, int]:
    env = _env(PONG)
    obs, _ = env.reset(seed=0)
    for _ in range(steps):
        obs, *_ = env.step(action)
    return obs, int(env.unwrapped.ale.getRAM()[PONG_PLAYER_Y])


def test_pong_actions_move_the_paddle():
    """ale-py 0.10.0-0.10.1 ignored discrete actions (ALE #594): UP and DOWN must move the paddle apart."""
    obs_up, y_up = _hold(PONG_UP)
    obs_down, y_down = _hold(PONG_DOWN)
    assert y_up + 50 < y_down  # RAM y grows downward
    paddle = slice(54, 60)  # the right paddle's columns at 64x64 (x ~ 140-143 of 160)
    assert np.abs(obs_up[:, paddle].astype(int) - obs_down[:, paddle].astype(int)).sum() > 1000
    assert np.array_equal(obs_up[:, :48], obs_down[:, :48])  # the CPU half of the court does not depend on it


def test_episode_statistics_count_every_reward():
    """A Pong game ends on a point, so the last step's reward is non-zero (STORM #16 dropped it)."""
    env = _env(PONG)
    env.reset(seed=0)
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        total += reward
        steps += 1
        if terminated or truncated:
            break
        assert "episode" not in info
    assert terminated and reward != 0
    assert info["episode"]["r"] == total and info["episode"]["l"] == steps


def test_frame_limit_truncates_in_agent_steps():
    env = _env(PONG, max_episode_frames=400)
    env.reset(seed=0)
    for step in range(1, 101):
        _, _, terminated, truncated, info = env.step(0)
        assert not terminated and truncated == (step == 100)
    assert info["episode"]["l"] == 100 and info["episode_frame_number"] == 400


def test_frame_limit_inside_a_repeat():
    """406 frames: step 102 stops after 2 raw frames; its obs pools those last two emulated frames."""
    env, raw = _env(PONG, max_episode_frames=406), _raw_env(PONG)
    env.reset(seed=0)
    raw.reset(seed=0)
    frames = [raw.step(0)[0] for _ in range(406)]
    for step in range(1, 103):
        obs, _, terminated, truncated, info = env.step(0)
        assert not terminated and truncated == (step == 102)
    assert info["episode_frame_number"] == 406 and info["episode"]["l"] == 102
    assert not np.array_equal(frames[-2], frames[-1])  # the ball moved, so the pooling is visible
    assert np.array_equal(obs, _resize(np.maximum(frames[-2], frames[-1])))


def test_vector_env_statistics_not_double_counted():
    """SAME_STEP autoreset with life losses, game overs and truncations mixed (CleanRL #454)."""
    envs = gym.vector.SyncVectorEnv(
        [
            make_env(BREAKOUT, 0, 0, False, "test"),
            make_env(BREAKOUT, 1, 1, False, "test", max_episode_frames=400),
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    envs.reset(seed=0)
    envs.action_space.seed(0)
    returns, lengths = np.zeros(2), np.zeros(2, int)
    reports, dones, kinds = 0, 0, {"life_loss": 0, "terminated": 0, "truncated": 0}
    for _ in range(400):
        _, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        returns += rewards
        lengths += 1
        done = terminated | truncated
        final = infos.get("final_info", {})
        reported = final.get("_episode", np.zeros(2, bool))
        assert "episode" not in infos  # only the done env's final info carries statistics
        assert np.array_equal(reported, done)
        for i in np.flatnonzero(done):
            assert final["episode"]["r"][i] == returns[i] and final["episode"]["l"][i] == lengths[i]
            returns[i], lengths[i] = 0.0, 0
        reports += reported.sum()
        dones += done.sum()
        kinds["life_loss"] += (infos["life_loss"] & ~done).sum()
        kinds["terminated"] += terminated.sum()
        kinds["truncated"] += truncated.sum()
    assert reports == dones
    assert all(n > 0 for n in kinds.values()), kinds  # the three cases really mixed


def test_seeding_and_sticky_flag():
    a, b = _env(PONG, seed=5), _env(PONG, seed=5)
    actions_a = [a.action_space.sample() for _ in range(30)]
    assert actions_a == [b.action_space.sample() for _ in range(30)]  # make_env seeds the action space
    obs_a, _ = a.reset(seed=5)
    obs_b, _ = b.reset(seed=5)
    for action in actions_a:
        obs_a, *_ = a.step(action)
        obs_b, *_ = b.step(action)
    assert np.array_equal(obs_a, obs_b)
    assert a.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    assert _env(PONG, sticky_actions=True).unwrapped.ale.getFloat("repeat_action_probability") == 0.25


def test_capture_video_writes_full_resolution_mp4(tmp_path):
    env = make_env(PONG, 0, 0, True, "test", max_episode_frames=80, video_dir=str(tmp_path / "videos"))()
    env.reset(seed=0)
    assert env.render().shape == (210, 160, 3)
    while not any(env.step(0)[2:4]):
        pass
    env.close()
    assert list((tmp_path / "videos").glob("*.mp4"))
    assert make_env(PONG, 0, 1, True, "test")().render_mode is None  # only env 0 records


def test_check_env_id():
    with pytest.raises(UserError) as err:
        check_env_id("ALE/Krul-v5")
    message = str(err.value)
    assert "\n" not in message and "'ALE/Krull-v5'" in message and "gym.registry" in message
    with pytest.raises(UserError, match="ALE/Pong-v5"):
        check_env_id("PongNoFrameskip-v4")
    with pytest.raises(UserError):
        make_env("ALE/Krul-v5", 0, 0, False, "test")
    check_env_id(PONG)
    assert len(ATARI100K_GAMES) == 26
    for game in ATARI100K_GAMES:
        check_env_id(f"ALE/{game}-v5")
