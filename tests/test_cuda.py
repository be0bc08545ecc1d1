"""What only a GPU can show, skipped without CUDA: mamba_ssm's fused Mamba-2 scan against mamba_ssm's own Mamba2
module and against our pure-PyTorch scan at the XS size, bf16 on the GPU, a full update, dream, save, load and
resume on CUDA, and a compiled imagination step that compiles once. benchmarks/gpu_check.py runs this file.

Elsewhere: the CUDA path's logic that a CPU can check (which scan runs and why, the compiler check, the cache
folders, mixer states) in test_gpu_path.py; the fused scan's maths on a CPU under Triton's interpreter in
test_fused_scan.py; the Mamba-1 kernel in test_mamba1.py.

TF32 is off in every test here (cuDNN convolutions default to it; its 10-bit mantissa alone moves results by
~1e-3). mamba_ssm's Triton kernels may still use TF32 dot products inside for fp32 inputs, so a fused result is
compared by the relative error of the whole tensor, ||a - b|| / ||b||, at 3e-3 (gradients 1e-2): a wrong term (D,
the gate, a state one step off, a lost initial state) gives 1e-1 and more.
"""

import importlib.util
import math
import shutil
import warnings
from collections import deque

import numpy as np
import pytest
import torch

import drama_xs
from utils.checkpoint import (
    TrainingState,
    read_training_state,
    restore_training_state,
    save_agent,
    save_training_state,
)

CUDA = torch.device("cuda")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_fused = pytest.mark.skipif(
    not HAS_CUDA or drama_xs.mamba_chunk_scan_combined is None,
    reason=f"needs a CUDA GPU and mamba_ssm (docs/gpu.md); scan here: {drama_xs.scan_backend(CUDA)}",
)


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of mamba_ssm's scan kernel from our mixer: proof that the fused path ran."""
    calls, kernel = [], drama_xs.mamba_chunk_scan_combined

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(drama_xs, "mamba_chunk_scan_combined", spy)
    return calls


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def perturbed_mixer(seed: int = 0) -> drama_xs.Mamba2:
    """The XS mixer (d_model 512, headdim 128) with every parameter moved off its init (D = 1, norm weight = 1)."""
    torch.manual_seed(seed)
    mixer = drama_xs.Mamba2(512, 16, 4, 2, 128, 64)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer.to(CUDA)


def reference_mamba2(ours: drama_xs.Mamba2, use_mem_eff_path: bool):
    from mamba_ssm.modules.mamba2 import Mamba2

    theirs = Mamba2(
        d_model=512, d_state=16, d_conv=4, expand=2, headdim=128, ngroups=1, chunk_size=64,
        use_mem_eff_path=use_mem_eff_path, layer_idx=0,
    ).to(CUDA)  # fmt: skip
    theirs.load_state_dict(ours.state_dict())  # same names and shapes: checkpoints move both ways
    return theirs


@needs_fused
def test_fused_forward_and_states_match_mamba_ssm_inference_cache(fused_calls):
    """mamba_ssm's Mamba2 with an inference cache (its non-fused-conv path: no causal-conv1d needed) fills the
    cache with the states our `forward` returns."""
    from mamba_ssm.utils.generation import InferenceParams

    ours = perturbed_mixer()
    theirs = reference_mamba2(ours, use_mem_eff_path=False)
    x = torch.randn(2, 200, 512, device=CUDA)
    cache = InferenceParams(max_seqlen=200, max_batch_size=2)
    with torch.no_grad():
        expected = theirs(x, inference_params=cache)
        y, (conv_state, ssm_state) = ours(x)
    conv_expected, ssm_expected = cache.key_value_memory_dict[0]
    assert fused_calls == [(2, 200, 8, 128)]
    assert rel_err(y, expected) < 3e-3
    assert rel_err(conv_state, conv_expected) < 1e-5  # the last 4 conv inputs: in_proj outputs, no scan involved
    assert rel_err(ssm_state, ssm_expected) < 3e-3
    assert conv_state.dtype == ssm_state.dtype == torch.float32
    assert conv_state.is_contiguous() and ssm_state.is_contiguous()


@needs_fused
def test_fused_forward_matches_mamba_ssm_fused_module(fused_calls):
    """mamba_ssm's default Mamba2 (use_mem_eff_path: fused conv + scan + norm) needs causal-conv1d."""
    if importlib.util.find_spec("causal_conv1d") is None:
        pytest.skip("mamba_ssm's fused Mamba2 path needs causal-conv1d: pip install --no-build-isolation causal-conv1d")
    ours = perturbed_mixer()
    theirs = reference_mamba2(ours, use_mem_eff_path=True)
    x = torch.randn(2, 200, 512, device=CUDA)
    with torch.no_grad():
        expected = theirs(x)
        y, _ = ours(x)
    assert fused_calls and rel_err(y, expected) < 3e-3


