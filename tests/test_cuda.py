"""GPU checks (skipped without CUDA; the Mamba-1 check is in test_mamba1.py)."""

import importlib.util

import pytest
import torch

import drama_xs

needs_mamba_ssm = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("mamba_ssm") is None,
    reason="needs a CUDA GPU and mamba_ssm (pip install -e '.[cuda]')",
)


@needs_mamba_ssm
def test_mamba2_matches_mamba_ssm_module():
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(0)
    ours = drama_xs.Mamba2(512, 16, 4, 2, 128, 64).cuda()
    theirs = Mamba2(d_model=512, d_state=16, d_conv=4, expand=2, headdim=128, ngroups=1, chunk_size=64).cuda()
    theirs.load_state_dict(ours.state_dict())  # same names and shapes: checkpoints move both ways
    x = torch.randn(2, 200, 512, device="cuda")
    expected = theirs(x)
    fused, _ = ours(x)  # our module with mamba_ssm's scan kernel
    pure, _ = ours.cpu()(x.cpu())  # our pure-PyTorch chunked SSD
    torch.testing.assert_close(fused, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(pure, expected.cpu(), atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_world_model_loss_close_to_fp32():
    torch.manual_seed(0)
    args = drama_xs.Args()
    world_model = drama_xs.WorldModel(args, 6).cuda()
    obs = torch.randint(0, 256, (4, 64, 64, 64, 3), dtype=torch.uint8, device="cuda")
    actions = torch.randint(0, 6, (4, 64), device="cuda")
    zeros = torch.zeros(4, 64, device="cuda")
    torch.manual_seed(1)
    fp32, _ = world_model.loss(obs, actions, zeros, zeros)
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16, _ = world_model.loss(obs, actions, zeros, zeros)
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.02
