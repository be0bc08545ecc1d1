"""Cost of one DRAMA training update, phase by phase, with FLOPs, machine peak, env steps/s and run-time projection.

What it measures
    For drama_xs (and drama_s when drama_s.py exists; --variants picks), at the paper's batch (world model 16 x 128,
    imagination 1024 starts x (8 context + 16 imagined steps); --scale shrinks both batches, --quick halves them),
    one update = one world-model update + one actor-critic update, on a replay buffer of random frames
    (the cost does not depend on the pixels). Phases:
      world model: sample batch (DFS + gather), encode, decode, dynamics, heads + losses + latent sampling (the rest
        of WorldModel.loss), backward, optimiser (grad clip + LaProp + schedule);
      actor-critic: sample batch, imagination = context encode (8 frames per start, each distinct frame once: the
        share depends on the buffer size, --buffer-steps) + context dynamics (one chunked pass) + rollout (16
        recurrent steps with actor, prior, sampling and heads), loss (incl. the running input norm), backward,
        optimiser (clip + LaProp + schedule + slow critic). --compile runs the rollout steps torch.compile'd.
    The instrumented update calls the same module methods in the same order as drama_xs.train_world_model and
    train_actor_critic; encode/decode/dynamics are timed with forward hooks on the modules (with device syncs).
    An un-instrumented call of the real train_world_model + train_actor_critic is timed as a check.
    FLOPs: torch.utils.flop_counter.FlopCounterMode over the warm-up update (matmuls, convolutions, attention; not
    elementwise ops), per phase. Peak: the same script measures fp32 and bf16 matmuls (2048² on CPU, 8192² on
    CUDA) and the FLOP-heaviest conv layer of the encoder (fp32, channels_last), so achieved GFLOP/s can be
    compared with this machine.
    Acting: Agent.act on one frame with a full 16-step window; env: one step of the Atari100k env (ALE/Pong-v5),
    if ale-py and the ROMs are installed. Env steps/s at train_ratio 1 = 1 / (update + act + env step); the
    projection of a 100k-step run adds the 1032 random steps (env only).
    Extras (first variant only; --no-extras skips): the VAE (encoder + posterior + decoder + reconstruction loss,
    forward + backward, and the encoder alone without grad as in imagination) in channels_last (drama_xs's layout)
    vs contiguous NCHW; fp32 against bf16 autocast phase by phase (interleaved rounds; which one --precision auto
    picks on this machine, and why); and the relative
    error of the bf16 world-model loss against fp32 on the same batch with the same RNG state for the latent
    samples (next to the difference that a different latent sample makes in fp32, for scale).

How to run (from the repository root)
    python benchmarks/training_step.py --quick --threads 1                        # half batch, few repeats
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/training_step.py
    python benchmarks/training_step.py --device cuda                              # GPU: --precision auto is bf16
    python benchmarks/training_step.py --compare-precision --repeats 3            # only fp32 vs bf16, per phase
    python benchmarks/training_step.py --quick --profile                          # + torch.profiler top ops

Columns
    ms: median over the timed repeats; %: share of the whole update (world model + actor-critic); GFLOP: FLOPs of
    the phase (FlopCounterMode); GFLOP/s: GFLOP / time; ratio columns divide by the baseline named in the table
    (measured in the same run).
"""

import argparse
import contextlib
import copy
import dataclasses
import resource
import sys
import time
import warnings
from collections import defaultdict

import _common as C
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from utils.precision import autocast as precision_autocast
from utils.precision import precision_of


