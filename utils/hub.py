"""Share DRAMA agents on the Hugging Face Hub and load them back (CleanRL `cleanrl_utils.huggingface` style).

A saved agent is a folder (`runs/{run_name}`, written by `utils.checkpoint.save_agent`) holding
`agent.safetensors` (the `Agent` state dict; metadata: variant, action_dim, env_id, sha256 of the tensors) and
`args.json` (every `Args` field plus "variant" and "action_dim"). `push_to_hub` uploads that folder with the
variant's script, the TensorBoard events, the evaluation results, a video and a model card; `load_agent` rebuilds
the agent from a folder or a Hub repo, checking every key and shape first (nanoGPT `from_pretrained` style) and
the tensors against their checksum.

Usage:
    agent = load_agent("runs/ALE/Pong-v5__drama_xs__1__1712345678")       # or "user/Pong-drama_xs-seed1"
    results = evaluate(agent, agent.args.env_id, episodes=10)             # utils.evaluate
    push_to_hub(args, run_dir)                                             # needs `hf auth login`

    python -m utils.hub push runs/ALE/Pong-v5__drama_xs__1__1712345678    # upload a saved run later
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, metadata_eval_result

from utils import UserError, command_parser, game_of, resolve_device, run_cli
from utils.checks import args_from_config

REPO_ROOT = Path(__file__).resolve().parent.parent  # the drama_*.py scripts live here, next to utils/
CHECKPOINT_FILES = ("agent.safetensors", "args.json")
LIBRARY_NAME = "drama-cleanrl"  # the project's package name (pyproject.toml)
LOGIN_HINT = "run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
# Files push_to_hub writes: older copies of these in the repo that this upload does not replace are deleted,
# so that the repo always holds exactly one run (no stale TensorBoard events or results from an earlier push).
MANAGED_PATTERNS = ("agent.safetensors", "args.json", "eval_results.json", "replay.mp4", "*.py", "events.out.tfevents*")


# --------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------
def read_config(folder: Path) -> dict:
    """The `args.json` of a saved agent; a one-line UserError when it is not a valid JSON object."""
    try:
        config = json.loads((folder / "args.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{folder / 'args.json'} is not valid JSON: re-download or re-save the agent") from None
    if not isinstance(config, dict):
        raise UserError(
            f"{folder / 'args.json'} holds a JSON {type(config).__name__}, not an object: re-save the agent"
        )
    return config


def default_repo_id(args, api: HfApi | None = None) -> str:
    """`{hf_entity}/{game}-{exp_name}-seed{seed}`, e.g. "user/Krull-drama_xs-seed1".

    Without `args.hf_entity` the logged-in user's name is asked from the Hub (`whoami`).
    """
    entity = args.hf_entity
    if not entity:
        api = api or HfApi()
        try:
            entity = api.whoami()["name"]
        except Exception as error:
            raise _hub_error(error, "asking the Hub for your user name") from None
    return f"{entity}/{game_of(args.env_id)}-{args.exp_name}-seed{args.seed}"


def _hub_error(error: Exception, doing: str, repo_id: str | None = None) -> UserError:
    """One line naming the fix for an exception raised by huggingface_hub."""
    from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    status = getattr(getattr(error, "response", None), "status_code", None)
    repo = f" {repo_id}" if repo_id else ""
    if isinstance(error, OfflineModeIsEnabled):
        return UserError(f"HF_HUB_OFFLINE is set, so {doing}{repo} cannot work: unset HF_HUB_OFFLINE (or set it to 0)")
    if isinstance(error, LocalTokenNotFoundError) or status in (401, 403):
        rights = f"your token cannot write to{repo}" if repo_id else "your token lacks the rights"
        return UserError(f"not logged in to the Hugging Face Hub, or {rights}: {LOGIN_HINT}")
    if isinstance(error, HfHubHTTPError):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(
            f"the Hugging Face Hub refused {doing}{repo} ({first_line}): check the repo id and your rights"
        )
    return UserError(
        f"could not reach the Hugging Face Hub while {doing}{repo} ({type(error).__name__}): check the network "
        "(or the HF_ENDPOINT / proxy settings)"
    )


def _newest_video(run_dir: Path, video_folder: str | None) -> Path | None:
    """The newest mp4 in `video_folder`, or by default in `videos/{run_name}` (as the scripts record them).

    run_name is the path of run_dir below its `runs/` folder; videos/ is looked up in the current directory
    and next to runs/.
    """
    if video_folder is not None:
        folders = [Path(video_folder)]
        if not folders[0].is_dir():
            raise UserError(f"video folder {video_folder} does not exist: pass the folder the videos were saved to")
    else:
        parts = run_dir.resolve().parts
        if "runs" not in parts:
            return None
        i = len(parts) - 1 - parts[::-1].index("runs")
        run_name = Path(*parts[i + 1 :])
        folders = [Path("videos") / run_name, Path(*parts[:i]) / "videos" / run_name]
    videos = [p for folder in folders if folder.is_dir() for p in folder.rglob("*.mp4")]
    if video_folder is not None and not videos:
        raise UserError(f"no .mp4 video in {video_folder}: record one with --capture-video or leave the folder out")
    return max(videos, key=lambda p: p.stat().st_mtime) if videos else None


def _training_command(args, variant: str) -> str:
    """`python {variant}.py` with every flag that differs from the script's defaults (env id and seed always)."""
    flags = []
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.name not in ("env_id", "seed") and value == default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (tuple, list)):
            flags.append(f"{flag} {' '.join(str(v) for v in value)}")
        elif value is not None:
            flags.append(f"{flag} {value}")
    return f"python {variant}.py " + " ".join(flags)


