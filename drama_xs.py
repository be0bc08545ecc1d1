# DRAMA (Wang et al., 2025), CleanRL style: a Mamba-2 world model trained with dynamic frequency-based
# sampling (DFS) and a DreamerV3-style actor-critic trained in imagination, on Atari100k.
# Paper: "Drama: Mamba-Enabled Model-Based Reinforcement Learning Is Sample and Parameter Efficient".
# One complete file per agent: drama_xs.py (the default), drama_s.py, drama_mamba1.py and
# drama_uniform_sampling.py. `diff drama_xs.py drama_mamba1.py` shows an ablation and nothing else.
#
# Shape letters. Sizes are lower case; the SSM's A, B, C, D keep the papers' names, and h is a state, never a size.
# The shape comments use these letters, not one agent's numbers, so they hold for every variant:
#   b   batch: sequences, imagined trajectories or environments   l   sequence length (steps in one dynamics pass)
#   m   rows of one flat batch (frames or features, e.g. b * l)   w   real (z, a) pairs an action is chosen from
#   v   imagined steps per trajectory (imagine_horizon)           f   encoder features (its last map, flattened)
#   zv  categorical variables of the latent (stoch_categoricals)  zc  classes per variable (stoch_classes)
#   z   width of the latent z: zv * zc (one-hot samples)          d   width of h and of the Mamba blocks (d_model)
#   e   inner width of a Mamba mixer (expand * d)                 n   SSM state size (d_state)
#   k   width of a mixer's causal conv (d_conv)                   bins  reward and critic two-hot bins (TWOHOT_BINS)
# The Mamba mixer's own letters are given with it.
import math
import os
import random
import sys
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from utils import UserError, checkpoint, run_cli, runs
from utils.atari import make_env
from utils.checks import check_ranges
from utils.dream import log_dream
from utils.evaluate import final_evaluation
from utils.laprop import LaProp
from utils.mamba_kernels import load_ssd_scan, mamba_ssm_version
from utils.progress import ProgressLine, start_logging
from utils.runs import RunOptions, start_run

# mamba_ssm's fused Mamba-2 scan (Triton; utils/mamba_kernels.py loads it also from a mamba-ssm built without
# its CUDA extensions), or None and why not: the mixer then runs its pure-PyTorch scan
mamba_chunk_scan_combined, MAMBA_SSM_ERROR = load_ssd_scan()
TRITON_SCAN = mamba_chunk_scan_combined is not None  # Triton compiles its kernels on first use: needs a C compiler

VARIANT = os.path.basename(__file__)[: -len(".py")]  # recorded in saved agents and checkpoints


def scan_backend(device: torch.device) -> str:
    """Which scan the Mamba mixer runs on `device`, and why (printed at start-up)."""
    why = [] if device.type == "cuda" else [f"running on {device.type}"]
    if MAMBA_SSM_ERROR:
        why.append(MAMBA_SSM_ERROR)
    return f"pure PyTorch ({'; '.join(why)})" if why else f"fused mamba_ssm {mamba_ssm_version()}"


@dataclass
class Args(RunOptions):
    """XS agent: the paper's default 7M-parameter world model (Tables 2-3) with Mamba-2 and DFS."""

    exp_name: str = VARIANT
    """the name of this experiment (the script's name: run names and Hub repo ids tell variants apart)"""

    # Environment (Atari100k protocol)
    env_id: str = "ALE/Krull-v5"
    """the environment: an `ALE/<Game>-v5` id (Atari100k protocol), or any registered Gymnasium id with image
    observations and discrete actions (frames resized to 64x64), e.g. the sanity game `drama/Catch-v0`"""
    total_timesteps: int = 100_000
    """agent steps in the environment (frameskip 4: 100k steps = 400k frames, the Atari100k budget)"""
    sticky_actions: bool = False
    """repeat the previous action with probability 0.25 (off in the Atari100k protocol)"""
    random_steps: int = 1032
    """uniformly random actions before training starts"""
    train_ratio: float = 1.0
    """world-model and actor-critic updates per environment step after `random_steps` (DreamerV3's train ratio counts
    replayed steps per environment step instead: ours x batch_size x sequence_length, 2,048 at the defaults)"""
    buffer_size: int = 100_000
    """replay capacity in steps (uint8 frames: 100k steps take 1.2 GB)"""
    act_on_posterior: bool = False
    """act on the posterior of the newest frame (as DreamerV3) instead of the prior predicted before it
    (the published code, the default)"""
    act_context_length: int = 16
    """real (z, a) pairs the dynamics runs over to choose an action (published code: 16)"""

    # World model (paper Tables 2-3; XS)
    encoder_filters: tuple[int, ...] = (16, 32, 48, 64, 64)
    """filters of the encoder's conv layers, one layer each (2 to 7 layers; kernel 5); the decoder mirrors them"""
    stoch_categoricals: int = 32
    """categorical variables in the latent z"""
    stoch_classes: int = 32
    """classes per categorical variable"""
    d_model: int = 512
    """width of the dynamics model (the deterministic state h)"""
    n_layers: int = 2
    """Mamba blocks in the dynamics model"""
    d_state: int = 16
    """SSM state size n (of each head in Mamba-2, of each inner channel in Mamba-1)"""
    d_conv: int = 4
    """kernel size of Mamba's causal depthwise convolution"""
    expand: int = 2
    """Mamba's inner width is expand * d_model"""
    headdim: int = 128
    """Mamba-2 head dimension p (paper Table 3; the published code uses mamba_ssm's default 64)"""
    chunk_size: int = 64
    """chunk length q of the chunked SSD scan (a speed setting: results do not depend on it)"""
    head_hidden: int = 256
    """hidden units of the reward and termination heads"""
    free_bits: float = 1.0
    """KL free bits: the dynamics and representation losses are max(free_bits, KL averaged over the batch)"""
    dyn_loss_scale: float = 1.0
    """weight of the dynamics loss KL(sg(posterior) || prior)"""
    rep_loss_scale: float = 0.1
    """weight of the representation loss KL(posterior || sg(prior))"""
    batch_size: int = 16
    """world-model batch: sequences per update"""
    sequence_length: int = 128
    """world-model batch: steps per sequence"""
    wm_lr: float = 4e-5
    """world-model LaProp learning rate"""
    wm_grad_clip: float = 1000.0
    """world-model gradient-norm clip"""

    # DFS (paper section 2.4)
    tau: float = 10.0
    """DFS temperature of the world-model sampler: p_i = softmax(-n_wm[i] / tau)"""
    tau_img: float = 10.0
    """DFS temperature of the imagination sampler"""
    alpha: float = 1.0
    """DFS imagination weight of the normalised imagination count k_i"""
    beta: float = 1.0
    """DFS imagination weight of max(0, n_wm[i] - k_i)"""

    # Imagination and actor-critic (paper A.2.4, DreamerV3)
    imagine_batch_size: int = 1024
    """starts of imagined trajectories per actor-critic update"""
    imagine_context_length: int = 8
    """real steps the dynamics runs over before imagining"""
    imagine_horizon: int = 16
    """imagined steps per trajectory"""
    actor_hidden: int = 256
    """hidden units of the actor's 2 layers"""
    critic_hidden: int = 512
    """hidden units of the critic's 2 layers"""
    gamma: float = 0.985
    """discount factor"""
    lam: float = 0.95
    """lambda of the lambda-returns"""
    entropy_coef: float = 3e-4
    """actor entropy bonus"""
    ac_lr: float = 4e-5
    """actor-critic LaProp learning rate"""
    ac_grad_clip: float = 100.0
    """actor-critic gradient-norm clip"""
    slow_critic_decay: float = 0.98
    """EMA decay of the slow critic used as a regulariser"""
    return_norm_decay: float = 0.99
    """EMA decay of the 5th/95th percentiles of the lambda-returns"""
    warmup_updates: int = 1000
    """linear learning-rate warm-up of both optimisers"""


