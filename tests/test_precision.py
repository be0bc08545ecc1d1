"""--precision: the auto rule, bf16 losses against fp32, a bf16 training run, fp32 checkpoints."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import drama_xs
import utils
from utils import precision

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
SKYLAKE = {**AVX2, "avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}  # bf16 emulated
ZEN4 = {**SKYLAKE, "avx512_bf16": True}
SAPPHIRE_RAPIDS = {**ZEN4, "amx_bf16": True, "amx_tile": True}
NEOVERSE_V1 = {"architecture": "arm64", "neon": True, "bf16": True, "sve": True, "sve_bf16": True}


@pytest.mark.parametrize(
    "capabilities, expected, why",
    [
        (AVX2, "fp32", "no native bf16"),
        (SKYLAKE, "fp32", "no native bf16"),
        (ZEN4, "bf16", "cpu has avx512_bf16"),
        (SAPPHIRE_RAPIDS, "bf16", "cpu has amx_bf16 + avx512_bf16"),
        (NEOVERSE_V1, "bf16", "cpu has sve_bf16 + bf16"),
    ],
    ids=["avx2", "avx512-without-bf16", "avx512_bf16", "amx", "arm"],
)
def test_auto_picks_bf16_only_where_the_cpu_has_it(capabilities, expected, why, monkeypatch):
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: capabilities)  # what main() reads, faked
    chosen, reason = precision.precision_of("auto", CPU)
    assert chosen == expected and why in reason


def test_auto_is_bf16_on_cuda_and_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: AVX2)
    assert precision.precision_of("auto", torch.device("cuda")) == ("bf16", "auto on CUDA")
    assert precision.precision_of("bf16", CPU)[0] == "bf16"  # emulated, slow, but asked for
    assert precision.precision_of("fp32", CPU, SAPPHIRE_RAPIDS)[0] == "fp32"
    assert precision.precision_of("fp32", torch.device("cuda"))[0] == "fp32"
    with pytest.raises(utils.UserError) as error:
        precision.precision_of("fp16", CPU)
    assert "\n" not in str(error.value) and "auto, fp32, bf16" in str(error.value)


def test_cpuinfo_flags_are_read_where_torch_cannot_report_capabilities(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert precision.native_bf16(precision.cpu_capabilities(str(cpuinfo))) == ["avx512_bf16"]
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # Arm
    assert precision.native_bf16(precision.cpu_capabilities(str(cpuinfo))) == ["bf16"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert precision.native_bf16(precision.cpu_capabilities(str(cpuinfo))) == []


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_torch_capabilities_agree_with_the_kernel_flags_of_this_machine():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    kernel_says = bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})
    assert precision.precision_of("auto", CPU)[0] == ("bf16" if kernel_says else "fp32")


def small_args(**overrides) -> drama_xs.Args:
    """Small but with the paper's structure: bf16 on an AVX2 CPU is emulated (slow), so keep these tiny."""
    kwargs = dict(
        encoder_filters=(8, 16, 16, 16, 16),
        stoch_categoricals=8,
        stoch_classes=8,
        d_model=64,
        headdim=32,
        chunk_size=8,
        head_hidden=32,
        actor_hidden=32,
        critic_hidden=64,
        batch_size=4,
        sequence_length=16,
    )
    return drama_xs.Args(**{**kwargs, **overrides})


