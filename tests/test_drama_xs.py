"""Tests of the DRAMA core (drama_xs.py and its variants): the Mamba-2 SSD mixer, the world model and its
loss alignment, DFS sampling, imagination, the actor-critic, LaProp, acting, argument checks, end to end.

Every module-level test runs against each variant script present in the repository root; mixer-specific
tests (SSD) run on the Mamba-2 variants only, DFS tests on the variants that have DFS.
"""

import dataclasses
import importlib
import json
import math
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, tiny_args

import utils
from utils.atari import make_env
from utils.checkpoint import read_training_state

ROOT = Path(__file__).resolve().parents[1]
MAMBA2 = [v for v in VARIANTS if v in ("drama_xs", "drama_s")]
WITH_HEADDIM = [v for v in VARIANTS if v != "drama_mamba1"]  # Mamba-2 mixers (headdim is a Mamba-2 setting)
F64 = torch.float64


@pytest.fixture(params=MAMBA2, scope="module")
def mamba2_mod(request):
    return importlib.import_module(request.param)


@pytest.fixture(params=WITH_HEADDIM, scope="module")
def headdim_mod(request):
    return importlib.import_module(request.param)


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its (often symmetric) init, so that e.g. a missing D or norm weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def mixer_f64(mod, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    mixer = mod.MambaBlock(tiny_args(mod, **overrides)).mixer.double()
    perturb(mixer, seed=seed)
    return mixer


def randn(*shape, seed: int = 0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_states_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, **tol)
        else:
            assert_states_close(x, y, **tol)


# ==========================================================================================================
# 1. SSD scan against the naive recurrence
# ==========================================================================================================
def naive_ssd(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t. x (b, L, H, P), B/C (b, L, N)."""
    batch, length, heads, headdim = x.shape
    h = torch.zeros(batch, heads, headdim, B.shape[-1], dtype=x.dtype) if h0 is None else h0.clone()
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)  # (b, H)
        h = decay[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("length", [1, 5, 8, 16, 21])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_ssd_scan_equals_naive_recurrence(mamba2_mod, length, with_initial_state):
    batch, heads, headdim, n = 2, 3, 4, 5
    x = randn(batch, length, heads, headdim, seed=1)
    dt = F.softplus(randn(batch, length, heads, seed=2))
    A = -torch.exp(torch.empty(heads, dtype=F64).uniform_(0, math.log(16)))
    B, C = randn(batch, length, n, seed=3), randn(batch, length, n, seed=4)
    h0 = randn(batch, heads, headdim, n, seed=5) if with_initial_state else None
    y_ref, h_ref = naive_ssd(x, dt, A, B, C, h0)
    for chunk_size in (8, 3, 64):
        y, h = mamba2_mod.ssd_scan(x, dt, A, B, C, chunk_size, h0)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_segment_sum_double_loop(mamba2_mod):
    x = randn(2, 3, 7, seed=6)
    out = mamba2_mod.segment_sum(x)
    assert out.shape == (2, 3, 7, 7)
    for i in range(7):
        for j in range(7):
            if j > i:
                assert torch.all(out[..., i, j] == -torch.inf)
            else:
                expected = x[..., j + 1 : i + 1].sum(-1)
                torch.testing.assert_close(out[..., i, j], expected, rtol=1e-12, atol=1e-12)


# ==========================================================================================================
# 2. The Mamba mixer: forward vs step, chunked continuation, chunk size, gradients, causality, shapes
# ==========================================================================================================
TOL = dict(rtol=1e-9, atol=1e-10)


def test_mixer_forward_equals_step_by_step(mod):
    mixer = mixer_f64(mod)
    u = randn(2, 21, 32, seed=7)
    y, state = mixer(u)
    assert y.shape == u.shape
    step_state = mixer.allocate_state(2, dtype=F64)
    ys = []
    for t in range(u.shape[1]):
        y_t, step_state = mixer.forward_token(u[:, t], step_state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, **TOL)
    assert_states_close(step_state, state, **TOL)
    # the conv state holds the last d_conv inputs and the SSM state is not trivially zero
    assert all(s.abs().max() > 0 for s in state)


def test_float64_mixer_computes_in_float64(mod):
    """At least fp32 (bf16 autocast -> fp32) must not mean fp32: a float64 mixer stays float64 in forward and step."""
    mixer = mixer_f64(mod)
    u = randn(2, 5, 32, seed=7)
    _, carried = mixer(u[:, :4])  # a non-zero state for `forward_token` to decay
    runs = []
    for scale in (1.0, 1 + 1e-10):  # a change of A far below fp32's resolution (6e-8)
        with torch.no_grad():
            mixer.A_log.mul_(scale)
        y, state = mixer(u)
        y_step, step_state = mixer.forward_token(u[:, 4], carried)
        assert {t.dtype for t in (y, *state, y_step, *step_state)} == {F64}
        runs.append((y, y_step))
    assert not torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("split", [1, 2, 3, 9, 16, 20])
def test_mixer_chunked_continuation_from_carried_state(mod, split):
    mixer = mixer_f64(mod)
    u = randn(2, 21, 32, seed=8)
    y, state = mixer(u)
    y1, state1 = mixer(u[:, :split])
    y2, state2 = mixer(u[:, split:], state1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **TOL)
    assert_states_close(state2, state, **TOL)
    # forward(prefix), then one step at a time
    step_state, ys = state1, [y1]
    for t in range(split, u.shape[1]):
        y_t, step_state = mixer.forward_token(u[:, t], step_state)
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y, **TOL)
    assert_states_close(step_state, state, **TOL)


def test_mixer_forward_from_allocated_state_equals_fresh(mod):
    mixer = mixer_f64(mod)
    u = randn(3, 11, 32, seed=9)
    y, state = mixer(u)
    y0, state0 = mixer(u, mixer.allocate_state(3, dtype=F64))
    torch.testing.assert_close(y0, y, **TOL)
    assert_states_close(state0, state, **TOL)


def test_mixer_is_causal(mod):
    mixer = mixer_f64(mod)
    u = randn(2, 21, 32, seed=10)
    v = u.clone()
    v[:, 10] += 1.0
    y, _ = mixer(u)
    y_v, _ = mixer(v)
    torch.testing.assert_close(y_v[:, :10], y[:, :10], **TOL)
    assert (y_v[:, 10] - y[:, 10]).abs().max() > 1e-3
    assert (y_v[:, 15:] - y[:, 15:]).abs().max() > 1e-6  # the change is remembered after the conv window


def mamba2_reference(mixer, u):
    """mamba_ssm's Mamba2 written out (ngroups 1, no MLP part): in_proj -> [z, xBC, dt] -> causal depthwise
    conv + SiLU -> [x, B, C] -> SSM with dt = softplus(dt + dt_bias), A = -exp(A_log) -> + D x ->
    RMSNorm(y * SiLU(z)) * weight (norm_before_gate=False, eps 1e-5) -> out_proj."""
    batch, length, _ = u.shape
    E, N, H, P, K = mixer.d_inner, mixer.d_state, mixer.nheads, mixer.headdim, mixer.d_conv
    z, xBC, dt = (u @ mixer.in_proj.weight.T).split([E, E + 2 * N, H], -1)
    xBC = F.conv1d(xBC.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=K - 1, groups=E + 2 * N)
    x, B, C = F.silu(xBC[..., :length]).transpose(1, 2).split([E, N, N], -1)
    x = x.reshape(batch, length, H, P)
    y, _ = naive_ssd(x, F.softplus(dt + mixer.dt_bias), -torch.exp(mixer.A_log), B, C)
    y = (y + x * mixer.D[:, None]).reshape(batch, length, E) * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight
    return y @ mixer.out_proj.weight.T


def test_mamba2_matches_mamba_ssm_reference_semantics(mamba2_mod):
    mixer = mixer_f64(mamba2_mod)
    u = randn(2, 13, 32, seed=16)
    expected = mamba2_reference(mixer, u)
    # A = -exp(A_log) is computed in float32 as in mamba_ssm (for bf16 autocast): 1e-7-level differences
    torch.testing.assert_close(mixer(u)[0], expected, rtol=1e-5, atol=1e-6)


def test_mamba2_results_do_not_depend_on_chunk_size(mamba2_mod):
    mixer = mixer_f64(mamba2_mod)
    u = randn(2, 21, 32, seed=11)
    y_ref, state_ref = mixer(u)
    for chunk_size in (1, 3, 5, 21, 64):
        mixer.chunk_size = chunk_size
        y, state = mixer(u)
        torch.testing.assert_close(y, y_ref, **TOL)
        assert_states_close(state, state_ref, **TOL)
        y2, state2 = mixer(u[:, 4:], mixer(u[:, :4])[1])
        torch.testing.assert_close(y2, y_ref[:, 4:], **TOL)


def test_mixer_gradients_reach_every_parameter(mod):
    mixer = mixer_f64(mod)
    u = randn(2, 13, 32, seed=12)
    y, _ = mixer(u)
    (y * randn(*y.shape, seed=13)).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


MAMBA2_SHAPES_HD128 = {
    "in_proj.weight": (2088, 512),
    "conv1d.weight": (1056, 1, 4),
    "conv1d.bias": (1056,),
    "dt_bias": (8,),
    "A_log": (8,),
    "D": (8,),
    "norm.weight": (1024,),
    "out_proj.weight": (512, 1024),
}


def test_mamba2_parameter_names_and_shapes_match_mamba_ssm(mamba2_mod):
    big = dict(d_model=512, d_state=16, d_conv=4, expand=2)
    mixer = mamba2_mod.MambaBlock(tiny_args(mamba2_mod, **big, headdim=128, chunk_size=64)).mixer
    assert type(mixer).__name__ == "Mamba2"
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == MAMBA2_SHAPES_HD128
    assert sum(p.numel() for p in mixer.parameters()) == 1_599_672
    mixer64 = mamba2_mod.MambaBlock(tiny_args(mamba2_mod, **big, headdim=64, chunk_size=64)).mixer
    assert tuple(mixer64.in_proj.weight.shape) == (2096, 512)
    assert sum(p.numel() for p in mixer64.parameters()) == 1_603_792
    conv_state, ssm_state = mixer.allocate_state(3)
    assert conv_state.shape == (3, 1056, 4) and ssm_state.shape == (3, 8, 128, 16)  # mamba_ssm's cache


def test_mamba1_variant_builds_mamba1_blocks():
    """drama_mamba1's blocks hold the Mamba-1 mixer (its names and shapes are checked in test_mamba1.py)."""
    mod = importlib.import_module("drama_mamba1")
    mixer = mod.MambaBlock(tiny_args(mod, d_model=512, d_state=16, d_conv=4, expand=2)).mixer
    assert type(mixer).__name__ == "Mamba1"
    assert sum(p.numel() for p in mixer.parameters()) == 1_694_720


# ==========================================================================================================
# 3. Dynamics: the whole 2-block stack, step by step vs forward
# ==========================================================================================================
def test_dynamics_step_equals_forward(mod):
    torch.manual_seed(0)
    dynamics = mod.Dynamics(tiny_args(mod), latent_dim=16, action_dim=5).double()
    perturb(dynamics)
    z = randn(2, 13, 16, seed=14)
    a = torch.randint(0, 5, (2, 13), generator=torch.Generator().manual_seed(15))
    h, states = dynamics(z, a)
    assert h.shape == (2, 13, 32) and len(states) == 2
    state, hs = dynamics.allocate_state(2, dtype=F64), []
    for t in range(13):
        h_t, state = dynamics.forward_token(z[:, t], a[:, t], state)
        hs.append(h_t)
    torch.testing.assert_close(torch.stack(hs, 1), h, **TOL)
    assert_states_close(state, states, **TOL)
    h1, states1 = dynamics(z[:, :5], a[:, :5])
    h2, states2 = dynamics(z[:, 5:], a[:, 5:], states1)
    torch.testing.assert_close(torch.cat([h1, h2], 1), h, **TOL)
    assert_states_close(states2, states, **TOL)
    # the action is an input: changing a_7 changes h_7
    a2 = a.clone()
    a2[:, 7] = (a2[:, 7] + 1) % 5
    assert (dynamics(z, a2)[0][:, 7] - h[:, 7]).abs().max() > 1e-4


# ==========================================================================================================
# 4. World-model parameter counts (the published code's, and the paper's "7M" XS model, section 3.1)
# ==========================================================================================================
PUBLISHED = {
    "encoder": 232_272,
    "decoder": 1_281_811,
    "dynamics": 3_737_504,
    "posterior+prior heads": 1_574_912,
    "reward+termination heads": 328_960,
    "total": 7_155_459,
}
XS = dict(
    encoder_filters=(16, 32, 48, 64, 64),
    stoch_categoricals=32,
    stoch_classes=32,
    d_model=512,
    n_layers=2,
    d_state=16,
    d_conv=4,
    expand=2,
    head_hidden=256,
)
STEM_AND_NORMS = (1024 + 6) * 512 + 512 + 512 + 2 * 512 + 512  # stem linear + RMSNorm, 2 block norms, final norm


def expected_counts(mod, headdim: int) -> dict[str, int]:
    mixer = {64: 1_603_792, 128: 1_599_672}[headdim] if mod.__name__ != "drama_mamba1" else 1_694_720
    counts = dict(PUBLISHED, dynamics=STEM_AND_NORMS + 2 * mixer)
    counts["total"] = sum(v for k, v in counts.items() if k != "total")
    return counts


def test_world_model_parameter_counts(mod):
    for headdim in (64, 128):
        wm = mod.WorldModel(tiny_args(mod, **XS, headdim=headdim, chunk_size=64), action_dim=6)
        counts = wm.parameter_counts()
        print(f"\n{mod.__name__} world model, headdim {headdim}, 6 actions:")
        for k, v in counts.items():
            print(f"  {k:26s} {v:>10,}")
        assert counts == expected_counts(mod, headdim)
        assert counts["total"] == sum(p.numel() for p in wm.parameters() if p.requires_grad)
        assert sum(v for k, v in counts.items() if k != "total") == counts["total"]  # no uncounted module
        mixers = sum(p.numel() for block in wm.dynamics.blocks for p in block.mixer.parameters())
        assert counts["dynamics"] - mixers == STEM_AND_NORMS  # the stem, the block norms and the final norm
        if headdim == 64 and mod.__name__ != "drama_mamba1":
            assert counts == PUBLISHED  # the published code's headdim (mamba_ssm's default 64)
    if mod.__name__ != "drama_mamba1":
        assert mod.Args().headdim == 128  # the paper's Table 3
        default_args = tiny_args(mod, **XS, headdim=mod.Args().headdim, chunk_size=64)
        default = mod.WorldModel(default_args, action_dim=6).parameter_counts()["total"]
        # 7,147,219: the paper's "7M parameters" XS model (section 3.1); 2.1% above 7,000,000
        assert default == 7_147_219 and abs(default - 7e6) / 7e6 < 0.03


# ==========================================================================================================
# 5. DFS sampling and the ring buffer
# ==========================================================================================================
def filled_buffer(mod, steps: int, capacity: int):
    buffer = mod.ReplayBuffer(capacity)
    for i in range(steps):  # step i is recognisable: reward i, obs filled with i % 256, action i % 7
        buffer.add(np.full((64, 64, 3), i % 256, np.uint8), i % 7, float(i), float(i % 5 == 4), i % 9 == 0)
    return buffer


def np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


# valid starts 0..9 of 12 stored steps with sequence length 3; indices 10, 11 are not valid starts
N_WM = np.array([0, 3, 5, 2, 0, 1, 4, 0, 7, 2, 0, 0])
N_IMG = np.array([0, 64, 128, 640, 32, 0, 256, 96, 64, 1280, 0, 0])
# k = n_img / 64 = [0, 1, 2, 10, .5, 0, 4, 1.5, 1, 20]; s * tau = n_wm - alpha k - beta max(0, n_wm - k):
SCORES_A1_B1 = np.array([0, 0, 0, -8, -0.5, 0, 0, -1.5, 0, -18])  # alpha = beta = 1: min(0, n_wm - k)
SCORES_A05_B2 = np.array([0, -1.5, -2, -3, -0.25, -1, 2, -0.75, -5.5, -8])  # alpha 0.5, beta 2


def test_dfs_world_model_probs(dfs_mod):
    buffer = filled_buffer(dfs_mod, 12, 50)
    buffer.n_wm[:12] = N_WM
    for tau in (10.0, 2.0):
        probs = buffer.world_model_probs(3, tau)
        assert probs.shape == (10,)  # exactly the valid starts [0, N - L]
        np.testing.assert_allclose(probs, np_softmax(-N_WM[:10] / tau), rtol=1e-12)
    assert buffer.world_model_probs(12, 10.0).shape == (1,)
    np.testing.assert_allclose(filled_buffer(dfs_mod, 12, 50).world_model_probs(3, 10.0), np.full(10, 0.1))


def test_dfs_imagination_probs_hand_computed(dfs_mod):
    buffer = filled_buffer(dfs_mod, 12, 50)
    buffer.n_wm[:12], buffer.n_img[:12] = N_WM, N_IMG
    for alpha, beta, scores in ((1.0, 1.0, SCORES_A1_B1), (0.5, 2.0, SCORES_A05_B2)):
        for tau_img in (10.0, 2.0):
            probs = buffer.imagination_probs(3, tau_img, alpha, beta, ratio=64.0)
            assert probs.shape == (10,)
            np.testing.assert_allclose(probs, np_softmax(scores / tau_img), rtol=1e-12)


def test_dfs_sampling_counts_exactly_the_sampled_starts(dfs_mod):
    buffer = filled_buffer(dfs_mod, 12, 50)
    buffer.n_wm[:12], buffer.n_img[:12] = N_WM, N_IMG
    args = tiny_args(dfs_mod, batch_size=16, sequence_length=3, imagine_batch_size=64, imagine_context_length=5)
    rng = np.random.default_rng(0)
    n_wm, n_img = buffer.n_wm.copy(), buffer.n_img.copy()
    starts = buffer.sample_world_model_starts(args, rng)
    assert starts.shape == (16,) and starts.min() >= 0 and starts.max() <= 12 - 3
    assert len(set(starts.tolist())) < 16  # 16 draws from 10 starts: duplicates, each counted
    np.testing.assert_array_equal(buffer.n_wm, n_wm + np.bincount(starts, minlength=50))
    np.testing.assert_array_equal(buffer.n_img, n_img)
    n_wm = buffer.n_wm.copy()
    starts = buffer.sample_imagination_starts(args, rng)
    assert starts.shape == (64,) and starts.min() >= 0 and starts.max() <= 12 - 5
    np.testing.assert_array_equal(buffer.n_img, n_img + np.bincount(starts, minlength=50))
    np.testing.assert_array_equal(buffer.n_wm, n_wm)


def test_dfs_empirical_frequencies_match_probabilities(dfs_mod):
    """One call with a huge batch draws every start from the same probabilities (counters update after)."""
    draws = 200_000
    buffer = filled_buffer(dfs_mod, 12, 50)
    buffer.n_wm[:12], buffer.n_img[:12] = N_WM, N_IMG
    rng = np.random.default_rng(1)
    args = tiny_args(dfs_mod, batch_size=draws, sequence_length=3, tau=2.0)
    starts = buffer.sample_world_model_starts(args, rng)
    expected = np_softmax(-N_WM[:10] / 2.0)
    freq = np.bincount(starts, minlength=10) / draws
    assert np.abs(freq - expected).max() < 0.004  # 5 sigma of a frequency at 200k draws
    assert np.abs(expected - 0.1).max() > 0.05  # far from uniform: the test can tell DFS from uniform
    # imagination: ratio = imagine_batch_size / batch_size = 4 -> k = n_img / 4
    buffer.n_wm[:12], buffer.n_img[:12] = N_WM, N_IMG // 16  # n_img / 4 = the k of the hand-computed table
    args = tiny_args(dfs_mod, batch_size=draws // 4, imagine_batch_size=draws, imagine_context_length=3)
    args = dataclasses.replace(args, tau_img=2.0, alpha=0.5, beta=2.0)
    starts = buffer.sample_imagination_starts(args, rng)
    freq = np.bincount(starts, minlength=10) / draws
    assert np.abs(freq - np_softmax(SCORES_A05_B2 / 2.0)).max() < 0.004


def test_ring_buffer_wraps_in_time_order(mod):
    buffer = filled_buffer(mod, 13, 8)  # steps 5..12 remain; logical index 0 is step 5
    batch = buffer.sequences(np.array([0, 3, 2]), 5, "cpu")
    expected = np.array([[5, 6, 7, 8, 9], [8, 9, 10, 11, 12], [7, 8, 9, 10, 11]])
    np.testing.assert_array_equal(batch["rewards"].numpy(), expected)
    np.testing.assert_array_equal(batch["actions"].numpy(), expected % 7)
    np.testing.assert_array_equal(batch["terminations"].numpy(), (expected % 5 == 4).astype(np.float32))
    assert batch["obs"].shape == (3, 5, 64, 64, 3) and batch["obs"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["obs"][..., 0, 0, 0].numpy(), expected)
    assert buffer.obs.dtype == torch.uint8  # frames are stored as uint8, never float


def test_replay_buffer_state_dict_is_the_checkpoint_format(dfs_mod):
    """state_dict: the physical rows [:size] of every array as CPU tensors (the checkpoint's "buffer.<array>" keys
    and dtypes, unchanged), next and size; load_state_dict puts back a buffer that samples and gathers the same."""
    buffer = filled_buffer(dfs_mod, 13, 8)  # wrapped: steps 5..12
    args = tiny_args(dfs_mod, batch_size=4, sequence_length=3, imagine_batch_size=8, imagine_context_length=2)
    buffer.sample_world_model_starts(args, np.random.default_rng(0))
    state = buffer.state_dict()
    dtypes = dict(obs=torch.uint8, actions=torch.int64, rewards=torch.float32, terminations=torch.float32,
                  episode_starts=torch.bool, n_wm=torch.int64, n_img=torch.int64)  # fmt: skip
    assert {k for k in state if k not in ("next", "size")} <= set(dtypes) and (state["next"], state["size"]) == (5, 8)
    for key, tensor in state.items():
        if key not in ("next", "size"):
            assert tensor.dtype == dtypes[key] and tensor.device.type == "cpu" and len(tensor) == 8
    np.testing.assert_array_equal(state["rewards"].numpy(), [8, 9, 10, 11, 12, 5, 6, 7])  # physical order
    restored = dfs_mod.ReplayBuffer(8)
    restored.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    starts = [b.sample_imagination_starts(args, np.random.default_rng(1)) for b in (buffer, restored)]
    np.testing.assert_array_equal(*starts)
    for distinct in (False, True):
        batches = [b.sequences(starts[0], 2, "cpu", distinct_frames=distinct) for b in (buffer, restored)]
        for key in batches[0]:
            assert torch.equal(batches[0][key], batches[1][key])
    # a plain numpy gather from the saved rows (the layout before the buffer held tensors) gives the same batch
    index = (5 + starts[0][:, None] + np.arange(2)) % 8
    batch = buffer.sequences(starts[0], 2, "cpu")
    for key in ("obs", "actions", "rewards", "terminations"):
        np.testing.assert_array_equal(batch[key].numpy(), state[key].numpy()[index])


def test_ring_buffer_dfs_counters_follow_logical_indices(dfs_mod):
    buffer = filled_buffer(dfs_mod, 10, 8)  # wrapped once: steps 2..9
    buffer.n_wm[:], buffer.n_img[:] = 7, 3
    for i in range(10, 13):
        buffer.add(np.full((64, 64, 3), i, np.uint8), 0, float(i), 0.0, False)  # overwrite steps 2, 3, 4
    slot = {int(r): s for s, r in enumerate(buffer.rewards)}  # step -> physical slot
    for step in range(5, 13):
        fresh = step >= 10
        assert buffer.n_wm[slot[step]] == (0 if fresh else 7) and buffer.n_img[slot[step]] == (0 if fresh else 3)
    # logical start i is step 5 + i: the probabilities follow the steps' counters in time order
    for i, step in enumerate(range(5, 13)):
        buffer.n_wm[slot[step]] = i
    np.testing.assert_allclose(buffer.world_model_probs(1, 10.0), np_softmax(-np.arange(8) / 10.0), rtol=1e-12)
    np.testing.assert_allclose(buffer.world_model_probs(3, 10.0), np_softmax(-np.arange(6) / 10.0), rtol=1e-12)
    n_wm = buffer.n_wm.copy()
    args = tiny_args(dfs_mod, batch_size=32, sequence_length=3)
    starts = buffer.sample_world_model_starts(args, np.random.default_rng(0))
    increments = buffer.n_wm - n_wm
    for i in range(6):
        assert increments[slot[5 + i]] == np.sum(starts == i)
    assert increments.sum() == 32


# ==========================================================================================================
# 6. symlog and the two-hot regression
# ==========================================================================================================
BINS = np.linspace(-20, 20, 255)


def twohot_ref(x: float) -> np.ndarray:
    y = np.clip(np.sign(x) * np.log1p(abs(x)), -20, 20)
    k = min(int(np.searchsorted(BINS, y, side="right")) - 1, 253)
    w = (y - BINS[k]) / (BINS[k + 1] - BINS[k])
    out = np.zeros(255)
    out[k], out[k + 1] = 1 - w, out[k + 1] + w
    return out


VALUES = [-3e8, -1234.5, -20.0, -7.3, -1.0, -0.01, 0.0, 1e-4, 0.5, 1.0, 3.0, 19.9, 20.0, 150.0, 4e8, 1e12]


def test_symlog_symexp_round_trip(mod):
    x = torch.tensor(VALUES, dtype=F64)
    torch.testing.assert_close(mod.symexp(mod.symlog(x)), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod.symlog(x), torch.sign(x) * torch.log(1 + x.abs()))
    assert mod.symlog(torch.tensor(-5.0)) == -mod.symlog(torch.tensor(5.0))


def test_twohot_encode(mod):
    twohot = mod.TwoHotSymlog()
    x = torch.tensor(VALUES)
    encoded = twohot.encode(x)
    assert encoded.shape == (len(VALUES), 255)
    torch.testing.assert_close(encoded.sum(-1), torch.ones(len(VALUES)))
    assert (encoded >= 0).all()
    for row, value in zip(encoded, VALUES, strict=True):
        nonzero = torch.nonzero(row).flatten().tolist()
        assert 1 <= len(nonzero) <= 2 and (len(nonzero) == 1 or nonzero[1] == nonzero[0] + 1)
        np.testing.assert_allclose(row.numpy(), twohot_ref(value), atol=1e-5)
    inside = torch.tensor([v for v in VALUES if abs(math.copysign(math.log1p(abs(v)), v)) <= 20])
    expectation = (twohot.encode(inside) * twohot.bins).sum(-1)
    torch.testing.assert_close(expectation, mod.symlog(inside), atol=1e-5, rtol=1e-6)
    decoded = twohot.decode(twohot.encode(inside).log())
    torch.testing.assert_close(decoded, inside, rtol=1e-4, atol=1e-5)
    assert twohot.decode(twohot.encode(torch.tensor(1e12)).log()) == pytest.approx(math.expm1(20), rel=1e-4)


def test_twohot_loss_is_minimal_at_the_target(mod):
    twohot = mod.TwoHotSymlog()
    candidates = torch.tensor([-50.0, -3.0, 0.0, 0.7, 2.0, 2.5, 3.0, 40.0])
    logits = (0.999 * twohot.encode(candidates) + 0.001 / 255).log()  # one prediction per candidate
    for i, target in enumerate(candidates):
        losses = twohot.loss(logits, target.expand(len(candidates)))
        assert losses.argmin() == i
    # gradient descent on the logits of the CE loss converges to predicting the target
    logit = torch.zeros(255, requires_grad=True)
    optimizer = torch.optim.Adam([logit], lr=0.2)
    for _ in range(300):
        optimizer.zero_grad()
        twohot.loss(logit, torch.tensor(37.5)).backward()
        optimizer.step()
    assert twohot.decode(logit.detach()).item() == pytest.approx(37.5, rel=2e-2)


# ==========================================================================================================
# 7. lambda-returns
# ==========================================================================================================
def test_lambda_returns_hand_computed(mod):
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=F64)
    continuations = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 2.0, 4.0], [0.5, 1.0, 2.0, 4.0]], dtype=F64)
    returns = mod.lambda_returns(rewards, continuations, values, gamma=0.9, lam=0.8)
    # R_3 = V_3 = 4; R_2 = 3 + 0.9 (0.2 * 4 + 0.8 * 4) = 6.6
    # row 0: R_1 = 2 + 0.9 * 0 * (...) = 2; R_0 = 1 + 0.9 (0.2 * 1 + 0.8 * 2) = 2.62
    # row 1: R_1 = 2 + 0.9 (0.2 * 2 + 0.8 * 6.6) = 7.112; R_0 = 1 + 0.9 (0.2 * 1 + 0.8 * 7.112) = 6.30064
    expected = torch.tensor([[2.62, 2.0, 6.6], [6.30064, 7.112, 6.6]], dtype=F64)
    torch.testing.assert_close(returns, expected, rtol=1e-12, atol=1e-12)


