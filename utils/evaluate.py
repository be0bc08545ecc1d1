"""Evaluate a DRAMA agent on Atari100k and aggregate results over games and seeds.

Protocol (DRAMA paper, section 4 and Table 1; the usual Atari100k protocol):
- the final agent plays 100 full episodes; we report the mean episodic return (every reward is counted,
  no clipping) and the human-normalised score HNS = (score - random) / (human - random), with the
  random and human scores of the paper's Table 1 (shipped next to this file as atari100k_scores.csv);
- ALE v5 games, minimal action set, frameskip 4 with max-pool, no sticky actions, 108k-frame limit;
- across games and seeds we report mean, median, interquartile mean (IQM) and optimality gap of the
  HNS with stratified-bootstrap 95% confidence intervals, as rliable does (Agarwal et al. 2021, "Deep RL
  at the edge of the statistical precipice"). rliable itself pulls in arch/statsmodels/pandas/seaborn,
  so the ~60 lines it takes are written out here.

Usage:
    results = evaluate(agent, "ALE/Pong-v5")          # agent.reset(num_envs), agent.act(obs, starts, greedy)
    results.update(exp_name="drama_xs", seed=1)
    save_results(results, f"runs/{run_name}/eval_results.json")

    python -m utils.evaluate aggregate runs/ --out figures/
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import gymnasium as gym
import numpy as np

from utils import UserError, command_parser, game_of, run_cli
from utils.atari import is_atari, make_env

TABLE1_CSV = Path(__file__).with_name("atari100k_scores.csv")
METRICS = ("mean", "median", "iqm", "optimality_gap")
METRIC_TITLES = {"mean": "Mean", "median": "Median", "iqm": "IQM", "optimality_gap": "Optimality gap"}


# --------------------------------------------------------------------------------------------------
# Human-normalised score (paper Table 1)
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _table1() -> dict[str, dict[str, float]]:
    with open(TABLE1_CSV, newline="") as f:
        return {row.pop("game"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def load_table1() -> dict[str, dict[str, float]]:
    """The paper's Table 1: {game: {"random", "human", "ppo", ..., "drama"}} for the 26 Atari100k games."""
    return {game: dict(row) for game, row in _table1().items()}


def game_name(game_or_env_id: str) -> str:
    """Table 1's name of a game: "ALE/Krull-v5", "KrullNoFrameskip-v4", "krull" -> "Krull".

    A game outside the 26 Atari100k games raises a one-line UserError.
    """
    name = game_of(game_or_env_id)
    by_lower = {g.lower(): g for g in _table1()}
    if name.lower() not in by_lower:
        raise UserError(
            f"unknown game {game_or_env_id!r}: Table 1 has random/human scores only for the 26 Atari100k "
            f"games "
            f"({', '.join(_table1())})"
        )
    return by_lower[name.lower()]


def human_normalized_score(game_or_env_id: str, score: float) -> float:
    """(score - random) / (human - random) with the random and human scores of the paper's Table 1."""
    row = _table1()[game_name(game_or_env_id)]
    return (score - row["random"]) / (row["human"] - row["random"])


