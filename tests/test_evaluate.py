"""Tests for utils/evaluate.py: human-normalised scores, the episode protocol of `evaluate`, the
rliable-style aggregate metrics with a stratified bootstrap, and the `aggregate` CLI."""

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from utils import UserError
from utils import evaluate as ev

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Human-normalised score
# --------------------------------------------------------------------------------------------------
def test_table1_matches_the_paper():
    table = ev.load_table1()
    assert len(table) == 26
    assert table["Krull"]["random"] == 1598 and table["Krull"]["human"] == 2666
    assert table["Pong"]["drama"] == 15 and table["Seaquest"]["human"] == 42055
    table["Krull"]["random"] = 0  # callers get a copy
    assert ev.load_table1()["Krull"]["random"] == 1598


def test_human_normalized_score_known_values():
    assert ev.human_normalized_score("Krull", 2666) == pytest.approx(1.0)
    assert ev.human_normalized_score("ALE/Krull-v5", 1598) == pytest.approx(0.0)
    assert ev.human_normalized_score("ALE/Krull-v5", 2132) == pytest.approx(0.5)
    assert ev.human_normalized_score("ALE/Pong-v5", -21) == pytest.approx(0.0)
    assert ev.human_normalized_score("PongNoFrameskip-v4", 15) == pytest.approx(1.0)
    assert ev.human_normalized_score("ALE/Breakout-v5", 30 + 28) == pytest.approx(2.0)


def test_unknown_game_is_a_one_line_user_error():
    with pytest.raises(UserError) as e:
        ev.human_normalized_score("ALE/Tetris-v5", 10.0)
    assert "\n" not in str(e.value) and "Tetris" in str(e.value)


# --------------------------------------------------------------------------------------------------
# Aggregate metrics and the stratified bootstrap
# --------------------------------------------------------------------------------------------------
def test_trim_mean_follows_scipy_definition():
    # scipy.stats.trim_mean cuts int(0.25 * n) values from each end
    assert ev.trim_mean(np.arange(1, 11), 0.25) == pytest.approx(5.5)  # n=10: cut 2, mean(3..8)
    assert ev.trim_mean([0, 0, 1, 5, 100, 7], 0.25) == pytest.approx((1 + 5 + 7 + 0) / 4)  # n=6: cut 1
    assert ev.trim_mean([3, 1, 2], 0.25) == pytest.approx(2.0)  # n=3: cut 0, plain mean


def test_aggregate_point_estimates_hand_computed():
    scores = {"a": [0.0, 10.0, 1.0, 2.0], "b": [3.0, 4.0, 100.0, 5.0]}
    out = ev.aggregate(scores, reps=200)
    assert out["games"] == 2 and out["runs"] == 8
    # pooled sorted [0, 1, 2, 3, 4, 5, 10, 100]: cut 2 each end -> mean(2, 3, 4, 5)
    assert out["iqm"]["estimate"] == pytest.approx(3.5)
    assert out["mean"]["estimate"] == pytest.approx((13 / 4 + 112 / 4) / 2)  # mean of per-game means
    assert out["median"]["estimate"] == pytest.approx((13 / 4 + 112 / 4) / 2)
    assert out["optimality_gap"]["estimate"] == pytest.approx(1 / 8)  # only the 0.0 run is below 1
    three = ev.aggregate({"a": [1.0], "b": [2.0], "c": [9.0]}, reps=50)
    assert three["median"]["estimate"] == 2.0 and three["mean"]["estimate"] == 4.0


def _random_scores(rng, games=10, seeds=5):
    return {f"g{k}": list(rng.normal(loc=k / 5, scale=0.5, size=seeds)) for k in range(games)}


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_seeds():
    rng = np.random.default_rng(1)
    few, many = _random_scores(rng, seeds=3), _random_scores(rng, seeds=60)
    width = {}
    for name, scores in (("few", few), ("many", many)):
        out = ev.aggregate(scores, reps=1000, seed=0)
        for m in ev.METRICS:
            assert out[m]["low"] <= out[m]["estimate"] <= out[m]["high"], (name, m, out[m])
        width[name] = {m: out[m]["high"] - out[m]["low"] for m in ev.METRICS}
    for m in ev.METRICS:  # 20x the seeds: about sqrt(20) ~ 4.5x narrower for the mean
        assert width["many"][m] < 0.75 * width["few"][m], (m, width)
    assert width["many"]["mean"] < 0.5 * width["few"]["mean"], width


