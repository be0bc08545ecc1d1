"""Which part of a trained agent does not learn? Diagnose a run from its last checkpoint (the agent and the replay
buffer: run with `--checkpoint-every`) and its TensorBoard logs.

    python benchmarks/diagnose_run.py runs/ALE/Boxing-v5__drama_xs_cpu__1__*

- **Reward head**: over the buffer's last `--steps` steps (real frames and actions, in windows of
  `--window-length`), the predicted reward of each step against the real one: on the rare steps with a
  reward, how often the prediction (rounded) is right and has the right sign; on the others, how often it is 0.
- **Termination head** (a lost life or the game's end): recall on the terminal steps, accuracy on the others.
- **Imagined vs real rewards**: the mean imagined reward per step of the last actor-critic updates (logged as
  `losses/imagined_reward`) against the mean real reward per step of the last training episodes.
- **Actor entropy**: the first and last logged entropy against its maximum, ln(actions).
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.checkpoint import CHECKPOINT  # noqa: E402
from utils.checks import args_from_config  # noqa: E402


def scalars(run: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one TensorBoard scalar of the run (empty when it was never logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    if key not in events.Tags()["scalars"]:
        return np.array([]), np.array([])
    values = events.Scalars(key)
    return np.array([s.step for s in values]), np.array([s.value for s in values])


def checkpoint_of(run: Path):
    """The agent (in eval mode) and the replay buffer (oldest step first) of the run's last checkpoint."""
    from safetensors import safe_open

    with safe_open(str(run / CHECKPOINT), "np") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    progress = json.loads(metadata["progress"])
    module = importlib.import_module(metadata["variant"])
    agent = module.Agent(args_from_config(module.Args, progress["args"], run / CHECKPOINT), int(metadata["action_dim"]))
    agent.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("agent.")})
    buffer = {k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")}
    if progress["buffer"]["size"] == len(buffer["actions"]) and progress["buffer"]["next"] != 0:  # a full ring
        buffer = {k: np.roll(v, -progress["buffer"]["next"], axis=0) for k, v in buffer.items()}
    return agent.eval(), buffer, progress["global_step"]


@torch.no_grad()
def head_predictions(agent, buffer: dict[str, np.ndarray], steps: int, length: int):
    """Predicted rewards and terminations of the buffer's last `steps` steps, in windows of `length` real steps."""
    world_model, sample_latent = agent.world_model, sys.modules[type(agent).__module__].sample_latent
    windows = min(steps, len(buffer["actions"])) // length
    first = len(buffer["actions"]) - windows * length
    obs = torch.from_numpy(buffer["obs"][first:]).view(windows, length, 64, 64, 3)
    actions = torch.from_numpy(buffer["actions"][first:]).view(windows, length)
    rewards, terminations = [], []
    for i in range(0, windows, 16):
        z = sample_latent(world_model.posterior(obs[i : i + 16]))  # (16, length, 1024)
        h, _ = world_model.dynamics(z, actions[i : i + 16])
        rewards.append(world_model.reward(h).flatten())
        terminations.append(1 - world_model.continuation(h).flatten())
    return (torch.cat(rewards).numpy(), torch.cat(terminations).numpy(), buffer["rewards"][first:],
            buffer["terminations"][first:])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with checkpoint.safetensors and TensorBoard events")
    parser.add_argument("--steps", type=int, default=4096, help="the buffer's last steps to predict (default 4096)")
    parser.add_argument("--window-length", type=int, default=64, help="real steps per window (default 64)")
    parser.add_argument("--episodes", type=int, default=5, help="last training episodes for the real reward rate")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    torch.manual_seed(0)  # the latent samples: the same numbers on every call

    agent, buffer, global_step = checkpoint_of(args.run)
    predicted_reward, predicted_termination, reward, termination = head_predictions(
        agent, buffer, args.steps, args.window_length
    )
    rewarded, terminal = reward != 0, termination == 1
    rounded = np.round(predicted_reward)
    print(f"run {args.run}, checkpoint at step {global_step} ({len(reward)} of the buffer's last steps)")
    values = sorted({float(r) for r in reward[rewarded]})[:8]
    print(f"reward head: {rewarded.mean():.1%} of the steps have a reward (values {values})")
    if rewarded.any():
        print(f"  on them: rounded prediction right {np.mean(rounded[rewarded] == reward[rewarded]):.1%}, "
              f"sign right {np.mean(np.sign(rounded[rewarded]) == np.sign(reward[rewarded])):.1%}, "
              f"mean prediction {predicted_reward[rewarded].mean():+.3f} vs mean reward {reward[rewarded].mean():+.3f}")
    print(f"  on the others: prediction rounds to 0 {np.mean(rounded[~rewarded] == 0):.1%}, "
          f"mean prediction {predicted_reward[~rewarded].mean():+.3f}")
    print(f"  always-0 accuracy {np.mean(~rewarded):.1%} vs the head's {np.mean(rounded == reward):.1%}")
    print(f"termination head: {terminal.mean():.2%} terminal steps; recall "
          f"{predicted_termination[terminal].mean() if terminal.any() else float('nan'):.1%}, accuracy on the others "
          f"{np.mean(predicted_termination[~terminal] == 0):.1%}")

    _, imagined = scalars(args.run, "losses/imagined_reward")
    _, returns = scalars(args.run, "charts/episodic_return")
    _, lengths = scalars(args.run, "charts/episodic_length")
    last = slice(-args.episodes, None)
    real_rate = returns[last].sum() / lengths[last].sum() if len(lengths) else float("nan")
    print(f"imagined reward per step (last 5 logs) {imagined[-5:].mean():+.4f} vs real reward per step "
          f"(last {min(args.episodes, len(lengths))} episodes) {real_rate:+.4f}; real per step in the window above "
          f"{reward.mean():+.4f}")
    _, entropy = scalars(args.run, "losses/entropy")
    _, imagined_return = scalars(args.run, "losses/imagined_return")
    if len(entropy):
        print(f"actor entropy: first log {entropy[0]:.3f}, last {entropy[-1]:.3f}, maximum ln({agent.action_dim}) = "
              f"{np.log(agent.action_dim):.3f}; imagined lambda-return first {imagined_return[0]:+.3f}, "
              f"last {imagined_return[-1]:+.3f}")


if __name__ == "__main__":
    main()
