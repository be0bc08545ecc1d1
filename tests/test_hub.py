"""utils.hub (push_to_hub, load_agent) and utils.enjoy, all offline.

The Hub is never contacted: HF_HUB_OFFLINE is on for every test (huggingface_hub then refuses any HTTP
request), Hub downloads come from a fake cache laid out in a temporary folder, and uploads go to a stand-in
HfApi that records what it was given.
"""

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_AGENT
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard
from huggingface_hub.utils import LocalTokenNotFoundError, OfflineModeIsEnabled
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import drama_xs
from utils import UserError, enjoy, hub
from utils.atari import make_env
from utils.checkpoint import save_agent
from utils.evaluate import evaluate, save_results
from utils.hub import load_agent, push_to_hub

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FLAGS = (
    "--env-id ALE/Pong-v5 --total-timesteps 40 --random-steps 32 --buffer-size 64 --batch-size 2 "
    "--sequence-length 8 --imagine-batch-size 4 --imagine-context-length 4 --imagine-horizon 3 "
    "--eval-episodes 0 --d-model 64 --headdim 32 --encoder-filters 4 8 8 8 8 --stoch-categoricals 8 "
    "--stoch-classes 8 --act-context-length 4 --actor-hidden 32 --critic-hidden 32 --head-hidden 32 "
    "--device cpu --torch-threads 1"
).split()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def child_env(home: Path) -> dict:
    """Environment of the subprocesses: offline, an empty HF home, the project importable, one torch thread
    (on a busy 2-core machine torch's default threads make a small model ~15x slower)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Hub offline with an empty cache of its own for every test."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_cache"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An untrained tiny Pong agent saved with utils.checkpoint.save_agent (non-trivial normaliser statistics)."""
    torch.manual_seed(0)
    args = drama_xs.Args(env_id="ALE/Pong-v5", **TINY_AGENT)
    agent = drama_xs.Agent(args, 6)
    with torch.no_grad():
        for buffer in agent.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 2.0)  # the saved statistics must come back, not the initial values
    run_dir = tmp_path_factory.mktemp("saved") / "runs" / "ALE" / "Pong-v5__drama_xs__1__0"
    save_agent(agent, args, str(run_dir), "drama_xs")
    return run_dir, {k: v.clone() for k, v in agent.state_dict().items()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (tiny) training run of drama_xs.py, as a user would start it."""
    cwd = tmp_path_factory.mktemp("train")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "drama_xs.py"), *TRAIN_FLAGS],
        cwd=cwd,
        env=child_env(cwd / "hf"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (weights,) = (cwd / "runs").rglob("agent.safetensors")
    return weights.parent


def copy_run(run_dir: Path, dst: Path) -> Path:
    return Path(shutil.copytree(run_dir, dst))


def resave(run_dir: Path, edit_state=None, edit_metadata=None) -> None:
    """Rewrite agent.safetensors with an edited state dict and/or metadata."""
    path = run_dir / "agent.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    if edit_state:
        edit_state(state)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(state, str(path), metadata=metadata)


def edit_args_json(run_dir: Path, **changes) -> None:
    config = json.loads((run_dir / "args.json").read_text())
    (run_dir / "args.json").write_text(json.dumps({**config, **changes}))


def put_in_cache(cache: Path, repo_id: str, run_dir: Path) -> None:
    """Lay a folder out as huggingface_hub's cache holds a downloaded repo at revision main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(run_dir, repo / "snapshots" / COMMIT)


def assert_same_weights(agent, state: dict) -> None:
    loaded = agent.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key].cpu(), value), key


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# load_agent
# --------------------------------------------------------------------------------------------------
def test_load_local_folder_same_weights_and_acts(saved):
    run_dir, state = saved
    agent = load_agent(str(run_dir), device="cpu", env_id="ALE/Pong-v5", variant="drama_xs")
    assert isinstance(agent, drama_xs.Agent) and not agent.training
    assert agent.args.encoder_filters == (4, 8, 8, 8, 8)  # JSON list back to the tuple field
    assert agent.args.env_id == "ALE/Pong-v5" and agent.action_dim == 6
    assert all(p.device.type == "cpu" for p in agent.parameters())
    assert_same_weights(agent, state)

    env = make_env("ALE/Pong-v5", 0, 0, False, "test")()
    obs, _ = env.reset(seed=0)
    agent.reset(1)
    for t in range(6):  # the window fills past its first (random) step: the actor acts on real frames
        actions = agent.act(obs[None], np.array([t == 0]), greedy=t % 2 == 0)
        assert actions.shape == (1,) and 0 <= int(actions[0]) < 6
        obs, *_ = env.step(int(actions[0]))
    env.close()
    # the .safetensors file itself may be given instead of its folder
    assert_same_weights(load_agent(str(run_dir / "agent.safetensors")), state)