def model_card(args, config: dict, repo_id: str, results: dict | None, files: list[str]) -> ModelCard:
    """CleanRL-style model card whose YAML metadata carries the evaluation result (model-index)."""
    variant = config.get("variant", args.exp_name)
    env_id = config["env_id"]
    metadata = {
        "library_name": LIBRARY_NAME,
        "tags": [
            env_id,
            "reinforcement-learning",
            "deep-reinforcement-learning",
            "atari",
            "drama",
            "model-based-rl",
            "custom-implementation",
        ],
    }
    if results is not None:
        metadata |= metadata_eval_result(
            model_pretty_name=variant,
            task_pretty_name="reinforcement-learning",
            task_id="reinforcement-learning",
            metrics_pretty_name="mean_reward",
            metrics_id="mean_reward",
            metrics_value=f"{results['mean']:.2f} +/- {results['std']:.2f}",
            dataset_pretty_name=env_id,
            dataset_id=env_id,
        )
    header = yaml.safe_dump(metadata, sort_keys=False)
    table = "\n".join(f"| {key} | {value} |" for key, value in config.items())
    if results is not None:
        hns = f", human-normalised score {results['hns']:.3f}" if results.get("hns") is not None else ""
        protocol = "\n".join(f"| {key} | {value} |" for key, value in results.get("protocol", {}).items())
        evaluation = (
            f"Mean episodic return {results['mean']:.2f} +/- {results['std']:.2f} (std) over "
            f"{results['episodes']} episodes{hns}, from `eval_results.json` (written by `utils.evaluate`; "
            "random and human scores of the DRAMA paper's Table 1). Protocol:\n\n"
            f"| setting | value |\n|---|---|\n{protocol}\n"
        )
    else:
        evaluation = "This agent was uploaded without an evaluation (`eval_results.json`): run `utils.enjoy` below.\n"
    body = f"""
# {variant} agent playing {env_id}

A DRAMA agent (Wang et al. 2025, "Drama: Mamba-Enabled Model-Based Reinforcement Learning Is Sample and
Parameter Efficient": a Mamba world model, an actor-critic trained in imagination, dynamic frequency-based
sampling) trained on {env_id} with [{variant}.py]({variant}.py), a CleanRL-style single-file implementation.

## How to use

From a checkout of the project (`pip install -e .`):

```python
from utils.hub import load_agent
from utils.evaluate import evaluate

agent = load_agent("{repo_id}", device="cpu")  # agent.reset(num_envs); agent.act(obs, episode_start, greedy)
print(evaluate(agent, "{env_id}", episodes=10)["mean"])
```

or play it and record a video:

```bash
python -m utils.enjoy {repo_id} --episodes 10 --capture-video
```

## Command to reproduce the training

```bash
{_training_command(args, variant)}
```

## Evaluation

{evaluation}
## Hyperparameters

From `args.json`:

| param | value |
|---|---|
{table}

## Files

{", ".join(f"`{name}`" for name in sorted(files))}
"""
    return ModelCard(f"---\n{header}---\n{body}")


