"""Training cost of the sequence mixers against sequence length: forward + backward time and activation memory.

What it measures
    Four 2-layer sequence models of width 512 (DRAMA's dynamics has 2 Mamba blocks of d_model 512; STORM's
    transformer has 2 layers of width 512), on a batch of 16 random sequences of length L, L in
    64, 128, 256, 512, 1024 (--quick: up to 512):
      - Mamba-2: drama_xs.Mamba2 with the paper's settings (d_state 16, d_conv 4, expand 2, headdim 128, chunk 64),
        in 2 pre-norm residual blocks (x + mixer(RMSNorm(x))) and a final RMSNorm, as drama_xs.Dynamics.
        On CUDA with mamba_ssm installed its scan is mamba_ssm's fused kernel, otherwise the pure-PyTorch SSD.
      - Mamba-1: the pure-PyTorch selective-scan mixer Mamba1(512, 16, 4, 2) of drama_mamba1.py, in the same
        blocks. Skipped with a note when drama_mamba1.py is missing.
      - GRU: torch.nn.GRU(512, 512, num_layers=2).
      - Transformer: 2 x torch.nn.TransformerEncoderLayer(d_model 512, 8 heads, feed-forward 1024 (STORM's 2x),
        ReLU, pre-norm, no dropout) with a causal mask (scaled-dot-product attention with is_causal).
    One timed iteration = zero grads, forward, loss = mean(y^2), backward. Untimed warm-up iterations come first;
    the median of the timed repeats is reported. The mixers are timed round-robin (one iteration of each per
    repeat), so that load from other processes on a shared machine hits them alike.

    Memory: on CPU torch keeps no peak counter, so the "saved MiB" column is the activation memory autograd holds
    for the backward pass, counted with torch.autograd.graph.saved_tensors_hooks (every tensor saved for backward,
    storages deduplicated, parameters excluded). On CUDA the table also shows the peak of
    torch.cuda.max_memory_allocated during one iteration, minus what was allocated before it (parameters, input).

How to run (from the repository root)
    python benchmarks/sequence_mixers.py --quick --threads 1          # a few minutes on a 2-core CPU
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/sequence_mixers.py
    python benchmarks/sequence_mixers.py --device cuda --bf16         # on a GPU, bf16 autocast

Columns
    L: sequence length; "<mixer> ms": median time of one forward + backward; "x Mamba-2": that time divided by
    Mamba-2's at the same L (measured in the same run); "saved MiB": activation memory for backward (see above);
    "peak MiB" (CUDA only): peak allocated memory of one iteration. The last table gives each mixer's parameter
    count and the scaling exponent k of time ~ L^k and memory ~ L^k (least-squares slope of log-log over all L).
"""

import argparse
import sys

import _common as C
import torch
import torch.nn as nn


