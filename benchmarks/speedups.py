"""What each CPU speed-up of drama_xs.py buys: the code before it against the code now, timed in one run.

What it measures
    drama_xs.py computes the same algorithm as before these changes (commit 9f2b760), faster:
      1. latent sampling by inverse CDF instead of torch.multinomial (same distribution, other random stream);
      2. Mamba2.forward_token updates its SSM state in two passes (mul, then addcmul_) instead of four;
      3. the eval-mode encoder (imagination context, acting) folds BatchNorm into the conv: one pass less;
      4. the imagination context encodes each distinct frame once (context windows of different starts overlap);
      5. `--compile`: torch.compile of the imagination step (optional; a one-time compile of ~20 s).
    The "before" forms of 1-4 are written out below and patched into drama_xs for the "before" rows. Tables:
      - each change alone on the piece it touches (ms, and before / now);
      - the share of distinct frames among the 8 x 1024 context frames, against the replay buffer size;
      - the whole update phase by phase (the phases of training_step.py) before, now, and now with --compile.
    Timings are interleaved round-robin (one run of each form per round, the order alternating between rounds) and
    every ratio is the median over rounds of the ratio within a round: this machine's speed drifts by up to +-30%
    from minute to minute, and a ratio within one round is far steadier than two medians taken minutes apart.

How to run (from the repository root)
    python benchmarks/speedups.py --quick          # half the paper's batch for the whole update, 2 rounds (~3.5 min)
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/speedups.py
"""

import argparse
import contextlib
import time
from unittest import mock

import _common as C
import numpy as np
import torch
import torch.nn.functional as F
import training_step

import drama_xs as m


# ----------------------------------------------------------------------------------------------------------
# The code before the speed-ups (commit 9f2b760)
# ----------------------------------------------------------------------------------------------------------
def sample_latent_before(probs: torch.Tensor) -> torch.Tensor:
    index = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)  # (N * 32, 1)
    onehot = torch.zeros_like(probs).view(-1, probs.shape[-1]).scatter_(1, index, 1.0).view_as(probs)
    return (onehot + probs - probs.detach()).flatten(-2)  # (..., 1024)


def mamba2_forward_token_before(self, u: torch.Tensor, state):
    conv_state, ssm_state = state
    z, xBC, dt = self._split(self.in_proj(u))  # (B, E), (B, E + 2N), (B, H)
    conv_state = torch.cat([conv_state[..., 1:], xBC[..., None].to(conv_state.dtype)], dim=-1)  # (B, E+2N, K)
    xBC = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (B, E + 2N)
    x, B, C_ = xBC.split([self.d_inner, self.d_state, self.d_state], dim=-1)
    x = x.view(-1, self.nheads, self.headdim)  # (B, H, P)
    dt = F.softplus(dt + self.dt_bias)  # (B, H)
    decay = torch.exp(dt * -torch.exp(self.A_log.float()))  # (B, H)
    ssm_state = ssm_state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, None, None, :]
    y = (ssm_state @ C_[:, None, :, None]).squeeze(-1) + x * self.D[:, None]  # (B, H, P)
    return self.out_proj(self.norm(y.reshape(-1, self.d_inner), z)), (conv_state, ssm_state)


def encoder_forward_before(self, obs: torch.Tensor) -> torch.Tensor:
    return self.net(obs.permute(0, 3, 1, 2).float().div(255)).flatten(1)  # BatchNorm as its own pass


def with_every_frame(sequences):
    """ReplayBuffer.sequences that hands imagination every context frame (B * C of them), as before."""

    def wrapper(self, starts, length, device, distinct_frames=False):
        batch = sequences(self, starts, length, device)
        if distinct_frames:
            obs = batch.pop("obs")  # (B, C, 64, 64, 3)
            batch["frames"] = obs.flatten(0, 1)
            batch["frame_index"] = torch.arange(obs.shape[0] * obs.shape[1], device=obs.device).view(obs.shape[:2])
        return batch

    return wrapper


