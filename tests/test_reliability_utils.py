"""Nothing a user feeds the utils (results, agents, pipes) ends in a traceback or in silently wrong numbers
(test_reliability.py: the scripts).

- `python -m utils.evaluate aggregate` leaves results it cannot human-normalise (drama/Catch-v0, MiniGrid, an
  ALE game outside Atari100k) out of the aggregate with one warning line each, and draws a readable plot;
- `load_agent` and `evaluate` check the agent's actions against the env before playing, and `load_agent`
  checks args.json and agent.safetensors before building or filling a model;
- the CLIs stop quietly when the reader of their output goes away (`| head -1`).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_AGENT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import drama_xs
from utils import SIGPIPE_EXIT_CODE, UserError, quiet_broken_pipe
from utils import evaluate as ev
from utils.checkpoint import save_agent
from utils.files import CHECKSUM, tensor_checksum
from utils.hub import load_agent

ROOT = Path(__file__).resolve().parent.parent
GAMES = ("Pong", "Krull", "Breakout", "Boxing", "Freeway", "MsPacman")
EXPS = {"drama_xs": 0.6, "drama_uniform_sampling": 0.2, "drama_mamba1": -0.4}  # mean HNS of each exp
NON_ATARI100K = ("drama/Catch-v0", "minigrid:MiniGrid-Empty-5x5-v0", "ALE/Tetris-v5")


def child_env(**changes) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **changes}
    return {k: v for k, v in env.items() if v is not None}


def result(env_id: str, mean: float) -> dict:
    return {
        "env_id": env_id,
        "episodes": 3,
        "returns": [mean] * 3,
        "lengths": [100] * 3,
        "mean": mean,
        "protocol": {"episodes": 3},
    }


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """3 exp_names x 6 games x 3 seeds of results (some HNS negative), plus results of non-Atari100k envs.

    Returns (folder, {exp: {game: [HNS per seed]}}) of the Atari100k results."""
    runs = tmp_path_factory.mktemp("results") / "runs"
    rng = np.random.default_rng(0)
    table = ev.load_table1()
    hns = {}
    for exp, level in EXPS.items():
        for game in GAMES:
            for seed in range(3):
                h = level + rng.normal(0, 0.4)
                random, human = table[game]["random"], table[game]["human"]
                path = runs / f"ALE/{game}-v5__{exp}__{seed}" / "eval_results.json"
                ev.save_results(result(f"ALE/{game}-v5", random + h * (human - random)), path, exp, seed)
                hns.setdefault(exp, {}).setdefault(game, []).append(h)
    for k, env_id in enumerate(NON_ATARI100K):
        path = runs / f"{env_id.replace(':', '_')}__drama_xs__1" / "eval_results.json"
        ev.save_results(result(env_id, 0.25 * k), path, "drama_xs", 1)
    return runs, hns


def run_module(*args, stdout=subprocess.PIPE, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env or child_env(),
        timeout=300,
    )


# --------------------------------------------------------------------------------------------------
# Item 9: aggregate over results that are not all Atari100k games
# --------------------------------------------------------------------------------------------------
def test_aggregate_leaves_out_non_atari100k_results_with_one_warning_each(results_dir, tmp_path):
    runs, hns = results_dir
    proc = run_module("utils.evaluate", "aggregate", runs, "--out", tmp_path, "--reps", 200)
    assert proc.returncode == 0, proc.stderr
    warning_lines = proc.stderr.splitlines()
    assert len(warning_lines) == len(NON_ATARI100K) and "Traceback" not in proc.stderr
    for env_id in NON_ATARI100K:
        (line,) = [w for w in warning_lines if env_id in w]
        assert line.startswith("warning: ") and "left out of the human-normalised aggregate" in line
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:4]}
    assert {name: row[1:3] for name, row in rows.items()} == {exp: ["6", "18"] for exp in EXPS}
    # the aggregate is that of the Atari100k results alone
    with open(tmp_path / "aggregate.csv") as f:
        table = {row["exp_name"]: row for row in csv.DictReader(f)}
    for exp in EXPS:
        by_game = {game: hns[exp][game] for game in sorted(GAMES)}  # the order the files are read in
        expected = ev.aggregate(by_game, reps=200, seed=0)
        for metric in ev.METRICS:
            assert float(table[exp][metric]) == pytest.approx(expected[metric]["estimate"])
            assert float(table[exp][f"{metric}_low"]) == pytest.approx(expected[metric]["low"])
    # the skipped envs keep their raw scores in per_game.csv, without a human-normalised one
    with open(tmp_path / "per_game.csv") as f:
        per_game = {(row["exp_name"], row["game"]): row for row in csv.DictReader(f)}
    assert len(per_game) == len(EXPS) * len(GAMES) + len(NON_ATARI100K)
    for k, env_id in enumerate(NON_ATARI100K):
        row = per_game[("drama_xs", env_id)]
        assert float(row["mean_score"]) == 0.25 * k and row["mean_hns"] == ""
    assert float(per_game[("drama_mamba1", "Pong")]["mean_hns"]) == pytest.approx(np.mean(hns["drama_mamba1"]["Pong"]))


def test_aggregate_of_no_atari100k_result_is_one_line(tmp_path):
    path = ev.save_results(result("drama/Catch-v0", 0.5), tmp_path / "catch" / "eval_results.json", "drama_xs", 1)
    proc = run_module("utils.evaluate", "aggregate", path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: drama/Catch-v0")
    assert lines[1].startswith("error: none of the 1 results") and "is an Atari100k game" in lines[1]
    assert not (tmp_path / "out" / "aggregate.csv").exists()


def _inside(box, frame, slack=1.0) -> bool:
    return (
        box.x0 >= frame.x0 - slack
        and box.y0 >= frame.y0 - slack
        and box.x1 <= frame.x1 + slack
        and (box.y1 <= frame.y1 + slack)
    )


def test_aggregate_plot_is_readable(results_dir):
    groups = ev.group_scores(ev.split_normalisable(ev.load_results([str(results_dir[0])]))[0])
    table = {name: ev.aggregate(scores, reps=100) for name, scores in groups.items()}
    fig = ev.aggregate_figure(groups, table, reps=100, seed=0)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] + [ax.title for ax in fig.axes]
    texts += [t for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    for ax in fig.axes:  # the tick labels drawn: those within the axis limits
        low, high = sorted(ax.get_xlim())
        labels = [t for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]
        bottom, top = sorted(ax.get_ylim())
        texts += labels + [t for t in ax.get_yticklabels() if t.get_text() and bottom <= t.get_position()[1] <= top]
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        for left, right in zip(boxes, boxes[1:], strict=False):
            assert left.x1 <= right.x0, f"overlapping tick labels in {ax.get_title()!r}"
    for text in texts:
        assert _inside(text.get_window_extent(renderer), fig.bbox), f"{text.get_text()!r} is cut off"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_performance_profile_falls_from_one_to_zero_for_negative_scores():
    groups = {"a": {"Pong": [-0.9, -0.5, -0.4], "Krull": [-0.3, -0.2, -0.6]}, "b": {"Pong": [-0.1, 0.3, 0.2]}}
    taus = ev.profile_taus(groups)
    assert taus[0] < -0.9 and taus[-1] >= 1.0  # below every score, and at least up to the human score
    for scores in groups.values():
        fraction, low, high = ev.performance_profile(scores, taus, reps=50)
        assert fraction[0] == low[0] == high[0] == 1.0 and fraction[-1] == 0.0
        assert (np.diff(fraction) <= 0).all() and len(np.unique(fraction)) > 2  # not flat


# --------------------------------------------------------------------------------------------------
# Item 8: the agent's actions against the env, args.json and agent.safetensors before playing
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pong_run(tmp_path_factory):
    """A tiny untrained Pong agent saved by utils.checkpoint.save_agent."""
    torch.manual_seed(0)
    args = drama_xs.Args(env_id="ALE/Pong-v5", **TINY_AGENT)
    run_dir = tmp_path_factory.mktemp("pong") / "runs" / "ALE" / "Pong-v5__drama_xs__1__0"
    save_agent(drama_xs.Agent(args, 6), args, str(run_dir), "drama_xs")
    return run_dir


@pytest.fixture(scope="module")
def pong_agent(pong_run):
    return load_agent(str(pong_run))


def copy_with_args(run_dir: Path, dst: Path, text: str | None = None, **changes) -> Path:
    """A copy of a saved run whose args.json has `changes` (or is `text`)."""
    shutil.copytree(run_dir, dst)
    config = json.loads((dst / "args.json").read_text())
    (dst / "args.json").write_text(text if text is not None else json.dumps({**config, **changes}))
    return dst


class Spy:
    """Counts the agent's calls: a refused agent must not have been reset or asked to act."""

    def __init__(self, agent):
        self.agent, self.calls = agent, 0
        self.action_dim, self.args = agent.action_dim, agent.args

    def reset(self, num_envs):
        self.calls += 1
        self.agent.reset(num_envs)

    def act(self, obs, episode_start, greedy):
        self.calls += 1
        return self.agent.act(obs, episode_start, greedy)


