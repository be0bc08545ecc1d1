"""Plot learning curves (episodic return and its running mean of 5 against env steps) of training runs, next to
the random policy's mean return and its 95% interval over the same number of episodes.

    python benchmarks/learning_curves.py runs/drama/Catch-v0__drama_xs__1__* --out docs/catch_learning.png
    python benchmarks/learning_curves.py RUN_A RUN_B --labels ok "sign flipped" --random-episodes 200

The random policy's returns come from playing the run's env (read from its args.json) with uniformly random
actions; its 95% interval is the mean +- 1.96 standard errors at the number of episodes the run played.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.atari import make_env  # noqa: E402


def episodes_of(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, returns) of every training episode logged to TensorBoard in `run`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("charts/episodic_return")
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def random_returns(env_id: str, episodes: int, seed: int = 0) -> np.ndarray:
    env = make_env(env_id, seed, 0, False, "random")()
    rng = np.random.default_rng(seed)
    returns = []
    env.reset(seed=seed)
    while len(returns) < episodes:
        _, _, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            returns.append(info["episode"]["r"])
            env.reset()
    env.close()
    return np.array(returns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (TensorBoard events + args.json)")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--random-episodes", type=int, default=0, help="random-policy episodes (0: as many as the run)")
    parser.add_argument("--env-id", help="the env of the runs (default: read from the first run's args.json)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, default=Path("learning_curves.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or [run.name for run in args.runs]
    env_id = args.env_id or json.loads((args.runs[0] / "args.json").read_text())["env_id"]
    figure, axis = plt.subplots(figsize=(8, 4.5), layout="constrained")
    most_steps, most_episodes = 0, 0
    for run, label in zip(args.runs, labels, strict=True):
        steps, returns = episodes_of(run)
        mean5 = np.array([returns[max(0, i - 4) : i + 1].mean() for i in range(len(returns))])
        (line,) = axis.plot(steps, mean5, label=f"{label}: running mean of 5")
        axis.scatter(steps, returns, s=4, alpha=0.25, color=line.get_color())
        most_steps, most_episodes = max(most_steps, steps.max()), max(most_episodes, len(returns))
        last = returns[-50:].mean()
        print(f"{label}: {len(returns)} episodes, mean return {returns.mean():.3f}, last 50 episodes {last:.3f}")
    baseline = random_returns(env_id, args.random_episodes or most_episodes)
    half_width = 1.96 * baseline.std() / np.sqrt(len(baseline))
    axis.axhline(baseline.mean(), color="black", linestyle="--", label=f"random policy ({len(baseline)} episodes)")
    axis.axhspan(baseline.mean() - half_width, baseline.mean() + half_width, color="black", alpha=0.12)
    print(f"random policy: mean {baseline.mean():.3f} +- {half_width:.3f} (95%) over {len(baseline)} episodes")
    axis.set(xlabel="env steps", ylabel="episodic return", title=args.title or env_id, xlim=(0, most_steps))
    axis.legend(loc="best", fontsize=8)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