def test_lambda_returns_lam1_is_discounted_return_plus_bootstrap(mod):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=g, dtype=F64)
    continuations = (torch.rand(4, 6, generator=g) > 0.2).to(F64)
    values = torch.randn(4, 7, generator=g, dtype=F64)
    gamma = 0.97
    returns = mod.lambda_returns(rewards, continuations, values, gamma=gamma, lam=1.0)
    for t in range(6):
        expected, discount = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
        for k in range(t, 6):
            expected += discount * rewards[:, k]
            discount = discount * gamma * continuations[:, k]
        expected += discount * values[:, 6]
        torch.testing.assert_close(returns[:, t], expected, rtol=1e-12, atol=1e-12)
    # lam = 0: one-step TD targets
    td = mod.lambda_returns(rewards, continuations, values, gamma=gamma, lam=0.0)
    torch.testing.assert_close(td, rewards + gamma * continuations * values[:, 1:], rtol=1e-12, atol=1e-12)


# ==========================================================================================================
# 8. Imagination: the reward and continuation of a_i come from the state after a_i
# ==========================================================================================================
CATS, CLASSES, H_DIM, N_ACTIONS = 2, 3, 3, 4


def onehot_probs(index: torch.Tensor) -> torch.Tensor:
    """(..., CATS) class indices -> exact one-hot probabilities (..., CATS, CLASSES): sampling is deterministic."""
    return F.one_hot(index.long() % CLASSES, CLASSES).double()


