"""mamba_ssm's fused Mamba-2 scan against each Mamba-2 script's pure-PyTorch scan, on a CPU: Triton's interpreter
(TRITON_INTERPRET=1) runs mamba_ssm's real Triton kernels on CPU tensors.

Needs triton and a mamba-ssm built without its CUDA extensions, neither of which `.[test]` installs (docs/gpu.md,
"Testing the fused scan without a GPU"); skipped with one line without them. Run with `pytest -m fused`.

The kernels are written for CUDA; stand-ins here (never in the scripts) let them run on a CPU: a fresh import of
the kernels with the interpreter on (triton.jit reads TRITON_INTERPRET when a kernel is defined), no-op
`torch.cuda.device` for a CPU tensor's index (None), an SM count for `torch.cuda.get_device_properties` (the
backward sizes its grids with it), and one config per autotuned kernel (the autotuner times configs on a GPU).
The mixers take the fused path through their `fused_scan_on` switch.
"""

import contextlib
import importlib
import sys
import types

import pytest
import torch

from utils.mamba_kernels import load_ssd_scan

pytestmark = pytest.mark.fused
MAMBA2_SCRIPTS = ["drama_xs", "drama_s", "drama_uniform_sampling"]


@pytest.fixture(scope="module")
def interpreted_kernel():
    """mamba_chunk_scan_combined imported afresh under Triton's interpreter, with the CUDA stand-ins in place."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            patch.delitem(sys.modules, name)  # a copy imported without the interpreter would run compiled
        patch.setenv("TRITON_INTERPRET", "1")
        kernel, error = load_ssd_scan()
        if kernel is None:
            pytest.skip(f"needs triton and mamba-ssm built without CUDA (docs/gpu.md): {error}")
        for name, module in list(sys.modules.items()):
            if name.startswith("mamba_ssm.ops.triton."):
                for value in vars(module).values():
                    if type(value).__name__ == "Autotuner":
                        value.configs = value.configs[:1]
        patch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        sm_count = types.SimpleNamespace(multi_processor_count=4)
        patch.setattr(torch.cuda, "get_device_properties", lambda device: sm_count)
        yield kernel
        for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            patch.delitem(sys.modules, name, raising=False)  # the interpreted copy stays out of later tests


@pytest.mark.parametrize("variant", MAMBA2_SCRIPTS)
def test_fused_scan_matches_pure_pytorch_with_states_and_gradients(variant, interpreted_kernel, monkeypatch):
    """fp32; L = 40 with chunks of 16 (a partial last chunk), a given initial state (conv and SSM), the final
    states, and the gradients of the input, both initial states and every parameter."""
    module = importlib.import_module(variant)
    monkeypatch.setattr(module, "mamba_chunk_scan_combined", interpreted_kernel)
    args = module.Args()
    torch.manual_seed(0)
    mixer = module.Mamba2(32, args.d_state, args.d_conv, args.expand, headdim=16, chunk_size=16)
    with torch.no_grad():
        for p in mixer.parameters():  # off the init (D = 1, norm weight = 1): every term shows
            p.add_(0.1 * torch.randn_like(p))
    u = torch.randn(2, 40, 32)
    conv_state, ssm_state = (torch.randn_like(s) for s in mixer.allocate_state(2))
    weights = [torch.randn(2, 40, 32), torch.randn_like(conv_state), torch.randn_like(ssm_state)]

    def run(fused_scan_on: str | None, calls: list):
        mixer.fused_scan_on = fused_scan_on
        mixer.zero_grad(set_to_none=True)
        inputs = [t.clone().requires_grad_() for t in (u, conv_state, ssm_state)]
        y, state = mixer(inputs[0], (inputs[1], inputs[2]))
        outputs = (y, *state)
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        calls.append(len(spy_calls))
        grads = {"u": inputs[0].grad, "conv_state": inputs[1].grad, "ssm_state": inputs[2].grad}
        return [o.detach() for o in outputs], grads | {n: p.grad for n, p in mixer.named_parameters()}

    spy_calls = []

    def spy(*args, **kwargs):
        spy_calls.append(args[0].shape)
        return interpreted_kernel(*args, **kwargs)

    monkeypatch.setattr(module, "mamba_chunk_scan_combined", spy)
    calls = []
    fused_outputs, fused_grads = run("cpu", calls)
    pure_outputs, pure_grads = run(None, calls)
    assert calls == [1, 1]  # the fused run called the kernel, the pure run did not
    for name, fused, pure in zip(("y", "conv_state", "ssm_state"), fused_outputs, pure_outputs, strict=True):
        assert (fused - pure).norm() <= 1e-5 * pure.norm(), name
    for name, pure in pure_grads.items():
        assert pure is not None and (fused_grads[name] - pure).norm() <= 1e-5 * pure.norm(), name