@contextlib.contextmanager
def before():
    """drama_xs as it was before speed-ups 1-4."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(m, "sample_latent", sample_latent_before))
        stack.enter_context(mock.patch.object(m.Mamba2, "forward_token", mamba2_forward_token_before))
        stack.enter_context(mock.patch.object(m.Encoder, "forward", encoder_forward_before))
        stack.enter_context(mock.patch.object(m.ReplayBuffer, "sequences", with_every_frame(m.ReplayBuffer.sequences)))
        yield


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
def paired(fns: dict, device, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each fn, and the median over rounds of (first fn's time / this fn's time) in a round."""
    times = C.measure_interleaved(fns, device, 1, rounds, alternate=True)
    base = times[next(iter(fns))]
    ratios = {n: C.median([b / t for b, t in zip(base, times[n], strict=True)]) for n in fns}
    return {n: C.median(times[n]) for n in fns}, ratios


def component_rows(agent, device, rounds: int, batch: int) -> list[list]:
    wm, ac = agent.world_model.eval(), agent.actor_critic
    rows = []

    def add(piece, before_fn, now_fn, scope):
        seconds, ratios = paired({"before": before_fn, "now": now_fn}, device, rounds)
        rows.append([piece, scope, 1e3 * seconds["before"], 1e3 * seconds["now"], ratios["now"]])

    probs = m.unimix_probs(torch.randn(batch, 32, 32, device=device))
    add("1. latent sampling", lambda: sample_latent_before(probs), lambda: m.sample_latent(probs), f"{batch} x 32 x 32")

    mixer = wm.dynamics.blocks[0].mixer
    u = torch.randn(batch, mixer.in_proj.in_features, device=device)
    state = tuple(s.normal_() for s in mixer.allocate_state(batch, device))
    with torch.no_grad():
        add(
            "2. Mamba2.forward_token (one layer)",
            lambda: mamba2_forward_token_before(mixer, u, state),
            lambda: mixer.forward_token(u, state),
            f"batch {batch}",
        )
        frames = torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8, device=device)
        add(
            "3. eval encoder",
            lambda: encoder_forward_before(wm.encoder, frames),
            lambda: wm.encoder(frames),
            f"{batch} frames",
        )
    z, h = torch.rand(batch, 1024, device=device), torch.randn(batch, 512, device=device)
    rollout_state = [tuple(s.normal_() for s in st) for st in wm.dynamics.allocate_state(batch, device)]

    @torch.no_grad()
    def rollout(rollout_step_fn):
        zz, hh, st = z, h, rollout_state
        for _ in range(16):
            zz, hh, st, _ = rollout_step_fn(wm, ac, zz, hh, st)

    def rollout_before():
        with (
            mock.patch.object(m, "sample_latent", sample_latent_before),
            mock.patch.object(m.Mamba2, "forward_token", mamba2_forward_token_before),
        ):
            rollout(m.imagine_one_step)

    compiled = m.compile_one_step()
    start = time.perf_counter()
    rollout(compiled)
    compile_seconds = time.perf_counter() - start
    seconds, ratios = paired(
        {"before": rollout_before, "now": lambda: rollout(m.imagine_one_step), "compiled": lambda: rollout(compiled)},
        device,
        rounds,
    )
    scope = f"16 steps, batch {batch}"
    rows.append(["1+2. imagination rollout", scope, 1e3 * seconds["before"], 1e3 * seconds["now"], ratios["now"]])
    rows.append(
        [
            f"5. --compile (first call {compile_seconds:.0f} s)",
            scope,
            1e3 * seconds["before"],
            1e3 * seconds["compiled"],
            ratios["compiled"],
        ]
    )
    return rows


def distinct_share_rows(a, rng: np.random.Generator, sizes=(1_000, 5_000, 25_000, 50_000, 100_000)) -> list[list]:
    """Distinct frames / (imagine_batch_size x imagine_context_length) for uniform starts in a buffer of N steps."""
    rows = []
    for size in sizes:
        shares = []
        for _ in range(20):
            starts = rng.integers(0, size - a.imagine_context_length + 1, a.imagine_batch_size)
            index = starts[:, None] + np.arange(a.imagine_context_length)
            shares.append(len(np.unique(index)) / index.size)
        rows.append([size, float(np.mean(shares))])
    return rows


