"""See what the world model imagines: real | reconstructed | imagined frames, and the error of imagination.

A DRAMA world model sees a few real frames (the context), then predicts the rest of a real trajectory
open loop: it is told the actions the agent really took, never the frames. Comparing its imagined frames
and rewards with the real ones shows what it has learned, and how fast its predictions drift.

    python -m utils.dream runs/ALE/Pong-v5__drama_xs__1__1712345678 --episodes 1 --horizon 64
    python -m utils.dream user/Pong-drama_xs-seed1 --interactive        # play inside the world model (utils/play.py)

writes to --out (default videos/dream__{Game}__{exp_name}__{seed}):
    dream.mp4 (dream.gif if mp4 writing fails)  windows of context + horizon steps, each frame real | reconstructed
                                                | imagined, scaled up --scale times (nearest neighbour)
    dream_strip.png                             a few steps of the first window: rows real, reconstructed, imagined
    error_vs_horizon.png / .json                pixel MSE and |reward error| of open-loop imagination against the
                                                imagination horizon 1..H, averaged over many start points

Alignment (paper 2.2.2, eq. 5): h_t = f(z_<=t, a_<=t) gives the prior over z_{t+1} and the reward r_t of a_t. Over the
context steps t < C the dynamics runs on posterior latents of real frames; then, for t = C .. T-1,
z_t ~ prior(h_{t-1}) and h_t = dynamics.forward_token(z_t, a_t). The imagined frame at horizon k (k = 1, 2, ...) is
decoder(z_{C-1+k}), its predicted reward reward(h_{C-1+k}): the reward of the real action a_{C-1+k} taken at
that frame, predicted from a state that has seen k imagined latents.

Latents are the most likely class of every categorical by default (`sample=False`: the same dream on every
call, and the error curves measure the model's best guess); `sample=True` draws them as training does.
Pixel MSE is the mean over the 64 x 64 x 3 values in [0, 1] of (prediction - real)^2, with the decoder's
float output (before it is rounded to uint8).

Only the world model's posterior, prior, dynamics (forward and step), decoder and reward are used, so every
variant's world model works (drama_xs, drama_s, drama_mamba1, drama_uniform_sampling).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch

from utils import UserError, device_of, game_of, run_cli
from utils.open_loop import as_tensor, decode, eval_mode, imagine_open_loop, latent, pixel_mse, to_uint8, window_starts
from utils.play import KEY_HELP, play_recorded


@torch.no_grad()
def dream(world_model, obs, actions, rewards, context_length: int = 8, sample: bool = False) -> dict:
    """Reconstruct a real trajectory and imagine it open loop after `context_length` real frames.

    obs (T, 64, 64, 3) uint8, actions (T,), rewards (T,) of one trajectory (numpy, or tensors on any device; a_t
    taken at obs_t, r_t its reward). Returns numpy arrays: real, reconstructed, imagined (T, 64, 64, 3) uint8
    (imagined[:C] are the reconstructions of the context), rewards and predicted_rewards (T,)
    (predicted_rewards[t] = reward(h_t), teacher-forced for t < C), imagination_mse and reconstruction_mse (T,)
    per-step pixel MSE against the real frames, reward_error (T,) |predicted - real|; and context_length.
    """
    if not 1 <= context_length <= len(obs):
        raise UserError(f"context length must be in [1, {len(obs)}] (the trajectory's length), got {context_length}")
    device = device_of(world_model)
    obs = as_tensor(obs, device)  # (T, 64, 64, 3)
    actions = as_tensor(actions, device).long()  # (T,)
    rewards = as_tensor(rewards, device).float()  # (T,)
    with eval_mode(world_model):
        z_real = latent(world_model.posterior(obs), sample)  # (T, L)
        z, predicted = imagine_open_loop(world_model, z_real[None, :context_length], actions[None], sample)
        reconstructed = decode(world_model, z_real)  # (T, 3, 64, 64)
        imagined = torch.cat([reconstructed[:context_length], decode(world_model, z[0, context_length:])])
    predicted = predicted[0].float()
    return {
        "real": obs.cpu().numpy(),
        "reconstructed": to_uint8(reconstructed),
        "imagined": to_uint8(imagined),
        "rewards": rewards.cpu().numpy(),
        "predicted_rewards": predicted.cpu().numpy(),
        "imagination_mse": pixel_mse(imagined, obs).cpu().numpy(),
        "reconstruction_mse": pixel_mse(reconstructed, obs).cpu().numpy(),
        "reward_error": (predicted - rewards).abs().cpu().numpy(),
        "context_length": context_length,
    }


def strip(result: dict, separator: int = 0) -> np.ndarray:
    """Frames side by side, real | reconstructed | imagined: (T, 64, 192 + 2 * separator, 3) uint8.

    `separator` white columns go between the panels (0, the default: none, 192 pixels wide).
    """
    panels = [result["real"], result["reconstructed"], result["imagined"]]
    if separator:
        white = np.full((*result["real"].shape[:2], separator, 3), 255, np.uint8)
        panels = [panels[0], white, panels[1], white, panels[2]]
    return np.concatenate(panels, axis=2)


# ----------------------------------------------------------------------------------------------------------
# Error against the imagination horizon, over many start points
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def error_vs_horizon(
    world_model,
    episodes: Sequence[dict],
    context_length: int = 8,
    horizon: int = 64,
    max_starts: int = 256,
    sample: bool = False,
    batch_size: int = 64,
) -> dict:
    """Pixel MSE and |reward error| of open-loop imagination at horizons 1..H, averaged over start points.

    episodes: dicts with obs (T, 64, 64, 3) uint8, actions (T,), rewards (T,). A start s of an episode uses the
    real frames s .. s+C-1 as context and is scored on frames s+C .. s+C+H-1 (horizon k: frame s+C-1+k and the
    reward of the action taken there); up to `max_starts` starts, evenly spread, run in batches of `batch_size`.
    reconstruction_mse, the floor of the pixel MSE, is over every frame the windows score.
    """
    window = context_length + horizon
    lengths = [len(episode["actions"]) for episode in episodes]
    starts = window_starts(lengths, window, max_starts)
    if not starts:
        raise UserError(
            f"the longest recorded episode has {max(lengths, default=0)} steps, fewer than --context-length + "
            f"--horizon = {window}: lower --horizon, or record more or longer episodes (--episodes, --max-steps)"
        )
    device = device_of(world_model)
    mse_sum, reward_sum = torch.zeros(horizon, dtype=torch.float64), torch.zeros(horizon, dtype=torch.float64)
    scored = [np.zeros(length, bool) for length in lengths]
    with eval_mode(world_model):
        for i in range(0, len(starts), batch_size):
            batch = starts[i : i + batch_size]
            index = [(e, np.arange(s, s + window)) for e, s in batch]
            obs = torch.as_tensor(np.stack([episodes[e]["obs"][t] for e, t in index]), device=device)  # (B, W, ...)
            actions = torch.as_tensor(np.stack([np.asarray(episodes[e]["actions"])[t] for e, t in index]))
            rewards = torch.as_tensor(np.stack([np.asarray(episodes[e]["rewards"])[t] for e, t in index]))
            z_context = latent(world_model.posterior(obs[:, :context_length]), sample)  # (B, C, L)
            z, predicted = imagine_open_loop(world_model, z_context, actions.to(device).long(), sample)
            target = slice(context_length, window)  # horizons 1..H
            predicted = predicted[:, target].float().cpu()  # (B, H)
            reward_sum += (predicted - rewards[:, target].float()).abs().sum(0).double()
            for k in range(horizon):
                frames = world_model.decoder(z[:, context_length + k])  # (B, 3, 64, 64)
                mse_sum[k] += pixel_mse(frames, obs[:, context_length + k]).sum().double().cpu()
            for e, s in batch:
                scored[e][s + context_length : s + window] = True
        recon_sum, recon_count = 0.0, 0
        for e, mask in enumerate(scored):
            frames = np.flatnonzero(mask)
            for part in np.array_split(frames, max(1, len(frames) // 256)) if len(frames) else []:
                obs = torch.as_tensor(episodes[e]["obs"][part], device=device)
                reconstructed = world_model.decoder(latent(world_model.posterior(obs), sample))
                recon_sum += float(pixel_mse(reconstructed, obs).double().sum())
                recon_count += len(part)
    return {
        "horizon": list(range(1, horizon + 1)),
        "pixel_mse": (mse_sum / len(starts)).tolist(),
        "reward_abs_error": (reward_sum / len(starts)).tolist(),
        "reconstruction_mse": recon_sum / recon_count,
        "starts": len(starts),
        "context_length": context_length,
        "sample": sample,
    }


def plot_error_vs_horizon(errors: dict, path: str, title: str = "") -> None:
    """Two panels: pixel MSE (with the reconstruction floor) and |reward error| against the horizon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mse, ax_reward) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_mse.plot(errors["horizon"], errors["pixel_mse"], label="imagined vs real")
    ax_mse.axhline(errors["reconstruction_mse"], color="gray", ls="--", label="reconstruction vs real")
    ax_mse.set(xlabel="imagination horizon (steps)", ylabel="pixel MSE", title="frames")
    ax_mse.legend(fontsize=8)
    ax_reward.plot(errors["horizon"], errors["reward_abs_error"], color="C1")
    ax_reward.set(xlabel="imagination horizon (steps)", ylabel="|predicted - real reward|", title="rewards")
    fig.suptitle(f"{title} (open loop after {errors['context_length']} real frames, {errors['starts']} starts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_strip_figure(result: dict, path: str, offsets: Sequence[int] = (0, 1, 2, 4, 8, 16, 32, 64)) -> None:
    """A PNG grid: rows real, reconstructed, imagined; columns the last context step and horizons `offsets`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context, length = result["context_length"], len(result["real"])
    steps = [context - 1 + k for k in offsets if context - 1 + k < length]
    rows = [("real", result["real"]), ("reconstructed", result["reconstructed"]), ("imagined", result["imagined"])]
    fig, axes = plt.subplots(3, len(steps), figsize=(1.1 * len(steps) + 0.6, 3.6), squeeze=False)
    for row, (name, frames) in enumerate(rows):
        for col, t in enumerate(steps):
            ax = axes[row, col]
            ax.imshow(frames[t], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title("context" if t == context - 1 else f"+{t - context + 1}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# TensorBoard: one dream from the replay buffer during training
# ----------------------------------------------------------------------------------------------------------
def _gif(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 -> an animated GIF that loops."""
    from PIL import Image

    images = [Image.fromarray(frame).quantize(method=Image.Quantize.FASTOCTREE) for frame in frames]  # 20x median cut
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def add_video(writer, tag: str, frames: np.ndarray, global_step: int, fps: float = 15) -> None:
    """What `writer.add_video` writes (an animated GIF image summary), encoded with Pillow.

    torch's add_video needs `moviepy.editor`, which moviepy 2.x removed: it then prints a warning and writes an
    empty summary. Falls back to `add_images` of every 8th frame if the GIF cannot be written.
    """
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        image = Summary.Image(
            height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=_gif(frames, fps)
        )
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), global_step)
    except Exception:
        writer.add_images(tag, frames[::8], global_step, dataformats="NHWC")


