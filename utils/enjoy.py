"""Play a saved DRAMA agent (a local run folder or a Hugging Face Hub repo) and print its returns.

    python -m utils.enjoy runs/ALE/Pong-v5__drama_xs__1__1712345678 --episodes 10
    python -m utils.enjoy user/Pong-drama_xs-seed1 --episodes 3 --capture-video --video-dir videos/pong

Episodes are played with `utils.evaluate.evaluate` (Atari100k protocol: minimal action set, frameskip 4,
no sticky actions unless the agent was trained with them); the env id defaults to the one the agent was
trained on.
"""

from __future__ import annotations

import argparse
import sys

from utils import UserError, game_of, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m utils.enjoy",
        description="Play a saved DRAMA agent for some episodes; print each return, the mean and the "
        "human-normalised score; optionally record a video.",
    )
    parser.add_argument(
        "repo_or_path",
        metavar="REPO_OR_PATH",
        help="a run folder with agent.safetensors + args.json (runs/{run_name}) or a Hub repo id (user/name)",
    )
    parser.add_argument(
        "--env-id", default=None, help="ALE/<Game>-v5 env to play (default: the one the agent was trained on)"
    )
    parser.add_argument("--episodes", type=int, default=10, help="episodes to play (default: %(default)s)")
    parser.add_argument(
        "--greedy", action="store_true", help="take the actor's most likely action instead of sampling one"
    )
    parser.add_argument(
        "--capture-video", action="store_true", help="record the episodes of the first env as mp4 videos"
    )
    parser.add_argument(
        "--video-dir", default=None, help="folder of the videos (default: videos/{game}__enjoy__{seed})"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the environments (default: %(default)s)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default; 1 is fastest for a small agent on a busy machine)",
    )
    parser.add_argument(
        "--num-envs",
        type=int,
        default=8,
        help="environments played in parallel, at most --episodes (default: %(default)s)",
    )
    parser.add_argument(
        "--max-episode-frames",
        type=int,
        default=108_000,
        help="raw-frame limit of an episode (default: %(default)s, the Atari100k protocol's 30 minutes)",
    )
    parser.add_argument(
        "--sticky-actions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="repeat the previous action with probability 0.25 (default: as the agent was trained)",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="fail unless the agent comes from this script (drama_xs, drama_s, drama_mamba1, ...)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the variant script downloaded with a Hub agent when this project lacks it",
    )
    return parser.parse_args(argv)


def enjoy(args: argparse.Namespace) -> dict:
    from utils.hub import load_agent

    if args.episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {args.episodes}")
    if args.num_envs < 1 or args.max_episode_frames < 1:
        raise UserError("--num-envs and --max-episode-frames must be >= 1")
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    agent = load_agent(
        args.repo_or_path,
        device=args.device,
        env_id=args.env_id,
        variant=args.variant,
        trust_remote_code=args.trust_remote_code,
    )
    from utils.evaluate import evaluate

    env_id = args.env_id or agent.args.env_id
    sticky = agent.args.sticky_actions if args.sticky_actions is None else args.sticky_actions
    video_dir = args.video_dir or f"videos/{game_of(env_id)}__enjoy__{args.seed}"
    print(f"playing {args.repo_or_path} ({agent.args.exp_name}) on {env_id} for {args.episodes} episodes", flush=True)
    results = evaluate(
        agent,
        env_id,
        episodes=args.episodes,
        seed=args.seed,
        num_envs=args.num_envs,
        greedy=args.greedy,
        capture_video=args.capture_video,
        video_dir=video_dir,
        sticky_actions=sticky,
        max_episode_frames=args.max_episode_frames,
    )
    for i, (episodic_return, length) in enumerate(zip(results["returns"], results["lengths"], strict=True)):
        print(f"episode {i + 1}: return {episodic_return:.1f}, length {length} steps")
    hns = f", human-normalised score {results['hns']:.3f}" if results["hns"] is not None else ""
    print(f"mean return over {args.episodes} episodes: {results['mean']:.2f} +/- {results['std']:.2f}{hns}")
    if args.capture_video:
        print(f"videos saved to {video_dir}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: enjoy(args))


if __name__ == "__main__":
    sys.exit(main())
