"""Where the scripts follow the published DRAMA code (github realwenlongwang/drama at e7b4041) and where they
chose otherwise (README, "Where we differ"): each behaviour pinned, on every variant script.

DFS without replacement, the critic's raw input, the lambda-return bootstrap, nearest-rank percentiles, RMSNorm
epsilons, LaProp during the warm-up, when the running normaliser updates, and the initialisation of every layer.
"""

import importlib
import math

import numpy as np
import pytest
import torch
from conftest import tiny_args

F64 = torch.float64


def filled_buffer(mod, steps: int, capacity: int = 100):
    buffer = mod.ReplayBuffer(capacity)
    for i in range(steps):
        buffer.add(np.full((64, 64, 3), (37 * i) % 256, np.uint8), i % 3, float(i % 4 == 0), 0.0, i == 0)
    return buffer


# ==========================================================================================================
# 1. DFS (and the uniform ablation) draw each batch's starts without replacement
# ==========================================================================================================
def test_draw_starts_is_successive_sampling_without_replacement(mod):
    """2 of 3 starts with p = (0.6, 0.3, 0.1): P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)."""
    p, rng, draws = np.array([0.6, 0.3, 0.1]), np.random.default_rng(0), 40_000
    pairs = {}
    for _ in range(draws):
        starts = mod.draw_starts(rng, 3, 2, p)
        assert starts[0] != starts[1]
        pairs[frozenset(starts.tolist())] = pairs.get(frozenset(starts.tolist()), 0) + 1
    for i, j in ((0, 1), (0, 2), (1, 2)):
        expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])  # {0,1} 0.707, {0,2} 0.193, {1,2} 0.100
        assert pairs[frozenset((i, j))] / draws == pytest.approx(expected, abs=0.012)  # 5 sigma at 40k draws
    uniform = np.bincount(np.concatenate([mod.draw_starts(rng, 5, 3) for _ in range(10_000)]), minlength=5)
    np.testing.assert_allclose(uniform / 30_000, 0.2, atol=0.012)


def test_draw_starts_larger_batch_takes_every_start_once_then_draws_with_replacement(mod):
    rng = np.random.default_rng(1)
    p = np.array([0.5, 0.3, 0.2, 0.0])  # a start of probability 0 is never drawn
    for _ in range(50):
        starts = mod.draw_starts(rng, 4, 7, p)
        counts = np.bincount(starts, minlength=4)
        assert starts.shape == (7,) and counts[3] == 0 and (counts[:3] >= 1).all()
        assert sorted(starts[:3].tolist()) == [0, 1, 2]  # each drawable start once, then 4 with replacement
    starts = mod.draw_starts(rng, 4, 9)
    assert sorted(starts[:4].tolist()) == [0, 1, 2, 3] and starts.max() <= 3


def test_world_model_and_imagination_batches_have_distinct_starts(dfs_mod):
    mod = dfs_mod
    buffer = filled_buffer(mod, 40)
    args = tiny_args(mod, batch_size=16, sequence_length=20, imagine_batch_size=32, imagine_context_length=4)
    rng = np.random.default_rng(0)
    for _ in range(20):  # 16 of 21 valid world-model starts, 32 of 37 imagination starts: collisions are likely
        n_wm, n_img = buffer.n_wm.copy(), buffer.n_img.copy()
        starts = buffer.sample_world_model_starts(args, rng)
        assert len(set(starts.tolist())) == 16 and starts.max() <= 40 - 20
        assert set(np.unique(buffer.n_wm - n_wm).tolist()) == {0, 1}  # each start counted once
        starts = buffer.sample_imagination_starts(args, rng)
        assert len(set(starts.tolist())) == 32 and starts.max() <= 40 - 4
        assert set(np.unique(buffer.n_img - n_img).tolist()) == {0, 1}
    assert buffer.n_wm.sum() == 20 * 16 and buffer.n_img.sum() == 20 * 32
    # a batch larger than the valid starts: every start once, the rest with replacement, all counted
    args = tiny_args(mod, batch_size=30, sequence_length=20)
    n_wm = buffer.n_wm.copy()
    starts = buffer.sample_world_model_starts(args, rng)
    assert (np.bincount(starts, minlength=21) >= 1).all()
    np.testing.assert_array_equal(buffer.n_wm - n_wm, np.bincount(starts, minlength=100))