def losses_at(fn, bf16: bool, seed: int = 1) -> dict[str, float]:
    """fn() -> (loss, metrics) under bf16 autocast or not, from the same torch RNG state (same latent samples)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = fn()
    assert loss.dtype == torch.float32  # the reductions are fp32 under autocast
    return {k: float(v.detach()) for k, v in metrics.items()}


# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); measured here: <= 0.15% on every loss term, while
# another latent sample moves the fp32 KL terms by ~5%. 1% leaves room for other CPUs' kernels.
RTOL, ATOL = 0.01, 0.005


def test_bf16_world_model_losses_within_tolerance_of_fp32():
    torch.manual_seed(0)
    args = small_args()
    world_model = drama_xs.WorldModel(args, 6).train()
    obs = torch.randint(0, 256, (4, 16, 64, 64, 3), dtype=torch.uint8)
    actions = torch.randint(0, 6, (4, 16))
    rewards = torch.tensor(np.random.default_rng(0).choice([0.0, 1.0, -1.0, 5.0], (4, 16)), dtype=torch.float32)
    terminations = (torch.rand(4, 16) < 0.1).float()

    def loss():
        return world_model.loss(obs, actions, rewards, terminations)

    fp32, bf16 = losses_at(loss, bf16=False), losses_at(loss, bf16=True)
    assert fp32.keys() == bf16.keys()
    for key in fp32:
        assert bf16[key] == pytest.approx(fp32[key], rel=RTOL, abs=ATOL), key
    assert fp32["world_model_loss"] > 100  # a loss big enough that a 1% error is meaningful (reconstruction ~ 1000)


def test_bf16_actor_critic_loss_within_tolerance_of_fp32():
    torch.manual_seed(0)
    args = small_args(imagine_horizon=8)
    feature_dim = args.stoch_categoricals * args.stoch_classes + args.d_model
    actor_critic = drama_xs.ActorCritic(args, feature_dim, 6)
    for module in (actor_critic.actor[-1], actor_critic.critic[-1]):  # away from the near-zero initial outputs
        torch.nn.init.normal_(module.weight, std=0.1)
    actor_critic.slow_critic.load_state_dict(actor_critic.critic.state_dict())
    features = torch.randn(32, args.imagine_horizon + 1, feature_dim)
    actions = torch.randint(0, 6, (32, args.imagine_horizon))
    rewards = torch.randn(32, args.imagine_horizon)
    continuations = (torch.rand(32, args.imagine_horizon) > 0.05).float()
    low, high = actor_critic.return_low.clone(), actor_critic.return_high.clone()

    def loss():
        actor_critic.return_low.copy_(low)  # the loss updates the return scale: the same state for each call
        actor_critic.return_high.copy_(high)
        return actor_critic.loss(features, actions, rewards, continuations)

    fp32, bf16 = losses_at(loss, bf16=False), losses_at(loss, bf16=True)
    for key in ("critic_loss", "entropy", "imagined_return", "return_scale"):
        assert bf16[key] == pytest.approx(fp32[key], rel=RTOL, abs=ATOL), key
    # the actor loss is a mean of advantages x log-probs that nearly cancel: compare it on the critic loss' scale
    assert abs(bf16["actor_loss"] - fp32["actor_loss"]) < RTOL * abs(fp32["critic_loss"])


def test_numerically_delicate_values_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    args = small_args()
    world_model = drama_xs.WorldModel(args, 6).eval()
    actor_critic = drama_xs.ActorCritic(args, 64 + 64, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        posterior = world_model.posterior(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8))
        z = drama_xs.sample_latent(posterior)
        h, _ = world_model.dynamics(z[None], torch.zeros(1, 2, dtype=torch.int64))
        assert h.dtype == torch.bfloat16  # the matmuls do run in bf16
        prior = world_model.prior(h)
        assert posterior.dtype == prior.dtype == z.dtype == torch.float32  # KL terms and sampling CDFs
        assert world_model.reward(h).dtype == torch.float32  # two-hot expectation
        assert world_model.twohot.loss(world_model.reward_head(h), torch.ones(1, 2)).dtype == torch.float32
        assert actor_critic.policy(torch.randn(3, 128)).logits.dtype == torch.float32  # log-probs and entropy


def test_bf16_training_run_saves_fp32_weights(tmp_path):
    from safetensors.torch import load_file

    flags = (
        "--env-id ALE/Pong-v5 --total-timesteps 30 --random-steps 20 --batch-size 2 --sequence-length 16 "
        "--imagine-batch-size 4 --imagine-context-length 4 --imagine-horizon 4 --eval-episodes 0 --d-model 32 "
        "--headdim 16 --encoder-filters 4 8 8 8 8 --stoch-categoricals 4 --stoch-classes 4 --act-context-length 4 "
        "--head-hidden 16 --actor-hidden 16 --critic-hidden 16 --log-every 5 --torch-threads 1 --checkpoint-every 30 "
        "--precision bf16"
    ).split()
    result = subprocess.run(
        [sys.executable, str(ROOT / "drama_xs.py"), *flags], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision bf16 (asked for with --precision)" in result.stdout
    assert "step 30/30" in result.stdout
    (run_dir,) = (tmp_path / "runs" / "ALE").iterdir()
    agent = load_file(str(run_dir / "agent.safetensors"))
    checkpoint = load_file(str(run_dir / "checkpoint.safetensors"))
    floats = {k: v for k, v in {**agent, **checkpoint}.items() if v.is_floating_point()}
    lr_avgs = {k for k in floats if k.endswith(".lr_avg")}  # LaProp's lr average: a float64 CPU scalar, by design
    assert lr_avgs and all(floats[k].dtype == torch.float64 and floats[k].dim() == 0 for k in lr_avgs)
    assert {v.dtype for k, v in floats.items() if k not in lr_avgs} == {torch.float32}  # weights, optimiser, windows
    assert any(k.startswith("wm_optimizer.") for k in floats) and any(k.startswith("ac_optimizer.") for k in floats)
    args = drama_xs.Args(**{**small_args().__dict__, "d_model": 32, "headdim": 16, "encoder_filters": (4, 8, 8, 8, 8)})
    args.stoch_categoricals = args.stoch_classes = 4
    args.head_hidden = args.actor_hidden = args.critic_hidden = 16
    fresh = drama_xs.Agent(args, 6)
    fresh.load_state_dict(agent, strict=True)  # an agent trained in bf16 loads into a plain fp32 agent
    assert all(torch.isfinite(v).all() for v in agent.values())
