"""Evidence that the world model learns: train drama_xs's world model on real Atari frames, compare with
trivial baselines on held-out steps, before and after training.

Collects random-policy steps of a real ALE game (default Breakout: frequent rewards and lost lives),
trains the world model with the script's own `train_world_model` (DFS sampling, LaProp, the paper's
loss) at a reduced batch, and reports on the last `--holdout` steps, never trained on:

- reconstruction MSE per pixel vs the mean training frame;
- reward: accuracy of the predicted reward (rounded) and recall on the steps with a reward, vs always 0;
- termination (a lost life): accuracy and recall on terminations, vs always "goes on";
- the dynamics KL(posterior || prior) of the next latent (lower = better predictions).

    python benchmarks/world_model_learning.py --quick        # ~10 min on 2 CPU cores
    python benchmarks/world_model_learning.py --steps 8000 --updates 1000 --batch-size 4 --sequence-length 32 \
        --lr 2e-4 --warmup 100                                # the numbers in docs/learning.md
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drama_xs  # noqa: E402
from utils.atari import make_env  # noqa: E402


def collect(env_id: str, steps: int, seed: int) -> dict[str, np.ndarray]:
    """Random-policy steps in the script's storage convention (obs, action, reward, termination, start)."""
    env = make_env(env_id, seed, 0, False, "learning")()
    rng = np.random.default_rng(seed)
    data = {"obs": [], "actions": [], "rewards": [], "terminations": [], "starts": []}
    obs, _ = env.reset(seed=seed)
    start = True
    for _ in range(steps):
        action = int(rng.integers(env.action_space.n))
        next_obs, reward, terminated, truncated, info = env.step(action)
        for key, value in zip(data, (obs, action, reward, terminated or info["life_loss"], start), strict=True):
            data[key].append(value)
        obs, start = next_obs, terminated or truncated
        if start:
            obs, _ = env.reset()
    return {key: np.array(value) for key, value in data.items()} | {"action_dim": int(env.action_space.n)}


@torch.no_grad()
def evaluate(world_model, data, mean_frame, length: int) -> dict[str, float]:
    """Held-out metrics over consecutive windows of `length` steps."""
    world_model.eval()
    windows = len(data["actions"]) // length
    cut = windows * length
    obs = torch.from_numpy(data["obs"][:cut]).view(windows, length, 64, 64, 3)
    actions = torch.from_numpy(data["actions"][:cut]).view(windows, length)
    rewards = torch.from_numpy(data["rewards"][:cut]).float().view(windows, length)
    terminations = torch.from_numpy(data["terminations"][:cut]).float().view(windows, length)
    posterior = world_model.posterior(obs)
    z = drama_xs.sample_latent(posterior)
    target = obs.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    reconstruction = world_model.decoder(z.flatten(0, 1))
    h, _ = world_model.dynamics(z, actions)
    predicted_reward = world_model.reward(h).round()
    predicted_termination = 1 - world_model.continuation(h)
    dynamics_kl = drama_xs.categorical_kl(posterior[:, 1:], world_model.prior(h[:, :-1])).mean()
    rewarded, terminal = rewards != 0, terminations == 1
    return {
        "reconstruction MSE/pixel": (reconstruction - target).pow(2).mean().item(),
        "mean-frame MSE/pixel": (mean_frame - target).pow(2).mean().item(),
        "reward accuracy": (predicted_reward == rewards).float().mean().item(),
        "reward recall (r != 0)": (predicted_reward[rewarded] == rewards[rewarded]).float().mean().item(),
        "always-0 reward accuracy": (rewards == 0).float().mean().item(),
        "termination accuracy": (predicted_termination == terminations).float().mean().item(),
        "termination recall": predicted_termination[terminal].mean().item(),
        "always-continue accuracy": (terminations == 0).float().mean().item(),
        "dynamics KL (nats)": dynamics_kl.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="ALE/Breakout-v5")
    parser.add_argument("--steps", type=int, default=12_000, help="random-policy steps collected")
    parser.add_argument("--holdout", type=int, default=2_000, help="last steps kept for evaluation only")
    parser.add_argument("--updates", type=int, default=3_000, help="world-model updates")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-5, help="the paper's 4e-5 by default")
    parser.add_argument("--warmup", type=int, default=1000, help="learning-rate warm-up updates (paper: 1000)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="6k steps, 1000 updates")
    options = parser.parse_args()
    if options.quick:
        options.steps, options.updates = 6_000, 1_000
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)

    data = collect(options.env_id, options.steps, options.seed)
    train = {k: v[: -options.holdout] for k, v in data.items() if k != "action_dim"}
    held_out = {k: v[-options.holdout :] for k, v in data.items() if k != "action_dim"}
    args = drama_xs.Args(
        batch_size=options.batch_size,
        sequence_length=options.sequence_length,
        wm_lr=options.lr,
        warmup_updates=options.warmup,
    )
    agent = drama_xs.Agent(args, data["action_dim"])
    buffer = drama_xs.ReplayBuffer(len(train["actions"]))
    for step in zip(*(train[k] for k in ("obs", "actions", "rewards", "terminations", "starts")), strict=True):
        buffer.add(*step)
    mean_frame = torch.from_numpy(train["obs"].mean(0)).permute(2, 0, 1)[None].float() / 255

    before = evaluate(agent.world_model, held_out, mean_frame, options.sequence_length)
    optimizer, scheduler = drama_xs.make_optimizer(agent.world_model.parameters(), args.wm_lr, args.warmup_updates)
    rng, start = np.random.default_rng(options.seed), time.time()
    for update in range(1, options.updates + 1):
        metrics = drama_xs.train_world_model(
            agent, optimizer, scheduler, buffer, args, rng, "cpu", contextlib.nullcontext()
        )
        if update % 250 == 0:
            print(
                f"update {update}/{options.updates} loss {metrics['world_model_loss'].item():.1f} "
                f"({(time.time() - start) / update:.2f} s/update)",
                flush=True,
            )
    after = evaluate(agent.world_model, held_out, mean_frame, options.sequence_length)

    print(
        f"\n{options.env_id}: {len(train['actions'])} training steps, {options.holdout} held-out steps, "
        f"{options.updates} updates of {options.batch_size}x{options.sequence_length}, lr {options.lr}, "
        f"warm-up {options.warmup}\n"
    )
    print("| metric (held-out) | before training | after training |")
    print("|---|---|---|")
    for key in before:
        print(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")


if __name__ == "__main__":
    main()