class StubDynamics:
    """h = [last action fed, time index, 1]: the reward read from h is a function of the last action."""

    def __init__(self):
        self.token_inputs = []

    def __call__(self, z, actions):
        batch, length = actions.shape
        t = torch.arange(length, dtype=F64).expand(batch, length)
        return torch.stack([actions.double(), t, torch.ones_like(t)], -1), {"t": length - 1}

    def forward_token(self, z, action, state):
        self.token_inputs.append((z.clone(), action.clone()))
        t = state["t"] + 1
        h = torch.stack(
            [action.double(), torch.full_like(action, t, dtype=F64), torch.ones(len(action), dtype=F64)], -1
        )
        return h, {"t": t}


class StubWorldModel:
    def __init__(self):
        self.dynamics = StubDynamics()

    def posterior(self, frames):  # (U, ...) -> (U, CATS, CLASSES)
        return onehot_probs(torch.zeros(len(frames), CATS))

    def prior(self, h):  # the latent after action a is (a, t) mod CLASSES
        return onehot_probs(torch.stack([h[..., 0], h[..., 1]], -1))

    def reward(self, h):
        return 10.0 * h[..., 0] + 0.5

    def continuation(self, h):
        return (h[..., 0] != 2).double()  # action 2 ends the episode


class StubActorCritic:
    def __init__(self):
        self.inputs = []

    def act(self, features, greedy=False):
        self.inputs.append(features.clone())
        i, batch = len(self.inputs), len(features)
        return (torch.arange(batch) + i) % (N_ACTIONS - 1) + 1  # never 0, the last context action