# --------------------------------------------------------------------------------------------------
# Evaluation episodes
# --------------------------------------------------------------------------------------------------
def episode_quotas(episodes: int, num_envs: int) -> np.ndarray:
    """Episodes each env must contribute: ceil(episodes / num_envs) for the first `episodes % num_envs`
    envs, floor for the rest. A fixed quota per env, with later episodes ignored, avoids the bias towards
    short episodes of "take the first `episodes` that finish"."""
    quotas = np.full(num_envs, episodes // num_envs, dtype=np.int64)
    quotas[: episodes % num_envs] += 1
    return quotas


def action_meanings(env: gym.Env) -> tuple[str, ...] | None:
    """What each action of an ALE env does (NOOP, FIRE, UP, ...), None for other envs."""
    get = getattr(env.unwrapped, "get_action_meanings", None)
    return tuple(get()) if get is not None else None


def trained_action_meanings(env_id: str) -> tuple[str, ...] | None:
    """The action meanings of the ALE game an agent was trained on (its minimal action set, as make_env plays it);
    None for other envs or an id this ALE does not know."""
    if not is_atari(env_id):
        return None
    try:
        env = gym.make(env_id, full_action_space=False)
    except Exception:  # an id from another ALE version: nothing to compare with
        return None
    try:
        return action_meanings(env)
    finally:
        env.close()


def check_agent_actions(env: gym.Env, env_id: str, action_dim: int | None, trained_on: str | None) -> None:
    """Refuse to play an agent whose actions would mean other things in `env` (built from `env_id`).

    action_dim: the agent's action count (None: not known, not checked); trained_on: the env id it was trained
    on (None: not known). Policy:
    - another action count: a one-line UserError naming both counts (ALE would fail inside with an IndexError,
      or, with more actions than the agent, silently play with only the first few);
    - the same count on another ALE game whose actions mean other things (Pong's action 2 is RIGHT, Qbert's UP):
      a UserError naming both meanings, as the scores would say nothing about the agent;
    - the same count on another game with the same action meanings (Pong and SpaceInvaders, any two 18-action
      games), or another non-ALE env: a warning only, since playing a game the agent never saw is a legitimate
      transfer experiment, but its scores do not measure the agent on its own game.
    """
    env_actions = int(env.action_space.n)
    trained = f" (on {trained_on})" if trained_on else ""
    if action_dim is not None and env_actions != action_dim:
        raise UserError(
            f"{env_id} has {env_actions} actions but the agent was trained with {action_dim}{trained}: "
            f"play it on a game with {action_dim} actions"
        )
    if not trained_on or game_of(trained_on).lower() == game_of(env_id).lower():
        return
    ours, theirs = action_meanings(env), trained_action_meanings(trained_on)
    if ours is not None and theirs is not None and ours != theirs:
        if len(ours) != len(theirs):  # an agent that does not say its action count
            raise UserError(
                f"{env_id} has {len(ours)} actions but the agent was trained on {trained_on}, which has "
                f"{len(theirs)}: play it on {trained_on}"
            )
        differ = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        raise UserError(
            f"the agent was trained on {trained_on}, whose action {differ} is {theirs[differ]}, but in {env_id} "
            f"action {differ} is {ours[differ]}: its actions would do other things; play it on {trained_on}"
        )
    same = "with the same meanings" if ours is not None and ours == theirs else "whose meanings may differ"
    warnings.warn(
        f"the agent was trained on {trained_on}, not {env_id} (same {env_actions} actions, {same}): "
        "the scores measure transfer to a game it never saw",
        stacklevel=1,  # one location: load_agent and evaluate on the same pair warn once
    )


def evaluate(
    agent,
    env_id: str,
    episodes: int = 100,
    seed: int = 0,
    num_envs: int = 8,
    greedy: bool = False,
    capture_video: bool = False,
    video_dir: str | None = None,
    sticky_actions: bool = False,
    max_episode_frames: int = 108_000,
) -> dict:
    """Play `episodes` full episodes with `num_envs` parallel envs and return scores plus the protocol.

    `agent.reset(num_envs)` is called once; then `agent.act(obs (N,64,64,3) uint8, episode_start (N,) bool,
    greedy) -> actions (N,) int64`, where episode_start[i] is True when obs[i] is the first observation of
    a new episode (the very first call, and the call right after env i finished an episode).

    The vector env uses gymnasium's SAME_STEP autoreset (gymnasium 1.x defaults to NEXT_STEP, CleanRL
    #499): the step that ends an episode already returns the first observation of the next one, and the
    finished episode's statistics arrive in info["final_info"]. So every agent call sees a real
    observation and no action is thrown away on a reset step. Returns and lengths are the ones
    RecordEpisodeStatistics (inside make_env) measured: every reward counted, lengths in agent steps.
    Env i is seeded with seed + i and contributes `episode_quotas(episodes, num_envs)[i]` episodes; envs
    that filled their quota keep running (their episodes are ignored) until all quotas are filled.

    Before the first step, the agent's `action_dim` and the env id it was trained on (`agent.args.env_id`),
    where the agent has them (every DRAMA Agent does), are checked against the env (`check_agent_actions`):
    another action count, or another ALE game whose actions mean other things, is a one-line UserError.
    """
    if episodes < 1:
        raise UserError(f"episodes must be >= 1, got {episodes}")
    game = game_of(env_id)
    num_envs = max(1, min(num_envs, episodes))
    quotas = episode_quotas(episodes, num_envs)
    envs = gym.vector.SyncVectorEnv(
        [
            make_env(
                env_id,
                seed + i,
                i,
                capture_video,
                f"{game}__eval__{seed}",
                sticky_actions=sticky_actions,
                max_episode_frames=max_episode_frames,
                video_dir=video_dir,
            )
            for i in range(num_envs)
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    returns, lengths = [], []
    finished = np.zeros(num_envs, dtype=np.int64)
    try:
        action_dim = getattr(agent, "action_dim", None)
        trained_on = getattr(getattr(agent, "args", None), "env_id", None)
        check_agent_actions(envs.envs[0], env_id, None if action_dim is None else int(action_dim), trained_on)
        agent.reset(num_envs)
        obs, _ = envs.reset(seed=seed)
        episode_start = np.ones(num_envs, dtype=bool)
        while (finished < quotas).any():
            actions = np.asarray(agent.act(obs, episode_start, greedy))
            obs, _, terminations, truncations, infos = envs.step(actions)
            episode_start = np.logical_or(terminations, truncations)
            for i in np.flatnonzero(episode_start):
                final_info = infos["final_info"]
                if not final_info.get("_episode", np.zeros(num_envs, bool))[i]:
                    raise RuntimeError("make_env must wrap RecordEpisodeStatistics: no info['episode'] at episode end")
                if finished[i] < quotas[i]:
                    returns.append(float(final_info["episode"]["r"][i]))
                    lengths.append(int(final_info["episode"]["l"][i]))
                finished[i] += 1
    finally:
        envs.close()

    mean = float(np.mean(returns))
    return {
        "env_id": env_id,
        "episodes": episodes,
        "returns": returns,
        "lengths": lengths,
        "mean": mean,
        "std": float(np.std(returns)),
        "median": float(np.median(returns)),
        "hns": human_normalized_score(game, mean) if game in _table1() else None,  # None outside Table 1
        "protocol": {
            "sticky_actions": sticky_actions,
            "full_action_space": False,
            "frameskip": 4 if is_atari(env_id) else 1,
            "max_episode_frames": max_episode_frames,
            "episodes": episodes,
            "greedy": greedy,
            "eval_seed": seed,
            "num_envs": num_envs,
            "source_of_random_human_scores": "DRAMA paper Table 1",
        },
    }


def save_results(results: dict, path: str | os.PathLike, exp_name: str | None = None, seed: int | None = None):
    """Write one game's, one training seed's results as JSON; `aggregate` reads these files back.

    exp_name and seed (the training seed), when given here or already in `results`, are stored with the
    scores and the protocol so that results from different runs can be grouped later.
    """
    data = dict(results)
    if exp_name is not None:
        data["exp_name"] = exp_name
    if seed is not None:
        data["seed"] = seed
    data.setdefault("game", game_of(str(data["env_id"])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def final_evaluation(agent, args, run_dir: str, writer) -> dict:
    """A training run's final evaluation: `--eval-episodes` episodes from seed + 1000, the results to
    run_dir/eval_results.json, the returns to TensorBoard (`eval/episodic_return`), one line printed."""
    results = evaluate(agent, args.env_id, episodes=args.eval_episodes, seed=args.seed + 1000,
                       greedy=args.eval_greedy, sticky_actions=args.sticky_actions)  # fmt: skip
    save_results(results, os.path.join(run_dir, "eval_results.json"), args.exp_name, args.seed)
    for i, episodic_return in enumerate(results["returns"]):
        writer.add_scalar("eval/episodic_return", episodic_return, i)
    hns = "n/a (not an Atari100k game)" if results["hns"] is None else f"{results['hns']:.3f}"
    print(f"evaluation over {args.eval_episodes} episodes: mean return {results['mean']:.1f}, human-normalised {hns}")
    return results


# --------------------------------------------------------------------------------------------------
# Aggregate metrics with stratified-bootstrap confidence intervals (rliable, Agarwal et al. 2021)
# --------------------------------------------------------------------------------------------------
def trim_mean(x: np.ndarray, proportion: float = 0.25, axis: int = -1) -> np.ndarray:
    """scipy.stats.trim_mean: sort, cut int(proportion * n) values from each end, average the rest."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    cut = int(proportion * n)
    return np.mean(np.sort(x, axis=axis).take(np.arange(cut, n - cut), axis=axis), axis=axis)


def _metrics(per_game: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Aggregate metrics of per-game HNS arrays shaped (..., runs_g); returns arrays shaped (...).

    mean / median: of the per-game mean scores (rliable aggregate_mean / aggregate_median);
    IQM: trim_mean(0.25) of all runs x games pooled (rliable aggregate_iqm);
    optimality gap: mean over all runs x games of max(0, 1 - HNS) (rliable aggregate_optimality_gap).
    """
    game_means = np.stack([s.mean(axis=-1) for s in per_game], axis=-1)  # (..., games)
    pooled = np.concatenate(per_game, axis=-1)  # (..., runs over all games)
    return {
        "mean": game_means.mean(axis=-1),
        "median": np.median(game_means, axis=-1),
        "iqm": trim_mean(pooled, 0.25, axis=-1),
        "optimality_gap": 1.0 - np.minimum(pooled, 1.0).mean(axis=-1),
    }


def _check_scores(scores: dict[str, list[float]]) -> list[np.ndarray]:
    if not scores or any(len(v) == 0 for v in scores.values()):
        raise UserError("aggregate needs at least one game with at least one run")
    return [np.asarray(v, dtype=np.float64) for v in scores.values()]


def stratified_bootstrap(scores: dict[str, list[float]], reps: int = 2000, seed: int = 0) -> list[np.ndarray]:
    """Resample each game's runs with replacement, independently per game (stratified by game).

    Returns one array (reps, runs_g) per game, in the order of `scores`; a resample of a game only ever
    holds that game's own runs, so every resample has the same number of runs of each game.
    """
    rng = np.random.default_rng(seed)
    return [s[rng.integers(0, len(s), size=(reps, len(s)))] for s in _check_scores(scores)]


def aggregate(scores: dict[str, list[float]], reps: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean, median, IQM and optimality gap of human-normalised scores with stratified-bootstrap CIs.

    scores: {game: [HNS of each run (seed)]}. Returns {"games", "runs", metric: {"estimate", "low", "high"}}
    for metric in ("mean", "median", "iqm", "optimality_gap"); the interval is the percentile
    bootstrap interval over `reps` stratified resamples, reproducible for a fixed `seed`.
    """
    point = _metrics(_check_scores(scores))
    boot = _metrics(stratified_bootstrap(scores, reps, seed))
    alpha = 100 * (1 - confidence) / 2
    out = {"games": len(scores), "runs": int(sum(len(v) for v in scores.values()))}
    for name in METRICS:
        low, high = np.percentile(boot[name], [alpha, 100 - alpha])
        out[name] = {"estimate": float(point[name]), "low": float(low), "high": float(high)}
    return out


def performance_profile(
    scores: dict[str, list[float]],
    taus: np.ndarray,
    reps: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fraction of runs (all games x seeds pooled) with HNS > tau, for each tau, with a stratified-bootstrap
    percentile band: returns (fraction, low, high), each shaped like taus (rliable run score distribution)."""
    taus = np.asarray(taus, dtype=np.float64)
    pooled = np.concatenate(_check_scores(scores))
    boot = np.concatenate(stratified_bootstrap(scores, reps, seed), axis=-1)  # (reps, runs)
    fraction = (pooled[:, None] > taus).mean(axis=0)
    boot_fraction = (boot[:, :, None] > taus).mean(axis=1)  # (reps, taus)
    alpha = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot_fraction, [alpha, 100 - alpha], axis=0)
    return fraction, low, high


# --------------------------------------------------------------------------------------------------
# CLI: python -m utils.evaluate aggregate RESULTS... --out DIR
# --------------------------------------------------------------------------------------------------
def _result_files(patterns: list[str]) -> list[tuple[Path, bool]]:
    """(path, named_explicitly) for every JSON file: directories are searched recursively."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            files += [(p, False) for p in sorted(Path(pattern).rglob("*.json"))]
        elif os.path.isfile(pattern):
            files.append((Path(pattern), True))
        else:
            files += [(Path(p), True) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
    return files


def load_results(patterns: list[str]) -> list[dict]:
    """Read result JSONs written by save_results. Files found by searching a directory that are not result
    files (no "env_id"/"mean"/"protocol") are skipped; files named explicitly must be result files.

    Each result gets "game" (Table 1's name for an Atari100k game, else the env id's game) and "hns" (None
    for an env outside Table 1's 26 games, e.g. drama/Catch-v0: it has no random/human score)."""
    results = []
    for path, explicit in _result_files(patterns):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{path} is not valid JSON ({e}): delete it or re-run the evaluation that wrote it"
            ) from None
        if not (isinstance(data, dict) and {"env_id", "mean", "protocol"} <= data.keys()):
            if explicit:
                raise UserError(
                    f"{path} is not an evaluation result (needs env_id, mean, protocol): "
                    "pass files written by utils.evaluate.save_results"
                )
            continue
        try:
            score = float(data["mean"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: 'mean' is {data['mean']!r}, not a number: re-run the evaluation") from None
        env_id = str(data["env_id"])
        if game_of(env_id).lower() in {g.lower() for g in _table1()}:
            game = game_name(env_id)
            hns = human_normalized_score(game, score)
        else:
            game, hns = env_id, None  # no Table 1 name: the env id itself
        results.append({**data, "mean": score, "game": game, "hns": hns, "path": str(path)})
    if not results:
        raise UserError(
            f"no evaluation results found in {' '.join(patterns)}: pass directories or globs of JSON files "
            "written by utils.evaluate.save_results"
        )
    return results


def split_normalisable(results: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    """(results of Atari100k games, {env_id: results without a human-normalised score})."""
    skipped: dict[str, list[dict]] = {}
    for r in results:
        if r["hns"] is None:
            skipped.setdefault(str(r["env_id"]), []).append(r)
    return [r for r in results if r["hns"] is not None], skipped


def group_scores(results: list[dict], key: str = "hns") -> dict[str, dict[str, list[float]]]:
    """{exp_name: {game: [result[key] per run]}} (HNS by default; "mean": the mean returns); results without an
    exp_name are grouped as "unnamed"."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in results:
        groups.setdefault(str(r.get("exp_name", "unnamed")), {}).setdefault(r["game"], []).append(r[key])
    return groups


def _format(m: dict) -> str:
    return f"{m['estimate']:7.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def profile_taus(groups: dict[str, dict[str, list[float]]], num: int = 201) -> np.ndarray:
    """Thresholds of the performance profile: from below the lowest score to above the highest (and at least
    0..1, random to human), so that every curve falls from 1 to 0 whatever the sign of the scores."""
    scores = np.concatenate([np.asarray(v, dtype=np.float64) for g in groups.values() for v in g.values()])
    low, high = min(0.0, scores.min()), max(1.0, scores.max())
    pad = 0.05 * (high - low)
    return np.linspace(low - pad, high + pad, num)


def aggregate_figure(groups: dict[str, dict[str, list[float]]], table: dict[str, dict], reps: int, seed: int):
    """Performance profile (fraction of runs with HNS > tau) above the four interval estimates, one colour per exp.

    Laid out by matplotlib's constrained layout: titles, tick labels and the legend stay inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(groups)
    colors = plt.get_cmap("tab10")
    taus = profile_taus(groups)
    fig = plt.figure(figsize=(13, 6.5 + 0.35 * len(names)), layout="constrained")
    grid = fig.add_gridspec(2, 4, height_ratios=[3, 1 + 0.35 * len(names)])
    ax = fig.add_subplot(grid[0, :])
    for k, name in enumerate(names):
        fraction, low, high = performance_profile(groups[name], taus, reps, seed)
        ax.plot(taus, fraction, color=colors(k % 10), label=name)
        ax.fill_between(taus, low, high, color=colors(k % 10), alpha=0.2)
    for level in (0.0, 1.0):
        label = "random and human (HNS 0 and 1)" if level == 0.0 else None
        ax.axvline(level, color="gray", linestyle="--", linewidth=0.8, label=label)
    ax.set_xlim(taus[0], taus[-1])
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(r"human-normalised score $\tau$")
    ax.set_ylabel(r"fraction of runs with score > $\tau$")
    ax.set_title("Performance profile")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    for j, metric in enumerate(METRICS):
        ax = fig.add_subplot(grid[1, j])
        for k, name in enumerate(names):
            m = table[name][metric]
            ax.barh(k, m["high"] - m["low"], left=m["low"], height=0.6, color=colors(k % 10), alpha=0.6)
            ax.vlines(m["estimate"], k - 0.3, k + 0.3, color="black")
        ax.set_yticks(range(len(names)), names if j == 0 else [""] * len(names))
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first exp on top, as in the legend
        ax.use_sticky_edges = False  # a margin on both sides of the intervals, not bars flush with the frame
        ax.margins(x=0.08)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.set_title(METRIC_TITLES[metric])
        ax.set_xlabel("HNS")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Atari100k human-normalised scores, 95% stratified-bootstrap CIs")
    return fig


def plot(groups: dict[str, dict[str, list[float]]], table: dict[str, dict], path: Path, reps: int, seed: int):
    """Write `aggregate_figure` as a PNG."""
    fig = aggregate_figure(groups, table, reps, seed)  # first: it selects the Agg backend
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_aggregate(patterns: list[str], out: str, reps: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Read results, write aggregate.csv, per_game.csv and aggregate.png into `out`, print the table.

    Results of envs outside Table 1's 26 games (drama/Catch-v0, MiniGrid, other ALE games) have no
    human-normalised score: each such env is left out of the aggregate with one warning line on stderr, and
    its raw scores still go to per_game.csv (mean_hns empty). The files are written before anything is
    printed, so `... | head -1` still writes them."""
    results = load_results(patterns)
    atari, skipped = split_normalisable(results)
    for env_id, rs in skipped.items():
        print(
            f"warning: {env_id} is not one of the 26 Atari100k games of Table 1 (no random/human score): its "
            f"{len(rs)} result(s) are left out of the human-normalised aggregate, raw scores in per_game.csv",
            file=sys.stderr,
        )
    if not atari:
        raise UserError(
            f"none of the {len(results)} results in {' '.join(patterns)} is an Atari100k game: the aggregate "
            f"needs human-normalised scores, which Table 1 has for {', '.join(_table1())} only"
        )
    groups = group_scores(atari)
    table = {name: aggregate(scores, reps, seed) for name, scores in groups.items()}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    with open(out_dir / "aggregate.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "games", "runs"] + [f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")])
        for name, t in table.items():
            stats = [t[m][k] for m in METRICS for k in ("estimate", "low", "high")]
            writer.writerow([name, t["games"], t["runs"]] + stats)
    with open(out_dir / "per_game.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["exp_name", "game", "runs", "mean_score", "mean_hns"])
        returns = group_scores(results, key="mean")
        for name, scores in returns.items():
            for game in sorted(scores):
                hns = groups.get(name, {}).get(game)
                writer.writerow([name, game, len(scores[game]), np.mean(scores[game]), np.mean(hns) if hns else ""])
    plot(groups, table, out_dir / "aggregate.png", reps, seed)

    width = max(8, *(len(n) for n in table))
    header = f"{'exp_name':<{width}} {'games':>5} {'runs':>5}" + "".join(
        f"  {METRIC_TITLES[m] + ' [95% CI]':<25}" for m in METRICS
    )
    print(header)
    for name, t in table.items():
        print(f"{name:<{width}} {t['games']:>5} {t['runs']:>5}" + "".join(f"  {_format(t[m]):<25}" for m in METRICS))
    print(f"wrote {out_dir / 'aggregate.csv'}, {out_dir / 'per_game.csv'}, {out_dir / 'aggregate.png'}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser(
        "python -m utils.evaluate", "Aggregate Atari100k evaluation results over games and seeds (rliable protocol)."
    )
    agg = commands.add_parser(
        "aggregate",
        help="mean/median/IQM/optimality gap of human-normalised scores with 95%% bootstrap CIs",
        description=(
            "Read the JSON files written by utils.evaluate.save_results (one per game and training seed), "
            "group them by (exp_name, game), convert each run's mean return to a human-normalised score "
            "with the random/human scores of the DRAMA paper's Table 1, and report per exp_name the mean "
            "and median of per-game means, the IQM (25%% trimmed mean of all runs x games) and the "
            "optimality gap, with 95%% stratified-bootstrap percentile CIs (runs resampled within each "
            "game; Agarwal et al. 2021). Prints a table and writes aggregate.csv, per_game.csv and "
            "aggregate.png (performance profile + interval estimates) into --out."
        ),
    )
    agg.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS_DIR_OR_GLOB",
        help="directories (searched recursively for result *.json files), JSON files, or quoted globs",
    )
    agg.add_argument("--out", default="aggregate", help="output directory (default: %(default)s)")
    agg.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    agg.add_argument("--seed", type=int, default=0, help="seed of the bootstrap RNG (default: %(default)s)")
    args = parser.parse_args(argv)

    def command():
        if args.reps < 1:
            raise UserError(f"--reps must be >= 1, got {args.reps}")
        run_aggregate(args.results, args.out, args.reps, args.seed)

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