class Phases:
    """Wall-clock seconds (and optionally FLOPs) per named phase; module forward hooks time sub-phases."""

    def __init__(self, device: torch.device, count_flops: bool = False):
        self.device, self.count_flops = device, count_flops
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.sublabels: dict[str, str] = {}  # module key -> phase label, while a hooked phase runs
        self.counter = None
        self._open = {}
        self.distinct_shares: list[float] = []  # distinct frames / context frames, per imagination batch

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.counter = FlopCounterMode(display=False) if self.count_flops else None
        C.sync(self.device)
        start = time.perf_counter()
        with self.counter if self.counter is not None else contextlib.nullcontext():
            yield
        C.sync(self.device)
        self.seconds[name] += time.perf_counter() - start
        if self.counter is not None:
            self.flops[name] += self.counter.get_total_flops()
        self.counter = None

    def hook(self, module: nn.Module, key: str) -> list:
        def pre(module, inputs):
            label = self.sublabels.get(key)
            if label is not None:
                C.sync(self.device)
                flops = self.counter.get_total_flops() if self.counter is not None else 0
                self._open[key] = (label, time.perf_counter(), flops)

        def post(module, inputs, output):
            if key in self._open:
                label, start, flops = self._open.pop(key)
                C.sync(self.device)
                self.seconds[label] += time.perf_counter() - start
                if self.counter is not None:
                    self.flops[label] += self.counter.get_total_flops() - flops

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def hook_world_model(self, world_model: nn.Module) -> list:
        """Hook the encoder, decoder and dynamics (timed inside the phases whose `sublabels` name them)."""
        return [
            handle
            for key in ("encoder", "decoder", "dynamics")
            for handle in self.hook(world_model.get_submodule(key), key)
        ]


def make_agent(m, scale: float, action_dim: int, device: torch.device):
    """m.Args with both batches scaled, the agent, and (wm optimiser, wm schedule, ac optimiser, ac schedule)."""
    a = m.Args()
    torch.backends.cudnn.deterministic = a.torch_deterministic  # as the script's main: the same conv algorithms
    a.batch_size = max(1, round(a.batch_size * scale))
    a.imagine_batch_size = max(1, round(a.imagine_batch_size * scale))
    agent = m.Agent(a, action_dim).to(device)
    optimizers = (
        *m.make_optimizer(agent.world_model.parameters(), a.wm_lr, a.warmup_updates),
        *m.make_optimizer(agent.actor_critic.parameters(), a.ac_lr, a.warmup_updates),
    )
    return a, agent, optimizers


def fill_buffer(module, steps: int, action_dim: int, rng: np.random.Generator):
    buffer = module.ReplayBuffer(steps)
    for i in range(steps):
        obs = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buffer.add(obs, int(rng.integers(action_dim)), float(rng.random() < 0.02), bool(rng.random() < 0.005), i == 0)
    return buffer


def instrumented_update(m, agent, optimizers, buffer, a, rng, device, autocast, phases: Phases, rollout_step_fn=None):
    """One world-model + one actor-critic update: the steps of m.train_world_model and m.train_actor_critic."""
    wm_opt, wm_sched, ac_opt, ac_sched = optimizers
    wm, ac = agent.world_model, agent.actor_critic
    with phases("wm: sample batch (DFS + gather)"):
        starts = buffer.sample_world_model_starts(a, rng)
        batch = buffer.sequences(starts, a.sequence_length, device)
    wm.train()
    phases.sublabels = {"encoder": "wm: encode", "decoder": "wm: decode", "dynamics": "wm: dynamics"}
    with phases("wm: forward"), autocast():
        loss, _ = wm.loss(batch["obs"], batch["actions"], batch["rewards"], batch["terminations"])
    phases.sublabels = {}
    with phases("wm: backward"):
        wm_opt.zero_grad(set_to_none=True)
        loss.backward()
    with phases("wm: optimiser (clip + LaProp)"):
        nn.utils.clip_grad_norm_(wm.parameters(), a.wm_grad_clip)
        wm_opt.step()
        wm_sched.step()

    with phases("ac: sample batch (DFS + gather)"):
        starts = buffer.sample_imagination_starts(a, rng)
        batch = buffer.sequences(starts, a.imagine_context_length, device, distinct_frames=True)
    phases.distinct_shares.append(len(batch["frames"]) / batch["frame_index"].numel())
    wm.eval()
    phases.sublabels = {"encoder": "img: context encode", "dynamics": "img: context dynamics"}
    with phases("img: imagine"), autocast():
        features, actions, rewards, continuations = m.imagine(
            wm, ac, batch["frames"], batch["frame_index"], batch["actions"], a.imagine_horizon,
            rollout_step_fn or m.imagine_one_step,
        )
    phases.sublabels = {}
    with phases("ac: loss (+ running norm)"):
        features = features.float()
        ac.norm.update(features.flatten(0, 1))
        with autocast():
            loss, _ = ac.loss(features, actions, rewards.float(), continuations.float())
    with phases("ac: backward"):
        ac_opt.zero_grad(set_to_none=True)
        loss.backward()
    with phases("ac: optimiser (clip + LaProp + slow critic)"):
        nn.utils.clip_grad_norm_([p for p in ac.parameters() if p.requires_grad], a.ac_grad_clip)
        ac_opt.step()
        ac_sched.step()
        ac.update_slow_critic()