def check_args(args: Args) -> None:
    """Fail early, with one line naming the fix, on values the model cannot work with (ranges: utils/checks.py)."""
    check_ranges(args)
    if args.imagine_context_length > args.sequence_length:
        raise UserError(f"--imagine-context-length {args.imagine_context_length} is longer than --sequence-length "
                        f"{args.sequence_length}: lower it or raise --sequence-length")
    if args.tau <= 0 or args.tau_img <= 0:
        raise UserError(f"the DFS temperatures --tau {args.tau} and --tau-img {args.tau_img} must be positive")
    d_inner = args.expand * args.d_model  # headdim and chunk_size are positive (check_ranges)
    if d_inner % args.headdim:
        raise UserError(f"--headdim {args.headdim} must be positive and divide expand * d_model = {d_inner}")
    if len(args.encoder_filters) < 2 or 64 % 2 ** (len(args.encoder_filters) - 1) or min(args.encoder_filters) <= 0:
        raise UserError("--encoder-filters needs 2 to 7 positive widths (the first keeps 64x64, each next halves it)")


# ----------------------------------------------------------------------------------------------------------
# Discrete VAE (paper 2.2.1, Table 2): 64x64 RGB -> zv categoricals x zc classes -> 64x64 RGB
# ----------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """One conv layer per filter, kernel 5, BatchNorm + SiLU; the first keeps 64x64, each next halves it; the last
    map (filters[-1], 64 / 2^(layers - 1), same) flattened gives the f features."""

    def __init__(self, filters: tuple[int, ...]):
        super().__init__()
        layers, in_channels = [], 3
        for i, out_channels in enumerate(filters):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_channels, out_channels, 5, stride, 2), nn.BatchNorm2d(out_channels), nn.SiLU()]
            in_channels = out_channels
        self.net = nn.Sequential(*layers)
        self.out_dim = filters[-1] * (64 // 2 ** (len(filters) - 1)) ** 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (m, 64, 64, 3) uint8 -> features (m, f)."""
        x = obs.permute(0, 3, 1, 2).float().div(255)  # (m, 3, 64, 64), channels_last in memory: no copy
        if self.training:
            return self.net(x).flatten(1)  # (m, f)
        for conv, norm in zip(self.net[0::3], self.net[1::3], strict=True):  # eval: BatchNorm folded into the conv
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)  # (the conv's output channels,)
            bias = (conv.bias - norm.running_mean) * scale + norm.bias
            x = F.silu(F.conv2d(x, conv.weight * scale[:, None, None, None], bias, conv.stride, conv.padding))
        return x.flatten(1)  # (m, f)