def test_uniform_sampler_draws_distinct_uniform_starts():
    mod = importlib.import_module("drama_uniform_sampling")
    buffer = filled_buffer(mod, 30)
    args = tiny_args(mod, batch_size=8, sequence_length=20, imagine_batch_size=20, imagine_context_length=4)
    rng = np.random.default_rng(0)
    starts = [buffer.sample_world_model_starts(args, rng) for _ in range(3000)]  # 8 of 11 valid starts
    assert all(len(set(s.tolist())) == 8 for s in starts) and max(s.max() for s in starts) == 10
    np.testing.assert_allclose(np.bincount(np.concatenate(starts)) / 24_000, 1 / 11, atol=0.01)
    starts = buffer.sample_imagination_starts(args, rng)
    assert len(set(starts.tolist())) == 20 and starts.max() <= 26
    starts = buffer.sample_world_model_starts(tiny_args(mod, batch_size=15, sequence_length=20), rng)
    assert sorted(set(starts.tolist())) == list(range(11))  # 15 from 11 starts: each once, 4 more


# ==========================================================================================================
# 2. The critic and the slow critic see the raw (z, h); only the actor's input is normalised
# ==========================================================================================================
def test_critic_sees_raw_features_actor_normalised(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod), 48, 5)
    with torch.no_grad():
        for net in (ac.actor, ac.critic, ac.slow_critic):  # off the near-uniform and zero output inits
            for p in net.parameters():
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(6, 5, 48, generator=g)
    actions, rewards = torch.randint(0, 5, (6, 4), generator=g), torch.randn(6, 4, generator=g)
    continuations = torch.ones(6, 4)
    value, slow_value, policy = ac.value(features), ac.value(features, slow=True), ac.policy(features).probs
    torch.testing.assert_close(value, ac.twohot.decode(ac.critic(features)))
    torch.testing.assert_close(slow_value, ac.twohot.decode(ac.slow_critic(features)))
    _, metrics = ac.loss(features, actions, rewards, continuations)
    ac.norm.update(torch.randn(100, 48, generator=g) * 5 + 3)  # other statistics: the critic does not notice
    torch.testing.assert_close(ac.value(features), value)
    torch.testing.assert_close(ac.value(features, slow=True), slow_value)
    assert (ac.policy(features).probs - policy).abs().max() > 1e-3  # but the actor does
    ac.return_low.zero_(), ac.return_high.zero_()
    _, other = ac.loss(features, actions, rewards, continuations)
    torch.testing.assert_close(other["critic_loss"], metrics["critic_loss"])
    assert other["actor_loss"] != metrics["actor_loss"]


# ==========================================================================================================
# 3. Lambda-returns bootstrap from V_{t+1} (DreamerV3 eq. 7), not the published (1 - lambda) V_t
# ==========================================================================================================
def test_lambda_return_bootstraps_from_the_next_value(mod):
    rewards, continuations = torch.tensor([[1.0]], dtype=F64), torch.tensor([[1.0]], dtype=F64)
    values = torch.tensor([[10.0, 2.0]], dtype=F64)  # V_0 = 10, V_1 = 2
    returns = mod.lambda_returns(rewards, continuations, values, gamma=0.5, lam=0.5)
    assert returns.item() == pytest.approx(1 + 0.5 * (0.5 * 2 + 0.5 * 2))  # published: 1 + 0.5 (0.5 * 10 + 0.5 * 2)