WM_PHASES = ["wm: sample batch (DFS + gather)", "wm: forward", "wm: backward", "wm: optimiser (clip + LaProp)"]
AC_PHASES = [
    "ac: sample batch (DFS + gather)",
    "img: imagine",
    "ac: loss (+ running norm)",
    "ac: backward",
    "ac: optimiser (clip + LaProp + slow critic)",
]


def breakdown_rows(a, s: dict[str, float], f: dict[str, int], distinct: float) -> list[tuple[str, float, int]]:
    """(label, seconds, flops) rows: top-level phases with the forward and imagination split into their parts."""

    def row(name: str, label: str | None = None):
        return (label or name, s.get(name, 0.0), f.get(name, 0))

    def rest(total: str, parts: list[str], label: str):
        return (label, s[total] - sum(s.get(p, 0.0) for p in parts), f.get(total, 0) - sum(f.get(p, 0) for p in parts))

    def total(names: list[str], label: str):
        return (label, sum(s[n] for n in names), sum(f.get(n, 0) for n in names))

    wm_parts = ["wm: encode", "wm: decode", "wm: dynamics"]
    img_parts = ["img: context encode", "img: context dynamics"]
    return [
        row(WM_PHASES[0]),
        *[row(n) for n in wm_parts],
        rest("wm: forward", wm_parts, "wm: heads + losses + latent sampling (rest of forward)"),
        row(WM_PHASES[2]),
        row(WM_PHASES[3]),
        total(WM_PHASES, "= world-model update"),
        row(AC_PHASES[0]),
        row(
            img_parts[0], f"img: context encode ({a.imagine_context_length} frames per start, {distinct:.2f} distinct)"
        ),
        row(img_parts[1], f"img: context dynamics ({a.imagine_context_length} steps, chunked)"),
        rest(
            "img: imagine", img_parts, f"img: rollout ({a.imagine_horizon} steps: actor, dynamics step, prior, heads)"
        ),
        *[row(n) for n in AC_PHASES[2:]],
        total(AC_PHASES, "= actor-critic update"),
        total(WM_PHASES + AC_PHASES, "= whole update"),
    ]