@torch.no_grad()
def log_dream(writer, agent, buffer, global_step: int, length: int = 64, context_length: int = 8, fps: float = 15):
    """Dream one random stored sequence of `length` steps; log the video and the errors to TensorBoard.

    Writes the video `dream/real_recon_imagined` (real | reconstructed | imagined) and the scalars
    dream/imagination_mse and dream/reward_error (mean over the imagined steps) and dream/reconstruction_mse
    (mean over all steps). The start is drawn with its own generator seeded by `global_step`, and latents are
    modes, so training's random streams are untouched. Returns dream()'s result, or None while the buffer holds
    fewer than `length` steps.
    """
    if buffer.size < length:
        return None
    start = np.random.default_rng(global_step).integers(0, buffer.size - length + 1)
    batch = buffer.sequences(np.array([start]), length, "cpu")  # dream() moves it to the model's device
    result = dream(agent.world_model, batch["obs"][0], batch["actions"][0], batch["rewards"][0], context_length)
    add_video(writer, "dream/real_recon_imagined", strip(result), global_step, fps)
    imagined = slice(context_length, length)
    writer.add_scalar("dream/imagination_mse", float(result["imagination_mse"][imagined].mean()), global_step)
    writer.add_scalar("dream/reconstruction_mse", float(result["reconstruction_mse"].mean()), global_step)
    writer.add_scalar("dream/reward_error", float(result["reward_error"][imagined].mean()), global_step)
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def record_episodes(agent, env_id: str, episodes: int, seed: int, max_steps: int, greedy: bool = False):
    """Play `episodes` real episodes (each cut after `max_steps` steps) -> (list of {obs, actions, rewards}, env).

    obs[t] is the frame the agent saw when it chose actions[t]; rewards[t] is the reward of actions[t].
    """
    from utils.atari import make_env

    env = make_env(env_id, seed, 0, False, "dream", sticky_actions=getattr(agent.args, "sticky_actions", False))()
    agent.reset(1)
    recorded = []
    obs, _ = env.reset(seed=seed)
    for _ in range(episodes):
        frames, actions, rewards, done = [], [], [], False
        while not done and len(actions) < max_steps:
            action = int(agent.act(obs[None], np.array([not actions]), greedy)[0])
            next_obs, reward, terminated, truncated, _ = env.step(action)
            frames.append(obs), actions.append(action), rewards.append(reward)
            obs, done = next_obs, terminated or truncated
        returned = sum(rewards)
        print(f"episode {len(recorded) + 1}: {len(actions)} steps, return {returned:.1f}", flush=True)
        recorded.append({"obs": np.stack(frames), "actions": np.array(actions), "rewards": np.array(rewards, "f4")})
        obs, _ = env.reset()
    return recorded, env