def push_to_hub(args, run_dir: str, repo_id: str | None = None, video_folder: str | None = None) -> str:
    """Upload a saved run to the Hub in one commit and return the repo URL.

    Uploads `agent.safetensors`, `args.json`, the variant's script `{variant}.py`, `eval_results.json` (if
    present), the TensorBoard events, the newest video as `replay.mp4` (from `video_folder`, by default
    `videos/{run_name}`) and a README.md model card. repo_id defaults to `default_repo_id(args)`.
    """
    run = Path(run_dir)
    missing = [name for name in CHECKPOINT_FILES if not (run / name).is_file()]
    if missing:
        raise UserError(f"{run_dir} has no {' or '.join(missing)}: train with --save-model, or pass the run folder")
    config = read_config(run)
    variant = config.get("variant", args.exp_name)
    files: dict[str, Path | bytes] = {name: run / name for name in CHECKPOINT_FILES}
    script = REPO_ROOT / f"{variant}.py"
    if script.is_file():
        files[script.name] = script
    else:
        warnings.warn(f"{script} not found: uploading without the training script", stacklevel=2)
    results = None
    if (run / "eval_results.json").is_file():
        files["eval_results.json"] = run / "eval_results.json"
        results = json.loads((run / "eval_results.json").read_text())
    for events in sorted(run.rglob("events.out.tfevents.*")):
        files[events.relative_to(run).as_posix()] = events
    video = _newest_video(run, video_folder)
    if video is not None:
        files["replay.mp4"] = video

    api = HfApi()
    retry = f"; then retry with: python -m utils.hub push {run_dir}"
    try:
        repo_id = repo_id or default_repo_id(args, api)
    except UserError as error:
        raise UserError(f"{error}{retry}") from None
    files["README.md"] = str(model_card(args, config, repo_id, results, [*files, "README.md"])).encode()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        stale = [
            name
            for name in api.list_repo_files(repo_id)
            if name not in files and any(Path(name).match(p) for p in MANAGED_PATTERNS)
        ]
        operations = [CommitOperationDelete(path_in_repo=name) for name in stale]
        operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src) for name, src in files.items()]
        api.create_commit(repo_id, operations, commit_message=f"{variant} on {config['env_id']}, seed {args.seed}")
    except Exception as error:
        raise UserError(f"{_hub_error(error, 'uploading to', repo_id)}{retry}") from None
    url = str(url) if url else f"https://huggingface.co/{repo_id}"
    print(f"uploaded {run_dir} to {url}")
    return url


# --------------------------------------------------------------------------------------------------
# Download and load
# --------------------------------------------------------------------------------------------------
def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.endswith(".safetensors")