@pytest.mark.parametrize("env_id, env_actions", [("ALE/Breakout-v5", 4), ("ALE/Boxing-v5", 18), ("drama/Catch-v0", 3)])
def test_evaluate_refuses_another_action_count(pong_agent, env_id, env_actions):
    spy = Spy(pong_agent)
    with pytest.raises(UserError) as error:
        ev.evaluate(spy, env_id, episodes=1)
    assert str(error.value) == (
        f"{env_id} has {env_actions} actions but the agent was trained with 6 (on ALE/Pong-v5): "
        "play it on a game with 6 actions"
    )
    assert spy.calls == 0


def test_evaluate_refuses_a_game_whose_actions_mean_other_things(pong_agent):
    spy = Spy(pong_agent)
    with pytest.raises(UserError, match=r"whose action 2 is RIGHT, but in ALE/Qbert-v5 action 2 is UP") as error:
        ev.evaluate(spy, "ALE/Qbert-v5", episodes=1)  # 6 actions, as Pong
    assert "\n" not in str(error.value) and spy.calls == 0


def test_evaluate_warns_on_a_game_with_the_same_actions(pong_agent):
    with pytest.warns(UserWarning, match=r"trained on ALE/Pong-v5, not ALE/SpaceInvaders-v5 .*same meanings"):
        res = ev.evaluate(pong_agent, "ALE/SpaceInvaders-v5", episodes=1, max_episode_frames=40)
    assert len(res["returns"]) == 1 and res["lengths"] == [10]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own game: no warning
        ev.evaluate(pong_agent, "ALE/Pong-v5", episodes=1, max_episode_frames=8)