# ==========================================================================================================
# 4. Return percentiles by nearest rank (kthvalue), as published
# ==========================================================================================================
def test_nearest_rank_percentiles(mod):
    x = torch.tensor([7.0, 1.0, 4.0, 9.0, 3.0, 8.0, 2.0, 6.0, 5.0, 10.0])  # 1..10 shuffled
    assert mod.nearest_rank(x, 0.05).item() == 1.0  # int(0.5) = 0: the smallest (the published code fails)
    assert mod.nearest_rank(x, 0.25).item() == 2.0  # int(2.5)-th smallest; torch.quantile interpolates 3.25
    assert mod.nearest_rank(x, 0.95).item() == 9.0  # int(9.5)-th; quantile: 9.55
    assert mod.nearest_rank(x, 1.0).item() == 10.0
    assert mod.nearest_rank(x.view(2, 5), 0.95).item() == 9.0  # over all elements
    returns = torch.arange(16384.0).flip(0)  # the default batch: 1024 x 16 returns
    assert mod.nearest_rank(returns, 0.05).item() == 818.0 and mod.nearest_rank(returns, 0.95).item() == 15563.0


def test_return_normalisation_uses_nearest_rank(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod), 48, 5)  # zero critic output: values 0, returns = lambda_returns(r, c, 0)
    g = torch.Generator().manual_seed(2)
    features, actions = torch.randn(8, 6, 48, generator=g), torch.randint(0, 5, (8, 5), generator=g)
    rewards, continuations = torch.randn(8, 5, generator=g) * 4, torch.ones(8, 5)
    ac.loss(features, actions, rewards, continuations)
    returns = mod.lambda_returns(rewards, continuations, torch.zeros(8, 6), 0.985, 0.95).flatten().sort().values
    assert ac.return_low.item() == pytest.approx(0.01 * returns[1].item(), rel=1e-5)  # int(0.05 * 40) = 2nd
    assert ac.return_high.item() == pytest.approx(0.01 * returns[37].item(), rel=1e-5)  # int(0.95 * 40) = 38th


# ==========================================================================================================
# 5. RMSNorm epsilon: torchtune's 1e-6 in the stem, heads and actor-critic; mamba_ssm's 1e-5 in the blocks
# ==========================================================================================================
def test_rmsnorm_epsilons(mod):
    agent = mod.Agent(tiny_args(mod, n_layers=2), 5)
    eps = {name: m.eps for name, m in agent.named_modules() if isinstance(m, torch.nn.RMSNorm)}
    expected = {"world_model.dynamics.stem.1": 1e-6, "world_model.reward_head.1": 1e-6}
    expected |= {"world_model.termination_head.1": 1e-6, "world_model.dynamics.norm": 1e-5}
    expected |= {f"world_model.dynamics.blocks.{i}.norm": 1e-5 for i in range(2)}
    expected |= {f"actor_critic.{net}.{i}": 1e-6 for net in ("actor", "critic", "slow_critic") for i in (1, 4)}
    assert eps == expected
    gated = [m.eps for m in agent.modules() if type(m).__name__ == "GatedRMSNorm"]
    assert gated == ([1e-5, 1e-5] if hasattr(mod, "Mamba2") else [])  # the mixer's gated norm: mamba_ssm's 1e-5


# ==========================================================================================================
# 6. LaProp folds the learning rate into the momentum (the published optimiser)
# ==========================================================================================================
def published_laprop(grads, lrs, b1=0.9, b2=0.999, eps=1e-20):
    """The published update, recurrence by recurrence, for a list of gradients and the lr of each step."""
    m, v, lr_ema, sq_ema, steps = 0.0, 0.0, 0.0, 0.0, []
    for g, lr in zip(grads, lrs, strict=True):
        v = b2 * v + (1 - b2) * g**2
        lr_ema = b1 * lr_ema + (1 - b1) * lr  # exp_avg_lr_1
        sq_ema = b2 * sq_ema + (1 - b2)  # exp_avg_lr_2 = 1 - b2^t
        m = b1 * m + (1 - b1) * lr * g / (np.sqrt(v / sq_ema) + eps)
        steps.append(m / (lr_ema / lr))  # p -= exp_avg / bias_correction1
    return np.array(steps)