def _download(repo_id: str) -> Path:
    """snapshot_download the checkpoint files (honours HF_HUB_OFFLINE and the local cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # only what loading needs: never a run's training checkpoint (checkpoint.safetensors, ~1.3 GB) or videos
        patterns = ["agent.safetensors", "args.json", "eval_results.json", "*.py", "README.md"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise UserError(
            f"{repo_id} is neither a local folder nor a Hub repo you can read: check the path or repo id "
            f"(a private repo needs a login: {LOGIN_HINT})"
        ) from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id} is not a local folder and is not in the Hugging Face cache, and the Hub cannot be reached: "
            "check the path or repo id, or unset HF_HUB_OFFLINE / check the network / download it first"
        ) from None
    except HFValidationError:
        raise UserError(f"{repo_id} is neither a local folder nor a valid Hub repo id: check the path") from None
    except Exception as error:
        raise _hub_error(error, "downloading", repo_id) from None


def _resolve(repo_id_or_path: str) -> tuple[Path, bool]:
    """(folder holding agent.safetensors + args.json, whether it came from the Hub)."""
    path = Path(repo_id_or_path).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        folder, from_hub = path, False
    elif path.exists() or not _looks_like_repo_id(repo_id_or_path):
        raise UserError(f"no agent folder {repo_id_or_path}: pass a run folder (runs/{{run_name}}) or a Hub repo id")
    else:
        folder, from_hub = _download(repo_id_or_path), True
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{repo_id_or_path} has no {' or '.join(missing)}: pass a folder written by save_agent (runs/{{run_name}})"
        )
    return folder, from_hub


def _import_variant(variant: str, folder: Path, from_hub: bool, trust_remote_code: bool):
    """The variant's script as a module: the project's `{variant}.py`, else the copy shipped with the agent."""
    if not re.fullmatch(r"[A-Za-z_]\w*", variant):
        raise UserError(f"{folder} names no valid variant script ({variant!r}): re-save the agent")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    if (REPO_ROOT / f"{variant}.py").is_file():
        return importlib.import_module(variant)
    shipped = folder / f"{variant}.py"
    if not shipped.is_file():
        raise UserError(
            f"the agent needs {variant}.py, found neither in {REPO_ROOT} nor in {folder}: "
            "update the project or add the script"
        )
    if from_hub and not trust_remote_code:
        raise UserError(
            f"this project has no {variant}.py; the copy downloaded with the agent runs code from the Hub: pass "
            f"trust_remote_code=True (--trust-remote-code) if you trust it, or add {variant}.py to {REPO_ROOT}"
        )
    if variant in sys.modules:
        return sys.modules[variant]
    spec = importlib.util.spec_from_file_location(variant, shipped)
    module = importlib.util.module_from_spec(spec)
    sys.modules[variant] = module  # dataclasses look the module up while the script runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[variant]
        raise
    return module


def check_variant_args(module, args, path: Path) -> None:
    """The variant's own checks of its Args (`check_args`: positive sizes, headdim dividing expand * d_model, ...),
    with the file named: an args.json edited by hand must not build a broken model."""
    check_args = getattr(module, "check_args", None)
    if check_args is None:
        return
    try:
        check_args(args)
    except UserError as error:
        raise UserError(f"{path} does not describe a valid {module.__name__} run: {error}") from None


def check_env_actions(env_id: str, action_dim: int, trained_on: str | None) -> None:
    """Build one `env_id` env and check the agent's actions against it (utils.evaluate.check_agent_actions)."""
    from utils.atari import make_env
    from utils.evaluate import check_agent_actions

    env = make_env(env_id, 0, 0, False, "check")()
    try:
        check_agent_actions(env, env_id, action_dim, trained_on)
    finally:
        env.close()


def check_finite(state: dict, path: Path) -> None:
    """Refuse weights holding NaN or inf (a diverged training or a damaged file): one line naming the tensor."""
    import torch

    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{path} holds NaN or inf in {key}: the training diverged or the file is damaged")