def test_load_agent_checks_the_env_actions(pong_run):
    with pytest.raises(UserError, match=r"ALE/Qbert-v5 action 2 is UP: its actions would do other things"):
        load_agent(str(pong_run), env_id="ALE/Qbert-v5")
    with pytest.raises(UserError, match=r"^ALE/Boxing-v5 has 18 actions but the agent was trained with 6 "):
        load_agent(str(pong_run), env_id="ALE/Boxing-v5")
    assert load_agent(str(pong_run), env_id="ALE/Pong-v5").action_dim == 6


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", "big", "'d_model' is \"big\", but Args.d_model needs an integer"),
        ("encoder_filters", 16, "'encoder_filters' is 16, but Args.encoder_filters needs a list of integers"),
        ("encoder_filters", [4, "8", 8, 8, 8], "Args.encoder_filters needs a list of integers"),
        ("gamma", float("nan"), "'gamma' is NaN, but Args.gamma needs a finite number"),
        ("sticky_actions", "no", "Args.sticky_actions needs true or false"),
        ("device", "tpu", 'Args.device needs one of "auto", "cpu", "cuda"'),
        ("wandb_entity", 3, "Args.wandb_entity needs a string or null"),
        ("action_dim", "big", "'action_dim' is \"big\", not a positive integer"),
        ("d_model", 0, "does not describe a valid drama_xs run: --d-model must be positive, got 0"),
        ("headdim", 48, "does not describe a valid drama_xs run: --headdim 48 must be positive and divide"),
    ],
)
def test_load_agent_validates_args_json(pong_run, tmp_path, field, value, message):
    run_dir = copy_with_args(pong_run, tmp_path / "run", **{field: value})
    with pytest.raises(UserError) as error:
        load_agent(str(run_dir))
    assert str(error.value).startswith(str(run_dir / "args.json")) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_load_agent_refuses_args_json_that_is_not_an_object(pong_run, tmp_path):
    run_dir = copy_with_args(pong_run, tmp_path / "run", text="[1, 2]")
    with pytest.raises(UserError, match=r"args.json holds a JSON list, not an object"):
        load_agent(str(run_dir))


