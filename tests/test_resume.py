"""Resuming a run reaches exactly the state of an uninterrupted run; checkpoints are written atomically."""

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import drama_xs
from utils import UserError
from utils.checkpoint import (
    TrainingState,
    load_optimizer_state,
    read_training_state,
    restore_rng,
    restore_training_state,
    rng_tensors,
    save_training_state,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--env-id ALE/Pong-v5 --random-steps 40 --batch-size 2 --sequence-length 16 --imagine-batch-size 8 "
    "--imagine-context-length 4 --imagine-horizon 4 --eval-episodes 0 --d-model 64 --headdim 32 "
    "--encoder-filters 4 8 8 8 8 --stoch-categoricals 8 --stoch-classes 8 --act-context-length 4 "
    "--torch-threads 1 --checkpoint-every 0"
).split()


def train(cwd: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "drama_xs.py"), *flags], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def run_dir(cwd: Path, exp_name: str) -> Path:
    (path,) = (cwd / "runs" / "ALE").glob(f"*__{exp_name}__*")
    return path


def test_a_bare_resume_reaches_the_uninterrupted_state_with_the_runs_threads_and_precision(tmp_path):
    """`--resume DIR` alone, where torch would take 2 threads and `auto` precision might be bf16: the run's own 1
    thread and fp32 are kept (on a CPU other threads or another precision give other weights)."""
    train(tmp_path, *TINY, "--precision", "fp32", "--total-timesteps", "80", "--exp-name", "straight")
    train(tmp_path, *TINY, "--precision", "fp32", "--total-timesteps", "50", "--exp-name", "stopped",
          "--checkpoint-every", "50")  # fmt: skip
    stopped = run_dir(tmp_path, "stopped")
    halfway = load_file(stopped / "agent.safetensors")
    two_threads = {**os.environ, "OMP_NUM_THREADS": "2"}  # torch's default for this process: 2 threads
    resumed = train(tmp_path, "--resume", str(stopped.relative_to(tmp_path)), "--total-timesteps", "80",
                    env=two_threads)  # fmt: skip
    assert "resuming with --torch-threads 1 (the run's) and --precision fp32 (the run's)\n" in resumed.stdout
    assert "precision fp32 (" in resumed.stdout
    straight = load_file(run_dir(tmp_path, "straight") / "agent.safetensors")
    final = load_file(stopped / "agent.safetensors")
    assert straight.keys() == final.keys()
    assert all(torch.equal(straight[k], final[k]) for k in straight)
    assert not all(torch.equal(halfway[k], final[k]) for k in halfway)  # it did train after resuming


def make_training(action_dim: int = 3, **overrides) -> TrainingState:
    """A small training state at step 10: 10 stored steps, two acting windows (one empty), a recorded return."""
    args = drama_xs.Args(d_model=32, headdim=16, encoder_filters=(4, 4, 4, 4, 4), stoch_categoricals=4,
                         stoch_classes=4, buffer_size=64, **overrides)  # fmt: skip
    agent = drama_xs.Agent(args, action_dim)
    wm_optimizer, wm_scheduler = drama_xs.make_optimizer(agent.world_model.parameters(), 1e-3, 10)
    ac_optimizer, ac_scheduler = drama_xs.make_optimizer(agent.actor_critic.parameters(), 1e-3, 10)
    buffer = drama_xs.ReplayBuffer(64)
    for i in range(10):
        buffer.add(np.full((64, 64, 3), i, np.uint8), i % 3, 0.0, 0.0, i == 0)
    agent.reset(2)
    window = {"0.z": torch.arange(3.0)[:, None].expand(3, 16), "0.actions": torch.arange(3) % action_dim}
    agent.load_window_state(window)
    return TrainingState(args, "test", agent, wm_optimizer, wm_scheduler, ac_optimizer, ac_scheduler, buffer,
                         np.random.default_rng(0), [0] * 10, deque([1.5], maxlen=5), global_step=10, updates=0,
                         update_budget=0.0, episode_start=False)  # fmt: skip


# What a checkpoint of drama_xs.py holds, named as every checkpoint written so far names it: a checkpoint of an
# earlier version loads only while these names stay
SAVED_PROGRESS = ["wm_scheduler", "ac_scheduler", "buffer", "rng", "recent_returns", "global_step", "updates",
                  "update_budget", "episode_start", "run_name", "args"]  # fmt: skip