def test_imagine_pairs_each_action_with_the_state_after_it(mod):
    world_model, actor_critic = StubWorldModel(), StubActorCritic()
    batch, context, horizon = 5, 4, 6
    frames = torch.zeros(batch * context, 8, 8, 3, dtype=torch.uint8)
    frame_index = torch.arange(batch * context).view(batch, context)
    context_actions = torch.zeros(batch, context, dtype=torch.long)
    features, actions, rewards, continuations = mod.imagine(
        world_model, actor_critic, frames, frame_index, context_actions, horizon
    )
    latent = CATS * CLASSES
    assert features.shape == (batch, horizon + 1, latent + H_DIM)
    assert actions.shape == rewards.shape == continuations.shape == (batch, horizon)
    assert len(actor_critic.inputs) == len(world_model.dynamics.token_inputs) == horizon
    # s_0 = (z_0 ~ prior(h_ctx), h_ctx): h_ctx is the last context output
    torch.testing.assert_close(
        features[:, 0, latent:], torch.tensor([0.0, context - 1, 1.0], dtype=F64).expand(batch, 3)
    )
    for i in range(horizon):
        # a_i is chosen from s_i, and the dynamics step takes (z_i, a_i)
        torch.testing.assert_close(actor_critic.inputs[i], features[:, i])
        z_in, a_in = world_model.dynamics.token_inputs[i]
        torch.testing.assert_close(z_in, features[:, i, :latent])
        assert torch.equal(a_in, actions[:, i])
        # z_i ~ prior(h_i)
        torch.testing.assert_close(features[:, i, :latent], world_model.prior(features[:, i, latent:]).flatten(-2))
        # s_{i+1} holds h_{i+1} = f(z_i, a_i); r_i and c_i come from h_{i+1} (not from h_i: the published bug)
        assert torch.equal(features[:, i + 1, latent].long(), actions[:, i])
        torch.testing.assert_close(rewards[:, i], 10.0 * actions[:, i].double() + 0.5)
        torch.testing.assert_close(continuations[:, i], (actions[:, i] != 2).double())
    assert (actions == 2).any() and (actions != 2).any()


def test_imagine_with_a_real_world_model_matches_one_forward_pass(mod):
    """The recurrent imagination equals one forward pass of the dynamics over context + imagined pairs."""
    args = tiny_args(mod)
    torch.manual_seed(0)
    world_model = mod.WorldModel(args, 5).eval()
    perturb(world_model.reward_head, 0.5)
    perturb(world_model.termination_head, 0.5)
    actor_critic = mod.ActorCritic(args, 16 + 32, 5)
    batch, context, horizon = 3, 4, 5
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (batch * context, 64, 64, 3), dtype=torch.uint8, generator=g)
    frame_index = torch.arange(batch * context).view(batch, context)
    z_context_index = torch.randint(0, 4, (batch, context, 4), generator=g)
    world_model.posterior = lambda f: F.one_hot(z_context_index.flatten(0, 1), 4).float()  # deterministic latents
    context_actions = torch.randint(0, 5, (batch, context), generator=g)
    features, actions, rewards, continuations = mod.imagine(
        world_model, actor_critic, frames, frame_index, context_actions, horizon
    )
    assert features.shape == (batch, horizon + 1, 16 + 32)
    z = torch.cat([F.one_hot(z_context_index, 4).float().flatten(-2), features[:, :horizon, :16]], 1)
    h, _ = world_model.dynamics(z, torch.cat([context_actions, actions], 1))  # (B, C + H, 32)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features[:, :, 16:], h[:, context - 1 :], **tol)
    torch.testing.assert_close(rewards, world_model.reward(h[:, context:]), **tol)
    torch.testing.assert_close(continuations, world_model.continuation(h[:, context:]))
    assert (rewards - world_model.reward(h[:, context - 1 : -1])).abs().max() > 1e-3  # one step early differs