def test_bootstrap_resamples_within_each_game():
    scores = {"a": [0.0, 1.0, 2.0], "b": [10.0, 11.0, 12.0, 13.0, 14.0], "c": [-5.0]}
    samples = ev.stratified_bootstrap(scores, reps=300, seed=3)
    for s, (game, runs) in zip(samples, scores.items(), strict=True):
        assert s.shape == (300, len(runs))
        assert set(np.unique(s)) <= set(runs), game  # only this game's own runs
    assert len(np.unique(samples[1])) == 5  # and all of them get drawn
    # Constant within each game but different across games: a stratified resample always holds 3 zeros
    # and 5 ones, so every metric has a zero-width interval. Resampling the 8 pooled runs would not.
    out = ev.aggregate({"a": [0.0] * 3, "b": [1.0] * 5}, reps=500, seed=0)
    for m in ev.METRICS:
        assert out[m]["low"] == pytest.approx(out[m]["estimate"]) == pytest.approx(out[m]["high"]), m
    pooled = np.array([0.0] * 3 + [1.0] * 5)[np.random.default_rng(0).integers(0, 8, size=(500, 8))]
    assert pooled.mean(axis=1).std() > 0.1


def test_bootstrap_is_reproducible_for_a_fixed_seed():
    scores = _random_scores(np.random.default_rng(0))
    assert ev.aggregate(scores, reps=300, seed=7) == ev.aggregate(scores, reps=300, seed=7)
    assert ev.aggregate(scores, reps=300, seed=7) != ev.aggregate(scores, reps=300, seed=8)


