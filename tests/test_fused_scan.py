"""mamba_ssm's fused Mamba-2 scan against each Mamba-2 script's pure-PyTorch scan, on a CPU: Triton's interpreter
(TRITON_INTERPRET=1) runs mamba_ssm's real Triton kernels on CPU tensors.

Needs triton and a mamba-ssm built without its CUDA extensions, neither of which `.[test]` installs (docs/gpu.md,
"Testing the fused scan without a GPU"); skipped with one line without them. Run with `pytest -m fused`.

The kernels are written for CUDA; stand-ins in the tests (never in the scripts) let them run on a CPU:
TRITON_INTERPRET=1 set by conftest.py before anything imports triton (triton.jit reads it when a kernel is
defined), mamba_ssm's package __init__ not run (utils/mamba_kernels.py, as in the scripts), a no-op
`torch.cuda.device` for a CPU tensor's index (None), an SM count for `torch.cuda.get_device_properties` (the
backward sizes its grids with it), and one config per autotuned kernel (the autotuner times configs on a GPU).
The mixers take the fused path through their `fused_scan_on` switch.
"""

import contextlib
import importlib
import os
import sys
import types

import pytest
import torch

from utils.mamba_kernels import load_ssd_scan

pytestmark = pytest.mark.fused
MAMBA2_SCRIPTS = ["drama_xs", "drama_s", "drama_uniform_sampling"]


@pytest.fixture(scope="module")
def interpreted_kernel():
    """mamba_chunk_scan_combined as Triton's interpreter runs it, with the CUDA stand-ins in place."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the compiled kernels: tests/test_cuda.py")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)")
    kernel, error = load_ssd_scan()
    if kernel is None:
        pytest.skip(f"needs triton and mamba-ssm built without CUDA (docs/gpu.md): {error}")
    with pytest.MonkeyPatch.context() as patch:
        for name, module in list(sys.modules.items()):
            if name.startswith("mamba_ssm.ops.triton."):
                for value in vars(module).values():
                    if type(value).__name__ == "Autotuner":
                        patch.setattr(value, "configs", value.configs[:1])
        patch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        sm_count = types.SimpleNamespace(multi_processor_count=4)
        patch.setattr(torch.cuda, "get_device_properties", lambda device: sm_count)
        yield kernel


@pytest.mark.parametrize("variant", MAMBA2_SCRIPTS)
def test_fused_scan_matches_pure_pytorch_with_states_and_gradients(variant, interpreted_kernel, monkeypatch):
    """fp32; L = 40 with chunks of 16 (a partial last chunk), a given initial state (conv and SSM), the final
    states, and the gradients of the input, both initial states and every parameter."""
    module = importlib.import_module(variant)
    args = module.Args()
    torch.manual_seed(0)
    mixer = module.Mamba2(32, args.d_state, args.d_conv, args.expand, headdim=16, chunk_size=16)
    with torch.no_grad():
        for p in mixer.parameters():  # off the init (D = 1, norm weight = 1): every term shows
            p.add_(0.1 * torch.randn_like(p))
    u = torch.randn(2, 40, 32)
    conv_state, ssm_state = (torch.randn_like(s) for s in mixer.allocate_state(2))
    weights = [torch.randn(2, 40, 32), torch.randn_like(conv_state), torch.randn_like(ssm_state)]

    kernel_calls = []

    def spy(*args, **kwargs):
        kernel_calls.append(tuple(args[0].shape))
        return interpreted_kernel(*args, **kwargs)

    monkeypatch.setattr(module, "mamba_chunk_scan_combined", spy)

    def run(fused_scan_on: str | None):
        """(y, conv_state, ssm_state) and the gradients of a weighted sum of all three."""
        mixer.fused_scan_on = fused_scan_on
        mixer.zero_grad(set_to_none=True)
        inputs = [t.clone().requires_grad_() for t in (u, conv_state, ssm_state)]
        y, state = mixer(inputs[0], (inputs[1], inputs[2]))
        outputs = (y, *state)
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        grads = {"u": inputs[0].grad, "conv_state": inputs[1].grad, "ssm_state": inputs[2].grad}
        return [o.detach() for o in outputs], grads | {n: p.grad for n, p in mixer.named_parameters()}

    fused_outputs, fused_grads = run("cpu")
    assert kernel_calls == [(2, 40, mixer.nheads, 16)]
    pure_outputs, pure_grads = run(None)
    assert len(kernel_calls) == 1  # the pure path did not call it
    for name, fused, pure in zip(("y", "conv_state", "ssm_state"), fused_outputs, pure_outputs, strict=True):
        assert (fused - pure).norm() <= 1e-5 * pure.norm(), name
    for name, pure in pure_grads.items():
        assert pure is not None and (fused_grads[name] - pure).norm() <= 1e-5 * pure.norm(), name