def test_imagine_from_distinct_frames_equals_imagine_from_every_frame(mod):
    """Encoding each distinct context frame once (overlapping starts) gives the imagination of encoding all."""
    args = tiny_args(mod, imagine_context_length=4)
    torch.manual_seed(0)
    world_model = mod.WorldModel(args, 5).eval()
    perturb(world_model, 0.3)
    actor_critic = mod.ActorCritic(args, 16 + 32, 5)
    rng = np.random.default_rng(0)
    buffer = mod.ReplayBuffer(20)
    for i in range(12):
        buffer.add(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % 5, 0.0, False, i == 0)
    starts = np.array([0, 2, 2, 5, 8, 7])  # overlapping windows: 12 distinct frames of 24
    distinct = buffer.sequences(starts, 4, "cpu", distinct_frames=True)
    every = buffer.sequences(starts, 4, "cpu")
    assert len(distinct["frames"]) == 12 and "obs" not in distinct
    assert torch.equal(distinct["frames"][distinct["frame_index"]], every["obs"])
    for key in ("actions", "rewards", "terminations"):
        assert torch.equal(distinct[key], every[key])
    results = []
    for frames, frame_index in [
        (distinct["frames"], distinct["frame_index"]),
        (every["obs"].flatten(0, 1), torch.arange(24).view(6, 4)),
    ]:
        torch.manual_seed(1)
        results.append(mod.imagine(world_model, actor_critic, frames, frame_index, every["actions"], 3))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


NEEDS_COMPILER = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)


@NEEDS_COMPILER
def test_compiled_imagination_step_matches_eager(mod):
    """--compile: imagine with compile_one_step() (reduce-overhead mode: CUDA graphs on a GPU, the default mode on a
    CPU) imagines what the eager step does, compiled once (step 0 gets the states of `forward`, later steps those
    of `forward_token`: same dtypes and layouts, no second compile), also over a second rollout."""
    args = tiny_args(mod)
    torch.manual_seed(0)
    world_model = mod.WorldModel(args, 5).eval()
    perturb(world_model, 0.3)
    actor_critic = mod.ActorCritic(args, 16 + 32, 5)
    frames = torch.randint(0, 256, (12, 64, 64, 3), dtype=torch.uint8)
    frame_index, context_actions = torch.arange(12).view(3, 4), torch.randint(0, 5, (3, 4))
    results = []
    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(fallback_random=True),  # the compiled step draws eager's random numbers
        torch._dynamo.config.patch(error_on_recompile=True),
    ):
        for rollout_step_fn in (mod.imagine_one_step, mod.compile_one_step()):
            for seed in (1, 2):  # the second rollout replays what the first compiled
                torch.manual_seed(seed)
                results.append(mod.imagine(world_model, actor_critic, frames, frame_index, context_actions, 5,
                                           rollout_step_fn))  # fmt: skip
    torch._dynamo.reset()
    for eager, compiled in zip(results[:2], results[2:], strict=True):
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_eval_encoder_folds_batchnorm_into_the_conv(mod):
    """In eval mode the encoder folds BatchNorm's running statistics into the conv: same output, one pass less."""
    args = tiny_args(mod)
    torch.manual_seed(0)
    encoder = mod.WorldModel(args, 5).encoder.eval()
    with torch.no_grad():
        for norm in encoder.net[1::3]:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.normal_()
            norm.bias.normal_()
    obs = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    expected = encoder.net(obs.permute(0, 3, 1, 2).float() / 255).flatten(1)  # the unfolded layers
    torch.testing.assert_close(encoder(obs), expected, rtol=1e-4, atol=1e-4)
    encoder.train()
    assert not torch.allclose(encoder(obs), expected, atol=1e-2)  # training mode normalises with batch statistics


def test_sample_latent_frequencies_and_straight_through_gradient(mod):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32, generator=g) * 2
    logits[0, :31] = -30.0  # almost all mass on the last class: the inverse CDF must still reach it
    probs = mod.unimix_probs(logits[None].expand(20000, 4, 32).contiguous())  # (N, 4, 32)
    probs.requires_grad_(True)
    torch.manual_seed(0)
    z = mod.sample_latent(probs).view(20000, 4, 32)
    onehot = z.detach().round()
    torch.testing.assert_close(z.detach(), onehot)  # one-hot forward (+ probs - probs)
    assert torch.equal(onehot.sum(-1), torch.ones(20000, 4))
    frequencies = onehot.mean(0)  # (4, 32)
    standard_error = (probs[0] * (1 - probs[0]) / 20000).sqrt()
    assert ((frequencies - probs[0].detach()).abs() < 5 * standard_error + 1e-4).all()
    (z * torch.arange(4 * 32.0).view(4, 32)).sum().backward()
    torch.testing.assert_close(probs.grad, torch.arange(4 * 32.0).view(4, 32).expand(20000, 4, 32))


# ==========================================================================================================
# 9. World-model loss: alignment, free bits, stop-gradients, gradients
# ==========================================================================================================
def recorded_loss(mod, free_bits=1.0, seed=0, prior_bias_scale=0.0):
    args = tiny_args(mod, free_bits=free_bits)
    torch.manual_seed(seed)
    wm = mod.WorldModel(args, 5)
    if prior_bias_scale:
        with torch.no_grad():
            wm.prior_head.bias.copy_(prior_bias_scale * torch.randn(wm.prior_head.bias.shape))
    g = torch.Generator().manual_seed(seed + 1)
    B, L = 2, 6
    obs = torch.randint(0, 256, (B, L, 64, 64, 3), dtype=torch.uint8, generator=g)
    actions = torch.randint(0, 5, (B, L), generator=g)
    rewards = torch.randn(B, L, generator=g) * 5
    terminations = (torch.arange(L) % 3 == 1).float().expand(B, L).contiguous()
    record = {"obs": obs}
    posterior, prior = wm.posterior, wm.prior

    def recording_posterior(o):
        record["posterior"] = posterior(o)
        return record["posterior"]

    def recording_prior(h):
        record["prior_h"], record["prior"] = h, prior(h)
        return record["prior"]

    wm.posterior, wm.prior = recording_posterior, recording_prior
    wm.dynamics.register_forward_hook(lambda m, i, o: record.update(h=o[0]))
    wm.decoder.register_forward_hook(lambda m, i, o: record.update(reconstruction=o))
    wm.reward_head.register_forward_hook(lambda m, i, o: record.update(reward_h=i[0], reward_logits=o))
    wm.termination_head.register_forward_hook(lambda m, i, o: record.update(term_h=i[0], term_logits=o))
    total, metrics = wm.loss(obs, actions, rewards, terminations)
    return wm, total, metrics, record, rewards, terminations


def kl(p, q):
    return (p * (p.log() - q.log())).sum((-2, -1))


def test_world_model_loss_alignment(mod):
    wm, total, metrics, rec, rewards, terminations = recorded_loss(mod)
    h = rec["h"]
    assert h.shape == (2, 6, 32)
    # reward and termination of a_t are read from h_t, for every t (same index, full length)
    assert rec["reward_h"] is h or torch.equal(rec["reward_h"], h)
    assert torch.equal(rec["term_h"], h)
    log_probs = rec["reward_logits"].log_softmax(-1).double()
    targets = torch.tensor(np.array([[twohot_ref(r) for r in row] for row in rewards.tolist()]))
    ce = -(targets * log_probs).sum(-1)  # (B, L)
    assert metrics["reward_loss"].item() == pytest.approx(ce.mean().item(), rel=1e-5)
    shifted = -(targets[:, 1:] * log_probs[:, :-1]).sum(-1).mean().item()
    assert abs(shifted - ce.mean().item()) > 1e-3  # the test can tell a one-step shift
    bce = F.binary_cross_entropy_with_logits(rec["term_logits"].squeeze(-1), terminations)
    assert metrics["termination_loss"].item() == pytest.approx(bce.item(), rel=1e-6)
    bce_shifted = F.binary_cross_entropy_with_logits(rec["term_logits"].squeeze(-1)[:, :-1], terminations[:, 1:])
    assert abs(bce_shifted.item() - bce.item()) > 1e-4
    # the prior from h_t is compared with the posterior of z_{t+1}
    assert torch.equal(rec["prior_h"], h[:, :-1])
    post, prior = rec["posterior"], rec["prior"]
    assert post.shape == (2, 6, 4, 4) and prior.shape == (2, 5, 4, 4)
    aligned = kl(post[:, 1:], prior).mean()
    assert metrics["dynamics_kl"].item() == pytest.approx(aligned.item(), rel=1e-5)
    assert metrics["representation_kl"].item() == pytest.approx(aligned.item(), rel=1e-5)
    assert abs(kl(post[:, :-1], prior).mean().item() - aligned.item()) > 1e-4
    # reconstruction: squared error summed over C, H, W, averaged over batch and time
    target = rec["obs"].flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    assert rec["reconstruction"].shape == (12, 3, 64, 64)
    expected = (rec["reconstruction"] - target).pow(2).sum((1, 2, 3)).mean()
    assert metrics["reconstruction_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("large_kl", [False, True])
def test_world_model_loss_free_bits_and_total(mod, large_kl):
    wm, total, m, _, _, _ = recorded_loss(mod, free_bits=1.0, prior_bias_scale=8.0 if large_kl else 0.0)
    kl_value = m["dynamics_kl"].item()
    assert (kl_value > 1.0) if large_kl else (kl_value < 1.0)  # both sides of the free-bits threshold
    clamped = max(1.0, kl_value)
    expected = m["reconstruction_loss"] + m["reward_loss"] + m["termination_loss"] + 1.0 * clamped + 0.1 * clamped
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert m["world_model_loss"].item() == pytest.approx(total.item())
    total.backward()
    prior_grad = wm.prior_head.weight.grad
    if large_kl:
        assert prior_grad.abs().max() > 0
    else:  # below the free bits the KL terms give no gradient
        assert prior_grad is None or prior_grad.abs().max() == 0


def test_world_model_kl_stop_gradients(mod):
    """dyn = KL(sg(posterior_{t+1}) || prior_t) and rep = KL(posterior_{t+1} || sg(prior_t)).

    The last posterior reaches the KL terms only directly (h_{L-1} predicts no prior in the batch), so its
    gradient from dyn is zero exactly when the posterior is stopped there; rep gives the prior no gradient.
    """
    wm, _, m, rec, _, _ = recorded_loss(mod, free_bits=0.0)
    post, prior = rec["posterior"], rec["prior"]
    dyn_post, dyn_prior = torch.autograd.grad(m["dynamics_kl"], [post, prior], retain_graph=True)
    rep_post, rep_prior = torch.autograd.grad(m["representation_kl"], [post, prior], allow_unused=True)

    def zero(g):
        return g is None or g.abs().max() == 0

    assert zero(dyn_post[:, -1]) and not zero(dyn_prior)
    assert zero(rep_prior) and not zero(rep_post[:, -1])


def test_world_model_loss_reaches_every_parameter(mod):
    wm, total, _, _, _, _ = recorded_loss(mod, free_bits=0.0)
    total.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None, name
        # a conv bias right before a BatchNorm has an exactly zero gradient in theory: allow tiny values there
        if not (name.endswith("bias") and ("encoder" in name or "decoder" in name)):
            assert p.grad.abs().max() > 0, name


# ==========================================================================================================
# 10. Actor-critic
# ==========================================================================================================
def imagined_batch(seed=0, batch=6, horizon=5, features=48, actions=5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, horizon + 1, features, generator=g),
        torch.randint(0, actions, (batch, horizon), generator=g),
        torch.randn(batch, horizon, generator=g) * 3,
        (torch.rand(batch, horizon, generator=g) > 0.2).float(),
    )