def peak_benchmarks(device, encoder: nn.Module, repeats: int) -> list[tuple[str, float, float]]:
    """(name, GFLOP, seconds) of fp32/bf16 matmuls and the encoder's FLOP-heaviest conv layer.

    On CPU the bf16 matmul starts at 512² and doubles (up to 2048²) while one call takes under 1/8 s: CPUs without
    AVX512-BF16/AMX run bf16 matmuls tens of times slower than fp32.
    """
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        size = 8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 512
        while True:
            x = torch.randn(size, size, device=device, dtype=dtype)
            y = torch.randn(size, size, device=device, dtype=dtype)
            t = C.median(C.measure(lambda x=x, y=y: x @ y, device, 1, 1 if size < 2048 else repeats))
            if device.type == "cuda" or size >= 2048 or t * 8 > 1.0:
                break
            size *= 2
        if size < 2048 or device.type == "cuda":
            t = C.median(C.measure(lambda x=x, y=y: x @ y, device, 0, repeats))
        results.append((f"matmul {size}x{size} {str(dtype)[6:]}", 2 * size**3 / 1e9, t))
    best, hw, channels = None, 64, 3
    for layer in encoder.modules():
        if isinstance(layer, nn.Conv2d):
            out_hw = (hw + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
            flops = 2 * layer.in_channels * layer.out_channels * layer.kernel_size[0] ** 2 * out_hw**2
            if best is None or flops > best[1]:
                best = (layer, flops, hw, channels)
            hw, channels = out_hw, layer.out_channels
    layer, flops, hw, channels = best
    frames = 512 if device.type == "cuda" else 128
    conv = copy.deepcopy(layer).to(device=device, memory_format=torch.channels_last)
    x = torch.randn(frames, channels, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = C.median(C.measure(lambda: conv(x), device, 1, repeats))
    name = f"conv2d {layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} s{layer.stride[0]} on {hw}x{hw}"
    results.append((f"{name}, {frames} frames fp32 (encoder's heaviest layer)", flops * frames / 1e9, t))
    return results


def vae_iteration(wm, obs: torch.Tensor, memory_format, backward: bool = True):
    """Encoder -> posterior -> latent sample -> decoder -> reconstruction loss (+ backward), in `memory_format`.

    The bodies of drama_xs's Encoder.forward and Decoder.forward with the memory format as a parameter.
    """
    x = obs.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=memory_format)  # (N, 3, 64, 64)
    if not backward:
        with torch.no_grad():
            return wm.encoder.net(x)
    features = wm.encoder.net(x).flatten(1)
    probs = wm.posterior_head(features).view(-1, *wm.stoch_shape).softmax(-1)
    onehot = F.one_hot(torch.multinomial(probs.view(-1, probs.shape[-1]), 1)[:, 0], probs.shape[-1]).view_as(probs)
    z = (onehot + probs - probs.detach()).flatten(1)
    h = wm.decoder.linear(z).view(-1, *wm.decoder.start_shape).contiguous(memory_format=memory_format)
    reconstruction = torch.sigmoid(wm.decoder.net(h))
    loss = (reconstruction - x).pow(2).sum((1, 2, 3)).mean()
    wm.zero_grad(set_to_none=True)
    loss.backward()


def compare_precisions(m, agent, optimizers, buffer, a, rng, device, rounds: int) -> None:
    """Per-phase table of fp32 against bf16 autocast: `rounds` instrumented updates of each after one warm-up each,
    interleaved (fp32, bf16, then bf16, fp32, ...) so that load from other processes hits both alike."""
    phases = Phases(device)
    hooks = phases.hook_world_model(agent.world_model)
    runs = {"fp32": [], "bf16": []}
    for r in range(rounds + 1):
        for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            phases.seconds.clear()
            start = time.perf_counter()
            instrumented_update(
                m, agent, optimizers, buffer, a, rng, device, lambda p=precision: precision_autocast(device, p), phases
            )
            load = C.load_average()
            note = "warm-up" if r == 0 else f"round {r}/{rounds}"
            print(f"  {precision} update ({note}): {time.perf_counter() - start:.1f} s, load {load:.2f}", flush=True)
            if r:
                runs[precision].append(dict(phases.seconds))
    for handle in hooks:
        handle.remove()
    share = float(np.mean(phases.distinct_shares))
    medians = {p: {k: C.median([r.get(k, 0.0) for r in v]) for k in v[0]} for p, v in runs.items()}
    rows = {p: breakdown_rows(a, seconds, {}, share) for p, seconds in medians.items()}
    table = [
        [label, 1e3 * t32, 1e3 * t16, t32 / t16 if t16 > 0 else None]
        for (label, t32, _), (_, t16, _) in zip(rows["fp32"], rows["bf16"], strict=True)
    ]
    print(
        f"\nworld model {a.batch_size} x {a.sequence_length}, imagination {a.imagine_batch_size} x "
        f"({a.imagine_context_length} + {a.imagine_horizon}); medians of {rounds} interleaved rounds\n"
    )
    print(C.format_table(["phase", "fp32 ms", "bf16 autocast ms", "speed-up fp32 / bf16"], table))
    chosen, why = precision_of("auto", device)
    print(f"\n--precision auto picks {chosen} here ({why})\n", flush=True)


def try_env():
    """(seconds per env step, note) of the Atari100k env, or (0, why not)."""
    try:
        from utils.atari import make_env

        env = make_env("ALE/Pong-v5", 0, 0, False, "benchmark")()
    except Exception as error:  # ale-py, ROMs or gymnasium missing: the env step is left out of the projection
        return 0.0, f"env step not measured ({type(error).__name__}: {error}); counted as 0"
    env.reset(seed=0)
    steps, start = 200, time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    seconds = (time.perf_counter() - start) / steps
    env.close()
    return seconds, "env step: ALE/Pong-v5 (frameskip 4, max-pool, resize to 64x64), random actions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--variants", type=str, default="drama_xs,drama_s", help="scripts to load (missing: skipped)")
    parser.add_argument("--scale", type=float, default=None, help="batch fraction (default 1, --quick 0.5)")
    parser.add_argument("--action-dim", type=int, default=6, help="actions of the game (Pong: 6)")
    parser.add_argument(
        "--buffer-steps",
        type=int,
        default=25000,
        help="random steps stored in the replay buffer (25,000: the share of distinct imagination context frames, "
        "~0.86, is then about its average over a 100k-step run)",
    )
    parser.add_argument("--total-timesteps", type=int, default=100_000, help="steps of the projected run")
    parser.add_argument("--no-extras", action="store_true", help="skip the memory-format and bf16 comparisons")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one update")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the imagination step, as drama_xs.py --compile"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="precision of the phase table, as drama_xs.py --precision (auto: its rule; --bf16 = --precision bf16)",
    )
    parser.add_argument(
        "--compare-precision",
        action="store_true",
        help="only the per-phase fp32 vs bf16 table of the first variant (--repeats interleaved rounds of each)",
    )
    args = parser.parse_args()
    device = C.setup(args)
    args.precision, precision_why = precision_of("bf16" if args.bf16 else args.precision, device)
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # rms_norm under autocast
    scale = args.scale if args.scale is not None else (0.5 if args.quick else 1.0)
    # at least one: the first (untimed) update counts the FLOPs; with --compile a second one compiles
    warmup = max(2 if args.compile else 1, args.warmup or 1)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    extra_repeats = 1 if args.quick else 3

    print("# DRAMA training update: phases, FLOPs, throughput\n")
    print(C.machine_info(device, args.precision == "bf16"))
    auto, auto_why = precision_of("auto", device)
    print(f"- precision chosen: {args.precision} ({precision_why}); auto: {auto} ({auto_why})")
    if args.compare_precision:
        m = C.load_variant(args.variants.split(",")[0].strip())
        torch.manual_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        a, agent, optimizers = make_agent(m, scale, args.action_dim, device)
        buffer = fill_buffer(m, max(args.buffer_steps, a.sequence_length + 1), args.action_dim, rng)
        print(f"\n## {m.__name__}: fp32 vs bf16 autocast, per phase\n", flush=True)
        compare_precisions(m, agent, optimizers, buffer, a, rng, device, repeats)
        return
    print(
        f"- warm-up {warmup} update(s) (FLOPs counted on the first), median of {repeats}; extras: median of "
        f"{extra_repeats}"
    )
    print(
        f"- imagination step: {'torch.compile (the FLOP-counting update runs it eager)' if args.compile else 'eager'}"
    )
    print(flush=True)

    peaks = peak_benchmarks(device, C.load_variant("drama_xs").Encoder((16, 32, 48, 64, 64)), 3)
    print("## Machine peak (micro-benchmarks in this run)\n")
    print(C.format_table(["kernel", "GFLOP", "ms", "GFLOP/s"], [[n, g, 1e3 * t, g / t] for n, g, t in peaks]))
    peak = {"fp32": peaks[0][1] / peaks[0][2], "bf16": peaks[1][1] / peaks[1][2]}
    print(flush=True)

    env_seconds, env_note = try_env()
    for index, name in enumerate(v.strip() for v in args.variants.split(",")):
        m = C.load_variant(name)
        if m is None:
            print(f"## {name}: skipped ({name}.py does not exist)\n")
            continue
        run_variant(
            name,
            m,
            args,
            device,
            scale,
            warmup,
            1 if args.quick and index > 0 else repeats,  # --quick: one timed update of the later variants
            peak,
            env_seconds,
            env_note,
            extra_repeats if index == 0 and not args.no_extras else 0,
        )