@pytest.mark.parametrize("variant", sorted(p.stem for p in ROOT.glob("drama_*.py")))
def test_load_every_variant(variant, tmp_path):
    module = importlib.import_module(variant)
    fields = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(env_id="ALE/Pong-v5", **{k: v for k, v in TINY_AGENT.items() if k in fields})
    save_agent(module.Agent(args, 6), args, str(tmp_path), variant)
    agent = load_agent(str(tmp_path), variant=variant)
    assert type(agent) is module.Agent and json.loads((tmp_path / "args.json").read_text())["variant"] == variant
    other = "drama_s" if variant == "drama_xs" else "drama_xs"
    with pytest.raises(UserError, match=f"is from {variant}, not {other}: load it with {variant}"):
        load_agent(str(tmp_path), variant=other)


def test_load_gpu_trained_args_on_cpu(saved, tmp_path):
    run_dir = copy_run(saved[0], tmp_path / "run")
    edit_args_json(run_dir, device="cuda", unknown_future_field=1)  # extra keys are ignored
    agent = load_agent(str(run_dir), device="cpu")
    assert agent.args.device == "cuda" and next(agent.parameters()).device.type == "cpu"
    assert_same_weights(agent, saved[1])


def test_load_wrong_action_space(saved):
    with pytest.raises(UserError, match=r"ALE/Breakout-v5 has 4 actions but the agent was trained with 6") as error:
        load_agent(str(saved[0]), env_id="ALE/Breakout-v5")
    assert_one_line(error)


def test_load_wrong_variant(saved, tmp_path):
    with pytest.raises(UserError, match=r"checkpoint .* is from drama_xs, not drama_mamba1") as error:
        load_agent(str(saved[0]), variant="drama_mamba1")
    assert_one_line(error)
    run_dir = copy_run(saved[0], tmp_path / "run")
    resave(run_dir, edit_metadata=lambda m: m.update(variant="drama_mamba1"))
    with pytest.raises(UserError, match=r"from drama_mamba1 but args.json says drama_xs"):
        load_agent(str(run_dir))


