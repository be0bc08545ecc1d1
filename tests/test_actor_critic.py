"""The actor-critic loss (ActorCritic.loss) pinned on hand-built imagined batches, in every variant script.

Each expectation is computed from the module's own pieces (its policy, critics, two-hot and lambda-returns),
so the tests hold whatever the layers' init, their norms or the feature normaliser look like; they fail for
an actor loss with its sign flipped, an advantage not divided by max(1, S), an entropy bonus with the wrong
coefficient or sign, or a critic not trained towards both the lambda-returns and the slow-critic returns.
"""

import copy
import dataclasses

import pytest
import torch

FEATURES, ACTIONS, BATCH, HORIZON = 12, 4, 8, 6


def make_actor_critic(mod, seed: int = 0, actor_scale: float = 0.0, **overrides):
    """A small actor-critic whose critics predict distinct non-zero values; `actor_scale` > 0 moves the
    actor's output layer off its near-uniform init (a policy whose entropy has a gradient)."""
    torch.manual_seed(seed)
    args = dataclasses.replace(mod.Args(), actor_hidden=16, critic_hidden=16, **overrides)
    ac = mod.ActorCritic(args, FEATURES, ACTIONS)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer, scale in ((ac.critic[-1], 0.3), (ac.slow_critic[-1], 0.3), (ac.actor[-1], actor_scale)):
            layer.weight.add_(scale * torch.randn(layer.weight.shape, generator=g))
    return ac