SAVED_TENSORS = {"torch_rng", "action_history", "window.0.z", "window.0.actions"} | {
    f"buffer.{name}" for name in ("obs", "actions", "rewards", "terminations", "episode_starts", "n_wm", "n_img")
}


def test_a_checkpoint_holds_what_checkpoints_always_held_and_restores_it(tmp_path):
    training = make_training()
    for parameter in training.agent.world_model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    training.wm_optimizer.step()  # the world model's optimiser holds a state, the actor-critic's none yet
    save_training_state(str(tmp_path), training, "drama_xs")
    saved = read_training_state(str(tmp_path), "drama_xs")
    assert list(saved.progress) == SAVED_PROGRESS and saved.progress["buffer"] == {"next": 10, "size": 10}
    agent = {f"agent.{k}" for k in training.agent.state_dict()}
    laprop = ("step", "lr_avg", "exp_avg", "exp_avg_sq")  # each parameter's state
    optimizer = {f"wm_optimizer.{i}.{k}" for i, _ in enumerate(training.agent.world_model.parameters()) for k in laprop}
    assert saved.tensors.keys() - agent - optimizer == SAVED_TENSORS and optimizer <= saved.tensors.keys()
    assert (saved.global_step, saved.run_name, saved.action_dim) == (10, "test", 3)

    restored = make_training()
    restored.agent.reset(2)
    restored.buffer, restored.action_history, restored.recent_returns = drama_xs.ReplayBuffer(64), [], deque(maxlen=5)
    restored.global_step, restored.episode_start = 0, True
    restore_training_state(restored, saved)
    assert (restored.global_step, restored.episode_start, list(restored.recent_returns)) == (10, False, [1.5])
    assert restored.action_history == [0] * 10 and (restored.buffer.next, restored.buffer.size) == (10, 10)
    assert torch.equal(restored.buffer.obs[:10], training.buffer.obs[:10])
    assert restored.agent.window_lengths.tolist() == [3, 0]
    windows, expected = restored.agent.window_state(), training.agent.window_state()
    assert windows.keys() == expected.keys() == {"0.z", "0.actions"}
    assert all(torch.equal(windows[k], expected[k]) for k in expected)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    before = (tmp_path / "checkpoint.safetensors").read_bytes()

    def crash(tensors, filename, metadata):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    training.global_step = 20
    with pytest.raises(KeyboardInterrupt):
        save_training_state(str(tmp_path), training, "drama_xs")
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert read_training_state(str(tmp_path), "drama_xs").global_step == 10


def test_bad_resume_paths_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        read_training_state(str(tmp_path), "drama_xs")
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupted or truncated") as error:
        read_training_state(str(tmp_path), "drama_xs")
    assert "\n" not in str(error.value)


