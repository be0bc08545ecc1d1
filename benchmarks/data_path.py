"""The data path of an update (DFS draw, gather, copy to the device, sync) and its share of the whole update; with
`--against REF`, this tree's drama_xs.py against the one of git commit REF (`git show REF:drama_xs.py`), both in
this process.

What it measures
    - wm batch: the world model's DFS draw (16 starts) and its 16 x 128 steps gathered onto --device;
    - img batch: the imagination's DFS draw (1024 starts) and the distinct frames of their 8-step contexts with
      frame_index, gathered onto --device;
    - whole update: train_world_model + train_actor_critic (which include both batches), unless --no-update.
    Each script gets its own agent and replay buffer of the same random steps and the same seeds; a script whose
    ReplayBuffer takes a device keeps the steps there (on a GPU: gathered there), an older one on the host. Rounds
    are paired (one run of each script per round, the order alternating) and each ratio is the median over rounds
    of the ratio within a round: this machine's speed drifts from minute to minute.

How to run (from the repository root)
    python benchmarks/data_path.py --quick                        # a quarter of the paper's batch, no --against
    python benchmarks/data_path.py --against main --threads 1 --scale 0.25 --rounds 8
    python benchmarks/data_path.py --device cuda --against main   # on a GPU
"""

import argparse
import contextlib
import importlib.util
import inspect
import os
import subprocess
import tempfile
import time

import _common as C
import numpy as np
import torch


def load_script_at(ref: str):
    """drama_xs.py as committed at git `ref`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:drama_xs.py"], cwd=C.REPO_ROOT, capture_output=True, text=True)
    if source.returncode:
        raise SystemExit(f"error: git show {ref}:drama_xs.py failed: {source.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(), f"drama_xs_at_{ref.replace('/', '_')}.py")
    with open(path, "w") as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_setup(m, scale: float, steps: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    a = m.Args()
    a.batch_size, a.imagine_batch_size = max(1, round(16 * scale)), max(1, round(1024 * scale))
    agent = m.Agent(a, 6).to(device)
    optimizers = (
        *m.make_optimizer(agent.world_model.parameters(), a.wm_lr, a.warmup_updates),
        *m.make_optimizer(agent.actor_critic.parameters(), a.ac_lr, a.warmup_updates),
    )
    on_device = "device" in inspect.signature(m.ReplayBuffer).parameters
    buffer = m.ReplayBuffer(steps, device=device) if on_device else m.ReplayBuffer(steps)
    for i in range(steps):
        obs = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        buffer.add(obs, int(rng.integers(6)), float(rng.random() < 0.02), bool(rng.random() < 0.005), i == 0)
    return m, a, agent, optimizers, buffer, rng


def one_round(setup, device: torch.device, update: bool) -> dict[str, float]:
    m, a, agent, optimizers, buffer, rng = setup
    seconds = {}
    for key, draw, length, distinct in (
        ("wm batch", buffer.sample_world_model_starts, a.sequence_length, False),
        ("img batch", buffer.sample_imagination_starts, a.imagine_context_length, True),
    ):
        C.sync(device)
        start = time.perf_counter()
        buffer.sequences(draw(a, rng), length, device, distinct_frames=distinct)
        C.sync(device)
        seconds[key] = time.perf_counter() - start
    if update:
        start = time.perf_counter()
        m.train_world_model(agent, *optimizers[:2], buffer, a, rng, device, contextlib.nullcontext())
        m.train_actor_critic(agent, *optimizers[2:], buffer, a, rng, device, contextlib.nullcontext())
        C.sync(device)
        seconds["whole update"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, timing=False)
    parser.add_argument("--scale", type=float, default=None, help="batch fraction (default 1, --quick 0.25)")
    parser.add_argument("--buffer-steps", type=int, default=10000, help="random steps in the replay buffer")
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds after a warm-up (default 3)")
    parser.add_argument("--against", default=None, help="a git commit whose drama_xs.py is timed too (e.g. main)")
    parser.add_argument("--no-update", action="store_true", help="time the batches only")
    args = parser.parse_args()
    device = C.setup(args)
    scale = args.scale if args.scale is not None else (0.25 if args.quick else 1.0)
    rounds = args.rounds or 3
    scripts = {"this tree": C.load_variant("drama_xs")}
    if args.against:
        scripts = {args.against: load_script_at(args.against), **scripts}
    print("# The data path of one update\n")
    print(C.machine_info(device, False))
    print(f"- batch scaled by {scale:g}; {args.buffer_steps} random steps in the buffer; {rounds} paired rounds after "
          "one warm-up; fp32\n", flush=True)  # fmt: skip
    setups = {name: make_setup(m, scale, args.buffer_steps, device, args.seed) for name, m in scripts.items()}
    for name in setups:
        one_round(setups[name], device, not args.no_update)
    runs = {name: [] for name in setups}
    for r in range(rounds):
        for name in list(setups)[:: -1 if r % 2 else 1]:
            runs[name].append(one_round(setups[name], device, not args.no_update))
    names, base = list(setups), list(setups)[0]
    headers = ["phase", *[f"{n} ms" for n in names]]
    headers += [f"{n} / {base}" for n in names[1:]] + (["share of the update"] if not args.no_update else [])
    rows = []
    for key in runs[base][0]:
        row = [key, *[C.median([run[key] for run in runs[n]]) * 1e3 for n in names]]
        row += [C.median([b[key] / a[key] for a, b in zip(runs[base], runs[n], strict=True)]) for n in names[1:]]
        if not args.no_update:
            shares = [(run["wm batch"] + run["img batch"]) / run["whole update"] for run in runs[names[-1]]]
            row.append(C.median(shares) if key == "whole update" else "")
        rows.append(row)
    print(C.format_table(headers, rows))
    if not args.no_update:
        print(f"\nshare of the update: the two batches of {names[-1]} over its whole update (median over rounds)")


if __name__ == "__main__":
    main()