def update_rows(args, device, scale: float, rounds: int) -> tuple[list[list], str]:
    """Phase-by-phase times of one update: before, now, now with --compile (paired rounds, own agents)."""
    setups = {}
    for name in ("before", "now", "now + --compile"):
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        a, agent, optimizers = training_step.make_agent(m, scale, 6, device)
        buffer = training_step.fill_buffer(m, args.buffer_steps, 6, rng)
        rollout_step_fn = m.compile_one_step() if "compile" in name else m.imagine_one_step
        setups[name] = (a, agent, optimizers, buffer, rng, rollout_step_fn)
    runs = {name: [] for name in setups}
    shares = {name: [] for name in setups}

    def update(name):
        a, agent, optimizers, buffer, rng, rollout_step_fn = setups[name]
        phases = training_step.Phases(device)
        hooks = phases.hook_world_model(agent.world_model)
        autocast = contextlib.nullcontext
        with before() if name == "before" else contextlib.nullcontext():
            training_step.instrumented_update(
                m, agent, optimizers, buffer, a, rng, device, autocast, phases, rollout_step_fn
            )
        for handle in hooks:
            handle.remove()
        shares[name] += phases.distinct_shares
        return phases.seconds

    names = list(setups)
    for name in names:  # warm-up (and compile)
        start = time.perf_counter()
        update(name)
        print(f"  warm-up update, {name}: {time.perf_counter() - start:.1f} s", flush=True)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name].append(dict(update(name)))
            print(f"  round {r + 1}/{rounds}, {name}: {time.perf_counter() - start:.1f} s", flush=True)
    a = setups["now"][0]
    table = {}
    for name in names:
        per_round = [
            training_step.breakdown_rows(a, run, {}, float(np.mean(shares[name]))) for run in runs[name]
        ]  # rounds x phases x (label, seconds, flops)
        table[name] = per_round
    rows = []
    for i, (label, _, _) in enumerate(table["now"][0]):
        seconds = {n: C.median([run[i][1] for run in table[n]]) for n in names}
        ratio = {
            n: C.median(
                [b[i][1] / x[i][1] if x[i][1] else float("nan") for b, x in zip(table["before"], table[n], strict=True)]
            )
            for n in names[1:]
        }
        rows.append([label, *[1e3 * seconds[n] for n in names], ratio["now"], ratio["now + --compile"]])
    note = (
        f"distinct context frames: {np.mean(shares['now']):.2f} of {a.imagine_batch_size * a.imagine_context_length}"
        f" per update (buffer of {args.buffer_steps:,} random steps)"
    )
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, timing=False)
    parser.add_argument("--scale", type=float, default=None, help="batch fraction (default 1, --quick 0.5)")
    parser.add_argument("--buffer-steps", type=int, default=25000, help="random steps in the replay buffer")
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds (default 3, --quick 2)")
    args = parser.parse_args()
    device = C.setup(args)
    scale = args.scale if args.scale is not None else (0.5 if args.quick else 1.0)
    rounds = args.rounds or (2 if args.quick else 3)
    print("# What each speed-up of drama_xs.py buys (before: commit 9f2b760)\n")
    print(C.machine_info(device, False))
    print(f"- {rounds} paired rounds after one warm-up; ratios: median over rounds of before / now within a round")
    print(flush=True)

    torch.manual_seed(args.seed)
    agent = m.Agent(m.Args(), 6).to(device)
    batch = round(1024 * scale)
    rows = component_rows(agent, device, 5 * rounds, batch)
    print("## Each change on the piece it touches\n")
    print(C.format_table(["change", "on", "before ms", "now ms", "before / now"], rows), flush=True)

    print("\n## Distinct frames among the imagination context frames (1024 starts x 8 frames, uniform starts)\n")
    rows = distinct_share_rows(m.Args(), np.random.default_rng(args.seed))
    print(C.format_table(["replay buffer steps", "distinct share"], rows), flush=True)

    print(f"\n## One update, phase by phase (drama_xs, batch scaled by {scale:g})\n", flush=True)
    rows, note = update_rows(args, device, scale, rounds)
    headers = ["phase", "before ms", "now ms", "now + --compile ms", "before / now", "before / (now + --compile)"]
    print()
    print(C.format_table(headers, rows))
    print(note)


if __name__ == "__main__":
    main()