def test_laprop_during_warmup_matches_the_published_update(mod):
    warmup, lr, b1, b2 = 5, 0.01, 0.9, 0.999
    grads = np.random.default_rng(0).normal(size=(8, 4)) * np.array([1.0, 10.0, 0.1, 3.0])  # (steps, params)
    p = torch.zeros(4, dtype=F64, requires_grad=True)
    optimizer, scheduler = mod.make_optimizer([p], lr, warmup)
    lrs = [lr * min(1, (t + 1) / warmup) for t in range(8)]
    expected = -np.cumsum(published_laprop(grads, lrs, b1, b2), axis=0)  # (steps, params)
    for t in range(8):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[t], rel=1e-12)
        p.grad = torch.tensor(grads[t])
        optimizer.step()
        scheduler.step()
        np.testing.assert_allclose(p.detach().numpy(), expected[t], rtol=1e-12, atol=1e-18)
    assert optimizer.state[p]["lr_avg"].item() == pytest.approx(sum(0.1 * 0.9 ** (7 - s) * lrs[s] for s in range(8)))
    # the test can tell: Adam's bias correction 1 - b1^t on an unscaled momentum moves differently in the warm-up
    v = np.cumsum([(1 - b2) * b2 ** (1 - s) * grads[s] ** 2 for s in range(2)], axis=0)  # (2, params)
    normalised = grads[:2] / np.sqrt(v / (1 - b2 ** np.arange(1, 3))[:, None])
    adam_style = lrs[1] * ((1 - b1) * (b1 * normalised[0] + normalised[1])) / (1 - b1**2)
    assert np.abs(adam_style / (expected[0] - expected[1]) - 1).max() > 0.05


def test_laprop_at_constant_lr_is_adam_bias_correction(mod):
    p = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    optimizer, (m, v, ref) = mod.LaProp([p], lr=0.1), (np.zeros(2), np.zeros(2), np.array([1.0, -2.0]))
    for t in range(1, 6):
        optimizer.zero_grad()
        (p**3).sum().backward()
        optimizer.step()
        grad = 3 * ref**2
        v = 0.999 * v + 0.001 * grad**2
        m = 0.9 * m + 0.1 * grad / (np.sqrt(v / (1 - 0.999**t)) + 1e-20)
        ref = ref - 0.1 * m / (1 - 0.9**t)
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12)


# ==========================================================================================================
# 7. The running normaliser: once per actor-critic update, from its imagined features; never while acting
# ==========================================================================================================
def test_running_norm_updates_once_per_update_and_never_while_acting(mod, monkeypatch):
    torch.manual_seed(0)
    args = tiny_args(mod, imagine_batch_size=6, imagine_horizon=3)
    agent = mod.Agent(args, 3)
    buffer = filled_buffer(mod, 30)
    norm = agent.actor_critic.norm
    frames = np.stack([np.full((64, 64, 3), 20 * i, np.uint8) for i in range(6)])
    for t in range(6):  # acting (as in training and evaluation) leaves the statistics alone
        agent.act(frames[t : t + 1], np.array([t == 0]))
    assert norm.count.item() == 0 and norm.mean.abs().max() == 0 and (norm.var == 1).all()
    seen, features = [], []

    def rollout_step_fn(world_model, actor_critic, z, h, state):
        seen.append((actor_critic.norm.count.item(), actor_critic.norm.mean.clone()))
        return mod.imagine_one_step(world_model, actor_critic, z, h, state)

    loss = agent.actor_critic.loss
    monkeypatch.setattr(agent.actor_critic, "loss", lambda f, *rest: features.append(f) or loss(f, *rest))
    optimizer, scheduler = mod.make_optimizer(agent.actor_critic.parameters(), 1e-4, 10)
    autocast = torch.autocast("cpu", enabled=False)
    mod.train_actor_critic(agent, optimizer, scheduler, buffer, args, np.random.default_rng(0), "cpu", autocast,
                           rollout_step_fn)
    assert [count for count, _ in seen] == [0, 0, 0]  # the rollout acts on the statistics before the update
    (imagined,) = features  # (6, 4, feature_dim)
    assert norm.count.item() == 6 * 4  # then one update with every imagined (z, h)
    torch.testing.assert_close(norm.mean, imagined.flatten(0, 1).mean(0))
    torch.testing.assert_close(norm.var, imagined.flatten(0, 1).var(0, unbiased=False))
    statistics = {k: v.clone() for k, v in norm.state_dict().items()}
    agent.reset(1)
    for t in range(4):
        agent.act(frames[t : t + 1], np.array([t == 0]))
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in statistics.items())


