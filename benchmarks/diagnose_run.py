"""Has the world model learned the rewards and terminations of a run? Diagnose a run from its last checkpoint (the
agent and the replay buffer: run with `--checkpoint-every`) and its TensorBoard logs.

    python benchmarks/diagnose_run.py runs/ALE/Boxing-v5__drama_xs_cpu__1__*

The buffer's last `--steps` steps (real frames and actions) go through the world model in windows of the run's
own `--sequence-length` (the windows training sees, each from a zero state), and for each step the heads'
predictions are compared with what happened:

- **Reward head**: its two-hot cross-entropy (the training loss, nats) on the steps with a reward and on the
  others, against the loss of the best constant prediction: the steps' overall reward distribution (the marginal,
  the mean two-hot target), which knows how often each reward happens and not when. A head that has learned when
  rewards happen beats the marginal on the rewarded steps. The ranking measure is the AUC of the head's probability
  of |r| > 0.5 for the steps with |r| > 0.5: 0.5 is no ranking, 1 puts every rewarded step above every other.
- **Termination head** (a lost life or the game's end): its binary cross-entropy on the terminal steps and on the
  others against the constant terminal rate's, and the AUC of its termination probability.
- **Imagined vs real rewards**: the mean imagined reward per step of the last actor-critic updates (logged as
  `losses/imagined_reward`) against the mean real reward per step of the last training episodes.
- **Actor entropy**: the first and last logged entropy against its maximum, ln(actions).

Every step of the buffer has been in training batches: these are losses on the training data, the question being
whether the heads fit the rare steps at all.
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
    """The agent (in eval mode), its Args, the replay buffer (oldest step first) and the step of the run's last
    checkpoint."""
    from safetensors import safe_open

    with safe_open(str(run / CHECKPOINT), "np") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    progress = json.loads(metadata["progress"])
    module = importlib.import_module(metadata["variant"])
    args = args_from_config(module.Args, progress["args"], run / CHECKPOINT)  # the run's args.json fields, as saved
    agent = module.Agent(args, int(metadata["action_dim"]))
    agent.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("agent.")})
    buffer = {k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")}
    if progress["buffer"]["size"] == len(buffer["actions"]) and progress["buffer"]["next"] != 0:  # a full ring
        buffer = {k: np.roll(v, -progress["buffer"]["next"], axis=0) for k, v in buffer.items()}
    return agent.eval(), args, buffer, progress["global_step"]


@torch.no_grad()
def head_outputs(agent, buffer: dict[str, np.ndarray], steps: int, length: int) -> dict[str, np.ndarray]:
    """The heads on the buffer's last `steps` steps (rounded down to whole windows of `length` steps), each window
    from a zero state as in training: per step the reward loss and the real reward, the predicted reward, its
    probability of |r| > 0.5, the termination logit and the real termination; and the marginal reward loss."""
    world_model = agent.world_model
    sample_latent = sys.modules[type(agent).__module__].sample_latent
    windows = min(steps, len(buffer["actions"])) // length
    first = len(buffer["actions"]) - windows * length
    obs = torch.from_numpy(buffer["obs"][first:]).view(windows, length, 64, 64, 3)
    actions = torch.from_numpy(buffer["actions"][first:]).view(windows, length)
    reward = torch.from_numpy(buffer["rewards"][first:])  # (windows * length,)
    reward_logits, termination_logits = [], []
    for i in range(0, windows, 16):
        z = sample_latent(world_model.posterior(obs[i : i + 16]))  # (16, length, latent)
        h, _ = world_model.dynamics(z, actions[i : i + 16])  # (16, length, d_model)
        reward_logits.append(world_model.reward_head(h).flatten(0, 1).float())  # (16 * length, bins)
        termination_logits.append(world_model.termination_head(h).flatten().float())  # (16 * length,)
    logits = torch.cat(reward_logits)  # (steps, bins)
    twohot = world_model.twohot
    target = twohot.encode(reward)  # (steps, bins)
    marginal = target.mean(0)  # (bins,): the best constant prediction of these steps
    big = (twohot.bins.abs().expm1() > 0.5).float()  # (bins,): the bins of |r| > 0.5 (symexp of the bin)
    return dict(
        reward=reward.numpy(),
        reward_loss=twohot.loss(logits, reward).numpy(),
        marginal_reward_loss=-(target * marginal.clamp(min=1e-30).log()).sum(-1).numpy(),
        predicted_reward=twohot.decode(logits).numpy(),
        big_reward_probability=(logits.softmax(-1) * big).sum(-1).numpy(),
        termination_logit=torch.cat(termination_logits).numpy(),
        termination=buffer["terminations"][first:],
    )


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count half); nan without both classes."""
    n_positive, n_negative = int(positive.sum()), int((~positive).sum())
    if not n_positive or not n_negative:
        return float("nan")
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, ranks) / counts)[inverse]  # tied scores share their mean rank
    return float((ranks[positive].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def termination_losses(logit: np.ndarray, termination: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step binary cross-entropy of the head (from its logits) and of the constant terminal rate."""
    logit_t, target = torch.from_numpy(logit), torch.from_numpy(termination.astype(np.float32))
    head = F.binary_cross_entropy_with_logits(logit_t, target, reduction="none")
    rate = target.mean().clamp(1e-7, 1 - 1e-7)
    constant = F.binary_cross_entropy(rate.expand_as(target), target, reduction="none")
    return head.numpy(), constant.numpy()


def report(out: dict[str, np.ndarray]) -> None:
    """The reward and termination heads' losses against the marginal's, and their AUCs."""
    reward, predicted = out["reward"], out["predicted_reward"]
    rewarded, big = reward != 0, np.abs(reward) > 0.5
    values = sorted({float(r) for r in reward[rewarded]})[:8]
    print(f"reward head: {rewarded.mean():.1%} of the steps have a reward (values {values})")
    print("  two-hot cross-entropy, nats        head   marginal")
    every = np.ones_like(rewarded)
    for name, where in (("steps with a reward", rewarded), ("the other steps", ~rewarded), ("all steps", every)):
        print(f"  {name:<32} {mean(out['reward_loss'][where]):6.3f} {mean(out['marginal_reward_loss'][where]):8.3f}")
    big_auc = auc(out["big_reward_probability"], big)
    print(f"  AUC of P(|r| > 0.5) for the {big.sum()} steps with |r| > 0.5: {big_auc:.3f}")
    print(f"  mean prediction on the steps with a reward {mean(predicted[rewarded]):+.3f} (mean reward "
          f"{mean(reward[rewarded]):+.3f}), on the others {mean(predicted[~rewarded]):+.3f}")
    terminal = out["termination"] == 1
    head, constant = termination_losses(out["termination_logit"], out["termination"])
    print(f"termination head: {terminal.mean():.2%} terminal steps ({terminal.sum()})")
    print("  binary cross-entropy, nats         head   marginal")
    for name, where in (("terminal steps", terminal), ("the other steps", ~terminal), ("all steps", every)):
        print(f"  {name:<32} {mean(head[where]):6.3f} {mean(constant[where]):8.3f}")
    print(f"  AUC of P(termination) for the terminal steps: {auc(out['termination_logit'], terminal):.3f}; "
          f"predicted terminal (logit > 0) on {mean(out['termination_logit'][terminal] > 0):.0%} of them and on "
          f"{mean(out['termination_logit'][~terminal] > 0):.2%} of the others")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with checkpoint.safetensors and TensorBoard events")
    parser.add_argument("--steps", type=int, default=16384, help="the buffer's last steps to predict (default 16384)")
    parser.add_argument("--episodes", type=int, default=5, help="last training episodes for the real reward rate")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    torch.manual_seed(0)  # the latent samples: the same numbers on every call

    agent, run_args, buffer, global_step = checkpoint_of(args.run)
    length = run_args.sequence_length
    out = head_outputs(agent, buffer, args.steps, length)
    print(f"run {args.run}, checkpoint at step {global_step}: the buffer's last {len(out['reward'])} steps in "
          f"windows of {length} (the run's --sequence-length)")
    report(out)

    _, imagined = scalars(args.run, "losses/imagined_reward")
    _, returns = scalars(args.run, "charts/episodic_return")
    _, lengths = scalars(args.run, "charts/episodic_length")
    last = slice(-args.episodes, None)
    real_rate = returns[last].sum() / lengths[last].sum() if len(lengths) else float("nan")
    print(f"imagined reward per step (last 5 logs) {imagined[-5:].mean():+.4f} vs real reward per step "
          f"(last {min(args.episodes, len(lengths))} episodes) {real_rate:+.4f}; real per step in the windows above "
          f"{out['reward'].mean():+.4f}")
    _, entropy = scalars(args.run, "losses/entropy")
    _, imagined_return = scalars(args.run, "losses/imagined_return")
    if len(entropy):
        print(f"actor entropy: first log {entropy[0]:.3f}, last {entropy[-1]:.3f}, maximum ln({agent.action_dim}) = "
              f"{np.log(agent.action_dim):.3f}; imagined lambda-return first {imagined_return[0]:+.3f}, "
              f"last {imagined_return[-1]:+.3f}")


if __name__ == "__main__":
    main()