def _damage(data: bytes, how: str) -> bytes:
    header = int.from_bytes(data[:8], "little")
    if how == "empty":
        return b""
    if how == "header length":
        return (10**12).to_bytes(8, "little") + data[8:]
    if how == "header bytes":
        return data[:8] + b"\xff" * 16 + data[24:]
    if how == "data cut":
        return data[: 8 + header + 100]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["empty", "header length", "header bytes", "data cut"])
def test_load_agent_damaged_weights_are_one_line(pong_run, tmp_path, how):
    run_dir = Path(shutil.copytree(pong_run, tmp_path / "run"))
    path = run_dir / "agent.safetensors"
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(UserError) as error:
        load_agent(str(run_dir))
    assert str(error.value) == f"{path} is corrupted or truncated: re-download or re-save it"


def test_load_agent_refuses_non_finite_weights(pong_run, tmp_path):
    run_dir = Path(shutil.copytree(pong_run, tmp_path / "run"))
    path = run_dir / "agent.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    key = "world_model.dynamics.blocks.1.mixer.in_proj.weight"
    state[key][3, 5] = float("nan")
    save_file(state, str(path), metadata={**metadata, CHECKSUM: tensor_checksum(state)})  # as a diverged run saves it
    with pytest.raises(UserError, match=rf"{path} holds NaN or inf in {key}: the training diverged") as error:
        load_agent(str(run_dir))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# Item 8: `| head -1` (a reader that goes away) ends the utils' CLIs quietly
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unbuffered", ["1", None], ids=["unbuffered", "buffered"])
def test_help_through_head_has_no_traceback(unbuffered):
    for module in ("utils.evaluate", "utils.hub", "utils.enjoy", "utils.sweep"):
        proc = subprocess.run(
            ["bash", "-c", f"{sys.executable} -m {module} --help | head -1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=child_env(PYTHONUNBUFFERED=unbuffered),
            timeout=120,
        )
        assert proc.stdout.startswith(f"usage: python -m {module}") and proc.stdout.count("\n") == 1
        assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("unbuffered", ["1", None], ids=["unbuffered", "buffered"])
def test_aggregate_into_a_closed_pipe_is_quiet_and_writes_its_files(results_dir, tmp_path, unbuffered):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        env = child_env(PYTHONUNBUFFERED=unbuffered)
        args = ("utils.evaluate", "aggregate", results_dir[0], "--out", tmp_path, "--reps", 50)
        proc = run_module(*args, stdout=write_end, env=env)
    finally:
        os.close(write_end)
    assert proc.returncode == SIGPIPE_EXIT_CODE
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert all(line.startswith("warning: ") for line in proc.stderr.splitlines())
    assert {p.name for p in tmp_path.iterdir()} == {"aggregate.csv", "per_game.csv", "aggregate.png"}


def test_aggregate_through_head(results_dir, tmp_path):
    proc = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m utils.evaluate aggregate {results_dir[0]} --out {tmp_path} | head -1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=300,
    )
    assert proc.stdout.startswith("exp_name") and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_quiet_broken_pipe_keeps_other_broken_pipes_and_results():
    assert quiet_broken_pipe(lambda: 7) == 7

    def other_pipe():
        raise BrokenPipeError("a subprocess's pipe, not stdout")

    with pytest.raises(BrokenPipeError, match="a subprocess's pipe"):
        quiet_broken_pipe(other_pipe)