# ==========================================================================================================
# 8. Initialisation of every layer, as the published code
# ==========================================================================================================
def assert_fan_avg_init(name, layer):
    weight = layer.weight.detach()
    fan_avg = (weight.shape[0] + weight.shape[1]) * math.prod(weight.shape[2:]) / 2
    std = math.sqrt(1 / fan_avg)
    assert (layer.bias == 0).all(), name
    assert weight.abs().max() <= 2 * std / 0.8796256610342398 * (1 + 1e-6), name  # truncated at 2 sigma
    if weight.numel() >= 20_000:
        assert weight.std().item() == pytest.approx(std, rel=0.03), name


def assert_pytorch_default(name, weight, bound, rel=0.02):
    """PyTorch's Linear/Conv init: uniform in +-bound (kaiming_uniform with a = sqrt(5): bound 1/sqrt(fan_in))."""
    weight = weight.detach()
    assert weight.abs().max() <= bound, name
    assert weight.abs().max() >= (1 - rel) * bound, name
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name


def test_world_model_init_matches_the_published_code(mod):
    torch.manual_seed(0)
    args = tiny_args(mod, encoder_filters=mod.Args().encoder_filters, stoch_categoricals=32, stoch_classes=32,
                     d_model=512, headdim=128, d_state=16, head_hidden=256, n_layers=2)  # fmt: skip
    wm = mod.WorldModel(args, action_dim=6)
    checked = set()
    for part in ("encoder", "decoder", "reward_head", "termination_head"):  # the published weight_init
        for name, layer in getattr(wm, part).named_modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                assert_fan_avg_init(f"{part}.{name}", layer)
                checked.add(f"{part}.{name}")
    assert len(checked) == 5 + 1 + 5 + 2 + 2  # encoder convs, decoder linear + 5 transposed convs, 2 heads x 2
    for name in ("posterior_head", "prior_head"):  # published DistHead: PyTorch's init, biases included
        layer = getattr(wm, name)
        assert_pytorch_default(name, layer.weight, 1 / math.sqrt(layer.in_features))
        assert layer.bias.abs().max() > 0
    stem = wm.dynamics.stem[0]  # mamba_ssm's _init_weights: Linear biases zero
    assert_pytorch_default("stem", stem.weight, 1 / math.sqrt(stem.in_features))
    assert (stem.bias == 0).all()
    for i, block in enumerate(wm.dynamics.blocks):  # and out_proj scaled by 1 / sqrt(n_layers)
        out_proj = block.mixer.out_proj
        assert_pytorch_default(f"block {i} out_proj", out_proj.weight, 1 / math.sqrt(out_proj.in_features * 2))
        assert_pytorch_default(f"block {i} in_proj", block.mixer.in_proj.weight, 1 / math.sqrt(512))
    for module in wm.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert (module.weight == 1).all() and (module.bias == 0).all()


def test_actor_critic_init_matches_the_published_layer_init(mod):
    torch.manual_seed(0)
    ac = mod.ActorCritic(tiny_args(mod, actor_hidden=64, critic_hidden=96), 48, 5)
    for net in (ac.actor, ac.critic):
        hidden = [m for m in net if isinstance(m, torch.nn.Linear)][:-1]
        assert len(hidden) == 2
        for layer in hidden:  # orthogonal with gain sqrt(2), zero bias
            singular = torch.linalg.svdvals(layer.weight.detach().double())
            torch.testing.assert_close(singular, torch.full_like(singular, math.sqrt(2)), rtol=1e-5, atol=0)
            assert (layer.bias == 0).all()
    torch.testing.assert_close(torch.linalg.svdvals(ac.actor[-1].weight.detach()), torch.full((5,), 0.001))
    assert (ac.critic[-1].weight == 0).all()  # ours: zero (DreamerV3); published: orthogonal with gain 0.001
    for slow, fast in zip(ac.slow_critic.parameters(), ac.critic.parameters(), strict=True):
        assert torch.equal(slow, fast)