def load_agent(
    repo_id_or_path: str,
    device: str = "cpu",
    env_id: str | None = None,
    variant: str | None = None,
    trust_remote_code: bool = False,
):
    """Rebuild a saved agent from a local folder or a Hub repo id, check it, load its weights, return it in eval mode.

    repo_id_or_path: a folder with agent.safetensors + args.json (runs/{run_name}), the .safetensors file in it,
        or a Hub repo id ("user/Pong-drama_xs-seed1"; downloaded with snapshot_download: HF_HUB_OFFLINE=1 and
        the local cache are honoured).
    device: "cpu", "cuda", "cuda:N" or "auto"; a GPU-trained agent loads on the CPU.
    env_id: if given, the env's action count must equal the agent's.
    variant: if given, the checkpoint must come from that script (drama_xs, drama_s, drama_mamba1, ...).
    trust_remote_code: allow running the `{variant}.py` downloaded with a Hub agent when this project lacks it.

    Every mismatch raises a one-line UserError naming what differs. The returned agent has `reset(num_envs)`,
    `act(obs, episode_start, greedy)` and `args` (its Args).
    """
    folder, from_hub = _resolve(repo_id_or_path)  # first: a wrong path fails fast, before torch is imported
    torch_device = resolve_device(device)
    from safetensors import safe_open
    from safetensors.torch import load_file

    from utils.files import verify_checksum

    weights = folder / "agent.safetensors"
    corrupted = f"{weights} is corrupted or truncated: re-download or re-save it"
    config = read_config(folder)
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception:
        raise UserError(corrupted) from None

    # checks that need no model: variant, action count
    saved_variant = str(config.get("variant") or metadata.get("variant"))
    if metadata.get("variant", saved_variant) != saved_variant:
        raise UserError(
            f"{weights} is from {metadata['variant']} but args.json says {saved_variant}: "
            "the two files come from different runs, re-save the agent"
        )
    if variant is not None and variant != saved_variant:
        raise UserError(
            f"checkpoint {repo_id_or_path} is from {saved_variant}, not {variant}: load it with "
            f"{saved_variant} (variant={saved_variant!r}) or leave the variant out"
        )
    action_dim = config.get("action_dim", metadata.get("action_dim", -1))
    if isinstance(action_dim, bool) or not str(action_dim).isdigit() or int(action_dim) < 1:
        raise UserError(
            f"{folder / 'args.json'}: 'action_dim' is {json.dumps(action_dim)}, not a positive integer: "
            "re-save the agent"
        )
    action_dim = int(action_dim)
    if str(metadata.get("action_dim", action_dim)) != str(action_dim):
        raise UserError(f"args.json and agent.safetensors in {folder} disagree on action_dim: re-save the agent")
    if env_id is not None:
        check_env_actions(env_id, action_dim, str(config.get("env_id") or metadata.get("env_id") or "") or None)

    # build the model, then check every key and shape before copying weights
    module = _import_variant(saved_variant, folder, from_hub, trust_remote_code)
    if not hasattr(module, "Args") or not hasattr(module, "Agent"):
        raise UserError(f"{module.__file__} has no Args or Agent: it is not a DRAMA variant script")
    args = args_from_config(module.Args, config, folder / "args.json")
    check_variant_args(module, args, folder / "args.json")
    agent = module.Agent(args, action_dim)
    expected = {key: tuple(value.shape) for key, value in agent.state_dict().items()}
    if missing := sorted(expected.keys() - shapes.keys()):
        key = missing[0]
        raise UserError(
            f"{weights} lacks {key} (shape {expected[key]}) that {saved_variant}.Agent has"
            f"{f' (and {len(missing) - 1} more keys)' if len(missing) > 1 else ''}: re-save the agent"
        )
    if unexpected := sorted(shapes.keys() - expected.keys()):
        key = unexpected[0]
        raise UserError(f"{weights} has {key} (shape {shapes[key]}) that {saved_variant}.Agent does not know")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise UserError(
                f"shape mismatch for {key}: checkpoint {shapes[key]}, {saved_variant}.Agent built from args.json "
                f"{shape}: args.json and agent.safetensors do not belong together, re-save the agent"
            )
    try:
        state = load_file(str(weights), device="cpu")
    except Exception:
        raise UserError(corrupted) from None
    verify_checksum(state, metadata, weights)
    check_finite(state, weights)
    agent.load_state_dict(state)
    return agent.to(torch_device).eval()


# --------------------------------------------------------------------------------------------------
# CLI: python -m utils.hub push RUN_DIR (upload a run saved earlier, e.g. after a failed --upload-model)
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser("python -m utils.hub", "Upload a saved DRAMA run to the Hub.")
    push = commands.add_parser(
        "push",
        help="upload runs/{run_name} (agent, args, script, results, events, video, model card) in one commit",
    )
    push.add_argument("run_dir", help="the run folder with agent.safetensors + args.json (runs/{run_name})")
    push.add_argument("--repo-id", default=None, help="target repo (default: {entity}/{game}-{exp_name}-seed{seed})")
    push.add_argument("--hf-entity", default=None, help="user or org of the default repo id (default: args.json's)")
    push.add_argument("--video-folder", default=None, help="folder of the mp4 to upload (default: videos/{run_name})")
    args = parser.parse_args(argv)

    def command():
        run = Path(args.run_dir)
        if not (run / "args.json").is_file():
            raise UserError(f"{args.run_dir} has no args.json: pass a run folder written by save_agent")
        config = read_config(run)
        module = _import_variant(str(config.get("variant")), run, False, False)
        run_args = args_from_config(module.Args, config, run / "args.json")
        if args.hf_entity is not None:
            run_args.hf_entity = args.hf_entity
        push_to_hub(run_args, args.run_dir, repo_id=args.repo_id, video_folder=args.video_folder)

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