class GRUModel(nn.Module):
    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.gru = nn.GRU(d_model, d_model, num_layers=n_layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class CausalTransformer(nn.Module):
    def __init__(self, d_model: int, n_layers: int, heads: int, ff: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        return self.encoder(x, mask=mask, is_causal=True)


def output(out) -> torch.Tensor:
    """y of a model that returns y or (y, state)."""
    return out[0] if isinstance(out, tuple) else out


def build_models(args) -> tuple[dict[str, nn.Module], list[str]]:
    d, n = args.width, args.layers
    models, notes = C.mamba_stacks(d, n)
    models["GRU"] = GRUModel(d, n)
    models["Transformer"] = CausalTransformer(d, n, 8, 2 * d)
    wanted = [m.strip() for m in args.mixers.split(",")] if args.mixers else list(models)
    return {k: v for k, v in models.items() if k in wanted}, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated L (default 64..1024, quick ..512)")
    parser.add_argument("--mixers", type=str, default=None, help="comma-separated subset, e.g. Mamba-2,GRU")
    args = parser.parse_args()
    device = C.setup(args)
    default_lengths = [64, 128, 256, 512] + ([] if args.quick else [1024])
    lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else default_lengths
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)

    models, notes = build_models(args)
    for model in models.values():
        model.to(device).train()
    print("# Sequence mixers: forward + backward vs sequence length\n")
    print(C.machine_info(device, args.bf16))
    print(f"- batch {args.batch}, width {args.width}, {args.layers} layers; warm-up {warmup}, median of {repeats}")
    for note in notes:
        print(f"- {note}")
    print(flush=True)

    times = {name: {} for name in models}
    saved = {name: {} for name in models}
    peak = {name: {} for name in models}
    for length in lengths:
        x = torch.randn(args.batch, length, args.width, device=device)
        iterations = {}
        for name, model in models.items():

            def iteration(model=model, x=x):
                model.zero_grad(set_to_none=True)
                with C.autocast(device, args.bf16):
                    y = output(model(x))
                y.float().square().mean().backward()

            times[name][length] = saved[name][length] = peak[name][length] = None
            try:  # the memory pass first (it is also a warm-up); models that run out of memory are not timed
                model.zero_grad(set_to_none=True)
                with C.SavedTensorBytes(exclude=list(model.parameters())) as counter, C.autocast(device, args.bf16):
                    y = output(model(x))
                saved[name][length] = counter.bytes / 2**20
                y.float().square().mean().backward()
                if device.type == "cuda":
                    model.zero_grad(set_to_none=True)
                    C.sync(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    iteration()
                    C.sync(device)
                    peak[name][length] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                iterations[name] = iteration
            except torch.OutOfMemoryError:
                print(f"{name} L={length}: out of memory", file=sys.stderr)
            model.zero_grad(set_to_none=True)
        for name, runs in C.measure_interleaved(iterations, device, warmup, repeats).items():
            times[name][length] = C.median(runs)
            print(f"  L={length:5d} {name:12s} {1e3 * times[name][length]:9.1f} ms", flush=True)

    names = list(models)
    base = "Mamba-2" if "Mamba-2" in names else names[0]
    others = [n for n in names if n != base]

    def ratio(table, name, length):
        a, b = table[name].get(length), table[base].get(length)
        return a / b if a is not None and b else None

    print("\n## Time of one forward + backward (ms)\n")
    headers = ["L"] + [f"{n} ms" for n in names] + [f"{n} x {base}" for n in others]
    rows = [
        [length]
        + [None if times[n][length] is None else 1e3 * times[n][length] for n in names]
        + [ratio(times, n, length) for n in others]
        for length in lengths
    ]
    print(C.format_table(headers, rows))

    print("\n## Activation memory saved for backward (MiB, saved_tensors_hooks)\n")
    headers = ["L"] + [f"{n} saved MiB" for n in names] + [f"{n} x {base}" for n in others]
    rows = [[n_] + [saved[n][n_] for n in names] + [ratio(saved, n, n_) for n in others] for n_ in lengths]
    print(C.format_table(headers, rows))
    if device.type == "cuda":
        print("\n## Peak CUDA memory of one iteration (MiB, max_memory_allocated)\n")
        headers = ["L"] + [f"{n} peak MiB" for n in names] + [f"{n} x {base}" for n in others]
        rows = [[n_] + [peak[n][n_] for n in names] + [ratio(peak, n, n_) for n in others] for n_ in lengths]
        print(C.format_table(headers, rows))

    print("\n## Scaling exponents k (time ~ L^k, memory ~ L^k; log-log least squares over all L)\n")
    rows = []
    for n in names:
        ok = [length for length in lengths if times[n][length] is not None]
        k_time = C.fit_exponent(ok, [times[n][length] for length in ok]) if len(ok) > 1 else None
        k_mem = C.fit_exponent(ok, [saved[n][length] for length in ok]) if len(ok) > 1 else None
        upper = ok[len(ok) // 2 :]
        k_upper = C.fit_exponent(upper, [times[n][length] for length in upper]) if len(upper) > 1 else None
        params = sum(p.numel() for p in models[n].parameters())
        rows.append([n, f"{params:,}", k_time, k_upper, k_mem])
    headers = ["mixer", "parameters", "k time", f"k time (L >= {lengths[len(lengths) // 2]})", "k memory"]
    print(C.format_table(headers, rows))


if __name__ == "__main__":
    main()