def test_actor_critic_loss_gradients(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod), 48, 5)
    features, actions, rewards, continuations = imagined_batch()
    loss, metrics = ac.loss(features, actions, rewards, continuations)
    assert torch.isfinite(loss) and {"actor_loss", "critic_loss"} <= set(metrics)
    loss.backward()
    for name, p in ac.actor.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    for name, p in ac.critic.named_parameters():
        assert p.grad is not None, name
    assert ac.critic[-1].weight.grad.abs().max() > 0
    for p in ac.slow_critic.parameters():
        assert p.grad is None and not p.requires_grad
    # once the critic's zero-initialised output layer has moved, every critic layer gets a gradient
    ac.zero_grad()
    with torch.no_grad():
        ac.critic[-1].weight.normal_(0, 0.1)
    ac.loss(features, actions, rewards, continuations)[0].backward()
    for name, p in ac.critic.named_parameters():
        assert p.grad.abs().max() > 0, name


def test_actor_critic_return_normalisation_and_advantage(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod), 48, 5)
    features, actions, rewards, continuations = imagined_batch(seed=1)
    with torch.no_grad():
        assert ac.value(features).abs().max() < 1e-4  # the critic starts predicting 0
    _, metrics = ac.loss(features, actions, rewards, continuations)
    returns = mod.lambda_returns(rewards, continuations, torch.zeros(6, 6), 0.985, 0.95)
    low, high = returns.flatten().sort().values[[0, 27]]  # nearest rank: the int(q * 30)-th smallest
    assert ac.return_low.item() == pytest.approx(0.01 * low.item(), abs=1e-4)
    assert ac.return_high.item() == pytest.approx(0.01 * high.item(), abs=1e-4)
    assert metrics["return_scale"].item() == pytest.approx(1.0)  # S = max(1, high - low) early on
    assert {"return_low", "return_high"} <= set(ac.state_dict())
    # the advantage R - V(s) (V = 0 here) divided by S = 1 weighs log pi(a): the actor loss by hand
    with torch.no_grad():
        policy = ac.policy(features[:, :-1])
    advantage = returns - ac.value(features).detach()[:, :-1]  # (6, 5)
    expected = -(policy.log_prob(actions) * advantage).mean() - 3e-4 * policy.entropy().mean()
    torch.testing.assert_close(metrics["actor_loss"], expected)
    # with the EMA spread over 10, the same advantage is divided by S = 0.99 * 10 + 0.01 (high - low)
    ac.return_low.fill_(-5.0)
    ac.return_high.fill_(5.0)
    _, metrics = ac.loss(features, actions, rewards, continuations)
    scale = 0.99 * 10 + 0.01 * (high - low).item()
    assert metrics["return_scale"].item() == pytest.approx(scale, rel=1e-5)
    expected = -(policy.log_prob(actions) * advantage / scale).mean() - 3e-4 * policy.entropy().mean()
    torch.testing.assert_close(metrics["actor_loss"], expected)


def test_update_slow_critic(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod), 48, 5)
    with torch.no_grad():
        for p in ac.critic.parameters():
            p.normal_()
    before = [p.clone() for p in ac.slow_critic.parameters()]
    ac.update_slow_critic()
    for slow, old, fast in zip(ac.slow_critic.parameters(), before, ac.critic.parameters(), strict=True):
        torch.testing.assert_close(slow, old + (1 - 0.98) * (fast - old))


def test_running_norm_statistics_and_state_dict(mod):
    norm = mod.RunningNorm(7)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, generator=g, dtype=F64) * s + m for n, s, m in ((5, 1, 0), (17, 3, 2), (40, 0.5, -1))]
    norm = norm.double()
    for x in batches:
        norm.update(x)
    all_x = torch.cat(batches).numpy()
    np.testing.assert_allclose(norm.mean.numpy(), all_x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.var.numpy(), all_x.var(0), rtol=1e-10)
    assert norm.count.item() == 62
    x = torch.tensor(all_x[:3])
    expected = ((all_x[:3] - all_x.mean(0)) / np.sqrt(all_x.var(0) + 1e-8)).clip(-10, 10)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-6)
    assert norm(torch.full((1, 7), 1e6, dtype=F64)).max() <= 10  # clipped
    # the statistics are part of the agent's state: they are saved with it (the published code loses them)
    agent = mod.Agent(tiny_args(mod), 5)
    keys = set(agent.state_dict())
    assert {"actor_critic.norm.mean", "actor_critic.norm.var", "actor_critic.norm.count"} <= keys
    agent.actor_critic.norm.update(torch.randn(10, 48) * 4 + 3)
    fresh = mod.Agent(tiny_args(mod), 5)
    fresh.load_state_dict(agent.state_dict())
    torch.testing.assert_close(fresh.actor_critic.norm.mean, agent.actor_critic.norm.mean)
    torch.testing.assert_close(fresh.actor_critic.norm.var, agent.actor_critic.norm.var)


def test_actor_output_init_is_small(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod), 48, 5)
    weight = ac.actor[-1].weight
    np.testing.assert_allclose(weight.norm(dim=1).detach().numpy(), 0.001, rtol=1e-3)  # orthogonal, gain 0.001
    assert weight.abs().max() < 0.001
    probs = ac.policy(torch.randn(100, 48) * 3).probs
    assert (probs - 0.2).abs().max() < 0.01  # a near-uniform initial policy
    assert len([m for m in ac.actor if isinstance(m, torch.nn.Linear)]) == 3  # 2 hidden layers + output
    assert len([m for m in ac.critic if isinstance(m, torch.nn.Linear)]) == 3


# ==========================================================================================================
# 11. LaProp
# ==========================================================================================================
def test_laprop_matches_reference_on_a_quadratic(mod):
    curvature = np.array([1.0, 10.0, 0.1, 3.0])
    start = np.array([1.0, -2.0, 3.0, 0.0])
    lr, b1, b2 = 0.01, 0.9, 0.999
    for eps in (1e-8, 1e-20):
        p = torch.tensor(start, requires_grad=True)
        optimizer = mod.LaProp([p], lr=lr, eps=eps)
        ref, m, v = start.copy(), np.zeros(4), np.zeros(4)
        for t in range(1, 8):
            optimizer.zero_grad()
            (0.5 * (torch.tensor(curvature) * p**2).sum()).backward()
            optimizer.step()
            grad = curvature * ref
            v = b2 * v + (1 - b2) * grad**2
            m = b1 * m + (1 - b1) * grad / (np.sqrt(v / (1 - b2**t)) + eps)
            ref = ref - lr * m / (1 - b1**t)
            np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12, atol=1e-15)
    assert ref[3] == 0.0  # a zero gradient with eps 1e-20 stays finite


def test_warmup_schedule(mod):
    p = torch.nn.Parameter(torch.ones(2))
    optimizer, scheduler = mod.make_optimizer([p], lr=4e-5, warmup=10)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(lrs, [4e-5 * min(1, (k + 1) / 10) for k in range(12)], rtol=1e-9)