def test_resume_with_another_variant_is_refused(tmp_path):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    result = subprocess.run(
        [sys.executable, str(ROOT / "drama_s.py"), "--resume", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/checkpoint.safetensors was written by drama_xs.py, not drama_s.py: resume it with that"
    ]


def test_resume_takes_device_and_compile_from_the_command_line_and_threads_and_precision_when_named(tmp_path):
    """A run saved with --device cuda --compile resumes on a CPU as the error message for it advises; it keeps its
    3 threads and its precision unless the command line names them."""
    training = make_training(6, env_id="ALE/Pong-v5", device="cuda", compile=True, torch_threads=3, eval_episodes=0,
                             checkpoint_every=0, save_model=False, sequence_length=8, random_steps=12)  # fmt: skip
    training.agent.reset(1)
    save_training_state(str(tmp_path), training, "drama_xs")
    resumed = train(tmp_path, "--resume", str(tmp_path), "--total-timesteps", "12", "--device", "cpu")
    assert "resuming test at step 10" in resumed.stdout and "run test on cpu" in resumed.stdout
    assert "resuming with --torch-threads 3 (the run's) and --precision auto (the run's)\n" in resumed.stdout
    assert "step 12/12" in resumed.stdout
    resumed = train(tmp_path, "--resume", str(tmp_path), "--total-timesteps", "12", "--device", "cpu",
                    "--torch-threads", "1", "--precision=fp32")  # fmt: skip
    lines = "resuming with --torch-threads 1 (this command line's) and --precision fp32 (this command line's)\n"
    assert lines in resumed.stdout and "precision fp32 (asked for with --precision)" in resumed.stdout
    assert "step 12/12" in resumed.stdout


def test_the_cuda_generator_is_saved_and_restored_only_on_cuda(tmp_path, monkeypatch):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    tensors = read_training_state(str(tmp_path), "drama_xs").tensors
    assert "torch_rng" in tensors and "cuda_rng" not in tensors  # a CPU run has no CUDA generator to save
    cuda_state, restored = torch.arange(4, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cuda = torch.device("cuda")
    saved = rng_tensors(cuda)
    assert torch.equal(saved["cuda_rng"], cuda_state) and torch.equal(saved["torch_rng"], torch.get_rng_state())
    restore_rng(saved, cuda)
    assert len(restored) == 1 and torch.equal(restored[0][0], cuda_state) and restored[0][1] == cuda
    restore_rng(tensors, cuda)  # a CPU checkpoint resumed on a GPU: nothing to set
    restore_rng(saved, torch.device("cpu"))  # a GPU checkpoint resumed on a CPU: the CUDA state is skipped
    assert len(restored) == 1


def test_restored_optimizer_state_goes_to_the_parameters_device_but_its_scalars_stay_on_the_cpu():
    """As LaProp keeps them: a `step` or `lr_avg` on the GPU would sync with the CPU once per parameter and update."""
    param = torch.nn.Parameter(torch.zeros(3, device="meta"))  # stands for a parameter on a GPU
    optimizer = drama_xs.LaProp([param], lr=1e-3)
    tensors = {"0.step": torch.tensor(5.0), "0.lr_avg": torch.tensor(4e-4, dtype=torch.float64)}
    tensors |= {"0.exp_avg": torch.ones(3), "0.exp_avg_sq": torch.ones(3)}
    load_optimizer_state(optimizer, tensors)
    state = optimizer.state[param]
    assert state["step"].device.type == "cpu" and state["step"].item() == 5
    assert state["lr_avg"].device.type == "cpu" and state["lr_avg"].item() == 4e-4
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"


def stop_early(run: Path, total_timesteps: int) -> None:
    """Make the finished run's checkpoint that of a run of `total_timesteps` stopped at its checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    progress = json.loads(metadata["progress"])
    progress["args"]["total_timesteps"] = total_timesteps
    save_file(tensors, str(run / "checkpoint.safetensors"), metadata={**metadata, "progress": json.dumps(progress)})


def test_resume_continues_in_its_folder_from_anywhere_and_keeps_its_total(tmp_path):
    train(tmp_path, *TINY, "--total-timesteps", "40", "--checkpoint-every", "40", "--run-dir", "first")
    first = tmp_path / "first"
    assert (first / "agent.safetensors").is_file() and not (tmp_path / "runs").exists()  # --run-dir named it
    copy = Path(shutil.copytree(first, tmp_path / "copy" / "X"))
    stop_early(copy, 60)  # as if it had stopped at step 40 of 60
    other = tmp_path / "other"
    other.mkdir()
    resumed = train(other, "--resume", "../copy/X")  # no --total-timesteps: the saved 60, not the default 100,000
    assert "resuming" in resumed.stdout and "step 60/60 " in resumed.stdout and "100000" not in resumed.stdout
    assert list(other.iterdir()) == []  # nothing went to ./runs or anywhere else in the current directory
    assert len(list(copy.glob("events.out.tfevents.*"))) == 2  # the resumed run's events are in the copy
    assert json.loads((copy / "args.json").read_text())["total_timesteps"] == 60
    assert (first / "agent.safetensors").read_bytes() != (copy / "agent.safetensors").read_bytes()
    assert json.loads((first / "args.json").read_text())["total_timesteps"] == 40  # the original is untouched

    for flags, error in [
        (["--resume", "../copy/X", "--total-timesteps", "30"],
         "error: --total-timesteps 30 < step 60, where ../copy/X stopped: give >= 60"),
        ([*TINY, "--run-dir", "../first"],
         "error: ../first already holds a run: continue it with --resume ../first or pick another --run-dir"),
    ]:  # fmt: skip
        result = subprocess.run([sys.executable, str(ROOT / "drama_xs.py"), *flags], cwd=other, capture_output=True,
                                text=True)  # fmt: skip
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [error]