@needs_fused
def test_fused_forward_then_step_or_forward_continues_the_sequence(fused_calls):
    """The hand-off the imagination relies on: a fused forward's states continue exactly as the whole sequence
    would, by `forward_token` (pure PyTorch) and by a fused forward from a given state (initial_states)."""
    ours = perturbed_mixer()
    x = torch.randn(2, 200, 512, device=CUDA)
    with torch.no_grad():
        ours.fused_scan_on = None
        expected, _ = ours(x)  # our pure-PyTorch chunked scan, on the GPU
        ours.fused_scan_on = "cuda"
        _, state = ours(x[:, :150])
        continued, _ = ours(x[:, 150:], state)
        stepped = []
        for t in range(150, 200):
            y, state = ours.forward_token(x[:, t], state)
            stepped.append(y)
    assert len(fused_calls) == 2
    assert rel_err(continued, expected[:, 150:]) < 3e-3
    assert rel_err(torch.stack(stepped, 1), expected[:, 150:]) < 3e-3


@needs_fused
def test_fused_gradients_match_pure_pytorch(fused_calls):
    ours = perturbed_mixer()
    x = torch.randn(2, 200, 512, device=CUDA)
    weights = torch.randn(2, 200, 512, device=CUDA)

    def gradients():
        ours.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        y, _ = ours(inputs)
        (y * weights).sum().backward()
        return {"input": inputs.grad} | {name: p.grad for name, p in ours.named_parameters()}

    fused = gradients()
    assert fused_calls
    ours.fused_scan_on = None
    pure = gradients()
    for name, grad in pure.items():
        assert rel_err(fused[name], grad) < 1e-2, name


@needs_cuda
def test_bf16_world_model_loss_components_close_to_fp32():
    """Every component, not the total (99% reconstruction): a term that bf16 breaks shows on its own."""
    torch.manual_seed(0)
    world_model = drama_xs.WorldModel(drama_xs.Args(), 6).to(CUDA)
    obs = torch.randint(0, 256, (4, 64, 64, 64, 3), dtype=torch.uint8, device=CUDA)
    actions = torch.randint(0, 6, (4, 64), device=CUDA)
    rewards = 3 * torch.randn(4, 64, device=CUDA)
    terminations = (torch.rand(4, 64, device=CUDA) < 0.1).float()
    torch.manual_seed(1)
    _, fp32 = world_model.loss(obs, actions, rewards, terminations)
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, bf16 = world_model.loss(obs, actions, rewards, terminations)
    # bf16 keeps 8 mantissa bits (0.4% per rounding); through the VAE and Mamba that stays well under 3%
    for name in ("reconstruction_loss", "reward_loss", "termination_loss", "dynamics_kl", "representation_kl"):
        assert math.isclose(bf16[name].item(), fp32[name].item(), rel_tol=0.03, abs_tol=0.01), name


def tiny_training(args: drama_xs.Args, action_dim: int = 4) -> TrainingState:
    agent = drama_xs.Agent(args, action_dim).to(CUDA)
    wm_optimizer, wm_scheduler = drama_xs.make_optimizer(agent.world_model.parameters(), 1e-3, 10)
    ac_optimizer, ac_scheduler = drama_xs.make_optimizer(agent.actor_critic.parameters(), 1e-3, 10)
    buffer = drama_xs.ReplayBuffer(args.buffer_size, device=CUDA)  # as main() makes it
    rng = np.random.default_rng(0)
    for i in range(64):
        buffer.add(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), i % action_dim, float(i % 5 == 0), 0.0, i == 0)
    return TrainingState(args, "cuda", agent, wm_optimizer, wm_scheduler, ac_optimizer, ac_scheduler, buffer, rng,
                         [0] * 64, deque(maxlen=5), 64, 0, 0.0, False)  # fmt: skip


TINY = dict(env_id="ALE/Pong-v5", encoder_filters=(8, 8, 8, 8, 8), d_model=64, headdim=32, stoch_categoricals=8,
            stoch_classes=8, batch_size=4, sequence_length=32, imagine_batch_size=16, imagine_context_length=4,
            imagine_horizon=4, buffer_size=64, act_context_length=4)  # fmt: skip