# ==========================================================================================================
# 12. Agent.act on real Pong frames
# ==========================================================================================================
@pytest.fixture(scope="module")
def pong_frames():
    env = make_env("ALE/Pong-v5", 0, 0, False, "t")()
    obs, _ = env.reset(seed=0)
    frames = [obs]
    rng = np.random.default_rng(0)
    for _ in range(11):
        obs, *_ = env.step(int(rng.integers(6)))
        frames.append(obs)
    env.close()
    return np.stack(frames)  # (12, 64, 64, 3) uint8


def argmax_latent(probs: torch.Tensor) -> torch.Tensor:
    return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype).flatten(-2)


def set_windows(agent, windows: dict, num_envs: int) -> None:
    """Give the agent the acting windows `windows` (as Agent.window_state writes them) for `num_envs` envs."""
    agent.reset(num_envs)
    agent.load_window_state(windows)


def window_of(windows: dict, i: int) -> dict:
    """Env i's window of `windows`, as env 0's."""
    return {f"0.{key}": windows[f"{i}.{key}"] for key in ("z", "actions") if f"{i}.{key}" in windows}


def make_agent(mod, **overrides):
    torch.manual_seed(0)
    agent = mod.Agent(tiny_args(mod, **overrides), 6)
    with torch.no_grad():
        agent.actor_critic.actor[-1].weight.mul_(1000)  # decisive greedy actions
    return agent


def test_act_valid_actions_and_windows(mod, pong_frames):
    agent = make_agent(mod)
    agent.reset(1)
    taken = []
    for t in range(7):
        actions = agent.act(pong_frames[t : t + 1], np.array([t == 0]))
        taken.append(int(actions[0]))
        assert agent.window_state()["0.actions"].tolist() == taken[-4:]  # oldest first, the oldest drops out
        assert actions.shape == (1,) and np.issubdtype(actions.dtype, np.integer) and 0 <= actions[0] < 6
        assert agent.window_lengths[0] == min(t + 1, 4)  # never more than act_context_length
        assert int(agent.window_state()["0.actions"][-1]) == actions[0]  # the chosen action joins the window
    agent.act(pong_frames[7:8], np.array([True]))
    assert agent.window_lengths[0] == 1  # an episode start clears the window
    agent.reset(3)
    starts = [[True, True, True], [False, True, False], [False, False, True], [False, False, False]]
    lengths = [[1, 1, 1], [2, 1, 2], [3, 2, 1], [4, 3, 2]]
    for t, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        actions = agent.act(pong_frames[3 * t % 10 : 3 * t % 10 + 3], np.array(start))
        assert actions.shape == (3,) and all(0 <= a < 6 for a in actions)
        assert agent.window_lengths.tolist() == length
    assert agent.training  # act leaves the mode as it found it


def test_act_takes_n_frames_or_one_frame_and_refuses_other_shapes(mod, pong_frames):
    """(N, 64, 64, 3) -> N actions; one unbatched frame (64, 64, 3), as a Gymnasium env gives it -> one action (the
    same as the batch of one); any other shape, or N frames for another number of envs, is one line naming it."""
    agent = make_agent(mod)
    results = []
    for batched in (True, False):
        agent.reset(1)
        torch.manual_seed(0)
        results.append([agent.act(pong_frames[t : t + 1] if batched else pong_frames[t], t == 0) for t in range(3)])
    assert all(isinstance(a, np.ndarray) and a.shape == (1,) for a in results[0])
    assert all(isinstance(a, int) for a in results[1]) and [int(a[0]) for a in results[0]] == results[1]
    agent.reset(2)
    assert agent.act(pong_frames[:2], np.array([True, True])).shape == (2,)
    for shape in [(64, 64), (64, 64, 1), (2, 32, 32, 3), (1, 2, 64, 64, 3)]:
        with pytest.raises(utils.UserError, match=re.escape(f"(N, 64, 64, 3) or one frame (64, 64, 3), not {shape}")):
            agent.act(np.zeros(shape, np.uint8))
    with pytest.raises(utils.UserError, match=r"got 3 frames for 2 envs: call agent.reset\(3\) first"):
        agent.act(pong_frames[:3])


def test_window_state_round_trip(mod, pong_frames):
    """window_state -> load_window_state (a checkpoint's "window.{i}.*"): the same windows, the same next actions."""
    agent = make_agent(mod)
    agent.reset(3)
    for t in range(6):  # env 1 restarts at t = 4: windows of 4, 2 and 4 pairs (act_context_length 4)
        agent.act(pong_frames[t : t + 3], np.array([t == 0, t in (0, 4), t == 0]))
    state = agent.window_state()
    assert sorted(state) == ["0.actions", "0.z", "1.actions", "1.z", "2.actions", "2.z"]
    assert [len(state[f"{i}.z"]) for i in range(3)] == [4, 2, 4] and state["0.z"].shape[1] == 16
    other = make_agent(mod)
    other.load_state_dict(agent.state_dict())
    other.reset(3)
    other.load_window_state(state)
    for key, tensor in other.window_state().items():
        assert torch.equal(tensor, state[key])
    actions = []
    for acting in (agent, other):
        torch.manual_seed(3)
        actions.append(acting.act(pong_frames[6:9]))
    np.testing.assert_array_equal(*actions)


def test_act_batched_equals_each_env_alone(mod, pong_frames, monkeypatch):
    """Windows of unequal lengths run in groups: each env gets the action it would get alone, from h over its
    own window (in time order) and z ~ prior(h); the newest frame is not seen (published behaviour)."""
    monkeypatch.setattr(mod, "sample_latent", argmax_latent)
    agent = make_agent(mod)
    agent.eval()
    seen = []
    act = agent.actor_critic.act
    monkeypatch.setattr(agent.actor_critic, "act", lambda f, greedy=False: seen.append(f) or act(f, greedy))
    g = torch.Generator().manual_seed(0)
    before = {}
    for i, length in enumerate([3, 1, 3, 2, 0]):  # envs 0 and 2 form one group
        if length:
            before[f"{i}.z"] = F.one_hot(torch.randint(0, 4, (length, 4), generator=g), 4).float().flatten(1)
            before[f"{i}.actions"] = torch.randint(0, 6, (length,), generator=g)
    set_windows(agent, before, 5)
    obs = pong_frames[:5]
    batched = agent.act(obs, None, greedy=True)
    assert agent.window_lengths.tolist() == [4, 2, 4, 3, 1]
    assert batched[0] != batched[2]  # the grouped envs act differently: a mix-up would show
    for i in range(4):
        set_windows(agent, window_of(before, i), 1)
        seen[:] = []
        alone = agent.act(obs[i : i + 1], None, greedy=True)
        assert alone[0] == batched[i]
        z, a = before[f"{i}.z"][None], before[f"{i}.actions"][None]
        with torch.no_grad():
            h = agent.world_model.dynamics(z, a)[0][:, -1]
            z_prior = argmax_latent(agent.world_model.prior(h))
        torch.testing.assert_close(seen[0], torch.cat([z_prior, h], -1), rtol=1e-5, atol=1e-5)
        # the same window with a different newest frame: the actor sees the same features
        set_windows(agent, window_of(before, i), 1)
        seen[:] = []
        agent.act(255 - obs[i : i + 1], None, greedy=True)
        torch.testing.assert_close(seen[0], torch.cat([z_prior, h], -1), rtol=1e-5, atol=1e-5)


def test_act_on_posterior_sees_the_newest_frame(mod, pong_frames, monkeypatch):
    monkeypatch.setattr(mod, "sample_latent", argmax_latent)
    agent = make_agent(mod, act_on_posterior=True)
    agent.eval()
    seen = []
    act = agent.actor_critic.act
    monkeypatch.setattr(agent.actor_critic, "act", lambda f, greedy=False: seen.append(f) or act(f, greedy))
    agent.reset(1)
    for t in range(3):
        agent.act(pong_frames[t : t + 1], np.array([t == 0]))
    window = agent.window_state()
    for obs in (pong_frames[3:4], 255 - pong_frames[3:4]):
        set_windows(agent, window, 1)
        seen[:] = []
        agent.act(obs, None, greedy=True)
        with torch.no_grad():
            z_new = argmax_latent(agent.world_model.posterior(torch.as_tensor(obs)))
        torch.testing.assert_close(seen[0][:, :16], z_new)
        torch.testing.assert_close(agent.window_state()["0.z"][-1], z_new[0])  # the frame joins the window once


def test_act_greedy_is_deterministic_given_the_same_windows(mod, pong_frames, monkeypatch):
    """Greedy acting takes the actor's most likely action: under any torch seed the same windows give the same
    actions, the argmax of the policy; sampled actions from the same near-uniform policy do vary."""
    monkeypatch.setattr(mod, "sample_latent", argmax_latent)  # the features the actor sees are deterministic
    torch.manual_seed(0)
    agent = mod.Agent(tiny_args(mod), 6)  # the actor's small output init: a near-uniform policy
    seen = []
    act = agent.actor_critic.act
    monkeypatch.setattr(agent.actor_critic, "act", lambda f, greedy=False: seen.append(f) or act(f, greedy))
    agent.reset(3)
    agent.act(pong_frames[0:3], np.ones(3, bool))
    agent.act(pong_frames[3:6], np.zeros(3, bool))
    window = agent.window_state()
    results = {True: [], False: []}
    for seed in range(8):
        for greedy in (True, False):
            set_windows(agent, window, 3)
            seen[:] = []
            torch.manual_seed(seed)
            results[greedy].append(agent.act(pong_frames[6:9], None, greedy=greedy))
    with torch.no_grad():
        most_likely = agent.actor_critic.policy(seen[0]).probs.argmax(-1).numpy()
    for actions in results[True]:
        np.testing.assert_array_equal(actions, most_likely)
    assert len({tuple(actions) for actions in results[False]}) > 1  # sampling would fail this test


