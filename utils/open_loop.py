"""A world model driven from outside the training loop, shared by utils/dream.py (videos and error curves of
open-loop imagination) and utils/play.py (playing inside the world model): one-hot latents from its categoricals,
open-loop imagination under given actions (aligned as utils/dream.py's docstring says), frames to and from its
decoder, windows of recorded episodes.
"""

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def latent(probs: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """probs (..., K, C) -> one-hot latent (..., K*C): each categorical's most likely class, or a sample."""
    if sample:
        index = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(probs.shape[:-1])
    else:
        index = probs.argmax(-1)  # (..., K)
    return F.one_hot(index, probs.shape[-1]).to(probs.dtype).flatten(-2)


def as_tensor(x, device: torch.device) -> torch.Tensor:
    """numpy or a tensor on any device -> a tensor on `device` (numpy is never handed a tensor: it cannot read GPU
    memory)."""
    return x.to(device) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), device=device)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def imagine_open_loop(world_model, z_context: torch.Tensor, actions: torch.Tensor, sample: bool = False):
    """Run the dynamics over C real latents, then imagine T - C more under the given actions.

    z_context (B, C, L) posterior latents of the context frames; actions (B, T), T >= C, the actions taken.
    Returns z (B, T, L): z[:, :C] = z_context, z[:, t] ~ prior(h_{t-1}) for t >= C; and rewards (B, T):
    rewards[:, t] = reward(h_t), the predicted reward of a_t (teacher-forced for t < C, open loop after).
    """
    context = z_context.shape[1]
    h, state = world_model.dynamics(z_context, actions[:, :context])  # (B, C, D)
    zs, rewards, h = [z_context], [world_model.reward(h)], h[:, -1]  # h_{C-1}
    for t in range(context, actions.shape[1]):
        z = latent(world_model.prior(h), sample)  # z_t ~ prior(h_{t-1}): (B, L)
        h, state = world_model.dynamics.forward_token(z, actions[:, t], state)  # h_t: (B, D)
        zs.append(z[:, None])
        rewards.append(world_model.reward(h)[:, None])
    return torch.cat(zs, 1), torch.cat(rewards, 1)


def decode(world_model, z: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """z (N, L) -> frames (N, 3, 64, 64) float in [0, 1], decoded in chunks."""
    return torch.cat([world_model.decoder(part) for part in z.split(chunk)])


def to_float(obs: torch.Tensor) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [0, 1]."""
    return obs.permute(0, 3, 1, 2).float().div(255)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(N, 3, 64, 64) float in [0, 1] -> (N, 64, 64, 3) uint8."""
    return frames.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def pixel_mse(prediction: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """prediction (N, 3, 64, 64) in [0, 1], real (N, 64, 64, 3) uint8 -> (N,) mean squared error."""
    return (prediction.float() - to_float(real)).pow(2).mean((1, 2, 3))


def window_starts(lengths: Sequence[int], window: int, max_starts: int) -> list[tuple[int, int]]:
    """Up to `max_starts` (episode, start) pairs, evenly spread over every window of `window` steps that fits."""
    valid = [(e, s) for e, length in enumerate(lengths) for s in range(length - window + 1)]
    if len(valid) <= max_starts:
        return valid
    return [valid[i] for i in np.unique(np.linspace(0, len(valid) - 1, max_starts).round().astype(int))]