@needs_cuda
def test_one_full_update_dream_save_load_and_resume_on_cuda(tmp_path):
    """What a GPU run does in its first 10,000 steps: updates, a dream log, a checkpoint and the saved agent."""
    from torch.utils.tensorboard import SummaryWriter

    from utils.dream import log_dream
    from utils.hub import load_agent

    torch.manual_seed(0)
    args = drama_xs.Args(**TINY)
    training = tiny_training(args)
    agent, buffer, rng = training.agent, training.buffer, training.rng
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for _ in range(2):
        metrics = drama_xs.train_world_model(
            agent, training.wm_optimizer, training.wm_scheduler, buffer, args, rng, CUDA, autocast
        )
        metrics |= drama_xs.train_actor_critic(
            agent, training.ac_optimizer, training.ac_scheduler, buffer, args, rng, CUDA, autocast
        )
    assert all(math.isfinite(float(value)) for value in metrics.values()), metrics
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        result = log_dream(writer, agent, buffer, 5000, length=32, context_length=4)
    assert result["imagined"].shape == (32, 64, 64, 3) and np.isfinite(result["imagination_mse"]).all()

    save_agent(agent, args, str(tmp_path / "agent"), "drama_xs")
    for device in ("cpu", CUDA.type):  # a GPU-trained agent plays on a laptop
        loaded = load_agent(str(tmp_path / "agent"), device=device)
        for key, value in agent.state_dict().items():
            assert torch.equal(loaded.state_dict()[key].cpu(), value.cpu()), key
        assert loaded.act(np.zeros((1, 64, 64, 3), np.uint8), np.array([True])).shape == (1,)

    save_training_state(str(tmp_path), training, "drama_xs")
    expected = torch.rand(8, device=CUDA)  # what the run would draw next from the CUDA generator
    restored = tiny_training(args)
    torch.cuda.manual_seed(123)  # another CUDA generator state, as in a fresh process
    restore_training_state(restored, read_training_state(str(tmp_path), "drama_xs"))
    assert torch.equal(torch.rand(8, device=CUDA), expected)
    for optimizer in (restored.wm_optimizer, restored.ac_optimizer):
        for state in optimizer.state.values():
            assert state["step"].device.type == state["lr_avg"].device.type == "cpu" and state["exp_avg"].is_cuda


@needs_cuda
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("clang") is None, reason="Triton needs gcc or clang")
def test_compiled_imagination_step_compiles_once_under_bf16_autocast():
    """Step 0 gets forward's states (bf16 under autocast, strided before the fix), later steps step's."""
    torch.manual_seed(0)
    args = drama_xs.Args(**TINY)
    agent = drama_xs.Agent(args, 4).to(CUDA).eval()
    frames = torch.randint(0, 256, (12, 64, 64, 3), dtype=torch.uint8, device=CUDA)
    frame_index, actions = torch.arange(12, device=CUDA).view(3, 4), torch.randint(0, 4, (3, 4), device=CUDA)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cuda", dtype=torch.bfloat16):
        features, *_ = drama_xs.imagine(
            agent.world_model, agent.actor_critic, frames, frame_index, actions, 5, drama_xs.compile_one_step()
        )
    torch._dynamo.reset()
    assert features.shape == (3, 6, 64 + 64) and torch.isfinite(features).all()


@needs_cuda
def test_replay_buffer_on_the_gpu_gathers_what_a_cpu_buffer_does_without_a_sync():
    """The buffer keeps its steps on the GPU; adding a step and gathering both batches never waits for the GPU
    (sync debug mode "error"), and the batches and the checkpoint state equal a CPU buffer's."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (80, 64, 64, 3), dtype=np.uint8)
    steps = [(frames[i], i % 4, float(i % 5 == 0), float(i % 7 == 0), i % 9 == 0) for i in range(80)]
    cpu, gpu = drama_xs.ReplayBuffer(64), drama_xs.ReplayBuffer(64, device=CUDA)
    assert gpu.obs.is_cuda and gpu.rewards.is_cuda and cpu.obs.device.type == "cpu"
    starts = np.array([0, 3, 3, 40])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            gpu.add(*step)
        on_gpu = [gpu.sequences(starts, 8, CUDA, distinct_frames=distinct) for distinct in (False, True)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for step in steps:
        cpu.add(*step)
    on_cpu = [cpu.sequences(starts, 8, "cpu", distinct_frames=distinct) for distinct in (False, True)]
    for expected, batch in zip(on_cpu, on_gpu, strict=True):
        assert expected.keys() == batch.keys()
        for key in expected:
            assert batch[key].is_cuda and torch.equal(batch[key].cpu(), expected[key]), key
    expected, state = cpu.state_dict(), gpu.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value


@needs_cuda
def test_act_on_the_gpu_syncs_once_per_call():
    """Acting keeps its windows on the GPU: the only sync of a call is the actions' copy back to the host."""
    agent = drama_xs.Agent(drama_xs.Args(**TINY), 4).to(CUDA)
    frames = np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64, 3), dtype=np.uint8)
    agent.reset(3)
    agent.act(frames[0], np.ones(3, bool))  # the first call makes the windows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for t in range(1, 8):  # full windows, unequal lengths (env 1 restarts), envs 0 and 2 grouped
                agent.act(frames[t], np.array([False, t == 3, False]))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 7, [str(w.message) for w in syncs]
    assert agent.window_z.is_cuda and agent.window_lengths.tolist() == [4, 4, 4]
