"""Resuming a run reaches exactly the state of an uninterrupted run; checkpoints are written atomically."""

import json
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
from utils.checkpoint import load_optimizer_tensors, read_training_state, restore_rng, rng_tensors, save_training_state

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--env-id ALE/Pong-v5 --random-steps 40 --batch-size 2 --sequence-length 16 --imagine-batch-size 8 "
    "--imagine-context-length 4 --imagine-horizon 4 --eval-episodes 0 --d-model 64 --headdim 32 "
    "--encoder-filters 4 8 8 8 8 --stoch-categoricals 8 --stoch-classes 8 --act-context-length 4 "
    "--torch-threads 1 --checkpoint-every 0"
).split()


def train(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "drama_xs.py"), *flags], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result


def run_dir(cwd: Path, exp_name: str) -> Path:
    (path,) = (cwd / "runs" / "ALE").glob(f"*__{exp_name}__*")
    return path


def test_resume_reaches_the_uninterrupted_state(tmp_path):
    train(tmp_path, *TINY, "--total-timesteps", "80", "--exp-name", "straight")
    train(tmp_path, *TINY, "--total-timesteps", "50", "--exp-name", "stopped", "--checkpoint-every", "50")
    stopped = run_dir(tmp_path, "stopped")
    halfway = load_file(stopped / "agent.safetensors")
    resumed = train(
        tmp_path, "--resume", str(stopped.relative_to(tmp_path)), "--total-timesteps", "80", "--torch-threads", "1"
    )
    assert "resuming" in resumed.stdout
    straight = load_file(run_dir(tmp_path, "straight") / "agent.safetensors")
    final = load_file(stopped / "agent.safetensors")
    assert straight.keys() == final.keys()
    assert all(torch.equal(straight[k], final[k]) for k in straight)
    assert not all(torch.equal(halfway[k], final[k]) for k in halfway)  # it did train after resuming


def make_training(action_dim: int = 3, **overrides):
    args = drama_xs.Args(d_model=32, headdim=16, encoder_filters=(4, 4, 4, 4, 4), stoch_categoricals=4,
                         stoch_classes=4, buffer_size=64, **overrides)  # fmt: skip
    agent = drama_xs.Agent(args, action_dim)
    wm_optimizer, wm_scheduler = drama_xs.make_optimizer(agent.world_model.parameters(), 1e-3, 10)
    ac_optimizer, ac_scheduler = drama_xs.make_optimizer(agent.actor_critic.parameters(), 1e-3, 10)
    buffer = drama_xs.ReplayBuffer(64)
    for i in range(10):
        buffer.add(np.full((64, 64, 3), i, np.uint8), i % 3, 0.0, 0.0, i == 0)
    return dict(
        args=args, agent=agent, buffer=buffer, rng=np.random.default_rng(0), wm_optimizer=wm_optimizer,
        wm_scheduler=wm_scheduler, ac_optimizer=ac_optimizer, ac_scheduler=ac_scheduler, global_step=10,
        updates=0, update_budget=0.0, episode_start=False, recent_returns=deque(maxlen=5), action_history=[0] * 10,
        window=agent, run_name="test",
    )  # fmt: skip


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    before = (tmp_path / "checkpoint.safetensors").read_bytes()

    def crash(tensors, filename, metadata):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    training["global_step"] = 20
    with pytest.raises(KeyboardInterrupt):
        save_training_state(str(tmp_path), training, "drama_xs")
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    _, progress = read_training_state(str(tmp_path), "drama_xs")
    assert progress["global_step"] == 10


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


def test_resume_takes_device_compile_and_threads_from_the_command_line(tmp_path):
    """A run saved with --device cuda --compile resumes on a CPU as the error message for it advises."""
    training = make_training(6, env_id="ALE/Pong-v5", device="cuda", compile=True, torch_threads=3, eval_episodes=0,
                             checkpoint_every=0, save_model=False, sequence_length=8, random_steps=12)  # fmt: skip
    save_training_state(str(tmp_path), training, "drama_xs")
    resumed = train(tmp_path, "--resume", str(tmp_path), "--total-timesteps", "12", "--device", "cpu")
    assert "resuming test at step 10" in resumed.stdout and "run test on cpu" in resumed.stdout
    assert "step 12/12" in resumed.stdout


def test_the_cuda_generator_is_saved_and_restored_only_on_cuda(tmp_path, monkeypatch):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    tensors, _ = read_training_state(str(tmp_path), "drama_xs")
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
    tensors = {"opt.0.step": torch.tensor(5.0), "opt.0.lr_avg": torch.tensor(4e-4, dtype=torch.float64)}
    tensors |= {"opt.0.exp_avg": torch.ones(3), "opt.0.exp_avg_sq": torch.ones(3)}
    load_optimizer_tensors("opt", optimizer, tensors)
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