def imagined_batch(seed: int = 0, reward_scale: float = 1.0, reward_mean: float = 0.0):
    """features (B, H+1, F), actions (B, H), rewards (B, H), continuations (B, H) with a few terminations."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, HORIZON + 1, FEATURES, generator=g)
    actions = torch.randint(0, ACTIONS, (BATCH, HORIZON), generator=g)
    rewards = reward_mean + reward_scale * torch.randn(BATCH, HORIZON, generator=g)
    continuations = (torch.rand(BATCH, HORIZON, generator=g) > 0.15).float()
    return features, actions, rewards, continuations


def by_hand(mod, ac, features, actions, rewards, continuations):
    """The loss's ingredients from the module's pieces, before `loss` updates the percentile EMA."""
    args = ac.args
    with torch.no_grad():
        values = ac.value(features)  # (B, H+1)
        returns = mod.lambda_returns(rewards, continuations, values, args.gamma, args.lam)  # (B, H)
        slow_returns = mod.lambda_returns(rewards, continuations, ac.value(features, slow=True), args.gamma, args.lam)
        # nearest rank, as the published code: the int(q * N)-th smallest of N = 48, so the 2nd and the 45th
        low, high = returns.flatten().sort().values[[int(0.05 * BATCH * HORIZON) - 1, int(0.95 * BATCH * HORIZON) - 1]]
        decay = args.return_norm_decay
        low_ema = decay * ac.return_low + (1 - decay) * low
        high_ema = decay * ac.return_high + (1 - decay) * high
        policy = ac.policy(features[:, :-1])
    return dict(
        returns=returns,
        slow_returns=slow_returns,
        advantage=returns - values[:, :-1],  # (B, H), not yet divided by the scale
        low_ema=low_ema,
        high_ema=high_ema,
        scale=torch.clamp(high_ema - low_ema, min=1.0),  # S = max(1, P95 - P5) of the EMA
        log_prob=policy.log_prob(actions),  # (B, H)
        probs=policy.probs,  # (B, H, A)
        entropy=policy.entropy(),  # (B, H)
    )


def actor_logits_grad(ac, features, actions, rewards, continuations, term: str = "actor_loss"):
    """d loss[term] / d actor logits (B, H, A) of one `loss` call, and the metrics."""
    captured = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = ac.actor.register_forward_hook(keep)
    _, metrics = ac.loss(features, actions, rewards, continuations)
    handle.remove()
    assert len(captured) == 1, "the actor runs once in the loss"
    metrics[term].backward()
    return captured[0].grad, metrics


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive-advantage", "negative-advantage"])
def test_one_step_raises_log_prob_for_a_positive_advantage_and_lowers_it_for_a_negative_one(mod, sign):
    ac = make_actor_critic(mod)
    features, _, rewards, continuations = imagined_batch(reward_mean=5.0 * sign, reward_scale=0.1)
    actions = torch.full((BATCH, HORIZON), 2)  # one action everywhere: its log-probability moves alike in every state
    batch = features, actions, rewards, continuations
    expected = by_hand(mod, ac, *batch)
    assert (expected["advantage"] * sign > 0).all()  # the batch is built so: every advantage has this sign
    before = expected["log_prob"]
    optimizer = torch.optim.SGD(ac.parameters(), lr=0.01)
    loss, _ = ac.loss(*batch)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = ac.policy(features[:, :-1]).log_prob(actions)
    assert ((after - before) * sign > 0).all(), after - before


@pytest.mark.parametrize("scale_above_one", [True, False], ids=["S>1", "S<1"])
def test_advantage_is_divided_by_max_1_S_from_the_percentile_ema(mod, scale_above_one):
    ac = make_actor_critic(mod, actor_scale=1.0)
    if scale_above_one:  # an EMA that has seen returns spread over [-10, 10]
        ac.return_low.fill_(-10.0)
        ac.return_high.fill_(10.0)
        batch = imagined_batch(seed=1, reward_scale=3.0)
    else:  # returns spread over much less than 1
        batch = imagined_batch(seed=1, reward_scale=0.01)
    expected = by_hand(mod, ac, *batch)
    spread = (expected["high_ema"] - expected["low_ema"]).item()
    assert spread > 5 if scale_above_one else 0 < spread < 0.1  # the case this test is about
    grad, metrics = actor_logits_grad(ac, *batch)
    torch.testing.assert_close(ac.return_low, expected["low_ema"])
    torch.testing.assert_close(ac.return_high, expected["high_ema"])
    scale = max(1.0, spread)
    assert metrics["return_scale"].item() == pytest.approx(scale, rel=1e-6)
    advantage = expected["advantage"] / scale  # (B, H)
    coef = ac.args.entropy_coef
    actor_loss = -(expected["log_prob"] * advantage).mean() - coef * expected["entropy"].mean()
    torch.testing.assert_close(metrics["actor_loss"], actor_loss, rtol=1e-5, atol=1e-7)
    # d/d logits of -mean(A log pi(a)) - c mean(H): -A (onehot(a) - pi) / N + c pi (log pi + H) / N
    probs, n = expected["probs"], BATCH * HORIZON
    onehot = torch.nn.functional.one_hot(batch[1], ACTIONS).float()  # (B, H, A)
    entropy_grad = probs * (probs.log() + expected["entropy"][..., None])  # (B, H, A)
    torch.testing.assert_close(grad, (-advantage[..., None] * (onehot - probs) + coef * entropy_grad) / n)


def test_entropy_bonus_has_coefficient_3e_4_and_raises_the_entropy(mod):
    assert mod.Args().entropy_coef == 3e-4
    ac = make_actor_critic(mod, actor_scale=1.0)
    batch = imagined_batch(seed=2)
    expected = by_hand(mod, ac, *batch)
    assert expected["entropy"].mean() < 0.95 * torch.log(torch.tensor(float(ACTIONS)))  # not at its maximum
    runs = {}
    for coef in (0.0, 3e-4, 0.5):
        copied = copy.deepcopy(ac)  # the same state (critics, percentile EMA) for every coefficient
        copied.args = dataclasses.replace(ac.args, entropy_coef=coef)
        runs[coef] = actor_logits_grad(copied, *batch)
    entropy_grad = expected["probs"] * (expected["probs"].log() + expected["entropy"][..., None])  # (B, H, A)
    for coef in (3e-4, 0.5):
        grad, metrics = runs[coef]
        change = metrics["actor_loss"] - runs[0.0][1]["actor_loss"]
        assert change.item() == pytest.approx(-coef * expected["entropy"].mean().item(), rel=1e-3)
        bonus_grad = coef * entropy_grad / (BATCH * HORIZON)  # (B, H, A)
        atol = 1e-2 * bonus_grad.abs().max().item()  # float32 cancellation against the advantage term
        torch.testing.assert_close(grad - runs[0.0][0], bonus_grad, rtol=1e-2, atol=atol)
    torch.testing.assert_close(runs[3e-4][1]["entropy"], expected["entropy"].mean())
    # a descent step on the entropy term alone raises the entropy (the bonus has the right sign)
    step = -(runs[0.5][0] - runs[0.0][0])  # (B, H, A) minus the gradient of the bonus
    logits = ac.policy(batch[0][:, :-1]).logits.detach()
    raised = torch.distributions.Categorical(logits=logits + 10.0 * step).entropy()
    assert (raised > expected["entropy"]).all()


def test_critic_is_trained_towards_the_lambda_returns_and_the_slow_critic_returns(mod):
    ac = make_actor_critic(mod)
    batch = imagined_batch(seed=3, reward_scale=2.0)
    features = batch[0]
    losses = []
    for slow_seed in (0, 1):
        with torch.no_grad():
            ac.slow_critic[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(slow_seed))
        expected = by_hand(mod, ac, *batch)
        assert (expected["slow_returns"] - expected["returns"]).abs().max() > 0.1  # two distinct targets
        logits = ac.critic(ac.norm(features))[:, :-1]  # (B, H, 255): the states whose returns are known
        log_probs = logits.log_softmax(-1)
        cross_entropy = -(ac.twohot.encode(expected["returns"]) * log_probs).sum(-1)  # (B, H)
        slow_cross_entropy = -(ac.twohot.encode(expected["slow_returns"]) * log_probs).sum(-1)  # (B, H)
        critic_loss = (cross_entropy + slow_cross_entropy).mean()
        ac.zero_grad()
        critic_loss.backward()
        expected_grads = [p.grad.clone() for p in ac.critic.parameters()]
        ac.zero_grad()
        _, metrics = ac.loss(*batch)
        torch.testing.assert_close(metrics["critic_loss"], critic_loss)
        metrics["critic_loss"].backward()  # the targets are constants: only the critic's prediction moves
        for grad, p in zip(expected_grads, ac.critic.parameters(), strict=True):
            torch.testing.assert_close(p.grad, grad)
        assert all(p.grad is None for p in ac.slow_critic.parameters())
        losses.append(metrics["critic_loss"].item())
    assert abs(losses[0] - losses[1]) > 1e-3  # the slow critic's returns are a target of the critic