def write_video(frames: np.ndarray, path: str, fps: float) -> str:
    """Write (N, H, W, 3) uint8 frames as mp4 (imageio-ffmpeg); as a GIF next to it if that fails. Returns the path."""
    try:
        import imageio.v2 as imageio

        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=16)
        return path
    except Exception as error:  # no ffmpeg, a codec missing, ...
        gif = os.path.splitext(path)[0] + ".gif"
        print(f"could not write {path} ({type(error).__name__}: {error}); writing {gif}", file=sys.stderr)
        with open(gif, "wb") as f:
            f.write(_gif(frames, fps))
        return gif


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m utils.dream",
        description="Play real episodes with a saved DRAMA agent, then show what its world model imagines: a video "
        "of real | reconstructed | imagined frames and the error of open-loop imagination against the horizon.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR_OR_HUB_ID", help="run folder or Hub repo id")
    parser.add_argument("--env-id", default=None, help="ALE/<Game>-v5 (default: the one the agent was trained on)")
    parser.add_argument("--episodes", type=int, default=1, help="real episodes to record (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=2000, help="steps recorded per episode (default: %(default)s)")
    parser.add_argument("--horizon", type=int, default=64, help="imagined steps per window (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=8, help="real context steps (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=4, help="windows in the video (default: %(default)s)")
    parser.add_argument("--max-starts", type=int, default=256, help="start points of the error curve (%(default)s)")
    parser.add_argument("--sample", action="store_true", help="sample latents instead of taking the most likely")
    parser.add_argument("--greedy", action="store_true", help="the agent takes its most likely action")
    parser.add_argument("--out", default=None, help="output folder (default: videos/dream__{Game}__{exp}__{seed})")
    parser.add_argument("--fps", type=float, default=15, help="video / interactive frame rate (default: %(default)s)")
    parser.add_argument("--scale", type=int, default=4, help="video / window upscaling (default: %(default)s)")
    parser.add_argument(
        "--interactive", action="store_true", help=f"play in the world model instead (utils/play.py): {KEY_HELP}"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the env and the agent (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from utils.hub import load_agent

    for name in ("episodes", "max_steps", "horizon", "context_length", "windows", "max_starts", "scale"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    agent = load_agent(args.checkpoint, device=args.device, env_id=args.env_id)
    env_id = args.env_id or agent.args.env_id
    torch.manual_seed(args.seed)
    episodes, env = record_episodes(agent, env_id, args.episodes, args.seed, args.max_steps, args.greedy)
    world_model, context, horizon = agent.world_model, args.context_length, args.horizon

    if args.interactive:  # utils/play.py: play inside the world model
        play_recorded(world_model, env, episodes, context, args)
        return

    out = args.out or os.path.join("videos", f"dream__{game_of(env_id)}__{agent.args.exp_name}__{args.seed}")
    os.makedirs(out, exist_ok=True)
    errors = error_vs_horizon(world_model, episodes, context, horizon, args.max_starts, args.sample)
    errors |= {"checkpoint": args.checkpoint, "env_id": env_id, "episodes": [len(e["actions"]) for e in episodes]}
    with open(os.path.join(out, "error_vs_horizon.json"), "w") as f:
        json.dump(errors, f, indent=2)
    title = f"{game_of(env_id)} {agent.args.exp_name}"
    plot_error_vs_horizon(errors, os.path.join(out, "error_vs_horizon.png"), title)

    windows = window_starts([len(e["actions"]) for e in episodes], context + horizon, args.windows)
    video = []
    for i, (e, s) in enumerate(windows):
        part = slice(s, s + context + horizon)
        episode = episodes[e]
        result = dream(
            world_model, episode["obs"][part], episode["actions"][part], episode["rewards"][part], context, args.sample
        )
        if i == 0:
            save_strip_figure(result, os.path.join(out, "dream_strip.png"))
        video.append(strip(result))
    video = np.concatenate(video)  # (windows * (C + H), 64, 192, 3)
    video = video.repeat(args.scale, 1).repeat(args.scale, 2)  # nearest-neighbour upscaling
    path = write_video(video, os.path.join(out, "dream.mp4"), args.fps)
    print(f"wrote {path} ({len(windows)} windows of {context} real + {horizon} imagined steps), dream_strip.png,")
    print(f"error_vs_horizon.png and error_vs_horizon.json to {out}")
    print(
        f"pixel MSE at horizon 1 / {horizon}: {errors['pixel_mse'][0]:.4f} / {errors['pixel_mse'][-1]:.4f} "
        f"(reconstruction {errors['reconstruction_mse']:.4f}); |reward error| {errors['reward_abs_error'][0]:.3f} / "
        f"{errors['reward_abs_error'][-1]:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