class Decoder(nn.Module):
    """Mirror of the encoder: linear -> its last map, transposed convs through the filters reversed, one to RGB."""

    def __init__(self, filters: tuple[int, ...], latent_dim: int):
        super().__init__()
        mirrored = filters[::-1]  # the encoder's widths, last first
        self.start_shape = (mirrored[0], 64 // 2 ** (len(filters) - 1), 64 // 2 ** (len(filters) - 1))
        self.linear = nn.Linear(latent_dim, math.prod(self.start_shape))
        layers = [nn.BatchNorm2d(mirrored[0]), nn.SiLU()]
        for in_channels, out_channels in zip(mirrored[:-1], mirrored[1:], strict=True):
            deconv = nn.ConvTranspose2d(in_channels, out_channels, 5, 2, 2, output_padding=1)
            layers += [deconv, nn.BatchNorm2d(out_channels), nn.SiLU()]
        layers += [nn.ConvTranspose2d(mirrored[-1], 3, 5, 1, 2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (m, z) -> reconstruction (m, 3, 64, 64) in [0, 1]."""
        x = self.linear(z).view(-1, *self.start_shape).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.net(x))  # (m, 3, 64, 64)


def unimix_probs(logits: torch.Tensor, unimix: float = 0.01) -> torch.Tensor:
    """Categorical probabilities mixed with 1% uniform (DreamerV3): no class is ever impossible."""
    probs = logits.float().softmax(-1)  # fp32 under bf16 autocast: the KL terms and sampling read these
    return (1 - unimix) * probs + unimix / logits.shape[-1]


def sample_latent(probs: torch.Tensor) -> torch.Tensor:
    """One-hot sample with straight-through gradients (Bengio et al., 2013): (..., zv, zc) -> (..., z).

    Inverse-CDF sampling: the class is the number of cumulative probabilities below u ~ U(0, 1) (on CPU 7-10x
    faster than torch.multinomial, which the imagination rollout calls 16 times per update).
    """
    cdf = probs.detach().float().cumsum(-1)  # (..., zv, zc)
    u = torch.rand(*probs.shape[:-1], 1, device=probs.device)  # (..., zv, 1)
    index = (cdf < u).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)  # (..., zv, 1)
    onehot = torch.zeros_like(probs).scatter_(-1, index, 1.0)  # (..., zv, zc)
    return (onehot + probs - probs.detach()).flatten(-2)  # (..., z)


def categorical_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of (..., zv, zc) probabilities, summed over the zv categoricals -> (...)."""
    return (p * (p.log() - q.log())).sum((-2, -1))


# ----------------------------------------------------------------------------------------------------------
# Mamba-2 mixer (Dao & Gu, 2024), pure PyTorch, with mamba_ssm's parameter names and inference cache.
#
# Its letters, with b, l, d, e, n, k above: g heads of dimension p (e = g * p); the scan cuts a sequence into
# c chunks of q steps (l = c * q after padding).
# The SSM of every head is h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = h_t C_t + D x_t (paper eq. 1-2)
# with a scalar A per head (SSD). Training computes it as a matrix product (eq. 3-4) in chunks:
# quadratic inside a chunk, a recurrence over chunk states between chunks, O(l) overall.
# Left out: ngroups > 1, the fused CUDA conv and gated norm (only the scan uses mamba_ssm's kernel).
# ----------------------------------------------------------------------------------------------------------
def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., s) -> (..., s, s) with out[..., i, j] = x[j+1] + ... + x[i] for j <= i, -inf above the diagonal.

    Summing masked copies (rather than differencing one cumsum) keeps exp(out) exact for long chunks (s: q or c + 1).
    """
    s = x.shape[-1]
    x = x[..., None].expand(*x.shape, s)  # (..., s, s): x[..., i, j] = x[i]
    strictly_lower = torch.tril(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0)
    out = torch.cumsum(x, dim=-2)  # (..., s, s)
    return out.masked_fill(~torch.tril(strictly_lower | torch.eye(s, dtype=torch.bool, device=x.device)), -torch.inf)


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked SSD scan (Dao & Gu 2024, "minimal SSD"). Returns y and the final state.

    x (b, l, g, p), dt (b, l, g) after softplus, A (g,) negative, B and C (b, l, n), initial_state (b, g, p, n).
    y (b, l, g, p); final_state (b, g, p, n). The D skip connection is added by the caller.
    The einsum subscripts use the same letters; i and j are steps of a chunk, s a chunk boundary.
    """
    batch, length, heads, headdim = x.shape
    chunk_length = min(chunk_size, length)  # q
    pad = (-length) % chunk_length  # zero inputs with zero decay leave the state unchanged
    x = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # (b, c*q, g, p): dt folded into x
    a = F.pad(dt * A, (0, 0, 0, pad))  # (b, c*q, g): log-decay of each step
    B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))  # (b, c*q, n)
    chunks = x.shape[1] // chunk_length
    x = x.view(batch, chunks, chunk_length, heads, headdim)  # (b, c, q, g, p)
    B, C = B.view(batch, chunks, chunk_length, -1), C.view(batch, chunks, chunk_length, -1)  # (b, c, q, n)
    a = a.view(batch, chunks, chunk_length, heads).permute(0, 3, 1, 2)  # (b, g, c, q)
    a_cumsum = torch.cumsum(a, dim=-1)  # (b, g, c, q)

    # 1. inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) x_j   (eq. 3-4)
    decay = torch.exp(segment_sum(a))  # (b, g, c, q, q)
    scores = torch.einsum("bcin,bcjn->bcij", C, B)  # (b, c, q, q)
    y = torch.einsum("bgcij,bcjgp->bcigp", decay * scores[:, None], x)  # (b, c, q, g, p)

    # 2. the state each chunk ends in, from its own inputs
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, g, c, q)
    states = torch.einsum("bcjn,bgcj,bcjgp->bcgpn", B, decay_to_end, x)  # (b, c, g, p, n)

    # 3. recurrence over chunk boundaries: the state entering each chunk
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_state[:, None].to(states.dtype), states], dim=1)  # (b, c+1, g, p, n)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # (b, g, c+1, c+1)
    states = torch.einsum("bgsc,bcgpn->bsgpn", chunk_decay, states)  # (b, c+1, g, p, n)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. the entering state's contribution to each output: C_i . (exp(a_1 + ... + a_i) state)
    y = y + torch.einsum("bcin,bcgpn,bgci->bcigp", C, entering, torch.exp(a_cumsum))  # (b, c, q, g, p)
    return y.reshape(batch, chunks * chunk_length, heads, headdim)[:, :length], final_state


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight: mamba_ssm's RMSNormGated with norm_before_gate=False."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y * F.silu(z)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> causal conv -> SSD scan -> gated RMSNorm -> out_proj (ngroups 1).

    `forward` runs a sequence (chunked, no loop over time) and returns the inference state it ends in;
    given a state it continues from it. `forward_token` advances one token. State: conv_state (b, e + 2n, k), the
    last k conv inputs, newest last; ssm_state (b, g, p, n), as mamba_ssm's inference cache; both contiguous and at
    least fp32 (also under bf16 autocast), so a compiled `forward_token` sees one input type from its first call.
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, headdim: int, chunk_size: int):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.nheads, self.headdim, self.chunk_size = self.d_inner // headdim, headdim, chunk_size
        self.conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: dt in [1e-3, 0.1]
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.fused_scan_on = "cuda" if TRITON_SCAN else None  # device type that runs mamba_ssm's scan (None: none)

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype)
        return conv_state, ssm_state

    def _split(self, zxbcdt: torch.Tensor):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)  # z, xBC, dt

    def forward(self, u: torch.Tensor, state=None):
        """u (b, l, d) -> y (b, l, d), (conv_state, ssm_state) after the last token."""
        batch, length, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))  # (b, l, e), (b, l, e + 2n), (b, l, g)
        if state is None:  # a fresh sequence: zero conv inputs before it, zero SSM state
            state = (torch.zeros(batch, self.conv_dim, self.d_conv, device=u.device, dtype=u.dtype), None)
        conv_state, initial_state = state
        xBC = torch.cat([conv_state[..., 1:].to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)  # (b, e + 2n, k-1+l)
        conv_state = xBC[..., -self.d_conv :]  # (b, e + 2n, k)
        xBC = F.silu(F.conv1d(xBC, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))  # (b, e + 2n, l)
        x, B, C = xBC.transpose(1, 2).split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.reshape(batch, length, self.nheads, self.headdim)  # (b, l, g, p)
        dt = F.softplus(dt + self.dt_bias)  # (b, l, g)
        A = -torch.exp(self.A_log.to(torch.promote_types(dt.dtype, torch.float32)))  # (g,) at least fp32
        if u.device.type == self.fused_scan_on:
            y, ssm_state = mamba_chunk_scan_combined(x, dt, A, B[:, :, None], C[:, :, None], self.chunk_size,
                                                     initial_states=initial_state, return_final_states=True)
        else:
            y, ssm_state = ssd_scan(x, dt, A, B, C, self.chunk_size, initial_state)
        y = y + x * self.D[:, None]  # (b, l, g, p)
        y = self.norm(y.reshape(batch, length, self.d_inner), z)  # (b, l, e)
        dtype = torch.promote_types(conv_state.dtype, torch.float32)  # bf16 -> fp32, as `forward_token` keeps its state
        return self.out_proj(y), (conv_state.to(dtype).contiguous(), ssm_state.to(dtype).contiguous())

    def forward_token(self, u: torch.Tensor, state):
        """One token: u (b, d) -> y (b, d), new (conv_state, ssm_state) (no in-place update)."""
        conv_state, ssm_state = state
        z, xBC, dt = self._split(self.in_proj(u))  # (b, e), (b, e + 2n), (b, g)
        conv_state = torch.cat([conv_state[..., 1:], xBC[..., None].to(conv_state.dtype)], dim=-1)  # (b, e+2n, k)
        xBC = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (b, e + 2n)
        x, B, C = xBC.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.view(-1, self.nheads, self.headdim)  # (b, g, p)
        dt = F.softplus(dt + self.dt_bias)  # (b, g)
        decay = torch.exp(dt * -torch.exp(self.A_log.to(torch.promote_types(dt.dtype, torch.float32))))  # (b, g)
        ssm_state = (ssm_state * decay[..., None, None]).addcmul_((dt[..., None] * x)[..., None], B[:, None, None, :])
        y = (ssm_state @ C[:, None, :, None]).squeeze(-1) + x * self.D[:, None]  # (b, g, p)
        return self.out_proj(self.norm(y.reshape(-1, self.d_inner), z)), (conv_state, ssm_state)


# ----------------------------------------------------------------------------------------------------------
# World model (paper 2.2, Figure 1): VAE + Mamba dynamics + reward and termination heads
# ----------------------------------------------------------------------------------------------------------
class MambaBlock(nn.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x)) (eps 1e-5: mamba_ssm's RMSNorm, as in the published code)."""

    def __init__(self, args: Args):
        super().__init__()
        self.norm = nn.RMSNorm(args.d_model, eps=1e-5)
        self.mixer = Mamba2(args.d_model, args.d_state, args.d_conv, args.expand, args.headdim, args.chunk_size)

    def forward(self, x, state=None):
        y, state = self.mixer(self.norm(x), state)
        return x + y, state

    def forward_token(self, x, state):
        y, state = self.mixer.forward_token(self.norm(x), state)
        return x + y, state


class Dynamics(nn.Module):
    """h_t = f(z_<=t, a_<=t) (paper eq. 5): concat(z_t, onehot(a_t)) -> linear -> RMSNorm -> SiLU -> Mamba blocks.

    As the published code: the stem's RMSNorm has eps 1e-6 (torchtune's), the blocks' and the final one 1e-5
    (mamba_ssm's); mamba_ssm's init zeroes the stem's bias and scales each mixer's out_proj by 1/sqrt(n_layers).
    """

    def __init__(self, args: Args, latent_dim: int, action_dim: int):
        super().__init__()
        self.action_dim = action_dim
        stem = nn.Linear(latent_dim + action_dim, args.d_model)
        self.stem = nn.Sequential(stem, nn.RMSNorm(args.d_model, eps=1e-6), nn.SiLU())
        self.blocks = nn.ModuleList(MambaBlock(args) for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.d_model, eps=1e-5)
        nn.init.zeros_(self.stem[0].bias)
        with torch.no_grad():
            for block in self.blocks:  # GPT-2's scaling of the layers that write to the residual stream
                block.mixer.out_proj.weight.div_(math.sqrt(args.n_layers))

    def _input(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.stem(torch.cat([z, F.one_hot(action, self.action_dim).to(z.dtype)], dim=-1))

    def forward(self, z: torch.Tensor, action: torch.Tensor, state=None):
        """z (b, l, z), action (b, l) -> h (b, l, d), per-block inference states after the last step."""
        x = self._input(z, action)  # (b, l, d)
        states = []
        for i, block in enumerate(self.blocks):
            x, block_state = block(x, state[i] if state is not None else None)
            states.append(block_state)
        return self.norm(x), states

    def forward_token(self, z: torch.Tensor, action: torch.Tensor, state):
        """One (z, a) token: z (b, z), action (b,) -> h (b, d), new states (imagination: constant cost per token)."""
        x = self._input(z, action)  # (b, d)
        states = []
        for block, block_state in zip(self.blocks, state, strict=True):
            x, block_state = block.forward_token(x, block_state)
            states.append(block_state)
        return self.norm(x), states

    def allocate_state(self, batch_size: int, device=None, dtype=None):
        return [block.mixer.allocate_state(batch_size, device, dtype) for block in self.blocks]


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


TWOHOT_BINS = 255  # outputs of the reward head and the critics (DreamerV3)


class TwoHotSymlog(nn.Module):
    """TWOHOT_BINS bins uniform in symlog space on [-20, 20]; targets as two-hot vectors (DreamerV3)."""

    def __init__(self, bins: int = TWOHOT_BINS, low: float = -20.0, high: float = 20.0):
        super().__init__()
        self.register_buffer("bins", torch.linspace(low, high, bins), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> two-hot (..., bins) of symlog(x)."""
        y = symlog(x).clamp(self.bins[0], self.bins[-1])
        below = (torch.bucketize(y, self.bins, right=True) - 1).clamp(0, len(self.bins) - 2)  # (...)
        weight_above = (y - self.bins[below]) / (self.bins[below + 1] - self.bins[below])  # (...)
        twohot = torch.zeros(*y.shape, len(self.bins), device=y.device, dtype=y.dtype)
        twohot.scatter_(-1, below[..., None], (1 - weight_above)[..., None])
        twohot.scatter_add_(-1, below[..., None] + 1, weight_above[..., None])
        return twohot

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., bins) -> expected value in real space (...)."""
        return symexp((logits.float().softmax(-1) * self.bins).sum(-1))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the two-hot target, per element (...)."""
        return -(self.encode(target) * logits.float().log_softmax(-1)).sum(-1)


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> RMSNorm -> SiLU -> Linear (paper A.2.3: one hidden layer of 256; RMSNorm eps 1e-6 as published)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.RMSNorm(hidden, eps=1e-6), nn.SiLU(), nn.Linear(hidden, out_dim))


TRUNCATED_NORMAL_STD = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2)))  # 0.8796


def fan_avg_init_(module: nn.Module) -> None:
    """DreamerV3's init, the published code's `weight_init`: a normal truncated at +-2 standard deviations and
    scaled to std sqrt(1 / fan_avg) after truncation, fan_avg = (fan_in + fan_out) / 2; zero bias.
    For Linear, Conv2d and ConvTranspose2d (`module.apply(fan_avg_init_)`); other modules are left as they are."""
    if isinstance(module, nn.Linear | nn.Conv2d | nn.ConvTranspose2d):
        weight = module.weight  # (out, in), (out, in, k, k) or (in, out, k, k)
        fan_avg = (weight.shape[0] + weight.shape[1]) * math.prod(weight.shape[2:]) / 2
        std = math.sqrt(1 / fan_avg) / TRUNCATED_NORMAL_STD
        nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)
        nn.init.zeros_(module.bias)


class WorldModel(nn.Module):
    """Encoder/decoder, posterior and prior heads, Mamba dynamics, reward and termination heads (paper 2.2)."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.stoch_shape = (args.stoch_categoricals, args.stoch_classes)
        latent_dim = args.stoch_categoricals * args.stoch_classes
        self.encoder = Encoder(args.encoder_filters)
        self.posterior_head = nn.Linear(self.encoder.out_dim, latent_dim)
        self.decoder = Decoder(args.encoder_filters, latent_dim)
        self.dynamics = Dynamics(args, latent_dim, action_dim)
        self.prior_head = nn.Linear(args.d_model, latent_dim)
        self.reward_head = mlp_head(args.d_model, args.head_hidden, TWOHOT_BINS)
        self.termination_head = mlp_head(args.d_model, args.head_hidden, 1)
        self.twohot = TwoHotSymlog()
        self.args = args
        for module in (self.encoder, self.decoder, self.reward_head, self.termination_head):
            module.apply(fan_avg_init_)  # as published; the posterior and prior heads keep PyTorch's init
        self.to(memory_format=torch.channels_last)  # conv VAE: NHWC is 1.1-1.3x faster on CPU

    def posterior(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (..., 64, 64, 3) uint8 -> posterior probabilities (..., zv, zc) with 1% unimix."""
        features = self.encoder(obs.reshape(-1, *obs.shape[-3:]))  # (m, f)
        return unimix_probs(self.posterior_head(features).view(*obs.shape[:-3], *self.stoch_shape))

    def prior(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> prior probabilities over the next latent (..., zv, zc) with 1% unimix."""
        return unimix_probs(self.prior_head(h).view(*h.shape[:-1], *self.stoch_shape))

    def reward(self, h: torch.Tensor) -> torch.Tensor:
        """Predicted reward of the action that led to h: (..., d) -> (...)."""
        return self.twohot.decode(self.reward_head(h))

    def continuation(self, h: torch.Tensor) -> torch.Tensor:
        """1 where the episode goes on after the action that led to h, 0 where it terminates: a hard 0/1, 1 where the
        termination logit is <= 0 (probability <= 0.5). DreamerV3's published code puts the probability of going on
        into the returns and the loss weights (its 2023 code took the 0/1 mode, as here)."""
        return (self.termination_head(h).squeeze(-1) <= 0).float()

    def loss(self, obs, actions, rewards, terminations):
        """Paper eq. 6-7 on a batch: obs (b, l, 64, 64, 3) uint8, actions (b, l), rewards/terminations (b, l).

        h_t (from z_<=t, a_<=t) predicts z_{t+1}, the reward r_t of a_t and the termination after a_t.
        """
        batch, length = actions.shape
        posterior = self.posterior(obs)  # (b, l, zv, zc)
        z = sample_latent(posterior)  # (b, l, z)
        reconstruction = self.decoder(z.flatten(0, 1))  # (b*l, 3, 64, 64)
        target = obs.flatten(0, 1).permute(0, 3, 1, 2).float().div(255)  # (b*l, 3, 64, 64)
        reconstruction_loss = (reconstruction - target).pow(2).sum((1, 2, 3)).mean()
        h, _ = self.dynamics(z, actions)  # (b, l, d)
        reward_loss = self.twohot.loss(self.reward_head(h), rewards).mean()
        termination_logits = self.termination_head(h).squeeze(-1).float()  # (b, l)
        termination_loss = F.binary_cross_entropy_with_logits(termination_logits, terminations)
        prior = self.prior(h[:, :-1])  # (b, l-1, zv, zc): predictions of z_1 .. z_{l-1}
        next_posterior = posterior[:, 1:]  # (b, l-1, zv, zc)
        dynamics_kl = categorical_kl(next_posterior.detach(), prior).mean()
        representation_kl = categorical_kl(next_posterior, prior.detach()).mean()
        # free bits on the batch mean, as the published code: no step's KL gets a gradient while the mean is below
        # free_bits, every step's does above it. DreamerV3 ("World model learning") takes max(1, KL) of each step
        # before the mean: only the steps above 1 nat are pushed down.
        dynamics_loss = dynamics_kl.clamp(min=self.args.free_bits)
        representation_loss = representation_kl.clamp(min=self.args.free_bits)
        total = reconstruction_loss + reward_loss + termination_loss  # paper eq. 7
        total = total + self.args.dyn_loss_scale * dynamics_loss + self.args.rep_loss_scale * representation_loss
        return total, dict(reconstruction_loss=reconstruction_loss, reward_loss=reward_loss,
                           termination_loss=termination_loss, dynamics_kl=dynamics_kl,
                           representation_kl=representation_kl, world_model_loss=total)  # fmt: skip

    def parameter_counts(self) -> dict[str, int]:
        parts = {"encoder": [self.encoder], "decoder": [self.decoder], "dynamics": [self.dynamics],
                 "posterior+prior heads": [self.posterior_head, self.prior_head],
                 "reward+termination heads": [self.reward_head, self.termination_head]}  # fmt: skip
        counts = {name: sum(p.numel() for m in modules for p in m.parameters()) for name, modules in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


# ----------------------------------------------------------------------------------------------------------
# Actor-critic (paper 2.3, A.2.4; DreamerV3)
# ----------------------------------------------------------------------------------------------------------
class RunningNorm(nn.Module):
    """Running mean/std of the actor's input (z, h), clipped at +-10 (the published VecNormalize's values); saved
    with the agent (buffers). Updated once per actor-critic update with all of its imagined features (count from
    0: the exact statistics of every feature seen), never while acting: acting and evaluation leave the agent as
    it is. The published code updates them on every actor forward (each imagination step, the loss's forward over
    the same features again, each env step), count from 1e-4: the same running average, read at other times."""

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the statistics of a batch x (m, dim) (parallel variance formula)."""
        batch_mean, batch_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        total = self.count + n
        delta = batch_mean - self.mean
        self.var.copy_((self.var * self.count + batch_var * n + delta.pow(2) * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """`layers` x (Linear -> RMSNorm -> SiLU), then a Linear output; orthogonal init with gain sqrt(2), zero bias,
    RMSNorm eps 1e-6 (the published code's `layer_init` and torchtune RMSNorm)."""
    modules, dim = [], in_dim
    for _ in range(layers):
        modules += [nn.Linear(dim, hidden), nn.RMSNorm(hidden, eps=1e-6), nn.SiLU()]
        dim = hidden
    modules.append(nn.Linear(dim, out_dim))
    for module in modules:
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight, gain=math.sqrt(2))
            nn.init.zeros_(module.bias)
    return nn.Sequential(*modules)


class ActorCritic(nn.Module):
    """Actor (2 hidden layers) on the running-normalised concat(z, h) (z + d features); critic and slow critic (2
    hidden layers, symlog two-hot over TWOHOT_BINS) on the raw concat(z, h), as the published code (z is one-hot, h
    comes out of an RMSNorm)."""

    def __init__(self, args: Args, feature_dim: int, action_dim: int):
        super().__init__()
        self.args = args
        self.norm = RunningNorm(feature_dim)
        self.actor = mlp(feature_dim, args.actor_hidden, action_dim)
        nn.init.orthogonal_(self.actor[-1].weight, gain=0.001)
        self.critic = mlp(feature_dim, args.critic_hidden, TWOHOT_BINS)
        nn.init.zeros_(self.critic[-1].weight)  # DreamerV3: the critic starts predicting 0
        self.slow_critic = mlp(feature_dim, args.critic_hidden, TWOHOT_BINS)
        self.slow_critic.load_state_dict(self.critic.state_dict())
        self.slow_critic.requires_grad_(False)
        self.twohot = TwoHotSymlog()
        self.register_buffer("return_low", torch.zeros(()))
        self.register_buffer("return_high", torch.zeros(()))

    def policy(self, features: torch.Tensor) -> torch.distributions.Categorical:
        # no argument validation: our logits need no check, and validating syncs a GPU with the CPU on every call
        return torch.distributions.Categorical(logits=self.actor(self.norm(features)).float(), validate_args=False)

    @torch.no_grad()
    def act(self, features: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """features (b, z + d) -> actions (b,)."""
        policy = self.policy(features)
        return policy.probs.argmax(-1) if greedy else policy.sample()

    def value(self, features: torch.Tensor, slow: bool = False) -> torch.Tensor:
        critic = self.slow_critic if slow else self.critic
        return self.twohot.decode(critic(features))

    def loss(self, features, actions, rewards, continuations):
        """Imagined trajectories: features (b, v+1, z+d), actions/rewards/continuations (b, v)."""
        critic_logits = self.critic(features)  # (b, v+1, bins): one pass for targets and loss
        values = self.twohot.decode(critic_logits.detach())  # (b, v+1)
        with torch.no_grad():
            returns = lambda_returns(rewards, continuations, values, self.args.gamma, self.args.lam)
            slow_values = self.value(features, slow=True)  # (b, v+1)
            slow_returns = lambda_returns(rewards, continuations, slow_values, self.args.gamma, self.args.lam)
            low, high = nearest_rank(returns, 0.05), nearest_rank(returns, 0.95)
            decay = self.args.return_norm_decay
            self.return_low.lerp_(low, 1 - decay)
            self.return_high.lerp_(high, 1 - decay)
            scale = (self.return_high - self.return_low).clamp(min=1.0)  # S = max(1, P95 - P5)
        policy = self.policy(features[:, :-1])  # (b, v) actions
        advantage = (returns - values[:, :-1]) / scale  # (b, v)
        entropy = policy.entropy()  # (b, v)
        # every imagined step weighs the same in both losses, also the steps after a predicted termination (the
        # rollout goes on past an episode's end, paper 2.3; the returns stop there, c = 0). DreamerV3's published
        # code weights each step's actor and critic loss by the product of the predicted continuations before it, so
        # steps after an imagined termination count for nothing.
        actor_loss = -(policy.log_prob(actions) * advantage).mean() - self.args.entropy_coef * entropy.mean()
        critic_logits = critic_logits[:, :-1]  # (b, v, bins): the states whose returns are known
        # the slow critic regularises the critic through a second target, the lambda-returns bootstrapped from the slow
        # values (same rewards and continuations), as the published code; DreamerV3 ("Critic learning") regularises
        # towards the slow critic's own prediction at each state instead.
        critic_loss = (self.twohot.loss(critic_logits, returns) + self.twohot.loss(critic_logits, slow_returns)).mean()
        return actor_loss + critic_loss, dict(actor_loss=actor_loss, critic_loss=critic_loss, entropy=entropy.mean(),
                                              return_scale=scale, imagined_return=returns.mean())  # fmt: skip

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters(), strict=True):
            slow.lerp_(fast, 1 - self.args.slow_critic_decay)


def nearest_rank(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-percentile of x by nearest rank, as the published code: the int(q * N)-th smallest of its N elements
    (the smallest where q * N < 1, where the published code fails)."""
    flat = x.flatten()
    return flat.kthvalue(min(max(int(q * flat.numel()), 1), flat.numel())).values


def lambda_returns(rewards, continuations, values, gamma: float, lam: float) -> torch.Tensor:
    """R_t = r_t + gamma c_t ((1 - lambda) V_{t+1} + lambda R_{t+1}), R_v = V_v (DreamerV3 eq. 7; v the horizon).

    rewards, continuations (b, v); values (b, v+1) -> returns (b, v).
    """
    returns, next_return = [], values[:, -1]
    for t in reversed(range(rewards.shape[1])):
        next_return = rewards[:, t] + gamma * continuations[:, t] * ((1 - lam) * values[:, t + 1] + lam * next_return)
        returns.append(next_return)
    return torch.stack(returns[::-1], dim=1)


# ----------------------------------------------------------------------------------------------------------
# The agent: world model + actor-critic, acting in real environments (one object for training and evaluation)
# ----------------------------------------------------------------------------------------------------------
class Agent(nn.Module):
    """Acts in N environments from a window of the last `act_context_length` real (z, a) pairs per env.

    To choose a_t the dynamics runs over the pairs up to t-1, giving h; the actor sees (z ~ prior(h), h)
    (published code) or, with `act_on_posterior`, (z ~ posterior(o_t), h). The newest frame is encoded once
    and joins the window with a_t. The first step of an episode takes a random action (empty window).
    """

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.args, self.action_dim = args, action_dim
        self.world_model = WorldModel(args, action_dim)
        self.actor_critic = ActorCritic(args, args.stoch_categoricals * args.stoch_classes + args.d_model, action_dim)
        self.reset(1)

    def reset(self, num_envs: int) -> None:
        """Empty acting windows for `num_envs` envs: window_z (b, w, z) and window_actions (b, w) on the agent's
        device (made at the first `act`), oldest pair first; window_lengths (b,) on the host: how many each holds."""
        self.window_lengths = np.zeros(num_envs, dtype=np.int64)
        self.window_z = self.window_actions = None

    @torch.no_grad()
    def act(self, obs: np.ndarray, episode_start=None, greedy: bool = False):
        """obs (b, 64, 64, 3) uint8, episode_start (b,) bool (obs is an episode's first frame) -> actions (b,); one
        frame (64, 64, 3) with one bool (as a Gymnasium env gives them) -> one action (an int).

        The windows stay on the device: one copy of obs there, one sync per call (the actions' copy back)."""
        obs = np.asarray(obs)
        if obs.shape == (64, 64, 3):
            start = None if episode_start is None else np.asarray(episode_start, dtype=bool).reshape(1)
            return int(self.act(obs[None], start, greedy)[0])
        if obs.ndim != 4 or obs.shape[1:] != (64, 64, 3):
            raise UserError(f"Agent.act takes frames (N, 64, 64, 3) or one frame (64, 64, 3), not {obs.shape}")
        if len(obs) != len(self.window_lengths):
            raise UserError(f"Agent.act got {len(obs)} frames for {len(self.window_lengths)} envs: call "
                            f"agent.reset({len(obs)}) first")  # fmt: skip
        device = next(self.parameters()).device
        if episode_start is not None:
            self.window_lengths[np.asarray(episode_start, dtype=bool)] = 0
        was_training = self.training
        self.eval()
        posterior = self.world_model.posterior(to_device(np.array(obs), device))  # (b, zv, zc)
        z_new = sample_latent(posterior)  # (b, z)
        self._windows_on(z_new.dtype, device)
        actions = torch.randint(self.action_dim, (len(obs),), device=device)
        lengths = self.window_lengths
        for length in set(lengths[lengths > 0].tolist()):  # envs with equally long windows run together
            envs = rows_of(np.flatnonzero(lengths == length), device)
            h, _ = self.world_model.dynamics(self.window_z[envs, :length], self.window_actions[envs, :length])
            h = h[:, -1]  # (len(envs), d)
            z_actor = z_new[envs] if self.args.act_on_posterior else sample_latent(self.world_model.prior(h))
            actions[envs] = self.actor_critic.act(torch.cat([z_actor, h], -1), greedy)
        self._append_to_windows(z_new, actions)
        self.train(was_training)
        return actions.cpu().numpy()

    def _windows_on(self, dtype: torch.dtype, device: torch.device) -> None:
        if self.window_z is None:
            shape = (len(self.window_lengths), self.args.act_context_length)
            self.window_z = torch.zeros(*shape, self.args.stoch_categoricals * self.args.stoch_classes, dtype=dtype)
            self.window_actions = torch.zeros(shape, dtype=torch.int64)
        self.window_z, self.window_actions = self.window_z.to(device), self.window_actions.to(device)

    def _append_to_windows(self, z: torch.Tensor, actions: torch.Tensor) -> None:
        """Each env's (z (z,), a) joins its window; a full window drops its oldest pair first."""
        full = self.window_lengths == self.args.act_context_length
        if full.any():
            envs = rows_of(np.flatnonzero(full), z.device)
            self.window_z[envs] = self.window_z[envs].roll(-1, 1)  # the oldest pair moves last, to be overwritten
            self.window_actions[envs] = self.window_actions[envs].roll(-1, 1)
        position = to_device(np.minimum(self.window_lengths, self.args.act_context_length - 1), z.device)  # (b,)
        envs = torch.arange(len(position), device=z.device)
        self.window_z[envs, position], self.window_actions[envs, position] = z, actions
        self.window_lengths = np.minimum(self.window_lengths + 1, self.args.act_context_length)

    def window_state(self) -> dict[str, torch.Tensor]:
        """The acting windows as CPU tensors (for a checkpoint): "{i}.z" (n_i, z) and "{i}.actions" (n_i,) of
        each env i with a non-empty window, oldest pair first."""
        state = {}
        for i in np.flatnonzero(self.window_lengths):
            state[f"{i}.z"] = self.window_z[i, : self.window_lengths[i]].cpu()
            state[f"{i}.actions"] = self.window_actions[i, : self.window_lengths[i]].cpu()
        return state

    def load_window_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back the windows of `window_state` (onto the agent's device); envs without one start empty."""
        self.window_lengths[:] = 0
        for key, z in tensors.items():
            if key.endswith(".z"):
                i = int(key[: -len(".z")])
                self._windows_on(z.dtype, next(self.parameters()).device)
                self.window_z[i, : len(z)], self.window_actions[i, : len(z)] = z, tensors[f"{i}.actions"]
                self.window_lengths[i] = len(z)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device` (no copy on a CPU); to a GPU through pinned memory, without a sync."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def rows_of(index: np.ndarray, device: torch.device) -> slice | torch.Tensor:
    """Row indices (ascending) as a slice when they are consecutive (no copy), else as an index tensor on `device`."""
    if index[-1] - index[0] == len(index) - 1:
        return slice(int(index[0]), int(index[-1]) + 1)
    return to_device(index, device)


# ----------------------------------------------------------------------------------------------------------
# Replay buffer with dynamic frequency-based sampling (paper 2.4)
# ----------------------------------------------------------------------------------------------------------
def draw_starts(rng: np.random.Generator, valid: int, size: int, probs: np.ndarray | None = None) -> np.ndarray:
    """`size` of the `valid` start indices, drawn without replacement (as the published buffer) from `probs`
    (uniform if None). A batch larger than the number of starts that can be drawn (those with probability > 0)
    takes each of them once and draws the rest with replacement from the same probabilities (the published code
    fails there)."""
    distinct = min(size, valid if probs is None else int(np.count_nonzero(probs)))
    starts = rng.choice(valid, size=distinct, replace=False, p=probs)
    if size > distinct:
        starts = np.concatenate([starts, rng.choice(valid, size=size - distinct, p=probs)])
    return starts


def replay_storage(nbytes: int, device: torch.device) -> tuple[torch.device, bool]:
    """Where a replay buffer of `nbytes` keeps its steps: (device, pinned). On a GPU when they take at most half of
    its free memory (100k steps: 1.2 GB), else in pinned host memory (one line says so); on a CPU, in plain memory."""
    if device.type != "cuda":
        return device, False
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= free // 2:
        return device, False
    print(f"replay buffer: {nbytes / 1e9:.1f} GB is more than half of the GPU's {free / 1e9:.1f} GB free: kept in "
          "pinned host memory, each batch copied to the GPU (slower)", flush=True)  # fmt: skip
    return torch.device("cpu"), True


class ReplayBuffer:
    """Ring buffer of (obs uint8, action, reward, termination, episode start) with DFS counters.

    Indices passed in and out are logical: 0 is the oldest stored step. n_wm[i] counts how often step i
    started a world-model sequence, n_img[i] how often it started an imagination context (start only).
    The steps live on `device` (`replay_storage`), where the batches are gathered; the sampling stays on the
    host (numpy), so a batch costs one small copy of indices to the device.
    """

    def __init__(self, capacity: int, obs_shape=(64, 64, 3), device="cpu"):
        self.capacity, self.size, self.next = capacity, 0, 0
        self.device, pinned = replay_storage(capacity * (math.prod(obs_shape) + 17), torch.device(device))
        self.obs = torch.zeros((capacity, *obs_shape), dtype=torch.uint8, device=self.device, pin_memory=pinned)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=self.device, pin_memory=pinned)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=self.device, pin_memory=pinned)
        self.terminations = torch.zeros(capacity, dtype=torch.float32, device=self.device, pin_memory=pinned)
        self.episode_starts = torch.zeros(capacity, dtype=torch.bool, device=self.device, pin_memory=pinned)
        self.n_wm = np.zeros(capacity, dtype=np.int64)
        self.n_img = np.zeros(capacity, dtype=np.int64)

    def add(self, obs, action, reward, termination, episode_start) -> None:
        i = self.next
        self.obs[i] = to_device(np.array(obs, dtype=np.uint8), self.device)  # (64, 64, 3); no sync on a GPU
        self.actions[i], self.rewards[i] = int(action), float(reward)
        self.terminations[i], self.episode_starts[i] = float(termination), bool(episode_start)
        self.n_wm[i] = self.n_img[i] = 0
        self.next, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def _physical(self, index: np.ndarray) -> np.ndarray:
        return (self.next - self.size + index) % self.capacity

    def counts(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(n_wm, n_img) of the valid starts [0, size - length] of sequences of `length` steps."""
        index = self._physical(np.arange(self.size - length + 1))
        return self.n_wm[index], self.n_img[index]

    def world_model_probs(self, length: int, tau: float) -> np.ndarray:
        """p_i = softmax(-n_wm[i] / tau) over valid starts (paper 2.4)."""
        n_wm, _ = self.counts(length)
        return softmax(-n_wm / tau)

    def imagination_probs(self, length: int, tau_img: float, alpha: float, beta: float, ratio: float) -> np.ndarray:
        """k_i = n_img[i] / ratio; p_i = softmax((n_wm[i] - alpha k_i - beta max(0, n_wm[i] - k_i)) / tau_img)."""
        n_wm, n_img = self.counts(length)
        k = n_img / ratio
        return softmax((n_wm - alpha * k - beta * np.maximum(0, n_wm - k)) / tau_img)

    def sample_world_model_starts(self, args: Args, rng: np.random.Generator) -> np.ndarray:
        """DFS: draw `batch_size` distinct sequence starts from p_i = softmax(-n_wm[i] / tau) (`draw_starts`), then
        count them."""
        probs = self.world_model_probs(args.sequence_length, args.tau)
        starts = draw_starts(rng, len(probs), args.batch_size, probs)
        np.add.at(self.n_wm, self._physical(starts), 1)
        return starts

    def sample_imagination_starts(self, args: Args, rng: np.random.Generator) -> np.ndarray:
        """DFS: draw `imagine_batch_size` distinct context starts from the imagination probabilities (`draw_starts`),
        then count them."""
        ratio = args.imagine_batch_size / args.batch_size  # k_i puts n_img on n_wm's scale (= 64 by default)
        probs = self.imagination_probs(args.imagine_context_length, args.tau_img, args.alpha, args.beta, ratio)
        starts = draw_starts(rng, len(probs), args.imagine_batch_size, probs)
        np.add.at(self.n_img, self._physical(starts), 1)
        return starts

    def sequences(self, starts: np.ndarray, length: int, device, distinct_frames: bool = False):
        """Steps [start, start + length) of each start -> tensors (b, length, ...) on `device`.

        With `distinct_frames`, "obs" is replaced by "frames" (m, 64, 64, 3), each distinct frame once, and
        "frame_index" (b, length) into them: overlapping imagination contexts then encode each frame once.
        The indices are worked out on the host; on a GPU they are copied there once and the steps gathered there.
        """
        index = self._physical(starts[:, None] + np.arange(length))  # (b, length)
        distinct, inverse = np.unique(index, return_inverse=True) if distinct_frames else (index[:0], index[:0])
        inverse = inverse.reshape(-1, length)  # (b, length) or, without distinct_frames, empty
        if self.device.type == "cpu":  # numpy's gather: faster than torch's on a CPU

            def gather(name: str, at: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(getattr(self, name).numpy()[at])

            frame_index = torch.from_numpy(inverse)
        else:  # one copy of the indices to the GPU, the steps gathered there

            def gather(name: str, at: torch.Tensor) -> torch.Tensor:
                return getattr(self, name)[at]

            packed = to_device(np.concatenate([index, distinct, inverse], axis=None), self.device)
            flat, distinct, frame_index = packed.split([index.size, distinct.size, inverse.size])
            index, frame_index = flat.view(index.shape), frame_index.view(inverse.shape)
        batch = {k: gather(k, index) for k in ("actions", "rewards", "terminations")}
        if distinct_frames:
            batch["frames"], batch["frame_index"] = gather("obs", distinct), frame_index
        else:
            batch["obs"] = gather("obs", index)
        to_gpu = torch.device(device).type == "cuda"  # to the host (a dream from a GPU buffer): a blocking copy
        if self.device.type == "cpu" and to_gpu:  # pinned host storage: copied over
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return {k: v.to(device, non_blocking=to_gpu) for k, v in batch.items()}  # already there: no copy

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the stored physical rows [:size] of every array (CPU tensors), next and size."""
        state = {k: v[: self.size].cpu() for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        state |= {k: torch.from_numpy(v[: self.size]) for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return state | {"next": self.next, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict` returned (onto the buffer's storage)."""
        self.next, self.size = state["next"], state["size"]
        for name, array in vars(self).items():
            if isinstance(array, torch.Tensor | np.ndarray):
                array[: self.size] = state[name] if isinstance(array, torch.Tensor) else state[name].numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ----------------------------------------------------------------------------------------------------------
# Imagination (paper 2.3): 8 real context steps, then 16 steps in the world model under the policy
# ----------------------------------------------------------------------------------------------------------
def imagine_one_step(world_model: WorldModel, actor_critic: ActorCritic, z, h, state):
    """s_i = (z_i (b, z), h_i (b, d)) -> a_i ~ pi(s_i), h_{i+1} = f(z_i, a_i), z_{i+1} ~ prior(h_{i+1})."""
    action = actor_critic.act(torch.cat([z, h], -1))  # (b,)
    h, state = world_model.dynamics.forward_token(z, action, state)  # (b, d)
    return sample_latent(world_model.prior(h)), h, state, action


def compile_one_step():
    """`--compile`: imagine_one_step under torch.compile. On a GPU in CUDA graphs ("reduce-overhead": each call
    replays one graph instead of launching each kernel; CUDA's generator is graph-safe, so each replay draws new
    random numbers); elsewhere that mode is the default one. Compiles on first use, once: the shapes never change."""
    return torch.compile(imagine_one_step, mode="reduce-overhead")


@torch.no_grad()
def imagine(world_model, actor_critic, frames, frame_index, actions, horizon: int, rollout_step_fn=imagine_one_step):
    """Context frames (m, 64, 64, 3) picked by frame_index (b, l), actions (b, l) -> features (b, v+1, z+d),
    actions, rewards, continuations (b, v), with v = horizon.

    s_0 = (z_0 ~ prior(h_ctx), h_ctx), then v calls of `rollout_step_fn` (imagine_one_step, or `compile_one_step`'s).
    The reward and continuation of a_i are read from h_{i+1}, the state after a_i. A step's outputs may live in
    CUDA-graph memory that the next rollout's replays overwrite: only the stacked copies leave this function.
    """
    z = sample_latent(world_model.posterior(frames)[frame_index])  # (b, l, z)
    h, state = world_model.dynamics(z, actions)  # (b, l, d)
    h = h[:, -1].contiguous()  # (b, d): laid out as the step's h, so that a compiled step compiles once
    z = sample_latent(world_model.prior(h))  # (b, z)
    if z.is_cuda:
        torch.compiler.cudagraph_mark_step_begin()  # a new rollout: a compiled step's graphs replay from the first
    zs, hs, taken = [z], [h], []
    for _ in range(horizon):
        z, h, state, action = rollout_step_fn(world_model, actor_critic, z, h, state)
        zs.append(z)
        hs.append(h)
        taken.append(action)
    h = torch.stack(hs, 1)  # (b, v+1, d)
    rewards, continuations = world_model.reward(h[:, 1:]), world_model.continuation(h[:, 1:])  # (b, v)
    return torch.cat([torch.stack(zs, 1), h], -1), torch.stack(taken, 1), rewards, continuations


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def train_world_model(agent, optimizer, scheduler, buffer, args, rng, device, autocast):
    starts = buffer.sample_world_model_starts(args, rng)
    batch = buffer.sequences(starts, args.sequence_length, device)
    agent.world_model.train()
    with autocast:
        loss, metrics = agent.world_model.loss(batch["obs"], batch["actions"], batch["rewards"], batch["terminations"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    metrics["world_model_grad_norm"] = nn.utils.clip_grad_norm_(agent.world_model.parameters(), args.wm_grad_clip)
    optimizer.step()
    scheduler.step()
    return metrics


def train_actor_critic(
    agent, optimizer, scheduler, buffer, args, rng, device, autocast, rollout_step_fn=imagine_one_step
):
    starts = buffer.sample_imagination_starts(args, rng)
    batch = buffer.sequences(starts, args.imagine_context_length, device, distinct_frames=True)
    agent.world_model.eval()
    with autocast:
        features, actions, rewards, continuations = imagine(agent.world_model, agent.actor_critic, batch["frames"],
                                                            batch["frame_index"], batch["actions"],
                                                            args.imagine_horizon, rollout_step_fn)  # fmt: skip
    features = features.float()
    agent.actor_critic.norm.update(features.flatten(0, 1))
    with autocast:
        loss, metrics = agent.actor_critic.loss(features, actions, rewards.float(), continuations.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trained = [p for p in agent.actor_critic.parameters() if p.requires_grad]  # not the slow critic
    metrics["actor_critic_grad_norm"] = nn.utils.clip_grad_norm_(trained, args.ac_grad_clip)
    optimizer.step()
    scheduler.step()
    agent.actor_critic.update_slow_critic()
    metrics["imagined_reward"] = rewards.mean()
    return metrics


def make_optimizer(parameters, lr: float, warmup: int):
    """LaProp (utils/laprop.py: DreamerV3's optimiser, as published) with a linear learning-rate warm-up."""
    optimizer = LaProp([p for p in parameters if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: min(1.0, (update + 1) / warmup))
    return optimizer, scheduler


def main(args: Args) -> None:
    # TRY NOT TO MODIFY: resuming, checks, run folder, device, precision, seeding, logging
    args, saved = runs.resume(args, VARIANT)  # --resume: the saved run's settings and training state
    check_args(args)
    run_name, run_dir, device, autocast = start_run(args, saved, TRITON_SCAN)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    writer = start_logging(args, run_name, run_dir, purge_step=saved.global_step if saved else None)

    # TRY NOT TO MODIFY: env setup
    env = make_env(args.env_id, args.seed, 0, args.capture_video, run_name, sticky_actions=args.sticky_actions)()
    action_dim = int(env.action_space.n)

    # ALGO LOGIC: the agent (world model + actor-critic), its two optimisers and the replay buffer
    agent = Agent(args, action_dim).to(device)
    counts = agent.world_model.parameter_counts()
    print(f"{args.exp_name} world model: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"run {run_name} on {device}: TensorBoard logs and the agent go to {run_dir}", flush=True)
    print(f"Mamba scan: {scan_backend(device)}", flush=True)
    rollout_step_fn = compile_one_step() if args.compile else imagine_one_step  # compiles on first use
    wm_optimizer, wm_scheduler = make_optimizer(agent.world_model.parameters(), args.wm_lr, args.warmup_updates)
    ac_optimizer, ac_scheduler = make_optimizer(agent.actor_critic.parameters(), args.ac_lr, args.warmup_updates)
    buffer, rng = ReplayBuffer(args.buffer_size, device=device), np.random.default_rng(args.seed)
    first_step, updates, update_budget, episode_start = 0, 0, 0.0, True
    recent_returns, action_history = deque(maxlen=5), []

    def training_state(global_step: int) -> checkpoint.TrainingState:  # what --resume needs, when saved or read
        return checkpoint.TrainingState(args, run_name, agent, wm_optimizer, wm_scheduler, ac_optimizer, ac_scheduler,
                                        buffer, rng, action_history, recent_returns, global_step, updates,
                                        update_budget, episode_start)  # fmt: skip

    if saved:  # the loop's objects get their saved state back, the env replays the saved actions
        first_step, updates, update_budget, episode_start, obs = checkpoint.resume_loop(training_state(0), saved, env)
    else:
        obs, _ = env.reset(seed=args.seed)
    progress = ProgressLine(first_step, args.total_timesteps, args.random_steps, args.train_ratio)
    step, checkpointed = first_step, first_step if saved else None  # env steps taken; of the last checkpoint
    stop = runs.StopOnSignal()  # Ctrl-C, SIGTERM, SIGUSR2: stop at a step boundary and save, say how to resume
    for global_step in range(first_step, args.total_timesteps):
        # ALGO LOGIC: collect (random actions before `random_steps`, then the actor on the world model's state)
        if global_step < args.random_steps:
            action = int(rng.integers(action_dim))
        else:
            action = int(agent.act(obs[None], np.array([episode_start]))[0])
        action_history.append(action)
        next_obs, reward, terminated, truncated, info = env.step(action)
        # a lost life is a termination for the world model, but the game goes on
        buffer.add(obs, action, reward, terminated or info["life_loss"], episode_start)
        obs, episode_start = next_obs, terminated or truncated
        if episode_start:  # TRY NOT TO MODIFY: record the episode
            recent_returns.append(info["episode"]["r"])
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            writer.add_scalar("charts/episodic_return_mean5", np.mean(recent_returns), global_step)
            obs, _ = env.reset()

        # ALGO LOGIC: train the world model, imagine and train the actor-critic (`train_ratio` of each per env step)
        if global_step >= args.random_steps:
            update_budget += args.train_ratio
            while update_budget >= 1:
                update_budget, updates = update_budget - 1, updates + 1
                metrics = train_world_model(agent, wm_optimizer, wm_scheduler, buffer, args, rng, device, autocast)
                metrics |= train_actor_critic(
                    agent, ac_optimizer, ac_scheduler, buffer, args, rng, device, autocast, rollout_step_fn
                )
                # TRY NOT TO MODIFY: record the losses and a dream
                if updates % args.log_every == 0:
                    for key, value in metrics.items():
                        writer.add_scalar(f"losses/{key}", float(value.detach()), global_step)
                    writer.add_scalar("charts/learning_rate", wm_optimizer.param_groups[0]["lr"], global_step)
                if args.dream_every and updates % args.dream_every == 0:
                    log_dream(writer, agent, buffer, global_step, context_length=args.imagine_context_length)

        # TRY NOT TO MODIFY: checkpoint, progress line, stop
        step = global_step + 1
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            checkpoint.save_training_state(run_dir, training_state(step), VARIANT)
            checkpointed = step
        progress.step(global_step, updates, recent_returns, writer)
        if stop.signal:
            break
    env.close()

    # TRY NOT TO MODIFY: save (a stopped run always saves its state), evaluate, upload
    if (args.checkpoint_every or stop.signal) and checkpointed != step:
        checkpoint.save_training_state(run_dir, training_state(step), VARIANT)
    agent_path = checkpoint.save_agent(agent, args, run_dir, VARIANT) if args.save_model else None
    stop.restore()  # from here on, Ctrl-C aborts at once: the run is saved
    if stop.signal:
        writer.close()
        raise runs.stopped(stop.signal, step, args.total_timesteps, run_dir, VARIANT, agent_path)
    if args.eval_episodes:
        final_evaluation(agent, args, run_dir, writer)
    writer.close()  # flush every event before the upload
    if args.upload_model:
        from utils.hub import push_to_hub

        print(f"uploaded to {push_to_hub(args, run_dir)}")


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(tyro.cli(Args))))