def test_performance_profile_counts_runs_above_tau():
    scores = {"a": [0.0, 0.5], "b": [1.5, 2.5]}
    fraction, low, high = ev.performance_profile(scores, [-1.0, 0.25, 1.0, 2.0, 3.0], reps=200)
    np.testing.assert_allclose(fraction, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert np.all(low <= fraction + 1e-12) and np.all(fraction <= high + 1e-12)


def test_aggregate_rejects_empty_input():
    with pytest.raises(UserError):
        ev.aggregate({})
    with pytest.raises(UserError):
        ev.aggregate({"a": []})


# --------------------------------------------------------------------------------------------------
# evaluate(): episode bookkeeping
# --------------------------------------------------------------------------------------------------
class RandomAgent:
    """The agent interface evaluate() expects; records every call."""

    def __init__(self, num_actions: int, seed: int = 0):
        self.num_actions, self.rng = num_actions, np.random.default_rng(seed)
        self.resets, self.obs, self.starts, self.greedy = [], [], [], []

    def reset(self, num_envs):
        self.resets.append(num_envs)

    def act(self, obs, episode_start, greedy):
        assert obs.dtype == np.uint8 and obs.shape[1:] == (64, 64, 3) and episode_start.dtype == bool
        self.obs.append(obs.copy())
        self.starts.append(episode_start.copy())
        self.greedy.append(greedy)
        return self.rng.integers(0, self.num_actions, size=len(obs))


class Recorder(gym.Wrapper):
    """Outside make_env's RecordEpisodeStatistics: logs reset observations and each episode's statistics."""

    def __init__(self, env, log):
        super().__init__(env)
        self.log = log  # {"reset_obs": [...], "episodes": [(stats_r, stats_l, own_return, own_length)]}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.log["reset_obs"].append(obs.copy())
        self.ret, self.len = 0.0, 0
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.ret, self.len = self.ret + reward, self.len + 1
        if terminated or truncated:
            stats = info["episode"]
            self.log["episodes"].append((float(stats["r"]), int(stats["l"]), self.ret, self.len))
        return obs, reward, terminated, truncated, info


def _recording_make_env(monkeypatch, logs):
    real_make_env = ev.make_env

    def make_env(env_id, seed, idx, *args, **kwargs):
        thunk = real_make_env(env_id, seed, idx, *args, **kwargs)
        logs[idx] = {"reset_obs": [], "episodes": []}
        return lambda: Recorder(thunk(), logs[idx])

    monkeypatch.setattr(ev, "make_env", make_env)


def test_evaluate_on_real_ale_game(monkeypatch):
    # Breakout with random actions ends in ~100-300 agent steps; a 600-frame (150-step) limit mixes
    # terminated and truncated episodes of different lengths.
    logs = {}
    _recording_make_env(monkeypatch, logs)
    agent = RandomAgent(num_actions=4)
    res = ev.evaluate(agent, "ALE/Breakout-v5", episodes=7, seed=5, num_envs=3, max_episode_frames=600)

    quotas = [3, 2, 2]
    assert res["episodes"] == 7 and len(res["returns"]) == len(res["lengths"]) == 7
    assert agent.resets == [3] and agent.greedy == [False] * len(agent.starts)
    # returns/lengths are RecordEpisodeStatistics' values of each env's first `quota` episodes,
    # and RecordEpisodeStatistics counted every reward and every step
    expected = []
    for i in range(3):
        episodes = logs[i]["episodes"]
        assert len(episodes) >= quotas[i]
        for r, length, own_r, own_len in episodes:
            assert r == pytest.approx(own_r) and length == own_len
        expected += [(r, length) for r, length, _, _ in episodes[: quotas[i]]]
    assert sorted(zip(res["returns"], res["lengths"], strict=True)) == sorted(expected)
    assert {length for _, length in expected} != {150}, "want some terminated (shorter) episodes"
    assert 150 in {length for _, length in expected}, "want some truncated episodes"
    # the loop stops as soon as the last quota is filled
    assert len(agent.starts) == max(sum(e[3] for e in logs[i]["episodes"][: quotas[i]]) for i in range(3))
    # episode_start[i] is True exactly at the first obs and at the obs after env i's episode ended,
    # and that obs is the new episode's reset observation
    starts = np.stack(agent.starts)  # (calls, envs)
    for i in range(3):
        boundaries = np.cumsum([0] + [e[3] for e in logs[i]["episodes"]])
        boundaries = boundaries[boundaries < len(starts)]
        np.testing.assert_array_equal(np.flatnonzero(starts[:, i]), boundaries)
        for k, t in enumerate(boundaries):
            np.testing.assert_array_equal(agent.obs[t][i], logs[i]["reset_obs"][k])
    assert res["mean"] == pytest.approx(np.mean(res["returns"]))
    assert res["hns"] == pytest.approx(ev.human_normalized_score("Breakout", res["mean"]))
    assert res["protocol"] == {
        "sticky_actions": False,
        "full_action_space": False,
        "frameskip": 4,
        "max_episode_frames": 600,
        "episodes": 7,
        "greedy": False,
        "eval_seed": 5,
        "num_envs": 3,
        "source_of_random_human_scores": "DRAMA paper Table 1",
    }


class FixedLengthEnv(gym.Env):
    """Episodes of `length` steps, reward `reward` per step: tells the envs' episodes apart."""

    observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, length, reward):
        self.length, self.reward = length, reward

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros((64, 64, 3), np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.full((64, 64, 3), self.t, np.uint8), self.reward, self.t >= self.length, False, {}


def test_evaluate_takes_a_fixed_quota_per_env(monkeypatch):
    # env 0 finishes an episode every step, env 1 every 20 steps: "the first 10 episodes to finish"
    # would all come from env 0; a fixed quota takes 5 from each.
    def make_env(env_id, seed, idx, *args, **kwargs):
        length = 1 if idx == 0 else 20
        return lambda: gym.wrappers.RecordEpisodeStatistics(FixedLengthEnv(length, reward=idx + 1.0))

    monkeypatch.setattr(ev, "make_env", make_env)
    agent = RandomAgent(num_actions=3)
    res = ev.evaluate(agent, "ALE/Pong-v5", episodes=10, num_envs=2, greedy=True)
    assert sorted(res["returns"]) == [1.0] * 5 + [40.0] * 5
    assert sorted(res["lengths"]) == [1] * 5 + [20] * 5
    assert len(agent.starts) == 100 and all(agent.greedy)
    assert np.stack(agent.starts)[:, 0].all()  # env 0 starts a new episode at every step
    # more envs than episodes: only as many envs as episodes are built
    res = ev.evaluate(RandomAgent(3), "ALE/Pong-v5", episodes=3, num_envs=8)
    assert len(res["returns"]) == 3 and res["protocol"]["num_envs"] == 3


def test_episode_quotas():
    np.testing.assert_array_equal(ev.episode_quotas(100, 8), [13, 13, 13, 13, 12, 12, 12, 12])
    np.testing.assert_array_equal(ev.episode_quotas(7, 3), [3, 2, 2])
    assert ev.episode_quotas(100, 7).sum() == 100


# --------------------------------------------------------------------------------------------------
# save_results and the aggregate CLI
# --------------------------------------------------------------------------------------------------
def _fake_results(env_id, mean):
    return {
        "env_id": env_id,
        "episodes": 3,
        "returns": [mean] * 3,
        "lengths": [100] * 3,
        "mean": mean,
        "protocol": {"sticky_actions": False, "episodes": 3},
    }


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "utils.evaluate", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def test_save_results_and_aggregate_cli(tmp_path):
    runs = tmp_path / "runs"
    raw = {"Pong": (-21, 15), "Krull": (1598, 2666), "Breakout": (2, 30)}
    for exp, level in (("drama_xs", 0.8), ("drama_s", 0.3)):
        for game, (random, human) in raw.items():
            for seed in range(3):
                score = random + (level + 0.1 * seed) * (human - random)
                path = runs / f"ALE/{game}-v5__{exp}__{seed}" / "eval_results.json"
                ev.save_results(_fake_results(f"ALE/{game}-v5", score), path, exp_name=exp, seed=seed)
    (runs / "args.json").write_text(json.dumps({"lr": 4e-5}))  # a non-result JSON in the tree is skipped
    saved = json.loads(next(runs.rglob("eval_results.json")).read_text())
    assert {"exp_name", "seed", "game", "protocol"} <= saved.keys()

    out = tmp_path / "out"
    proc = _cli("aggregate", runs, "--out", out, "--reps", 300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "exp_name" in lines[0] and "IQM" in lines[0]
    row = next(line for line in lines if line.startswith("drama_xs"))
    assert row.split()[1:3] == ["3", "9"]  # games, runs
    csv_rows = (out / "aggregate.csv").read_text().splitlines()
    assert csv_rows[0].startswith("exp_name,games,runs,mean,mean_low,mean_high")
    values = {r.split(",")[0]: r.split(",") for r in csv_rows[1:]}
    assert float(values["drama_xs"][3]) == pytest.approx(0.9)  # HNS 0.8, 0.9, 1.0 in every game
    assert float(values["drama_s"][3]) == pytest.approx(0.4)
    assert (out / "aggregate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "per_game.csv").read_text().splitlines()) == 1 + 2 * 3

    # the same files through a quoted glob
    proc = _cli("aggregate", f"{runs}/**/eval_results.json", "--out", out, "--reps", 50)
    assert proc.returncode == 0 and "drama_s " in proc.stdout


def test_aggregate_cli_errors_are_one_line(tmp_path):
    checks = []
    proc = _cli("aggregate", tmp_path / "nowhere", "--out", tmp_path / "out")
    checks.append((proc, "no evaluation results found"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    checks.append((_cli("aggregate", bad, "--out", tmp_path / "out"), "not valid JSON"))
    other = tmp_path / "args.json"
    other.write_text(json.dumps({"lr": 1}))
    checks.append((_cli("aggregate", other, "--out", tmp_path / "out"), "not an evaluation result"))
    for proc, message in checks:
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "aggregate.csv").exists()
    # a game outside Table 1 alone: a warning that it is left out, then the error that nothing is left
    tetris = tmp_path / "tetris.json"
    tetris.write_text(json.dumps(_fake_results("ALE/Tetris-v5", 3.0)))
    proc = _cli("aggregate", tetris, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    warning, error = proc.stderr.splitlines()
    assert warning.startswith("warning: ALE/Tetris-v5 is not one of the 26 Atari100k games")
    assert error.startswith("error: none of the 1 results")


def test_aggregate_seed_and_reps_set_the_bootstrap_and_out_defaults_to_aggregate(tmp_path, monkeypatch, capsys):
    """The same --seed gives the same intervals, another seed other ones; --reps 0 is refused; without --out the
    files go to ./aggregate."""
    for game, (score, spread) in {"Pong": (0.0, 9.0), "Krull": (2000.0, 500.0)}.items():
        for seed in range(4):
            results = _fake_results(f"ALE/{game}-v5", score + spread * seed)
            ev.save_results(results, tmp_path / "runs" / f"{game}{seed}.json", exp_name="drama_xs", seed=seed)
    monkeypatch.chdir(tmp_path)

    def intervals(*flags) -> str:
        assert ev.main(["aggregate", "runs", *flags]) == 0
        return (tmp_path / "aggregate" / "aggregate.csv").read_text()

    first = intervals("--seed", "1", "--reps", "200")
    assert intervals("--seed", "1", "--reps", "200") == first
    assert intervals("--seed", "2", "--reps", "200") != first
    capsys.readouterr()
    assert ev.main(["aggregate", "runs", "--reps", "0"]) == 2
    assert capsys.readouterr().err == "error: --reps must be >= 1, got 0\n"
