"""Cost of one imagination step against context length: recurrent Mamba state vs a Transformer's KV cache.

What it measures
    In imagination the world model advances 1024 trajectories (--quick: 256) one token at a time after a real
    context of c steps (DRAMA: c = 8, horizon 16). Per model, the time of one step (no grad, eval mode) at
    c in 8, 32, 128, 512, averaged over a rollout of --horizon (16) steps that starts after the context:
      - Mamba-2: 2 pre-norm blocks of drama_xs.Mamba2 (d_model 512, d_state 16, d_conv 4, expand 2, headdim 128)
        advanced by `forward_token` on its (conv_state, ssm_state): its cost does not depend on c.
      - Mamba-1: the same blocks with the Mamba1 mixer of drama_mamba1.py, if present.
      - Transformer + KV cache: a minimal 2-layer pre-norm causal transformer (width 512, 8 heads, feed-forward
        1024, as STORM) whose step appends the new key/value to a preallocated cache and attends over the
        c context keys plus the keys generated so far (scaled_dot_product_attention).
      - GRU: 2 stacked torch.nn.GRUCell(512, 512).
      - drama_xs step: the whole imagination step of drama_xs (actor samples a_i, Dynamics.forward_token, prior head +
        latent sample, reward and termination heads), as in drama_xs.imagine; an extra row for scale.
    The states/caches at the start of the rollout are filled with random values (the cost of a step does not
    depend on them; computing a 512-step context for 1024 trajectories would take minutes on a CPU). A small
    self-check first verifies that each model's step-by-step output equals its full forward pass. The models are
    timed round-robin (one rollout of each per repeat), so that load from other processes hits them alike.

How to run (from the repository root)
    python benchmarks/imagination_step.py --quick --threads 1
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/imagination_step.py
    python benchmarks/imagination_step.py --device cuda --bf16

Columns
    c: context length; "<model> ms/step": median over repeats of (rollout time / horizon); "x Mamba-2": that time
    divided by Mamba-2's at the same c (same run); "state MiB": memory of the recurrent state / KV cache of the
    whole batch at the end of the rollout (c + horizon tokens for the cache).
"""

import argparse

import _common as C
import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCachedTransformer(nn.Module):
    """Pre-norm causal transformer (LayerNorm, MHA, ReLU feed-forward) with a preallocated KV cache."""

    def __init__(self, d_model: int, n_layers: int, heads: int, ff: int):
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(d_model),
                    "qkv": nn.Linear(d_model, 3 * d_model),
                    "out": nn.Linear(d_model, d_model),
                    "norm2": nn.LayerNorm(d_model),
                    "ff1": nn.Linear(d_model, ff),
                    "ff2": nn.Linear(ff, d_model),
                }
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def allocate_cache(self, batch: int, max_len: int, device=None, dtype=None):
        """Per layer (keys, values), each (B, heads, max_len, head_dim)."""
        shape = (batch, self.heads, max_len, self.head_dim)
        return [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in self.layers
        ]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, head_dim)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache, position: int = 0) -> torch.Tensor:
        """x (B, L, D), the tokens at positions [position, position + L): writes their keys/values to the cache and
        attends causally over the cache up to each token. L = 1 is one imagination step."""
        length, end = x.shape[1], position + x.shape[1]
        for layer, (keys, values) in zip(self.layers, cache, strict=True):
            q, k, v = layer["qkv"](layer["norm1"](x)).chunk(3, dim=-1)
            keys[:, :, position:end] = self._heads(k).to(keys.dtype)
            values[:, :, position:end] = self._heads(v).to(values.dtype)
            q = self._heads(q).to(keys.dtype)
            if length == 1:  # the newest token sees every cached key: no mask
                attention = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])
            else:  # token i of the block sees the cache up to position + i
                mask = torch.ones(length, end, dtype=torch.bool, device=x.device).tril(diagonal=position)
                attention = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask)
            x = x + layer["out"](attention.transpose(1, 2).reshape(x.shape).to(x.dtype))
            x = x + layer["ff2"](F.relu(layer["ff1"](layer["norm2"](x))))
        return self.norm(x)


class GRUStack(nn.Module):
    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.cells = nn.ModuleList(nn.GRUCell(d_model, d_model) for _ in range(n_layers))

    def forward_token(self, x: torch.Tensor, states: list[torch.Tensor]):
        new_states = []
        for cell, h in zip(self.cells, states, strict=True):
            x = cell(x, h)
            new_states.append(x)
        return x, new_states


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return sum(state_bytes(s) for s in state)


def random_like_state(state, scale: float = 0.1):
    if isinstance(state, torch.Tensor):
        return torch.randn_like(state) * scale
    return type(state)(random_like_state(s, scale) for s in state)