# ==========================================================================================================
# 13. Argument checks
# ==========================================================================================================
BAD_ARGS = [
    (dict(batch_size=-1), "--batch-size"),
    (dict(d_model=0), "--d-model"),
    (dict(sequence_length=-16), "--sequence-length"),
    (dict(imagine_batch_size=0), "--imagine-batch-size"),
    (dict(act_context_length=-2), "--act-context-length"),
    (dict(random_steps=-1), "--random-steps"),
    (dict(sequence_length=200, random_steps=300, buffer_size=100), "--sequence-length"),
    (dict(imagine_context_length=20), "--imagine-context-length"),
    (dict(encoder_filters=(4, -8, 8, 8, 8)), "--encoder-filters"),
]


@pytest.mark.parametrize("overrides, flag", BAD_ARGS, ids=[str(o) for o, _ in BAD_ARGS])
def test_check_args_errors(mod, overrides, flag):
    mod.check_args(tiny_args(mod))  # the base configuration is fine
    with pytest.raises(utils.UserError) as error:
        mod.check_args(tiny_args(mod, **overrides))
    message = str(error.value)
    assert "\n" not in message and flag in message


def test_check_args_headdim_must_divide_d_inner(headdim_mod):
    mod = headdim_mod
    with pytest.raises(utils.UserError) as error:
        mod.check_args(tiny_args(mod, headdim=48))  # d_inner = 2 * 32 = 64
    assert "\n" not in str(error.value) and "--headdim" in str(error.value)
    mod.check_args(mod.Args())  # the defaults are valid


@pytest.mark.parametrize("field", ["tau", "tau_img"])
def test_check_args_dfs_temperatures_must_be_positive(dfs_mod, field):
    """tau 0 makes the DFS probabilities NaN: rng.choice would raise only once training starts."""
    with pytest.raises(utils.UserError) as error:
        dfs_mod.check_args(tiny_args(dfs_mod, **{field: 0.0}))
    assert "\n" not in str(error.value) and f"--{field.replace('_', '-')}" in str(error.value)


# ==========================================================================================================
# 14. End to end: the script on a real ALE game, TensorBoard keys, saved agent, replay buffer vs the game
# ==========================================================================================================
# Breakout under seed 5 with random actions: two games over (steps 160 and 288) and lost lives between them,
# all within the 290 random steps (test_end_to_end_training_run checks that they happen)
TINY_FLAGS = (
    "--env-id ALE/Breakout-v5 --total-timesteps 300 --random-steps 290 --batch-size 2 --sequence-length 16 "
    "--imagine-batch-size 8 --imagine-context-length 4 --imagine-horizon 4 --eval-episodes 0 --d-model 64 "
    "--headdim 32 --encoder-filters 4 8 8 8 8 --stoch-categoricals 8 --stoch-classes 8 --act-context-length 4 "
    "--log-every 5 --torch-threads 1 --seed 5"
).split()


def run_script(variant: str, flags: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / f"{variant}.py"), *flags], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def replay_game(env_id: str, seed: int, actions: list[int]) -> dict[str, np.ndarray]:
    """The game's own account of a run's actions: per-step rewards, game overs, lost lives, episode starts."""
    env = make_env(env_id, seed, 0, False, "t")()
    env.reset(seed=seed)
    steps = dict(rewards=[], terminated=[], life_loss=[], episode_starts=[])
    episode_start = True
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        for key, value in zip(steps, (reward, terminated, info["life_loss"], episode_start), strict=True):
            steps[key].append(value)
        episode_start = terminated or truncated
        if episode_start:
            env.reset()
    env.close()
    return {key: np.array(value) for key, value in steps.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_training_run(variant, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mod = importlib.import_module(variant)
    flags = TINY_FLAGS
    if "headdim" not in {f.name for f in dataclasses.fields(mod.Args)}:  # a Mamba-2 setting only
        i = flags.index("--headdim")
        flags = flags[:i] + flags[i + 2 :]
    result = run_script(variant, flags, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/300 updates 0 ") and "s/update - ETA after the first updates" in lines[0]
    last_line = r"step 300/300 updates 10 SPS [\d.]+ s/update [\d.]+ ETA 0\.0 h return\(mean of 5\) 0\.5"
    assert re.fullmatch(last_line, lines[-1]), lines[-1]
    run_dirs = list((tmp_path / "runs" / "ALE").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.startswith(f"Breakout-v5__{variant}__5__")
    run_dir = run_dirs[0]
    # the replay buffer holds what the game did: a lost life is a termination target, the game goes on
    saved = read_training_state(str(run_dir), variant)
    tensors, actions = saved.tensors, saved.tensors["action_history"].tolist()
    assert len(actions) == 300 and saved.global_step == 300
    game = replay_game("ALE/Breakout-v5", 5, actions)
    episode_ends = np.flatnonzero(game["terminated"])
    assert len(episode_ends) == 2 and (game["life_loss"] & ~game["terminated"]).sum() >= 3  # the run's premise
    np.testing.assert_array_equal(tensors["buffer.actions"].numpy(), actions)
    np.testing.assert_array_equal(tensors["buffer.rewards"].numpy(), game["rewards"])
    np.testing.assert_array_equal(tensors["buffer.terminations"].numpy(), game["terminated"] | game["life_loss"])
    np.testing.assert_array_equal(tensors["buffer.episode_starts"].numpy(), game["episode_starts"])
    # TensorBoard: every finished episode's return and length, and the running mean of the last 5 returns
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"charts/SPS", "losses/world_model_loss", "losses/actor_loss", "losses/critic_loss"} <= scalars
    starts = np.concatenate([[0], episode_ends[:-1] + 1])
    returns = [game["rewards"][a : b + 1].sum() for a, b in zip(starts, episode_ends, strict=True)]
    assert len(set(returns)) > 1  # the mean of 5 differs from the last return
    for key, expected in (
        ("charts/episodic_return", returns),
        ("charts/episodic_length", episode_ends - starts + 1),
        ("charts/episodic_return_mean5", [np.mean(returns[max(0, i - 4) : i + 1]) for i in range(len(returns))]),
    ):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == episode_ends.tolist(), key
        np.testing.assert_allclose([e.value for e in logged], expected, err_msg=key)
    assert len(events.Scalars("losses/world_model_loss")) == 2  # 10 updates, logged every 5
    # the saved agent rebuilds from args.json alone and carries the normaliser statistics
    config = json.loads((run_dir / "args.json").read_text())
    assert config["variant"] == variant and config["action_dim"] == 4 and config["d_model"] == 64
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    args = mod.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})
    agent = mod.Agent(args, config["action_dim"])
    state = load_file(str(run_dir / "agent.safetensors"))
    agent.load_state_dict(state, strict=True)
    for key, value in agent.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert state["actor_critic.norm.count"].item() == 10 * 8 * 5  # 10 updates x 8 starts x (horizon + 1)
    assert state["actor_critic.norm.var"].min() > 0
    with safe_open(str(run_dir / "agent.safetensors"), "pt") as f:
        assert f.metadata()["variant"] == variant and f.metadata()["action_dim"] == "4"
    assert not (run_dir / "agent.safetensors.tmp").exists()


@NEEDS_COMPILER
def test_end_to_end_training_run_compiled(tmp_path):
    result = run_script("drama_xs", [*TINY_FLAGS, "--compile"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 300/300" in result.stdout
    assert len(list((tmp_path / "runs" / "ALE").glob("*/agent.safetensors"))) == 1


BAD_FLAGS = [(["--batch-size", "-1"], "--batch-size"), (["--env-id", "ALE/Krul-v5"], "Krull")]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=["negative-batch", "typo-env"])
def test_bad_flags_exit_with_one_line_error(variant, flags, words, tmp_path, monkeypatch, capsys):
    """The script's __main__ block, run in this process (a subprocess per case costs ~8 s of imports)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{variant}.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / f"{variant}.py"), run_name="__main__")
    message = capsys.readouterr().err  # utils.run_cli: the one line on stderr, exit status 2
    assert exit_info.value.code == 2 and message.startswith("error:") and message.count("\n") == 1
    assert words in message
    assert not (tmp_path / "runs").exists()  # nothing written before the check


def test_compile_without_a_cpp_compiler_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["drama_xs.py", "--compile", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "drama_xs.py"), run_name="__main__")
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.startswith("error:") and message.count("\n") == 1
    assert "--compile" in message and "g++" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=["negative-batch", "typo-env"])
def test_bad_flags_subprocess_stderr(flags, words, tmp_path):
    result = run_script("drama_xs", flags, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