def test_load_truncated_file(saved, tmp_path):
    run_dir = copy_run(saved[0], tmp_path / "run")
    data = (run_dir / "agent.safetensors").read_bytes()
    for size in (len(data) // 2, 40):  # data cut off; header cut off
        (run_dir / "agent.safetensors").write_bytes(data[:size])
        with pytest.raises(UserError, match="is corrupted or truncated: re-download or re-save it") as error:
            load_agent(str(run_dir))
        assert_one_line(error)


@pytest.mark.parametrize("change", ["shape", "missing", "extra"])
def test_load_tampered_state_dict(saved, tmp_path, change):
    run_dir = copy_run(saved[0], tmp_path / "run")
    key = "world_model.dynamics.blocks.1.mixer.in_proj.weight"

    def edit(state):
        if change == "shape":
            state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
        elif change == "missing":
            del state[key]
        else:
            state["world_model.extra.weight"] = torch.zeros(2)

    resave(run_dir, edit_state=edit)
    expected = {
        "shape": rf"shape mismatch for {re.escape(key)}: checkpoint \(\d+, 64\), drama_xs.Agent .* \(\d+, 64\)",
        "missing": rf"lacks {re.escape(key)}",
        "extra": r"has world_model.extra.weight",
    }[change]
    with pytest.raises(UserError, match=expected) as error:
        load_agent(str(run_dir))
    assert_one_line(error)


def test_load_args_that_do_not_fit_the_weights(saved, tmp_path):
    run_dir = copy_run(saved[0], tmp_path / "run")
    edit_args_json(run_dir, d_model=128)
    with pytest.raises(UserError, match="shape mismatch for "):
        load_agent(str(run_dir))


def test_load_missing_folder_or_files(tmp_path):
    with pytest.raises(UserError, match="no agent folder"):
        load_agent(str(tmp_path / "nowhere" / "deeper" / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no agent.safetensors or args.json"):
        load_agent(str(tmp_path / "empty"))


def test_load_from_hub_cache_offline(saved, offline):
    put_in_cache(offline, "tester/Pong-drama_xs-seed1", saved[0])
    agent = load_agent("tester/Pong-drama_xs-seed1", env_id="ALE/Pong-v5")
    assert_same_weights(agent, saved[1])


def test_load_unknown_repo_offline():
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as error:
        load_agent("tester/no-such-repo")
    assert_one_line(error)


@pytest.fixture
def shipped_variant(saved, tmp_path):
    """An agent whose variant script is not in the project but shipped in its folder (a copy of drama_xs.py)."""
    name = "drama_shipped_copy"
    run_dir = copy_run(saved[0], tmp_path / "run")
    shutil.copy(ROOT / "drama_xs.py", run_dir / f"{name}.py")
    edit_args_json(run_dir, variant=name)
    resave(run_dir, edit_metadata=lambda m: m.update(variant=name))
    yield name, run_dir
    sys.modules.pop(name, None)


def test_load_variant_script_shipped_with_the_agent(saved, shipped_variant, offline):
    name, run_dir = shipped_variant
    agent = load_agent(str(run_dir))  # a local folder: its script may run
    assert type(agent).__module__ == name
    assert_same_weights(agent, saved[1])

    put_in_cache(offline, f"tester/{name}", run_dir)
    with pytest.raises(UserError, match="trust_remote_code=True") as error:
        load_agent(f"tester/{name}")  # from the Hub: only when asked
    assert_one_line(error)
    agent = load_agent(f"tester/{name}", trust_remote_code=True)
    assert_same_weights(agent, saved[1])


# --------------------------------------------------------------------------------------------------
# push_to_hub
# --------------------------------------------------------------------------------------------------
class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the repo and the files of each commit."""

    repos: list[str] = []
    commits: list[dict] = []
    existing_files = [".gitattributes", "README.md", "events.out.tfevents.123.old.0", "notes.txt"]
    error: Exception | None = None

    def __init__(self, *args, **kwargs):
        pass

    def whoami(self):
        if self.error:
            raise self.error
        return {"name": "tester"}

    def create_repo(self, repo_id, exist_ok=False, **kwargs):
        if self.error:
            raise self.error
        assert exist_ok
        self.repos.append(repo_id)
        return f"https://huggingface.co/{repo_id}"

    def list_repo_files(self, repo_id, **kwargs):
        return list(self.existing_files)

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        files, deleted = {}, []
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                src = op.path_or_fileobj
                files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
            else:
                assert isinstance(op, CommitOperationDelete)
                deleted.append(op.path_in_repo)
        self.commits.append({"repo_id": repo_id, "files": files, "deleted": deleted, "message": commit_message})


@pytest.fixture
def fake_api(monkeypatch):
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "repos", [])
    monkeypatch.setattr(FakeHfApi, "commits", [])
    monkeypatch.setattr(FakeHfApi, "error", None)
    return FakeHfApi


def test_default_repo_id(fake_api):
    args = drama_xs.Args(env_id="ALE/Krull-v5", hf_entity="someone")
    assert hub.default_repo_id(args) == "someone/Krull-drama_xs-seed1"
    assert hub.default_repo_id(drama_xs.Args(seed=3)) == "tester/Krull-drama_xs-seed3"  # whoami


def test_push_to_hub(trained_run, tmp_path, fake_api):
    run_dir = copy_run(trained_run, tmp_path / "runs" / trained_run.parent.name / trained_run.name)
    agent = load_agent(str(run_dir))
    results = evaluate(agent, "ALE/Pong-v5", episodes=1, num_envs=1, max_episode_frames=400)
    save_results(results, run_dir / "eval_results.json", exp_name="drama_xs", seed=1)
    videos = tmp_path / "videos" / trained_run.parent.name / trained_run.name  # where --capture-video puts them
    videos.mkdir(parents=True)
    (videos / "rl-video-episode-0.mp4").write_bytes(b"old")
    (videos / "rl-video-episode-8.mp4").write_bytes(b"newest")
    os.utime(videos / "rl-video-episode-0.mp4", (1, 1))

    url = push_to_hub(agent.args, str(run_dir))

    repo_id = "tester/Pong-drama_xs-seed1"
    assert url == f"https://huggingface.co/{repo_id}" and fake_api.repos == [repo_id]
    (commit,) = fake_api.commits  # one commit
    files = commit["files"]
    events = [name for name in files if name.startswith("events.out.tfevents.")]
    assert len(events) == 1
    assert set(files) == {
        "agent.safetensors",
        "args.json",
        "drama_xs.py",
        "eval_results.json",
        "replay.mp4",
        "README.md",
        *events,
    }
    assert files["agent.safetensors"] == (run_dir / "agent.safetensors").read_bytes()
    assert files["drama_xs.py"] == (ROOT / "drama_xs.py").read_bytes()
    assert files["replay.mp4"] == b"newest"
    assert commit["deleted"] == ["events.out.tfevents.123.old.0"]  # stale events of an earlier push

    readme = files["README.md"].decode()
    front_matter = yaml.safe_load(readme.split("---")[1])
    card = ModelCard(readme)
    assert card.data.library_name == front_matter["library_name"]
    for tag in ["reinforcement-learning", "deep-reinforcement-learning", "atari", "drama", "model-based-rl"]:
        assert tag in front_matter["tags"]
    assert "ALE/Pong-v5" in front_matter["tags"] and "custom-implementation" in front_matter["tags"]
    (result,) = front_matter["model-index"][0]["results"]
    assert result["dataset"]["name"] == "ALE/Pong-v5"
    assert result["metrics"][0]["type"] == "mean_reward"
    assert result["metrics"][0]["value"] == f"{results['mean']:.2f} +/- {results['std']:.2f}"
    assert card.data.eval_results[0].metric_value == result["metrics"][0]["value"]
    assert f'load_agent("{repo_id}"' in readme and f"python -m utils.enjoy {repo_id}" in readme
    (command,) = [line for line in readme.splitlines() if line.startswith("python drama_xs.py ")]
    for flag in ["--seed 1", "--env-id ALE/Pong-v5", "--encoder-filters 4 8 8 8 8", "--eval-episodes 0"]:
        assert flag in command
    assert "--exp-name" not in command  # defaults are left out
    assert "| d_model | 64 |" in readme and "max_episode_frames" in readme


def test_push_to_hub_errors(saved, fake_api, tmp_path):
    args = drama_xs.Args(env_id="ALE/Pong-v5", hf_entity="tester", **TINY_AGENT)
    cases = [
        (LocalTokenNotFoundError("no token"), r"not logged in .*hf auth login.*huggingface-cli login"),
        (ConnectionError("no route to host"), "check the network"),
        (OfflineModeIsEnabled("offline"), "unset HF_HUB_OFFLINE"),
    ]
    for error, message in cases:
        fake_api.error = error  # the fixture restores it
        with pytest.raises(UserError, match=message) as info:
            push_to_hub(args, str(saved[0]))
        assert_one_line(info)
    fake_api.error = None
    with pytest.raises(UserError, match="has no agent.safetensors or args.json"):
        push_to_hub(args, str(tmp_path))
    with pytest.raises(UserError, match="video folder .* does not exist"):
        push_to_hub(args, str(saved[0]), video_folder=str(tmp_path / "no_videos"))
    assert fake_api.commits == []


def test_push_cli_uploads_a_saved_run(saved, fake_api, capsys):
    assert hub.main(["push", str(saved[0]), "--hf-entity", "someone"]) == 0
    (commit,) = fake_api.commits
    assert commit["repo_id"] == "someone/Pong-drama_xs-seed1"
    assert {"agent.safetensors", "args.json", "drama_xs.py", "README.md"} <= set(commit["files"])
    assert "eval_results.json" not in commit["files"] and "replay.mp4" not in commit["files"]
    assert "model-index" not in yaml.safe_load(commit["files"]["README.md"].decode().split("---")[1])

    fake_api.error = LocalTokenNotFoundError("no token")
    assert hub.main(["push", str(saved[0])]) == 2  # whoami fails: not logged in
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hf auth login" in err and f"python -m utils.hub push {saved[0]}" in err


# --------------------------------------------------------------------------------------------------
# python -m utils.enjoy
# --------------------------------------------------------------------------------------------------
def test_enjoy_cli_plays_a_trained_run(trained_run, tmp_path):
    cmd = [sys.executable, "-m", "utils.enjoy", str(trained_run), "--episodes", "1", "--max-episode-frames", "400"]
    cmd += ["--greedy", "--device", "cpu", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"episode 1: return -?\d+\.\d, length 100 steps", proc.stdout), proc.stdout
    assert re.search(r"mean return over 1 episodes: -?\d+\.\d\d \+/- 0\.00, human-normalised score", proc.stdout)


def test_enjoy_cli_missing_path(tmp_path):
    cmd = [sys.executable, "-m", "utils.enjoy", str(tmp_path / "no" / "such" / "run"), "--episodes", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no agent folder"), proc.stderr


def test_enjoy_video_and_defaults(saved, tmp_path, capsys):
    video_dir = tmp_path / "videos"
    argv = [str(saved[0]), "--episodes", "1", "--max-episode-frames", "120", "--capture-video"]
    assert enjoy.main([*argv, "--video-dir", str(video_dir)]) == 0
    out = capsys.readouterr().out
    assert "on ALE/Pong-v5 for 1 episodes" in out  # env id from args.json
    assert "episode 1: return" in out and f"videos saved to {video_dir}" in out
    assert list(video_dir.glob("*.mp4"))
    assert enjoy.main([str(saved[0]), "--env-id", "ALE/Breakout-v5"]) == 2
    assert "has 4 actions but the agent was trained with 6" in capsys.readouterr().err


def test_enjoy_flags_change_what_it_plays(saved, tmp_path, monkeypatch, capsys):
    """--episodes and --num-envs: how many episodes; --max-episode-frames: where they are cut (40 frames, 10 agent
    steps); --seed: the default video folder; --torch-threads; --variant: which script the agent must come from."""
    monkeypatch.chdir(tmp_path)
    argv = [str(saved[0]), "--episodes", "3", "--num-envs", "2", "--max-episode-frames", "40", "--seed", "7",
            "--capture-video", "--greedy", "--device", "cpu", "--torch-threads", "2",
            "--variant", "drama_xs"]  # fmt: skip
    try:
        assert enjoy.main(argv) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    out = capsys.readouterr().out
    assert re.findall(r"episode \d: return -?[\d.]+, length (\d+) steps", out) == ["10", "10", "10"]
    assert "mean return over 3 episodes" in out and "videos saved to videos/Pong__enjoy__7" in out
    assert list((tmp_path / "videos" / "Pong__enjoy__7").glob("*.mp4"))
    assert enjoy.main([*argv[:1], "--variant", "drama_s"]) == 2
    assert "is from drama_xs, not drama_s" in capsys.readouterr().err