def run_variant(name, m, args, device, scale, warmup, repeats, peak, env_seconds, env_note, extra_repeats):
    def autocast():
        return precision_autocast(device, args.precision)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    a, agent, optimizers = make_agent(m, scale, args.action_dim, device)
    buffer = fill_buffer(m, max(args.buffer_steps, a.sequence_length + 1), args.action_dim, rng)
    counts = agent.world_model.parameter_counts()
    batch_note = "the paper's batch" if scale == 1 else f"batch scaled by {scale:g}; the paper's: 16 x 128, 1024"
    print(
        f"## {name}: world model {counts['total']:,} parameters; world-model batch {a.batch_size} x "
        f"{a.sequence_length}, imagination {a.imagine_batch_size} x ({a.imagine_context_length} + "
        f"{a.imagine_horizon}) ({batch_note})\n",
        flush=True,
    )

    phases = Phases(device)
    hooks = phases.hook_world_model(agent.world_model)
    runs, flops = [], {}
    rollout_step_fn = m.compile_one_step() if args.compile else m.imagine_one_step  # the first update runs eager
    for i in range(warmup + repeats):
        phases.count_flops = i == 0
        phases.seconds.clear()
        start = time.perf_counter()
        this_update_fn = rollout_step_fn if i else None  # the first update runs eager
        instrumented_update(m, agent, optimizers, buffer, a, rng, device, autocast, phases, this_update_fn)
        note = " (warm-up, counting FLOPs)" if i == 0 else " (warm-up)" if i < warmup else ""
        print(f"  update {i + 1}/{warmup + repeats}: {time.perf_counter() - start:.1f} s{note}", flush=True)
        if i == 0:
            flops = dict(phases.flops)
        if i >= warmup:
            runs.append(dict(phases.seconds))
    for handle in hooks:
        handle.remove()
    per_phase = {k: C.median([r.get(k, 0.0) for r in runs]) for k in runs[0]}
    rows = breakdown_rows(a, per_phase, flops, float(np.mean(phases.distinct_shares)))
    by_label = {label: (t, fl) for label, t, fl in rows}
    update_time, total_flops = by_label["= whole update"]
    rollout_time = next(t for label, t, _ in rows if label.startswith("img: rollout"))

    # the real functions, un-instrumented, as a check of the sum of the phases
    def real_update():
        m.train_world_model(agent, optimizers[0], optimizers[1], buffer, a, rng, device, autocast())
        m.train_actor_critic(agent, optimizers[2], optimizers[3], buffer, a, rng, device, autocast(), rollout_step_fn)

    check = not args.quick or repeats > 1  # --quick checks the first variant only
    real_time = C.median(C.measure(real_update, device, 0, 1 if args.quick else 2)) if check else None

    # acting: one frame with a full window
    agent.reset(1)
    frame = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    for _ in range(a.act_context_length + 1):
        agent.act(frame, np.array([False]))
    act_time = C.median(C.measure(lambda: agent.act(frame, np.array([False])), device, 2, 10 if args.quick else 30))

    table = [
        [label, 1e3 * t, 100 * t / update_time, fl / 1e9, fl / 1e9 / t if t > 0 and fl else None]
        for label, t, fl in rows
    ]
    if real_time is not None:
        label = f"(check) real {name}.train_world_model + train_actor_critic, un-instrumented"
        table.append([label, 1e3 * real_time, 100 * real_time / update_time, None, None])
    print("\n" + C.format_table(["phase", "ms", "% of update", "GFLOP", "GFLOP/s"], table))
    per_step = 1e3 * rollout_time / a.imagine_horizon
    print(f"\nimagination rollout: {per_step:.1f} ms per step at batch {a.imagine_batch_size}")
    achieved = total_flops / 1e9 / update_time
    # the fp32 peak again, now: on a shared machine the load may have changed since the start; the best is used
    size = 8192 if device.type == "cuda" else 2048
    x = torch.randn(size, size, device=device)
    peak["fp32"] = max(peak["fp32"], 2 * size**3 / 1e9 / min(C.measure(lambda: x @ x, device, 1, 3)))
    print(
        f"achieved {achieved:.1f} GFLOP/s over the update = {100 * achieved / peak['fp32']:.1f}% of the measured "
        f"fp32 matmul peak ({peak['fp32']:.1f} GFLOP/s, the best of this run's measurements)"
    )
    step_time = update_time + act_time + env_seconds
    random_steps = min(a.random_steps, args.total_timesteps)
    learning_steps = args.total_timesteps - random_steps

    def hours(update: float) -> float:
        return (random_steps * env_seconds + learning_steps * (update + act_time + env_seconds)) / 3600

    throughput = [
        ["update (world model + actor-critic)", 1e3 * update_time],
        ["act (Agent.act, 1 env, window 16)", 1e3 * act_time],
        ["env step", 1e3 * env_seconds],
        ["env steps/s at train_ratio 1", 1 / step_time],
        [f"projected hours for {args.total_timesteps:,} steps", hours(update_time)],
    ]
    if scale != 1:
        throughput.append(
            ["projected hours at the paper's batch (update time / scale: an estimate)", hours(update_time / scale)]
        )
    print("\n" + C.format_table(["end to end", "ms, steps/s or hours"], throughput))
    memory = f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB"
    if device.type == "cuda":
        memory += f", CUDA peak {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"
    print(f"({env_note}; {memory})\n", flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            instrumented_update(m, agent, optimizers, buffer, a, rng, device, autocast, Phases(device))
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20) + "\n", flush=True)

    if extra_repeats:
        ratio = peak["fp32"] / peak["bf16"]
        extras(m, agent, a, optimizers, buffer, rng, device, extra_repeats, ratio, 512 if args.quick else None)


