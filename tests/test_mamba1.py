import pytest
import torch
import torch.nn.functional as F

from drama_mamba1 import MAMBA_SSM_ERROR, Mamba1, selective_scan, selective_scan_fn


def reference_scan(u, delta, A, B, C, D, h):
    """Naive recurrence, one time step and one channel at a time: h_t = exp(dt A) h_{t-1} + dt B_t x_t,
    y_t = C_t h_t + D x_t."""
    ys = torch.zeros_like(u)
    h = h.clone()
    for t in range(u.shape[1]):
        for d in range(u.shape[2]):
            h[:, d] = (
                torch.exp(delta[:, t, d, None] * A[d]) * h[:, d] + delta[:, t, d, None] * B[:, t] * u[:, t, d, None]
            )
            ys[:, t, d] = (C[:, t] * h[:, d]).sum(-1) + D[d] * u[:, t, d]
    return ys, h


def reference_mixer(m, x):
    """The whole mixer from its parameters, with an explicit causal convolution loop and `reference_scan`."""
    xs, z = (x @ m.in_proj.weight.T).chunk(2, dim=-1)
    w = m.conv1d.weight[:, 0]  # (D, W)
    conv = torch.zeros_like(xs) + m.conv1d.bias
    for t in range(x.shape[1]):
        for k in range(m.d_conv):  # tap k sees the input k steps back
            if t - k >= 0:
                conv[:, t] += w[:, m.d_conv - 1 - k] * xs[:, t - k]
    u = F.silu(conv)
    dt, B, C = (u @ m.x_proj.weight.T).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)
    h0 = torch.zeros(x.shape[0], m.d_inner, m.d_state, dtype=x.dtype)
    y, h = reference_scan(u, delta, -torch.exp(m.A_log), B, C, m.D, h0)
    return (y * F.silu(z)) @ m.out_proj.weight.T, h


def small_mixer(seed=0, d_model=16, d_state=4, d_conv=4):
    """A float64 mixer with every parameter moved off its structured init, so no term is trivial."""
    torch.manual_seed(seed)
    m = Mamba1(d_model, d_state=d_state, d_conv=d_conv).double()
    with torch.no_grad():
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.D.add_(0.5 * torch.randn_like(m.D))
        m.conv1d.bias.normal_()
    return m


def test_selective_scan_matches_naive_recurrence():
    torch.manual_seed(0)
    b, L, d, n = 2, 11, 5, 3
    u = torch.randn(b, L, d, dtype=torch.float64)
    delta = F.softplus(torch.randn(b, L, d, dtype=torch.float64))
    A = -torch.rand(d, n, dtype=torch.float64) * 3
    B, C = torch.randn(2, b, L, n, dtype=torch.float64)
    D = torch.randn(d, dtype=torch.float64)
    h0 = torch.randn(b, d, n, dtype=torch.float64)  # a carried-in state
    y, h = selective_scan(u, delta, A, B, C, D, h0)
    y_ref, h_ref = reference_scan(u, delta, A, B, C, D, h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)


def test_forward_matches_reference_mixer():
    m = small_mixer()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, (conv_state, ssm_state) = m(x)
    y_ref, h_ref = reference_mixer(m, x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ssm_state, h_ref, rtol=0, atol=1e-10)
    xs = (x @ m.in_proj.weight.T)[..., : m.d_inner]  # (B, L, D) conv inputs
    torch.testing.assert_close(conv_state, xs[:, -m.d_conv :].transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", [0, 2, 7])
def test_step_matches_forward(prefix):
    m = small_mixer()
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    y_full, state_full = m(x)
    if prefix == 0:
        state = m.allocate_state(3)
        assert state[0].shape == (3, 32, 4) and state[1].shape == (3, 32, 4)
    else:
        y_prefix, state = m(x[:, :prefix])
        torch.testing.assert_close(y_prefix, y_full[:, :prefix], rtol=0, atol=1e-10)
    ys = []
    for t in range(prefix, x.shape[1]):
        old = [s.clone() for s in state]
        y_t, new_state = m.forward_token(x[:, t], state)
        assert all(torch.equal(a, b) for a, b in zip(old, state, strict=True)), "step must not modify its input state"
        ys.append(y_t)
        state = new_state
    torch.testing.assert_close(torch.stack(ys, 1), y_full[:, prefix:], rtol=0, atol=1e-10)
    for s, s_full in zip(state, state_full, strict=True):
        torch.testing.assert_close(s, s_full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("splits", [[1], [2], [3], [4], [6], [1, 2], [3, 5, 9], [11]])
def test_chunked_continuation(splits):
    m = small_mixer()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y_full, state_full = m(x)
    ys, state = [], None
    for a, b in zip([0, *splits], [*splits, x.shape[1]], strict=True):
        y, state = m(x[:, a:b], state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=0, atol=1e-10)
    for s, s_full in zip(state, state_full, strict=True):
        torch.testing.assert_close(s, s_full, rtol=0, atol=1e-10)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = Mamba1(32, d_state=8)
    y, (conv_state, ssm_state) = m(torch.randn(2, 10, 32))
    y2, _ = m(torch.randn(2, 3, 32), (conv_state, ssm_state))  # also through a carried state
    (y.square().mean() + y2.square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_names_shapes_and_count():
    m = Mamba1(512, d_state=16, d_conv=4, expand=2)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2048, 512),
        "conv1d.weight": (1024, 1, 4),
        "conv1d.bias": (1024,),
        "x_proj.weight": (64, 1024),
        "dt_proj.weight": (1024, 32),
        "dt_proj.bias": (1024,),
        "A_log": (1024, 16),
        "D": (1024,),
        "out_proj.weight": (512, 1024),
    }
    assert sum(p.numel() for p in m.parameters()) == 1_694_720


def test_init_as_upstream():
    torch.manual_seed(0)
    m = Mamba1(512)
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert m.dt_proj.weight.abs().max() <= 32**-0.5
    torch.testing.assert_close(-torch.exp(m.A_log.detach()), -torch.arange(1, 17.0).expand(1024, 16))
    assert torch.equal(m.D.detach(), torch.ones(1024))


@pytest.mark.skipif(
    not torch.cuda.is_available() or selective_scan_fn is None,
    reason=f"needs a CUDA GPU and mamba-ssm's full build (docs/gpu.md): {MAMBA_SSM_ERROR or 'no GPU'}",
)
def test_cuda_fused_path_matches_mamba_ssm():
    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.utils.generation import InferenceParams

    torch.manual_seed(0)
    ref = Mamba(64, d_state=16, d_conv=4, expand=2, layer_idx=0).cuda()
    m = Mamba1(64, d_state=16, d_conv=4, expand=2).cuda()
    m.load_state_dict(ref.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 33, 64, device="cuda")
    params = InferenceParams(max_seqlen=33, max_batch_size=2)
    y_ref = ref(x, inference_params=params)
    conv_ref, ssm_ref = params.key_value_memory_dict[0]
    y, (conv_state, ssm_state) = m(x)  # fused path
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv_state, conv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm_state, ssm_ref, rtol=1e-4, atol=1e-4)
    # the pure-PyTorch path (taken when a state is passed) agrees in outputs and gradients
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    y_pt, _ = m(x, m.allocate_state(2))
    torch.testing.assert_close(y_pt, y, rtol=1e-4, atol=1e-4)
    y_pt.square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=n)