@torch.no_grad()
def self_check(models: dict, device: torch.device) -> list[str]:
    """Step-by-step output == full forward, on a small batch (fp32): one line per model."""
    lines, batch, length, d = [], 3, 11, 512
    x = torch.randn(batch, length, d, device=device)
    for name, model in models.items():
        if isinstance(model, C.ResidualStack):
            full, _ = model(x)
            context, state = model(x[:, :5])
            steps = [context]
            for t in range(5, length):
                y, state = model.forward_token(x[:, t], state)
                steps.append(y[:, None])
            error = (torch.cat(steps, 1) - full).abs().max().item()
        elif isinstance(model, KVCachedTransformer):
            full = model(x, model.allocate_cache(batch, length, device))
            cache = model.allocate_cache(batch, length, device)
            steps = [model(x[:, :5], cache)]
            steps += [model(x[:, t : t + 1], cache, position=t) for t in range(5, length)]
            error = (torch.cat(steps, 1) - full).abs().max().item()
        else:
            continue
        lines.append(f"{name}: max |step-by-step - full forward| = {error:.1e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser)
    parser.add_argument("--batch", type=int, default=None, help="trajectories (default 1024, quick 256)")
    parser.add_argument("--contexts", type=str, default="8,32,128,512", help="comma-separated context lengths")
    parser.add_argument("--horizon", type=int, default=16, help="imagined steps per timed rollout")
    args = parser.parse_args()
    device = C.setup(args)
    batch = args.batch or (256 if args.quick else 1024)
    contexts = [int(v) for v in args.contexts.split(",")]
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    d, n_layers, horizon = 512, 2, args.horizon

    drama_xs = C.load_variant("drama_xs")
    models, notes = C.mamba_stacks(d, n_layers)
    models["Transformer-KV"] = KVCachedTransformer(d, n_layers, 8, 2 * d)
    models["GRU"] = GRUStack(d, n_layers)
    for model in models.values():
        model.to(device).eval()
    xs_args = drama_xs.Args()
    agent = drama_xs.Agent(xs_args, action_dim=6).to(device).eval()
    wm, ac = agent.world_model, agent.actor_critic

    print("# Imagination: cost of one step vs context length\n")
    print(C.machine_info(device, args.bf16))
    print(f"- batch {batch} trajectories, horizon {horizon}; warm-up {warmup} rollouts, median of {repeats}")
    for note in notes:
        print(f"- {note}")
    for line in self_check(models, device):
        print(f"- self-check {line}")
    print(flush=True)

    xs = torch.randn(horizon, batch, d, device=device)
    times = {name: {} for name in [*models, "drama_xs step"]}
    memory = {name: {} for name in times}
    with torch.no_grad():
        for c in contexts:
            rollouts = {}
            for name, model in models.items():
                if isinstance(model, KVCachedTransformer):
                    cache = random_like_state(model.allocate_cache(batch, c + horizon, device, dtype))

                    def rollout(model=model, cache=cache, c=c):
                        with C.autocast(device, args.bf16):
                            for t in range(horizon):
                                model(xs[t][:, None], cache, position=c + t)
                        return cache

                else:  # recurrent: Mamba-2 / Mamba-1 stacks or the GRU, from a random state
                    if isinstance(model, C.ResidualStack):
                        start_state = random_like_state(model.allocate_state(batch, device, dtype))
                    else:
                        start_state = [0.1 * torch.randn(batch, d, device=device) for _ in range(n_layers)]

                    def rollout(model=model, start_state=start_state):
                        state = start_state
                        with C.autocast(device, args.bf16):
                            for t in range(horizon):
                                _, state = model.forward_token(xs[t], state)
                        return state

                rollouts[name] = rollout

            # drama_xs: imagine_one_step (actor, dynamics step, prior, sample) and the reward/termination heads
            h0 = torch.randn(batch, d, device=device)
            z0 = drama_xs.sample_latent(wm.prior(h0))
            state0 = random_like_state(wm.dynamics.allocate_state(batch, device, dtype))

            def drama_rollout(z=z0, h=h0, state=state0):
                with C.autocast(device, args.bf16):
                    for _ in range(horizon):
                        z, h, state, _ = drama_xs.imagine_one_step(wm, ac, z, h, state)
                        wm.reward(h), wm.continuation(h)
                return state

            rollouts["drama_xs step"] = drama_rollout
            for name, runs in C.measure_interleaved(rollouts, device, warmup, repeats).items():
                times[name][c] = C.median(runs) / horizon
                memory[name][c] = state_bytes(rollouts[name]()) / 2**20
                print(f"  c={c:4d} {name:15s} {1e3 * times[name][c]:8.2f} ms/step", flush=True)

    names = list(times)
    others = [n for n in names if n != "Mamba-2"]
    print(f"\n## One imagination step, batch {batch} (ms/step, mean over a {horizon}-step rollout; median of runs)\n")
    headers = ["c"] + [f"{n} ms/step" for n in names] + [f"{n} x Mamba-2" for n in others]
    rows = [
        [c] + [1e3 * times[n][c] for n in names] + [times[n][c] / times["Mamba-2"][c] for n in others] for c in contexts
    ]
    print(C.format_table(headers, rows))
    print(f"\n## State carried per rollout, batch {batch} (MiB; the KV cache holds c + {horizon} tokens)\n")
    headers = ["c"] + [f"{n} state MiB" for n in names] + [f"{n} x Mamba-2" for n in others]
    rows = [
        [c] + [memory[n][c] for n in names] + [memory[n][c] / memory["Mamba-2"][c] for n in others] for c in contexts
    ]
    print(C.format_table(headers, rows))
    if len(contexts) > 1:
        print("\n## Growth of the step time from the shortest to the longest context\n")
        first, last = contexts[0], contexts[-1]
        rows = [
            [n, times[n][last] / times[n][first], C.fit_exponent(contexts, [times[n][c] for c in contexts])]
            for n in names
        ]
        print(C.format_table(["model", f"t(c={last}) / t(c={first})", "k (t ~ c^k)"], rows))


if __name__ == "__main__":
    main()