def extras(m, agent, a, optimizers, buffer, rng, device, repeats, bf16_slowdown, max_frames=None):
    print("## Extras: memory format of the VAE\n", flush=True)
    starts = buffer.sample_world_model_starts(a, rng)
    obs = buffer.sequences(starts, a.sequence_length, device)["obs"].flatten(0, 1)  # (B*L, 64, 64, 3)
    obs = obs[: max_frames or len(obs)]  # --quick: a slice of the batch (the ratio barely depends on it)
    wm_cl = agent.world_model.train()
    wm_nchw = copy.deepcopy(wm_cl).to(memory_format=torch.contiguous_format)
    frames_img = obs[: min(len(obs), a.imagine_batch_size * a.imagine_context_length)]
    rows = []
    for label, frames, backward in [
        (f"VAE forward + backward, {len(obs)} frames (of the world-model batch)", obs, True),
        (f"encoder forward, no grad, {len(frames_img)} frames (imagination context)", frames_img, False),
    ]:
        t_cl = C.median(
            C.measure(lambda f=frames, b=backward: vae_iteration(wm_cl, f, torch.channels_last, b), device, 1, repeats)
        )
        t_nchw = C.median(
            C.measure(
                lambda f=frames, b=backward: vae_iteration(wm_nchw, f, torch.contiguous_format, b), device, 1, repeats
            )
        )
        rows.append([label, 1e3 * t_cl, 1e3 * t_nchw, t_nchw / t_cl])
        print(f"  {label}: done", flush=True)
    print("\n" + C.format_table(["VAE work", "channels_last ms (drama_xs)", "contiguous NCHW ms", "NCHW / CL"], rows))

    print("\n## Extras: bf16 autocast vs fp32\n", flush=True)
    if bf16_slowdown > 4:  # no bf16 hardware: a paper-batch bf16 update would take many minutes
        small = dataclasses.replace(a, batch_size=1, imagine_batch_size=64)
        print(
            f"bf16 matmuls are {bf16_slowdown:.0f}x slower than fp32 here (no AVX512-BF16/AMX), so both precisions "
            f"are timed at a small batch: world model {small.batch_size} x {small.sequence_length}, imagination "
            f"{small.imagine_batch_size} x ({small.imagine_context_length} + {small.imagine_horizon})\n"
        )
    else:
        small = a
    compare_precisions(m, agent, optimizers, buffer, small, rng, device, repeats)

    # relative error of the bf16 loss: same batch, same RNG state for the latent samples
    starts = buffer.sample_world_model_starts(a, rng)
    batch = buffer.sequences(starts, a.sequence_length, device)
    wm = agent.world_model.train()
    losses = {}
    with torch.no_grad():
        for key, enabled, seed in [("fp32", False, 1), ("bf16", True, 1), ("fp32 other sample", False, 2)]:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                with C.autocast(device, enabled):
                    _, metrics = wm.loss(batch["obs"], batch["actions"], batch["rewards"], batch["terminations"])
            losses[key] = {k: float(v) for k, v in metrics.items()}
    rows = []
    for k, ref in losses["fp32"].items():
        rel = abs(losses["bf16"][k] - ref) / max(abs(ref), 1e-12)
        noise = abs(losses["fp32 other sample"][k] - ref) / max(abs(ref), 1e-12)
        rows.append([k, ref, losses["bf16"][k], rel, noise])
    print(
        "\n"
        + C.format_table(
            [
                "world-model loss term",
                "fp32",
                "bf16 autocast",
                "bf16 vs fp32: rel. error",
                "fp32 other latent sample: rel. diff",
            ],
            rows,
        )
    )
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
