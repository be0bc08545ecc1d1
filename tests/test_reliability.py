"""Nothing a run has done is lost or overwritten, and damage is caught (the scripts; test_reliability_utils.py: the
utils).

- SIGINT/SIGTERM/SIGUSR2 (Slurm's) stop a run at a step boundary, with its state and agent saved (also with
  --checkpoint-every 0), one line saying how to resume, exit code 130/143/140; the resumed run ends with the weights
  of an uninterrupted one; a second Ctrl-C aborts at once, a repeated SIGUSR2 is ignored;
- a run folder is locked while a process trains in it (a second process fails naming the PID; the lock file of
  a dead process is taken over); new runs of the same name get distinct folders;
- a full disk or another OSError while saving is one line naming the path and the space needed, the previous
  file stays, no temporary file is left, and those a killed save left (safetensors' own included) are removed at
  the next save or when a run takes the folder;
- every safetensors file written carries a checksum verified on load; files from before load with one warning;
- the flags and the saved settings are checked before anything runs.
"""

import contextlib
import dataclasses
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_resume import TINY, make_training

import drama_xs
from utils import Interrupted, UserError, files, run_cli, runs
from utils.checkpoint import CHECKPOINT, read_training_state, save_agent, save_training_state
from utils.hub import load_agent
from utils.runs import LOCK, lock_run_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "drama_xs.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+)/\d+: the training state is in (\S+), the agent in (\S+); "
                     r"continue with: python drama_xs.py --resume (\S+)$")  # fmt: skip


def start(cwd: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, *flags], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_progress(process: subprocess.Popen) -> None:
    """Read stdout up to the run's first progress line (its first step): the folder is locked, training has begun."""
    for line in process.stdout:
        if line.startswith("step "):
            return
    raise AssertionError(f"no progress line: {process.communicate()[1]}")


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def run(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_sigint_saves_the_run_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    """With --checkpoint-every 0, so that nothing but the stop saves; meanwhile the folder is locked."""
    training = start(tmp_path, *TINY, "--total-timesteps", "100000", "--run-dir", "a")
    wait_for_progress(training)
    second = [start(tmp_path, *TINY, "--run-dir", "a"), start(tmp_path, "--resume", "a")]
    for process in second:
        code, stderr = finish(process)
        assert code == 2 and "Traceback" not in stderr
        assert last_line(stderr).startswith(f"error: a is in use by process {training.pid} on ")
    time.sleep(2)  # some training steps (the random steps end at step 40)
    training.send_signal(signal.SIGINT)
    code, stderr = finish(training)
    assert code == 130 and "Traceback" not in stderr, stderr
    name, step, state, agent, folder = STOPPED.match(last_line(stderr)).groups()
    assert (name, state, agent, folder) == ("SIGINT", f"a/{CHECKPOINT}", "a/agent.safetensors", "a")
    step = int(step)
    assert not (tmp_path / "a" / LOCK).exists()
    assert read_training_state(str(tmp_path / "a"), "drama_xs").global_step == step  # the saved state loads
    total = str(step + 8)
    resumed = start(tmp_path, "--resume", "a", "--total-timesteps", total, "--torch-threads", "1")
    straight = start(tmp_path, *TINY, "--total-timesteps", total, "--run-dir", "b")
    assert finish(resumed)[0] == 0 and finish(straight)[0] == 0
    assert same_weights(tmp_path / "a" / "agent.safetensors", tmp_path / "b" / "agent.safetensors")
    assert step > 40  # it stopped while training, and the resumed run trained on from there


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGUSR2, 140)])
def test_sigterm_and_slurms_sigusr2_save_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, signum, code):
    """SIGUSR2: Slurm's warning before a time limit or a preemption, sent to every process of the job (and maybe
    again by submitit's checkpoint()): a repeated one is ignored, the run stops once and saves."""
    terminated = start(tmp_path, *TINY, "--total-timesteps", "100000", "--run-dir", "t", "--checkpoint-every", "7")
    wait_for_progress(terminated)
    time.sleep(2)  # some training steps (the random steps end at step 40)
    terminated.send_signal(signum)
    if signum == signal.SIGUSR2:
        terminated.send_signal(signum)
    code_, stderr = finish(terminated)
    name, step, *_ = STOPPED.match(last_line(stderr)).groups()
    assert (code_, name) == (code, signum.name) and "Traceback" not in stderr, stderr
    again = " (again: abort at once)" if signum == signal.SIGTERM else ""
    assert f"{signum.name}: stopping after this step to save the run{again}\n" in stderr
    step = int(step)
    assert read_training_state(str(tmp_path / "t"), "drama_xs").global_step == step and step > 40
    total = str(step + 8)
    resumed = start(tmp_path, "--resume", "t", "--total-timesteps", total)
    straight = start(tmp_path, *TINY, "--total-timesteps", total, "--checkpoint-every", "7", "--run-dir", "s")
    assert finish(resumed)[0] == 0 and finish(straight)[0] == 0
    assert same_weights(tmp_path / "t" / "agent.safetensors", tmp_path / "s" / "agent.safetensors")


def test_a_second_signal_aborts_at_once_but_a_repeated_sigusr2_is_ignored():
    stop = runs.StopOnSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT  # the first only asks the loop to stop
        os.kill(os.getpid(), signal.SIGUSR2)  # Slurm's warning, maybe sent twice: ignored while stopping
        assert stop.signal == signal.SIGINT
        with pytest.raises(Interrupted, match="SIGTERM again: aborted at once") as error:
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    assert run_cli(lambda: (_ for _ in ()).throw(error.value)) == 143
    assert run_cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt())) == 130


def test_a_stale_lock_is_taken_over_and_a_held_one_is_refused(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{dead.pid} somehost\n")
    (tmp_path / f"{CHECKPOINT}.tmp").write_bytes(b"left by a killed save")
    hold = "import sys, time; from utils.runs import lock_run_folder; lock_run_folder(sys.argv[1]); " \
           "print('locked', flush=True); time.sleep(60)"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == f"took over {tmp_path / LOCK} of process {dead.pid} somehost, which is no " \
                                           "longer running\n"  # fmt: skip
        assert holder.stdout.readline() == "locked\n"
        assert not (tmp_path / f"{CHECKPOINT}.tmp").exists()  # taking the folder removes stale temporary files
        assert (tmp_path / LOCK).read_text().split()[0] == str(holder.pid)
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "):
            lock_run_folder(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    lock_run_folder(str(tmp_path))  # the kernel dropped the killed holder's lock: taken over
    assert (tmp_path / LOCK).read_text().split()[0] == str(os.getpid())


def test_new_runs_of_one_name_get_distinct_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = drama_xs.Args()
    first = runs.run_folder(args, "ALE/Pong-v5__drama_xs__1__1700000000")
    second = runs.run_folder(args, "ALE/Pong-v5__drama_xs__1__1700000000")
    assert first == ("runs/ALE/Pong-v5__drama_xs__1__1700000000", "ALE/Pong-v5__drama_xs__1__1700000000")
    assert second == ("runs/ALE/Pong-v5__drama_xs__1__1700000000__2", "ALE/Pong-v5__drama_xs__1__1700000000__2")
    assert (tmp_path / second[0] / LOCK).read_text().split()[0] == str(os.getpid())


def full_disk(tensors, filename, metadata):
    Path(filename).write_bytes(b"the first bytes")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_is_one_line_and_keeps_the_previous_files(tmp_path, monkeypatch):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    save_agent(training.agent, training.args, str(tmp_path), "drama_xs")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    training.global_step = 20
    with pytest.raises(UserError) as error:
        save_training_state(str(tmp_path), training, "drama_xs")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"could not write {tmp_path / CHECKPOINT} (")
    size = (tmp_path / CHECKPOINT).stat().st_size
    needed = float(re.search(r"it needs about ([\d.,]+) MB", message).group(1).replace(",", ""))
    assert 0.9 * size / 1e6 <= needed <= 1.1 * size / 1e6 + 0.1  # the estimate from the tensors' bytes
    assert "MB are free there" in message and f"the previous {CHECKPOINT} is untouched" in message

    def no_space(tensors, filename, metadata):
        Path(filename).write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr("safetensors.torch.save_file", no_space)
    with pytest.raises(UserError, match="agent.safetensors .*No space left on device.*untouched"):
        save_agent(training.agent, training.args, str(tmp_path), "drama_xs")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file, nothing changed
    assert read_training_state(str(tmp_path), "drama_xs").global_step == 10


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A tmpfs with room for one checkpoint but not for a second next to it (needs root to mount; else skipped)."""
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    size = (tmp_path / CHECKPOINT).stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(disk)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        save_training_state(str(disk), training, "drama_xs")
        before = (disk / CHECKPOINT).read_bytes()
        training.global_step = 20
        with pytest.raises(UserError, match=r"could not write .*No space left on device.*untouched"):
            save_training_state(str(disk), training, "drama_xs")
        assert [p.name for p in disk.iterdir()] == [CHECKPOINT] and (disk / CHECKPOINT).read_bytes() == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_stale_temporary_files_are_removed_at_the_next_save(tmp_path):
    for name in ("agent.safetensors.tmp", "args.json.tmp", f"{CHECKPOINT}.tmp"):
        (tmp_path / name).write_bytes(b"x" * 1000)  # what saves killed mid-write left
    save_training_state(str(tmp_path), make_training(), "drama_xs")
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


def safetensors_temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if files.SAFETENSORS_TEMPORARY.fullmatch(path.name)]


def partly_written(folder: Path) -> list[Path]:
    """The safetensors temporaries in `folder` that hold some bytes (one may be renamed away while we look)."""
    written = []
    for path in safetensors_temporaries(folder):
        with contextlib.suppress(FileNotFoundError):
            written += [path] if path.stat().st_size > 0 else []
    return written


def kill_mid_save(folder: Path) -> None:
    """SIGKILL a process that holds `folder`'s lock and saves 128 MB there again and again, while safetensors writes
    its own hidden temporary file (tried again where the kill came before its first bytes or after the rename);
    one partly written temporary is left."""
    saving = ("import sys, torch; from utils.runs import lock_run_folder; from utils.files import atomic_save\n"
              "lock_run_folder(sys.argv[1]); print('locked', flush=True)\n"
              "big = {'x': torch.ones(2**27, dtype=torch.uint8)}\n"
              "while True: atomic_save(big, sys.argv[1] + '/agent.safetensors', {})")  # fmt: skip
    for _ in range(5):
        saver = subprocess.Popen([sys.executable, "-c", saving, str(folder)], env=ENV, stdout=subprocess.PIPE,
                                 text=True)  # fmt: skip
        assert saver.stdout.readline() == "locked\n"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not partly_written(folder):
            time.sleep(0.001)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        if partly_written(folder):
            for path in set(safetensors_temporaries(folder)) - set(partly_written(folder)):
                path.unlink()  # an empty one from a kill before the first bytes of an earlier try
            return
    raise AssertionError("no save was caught mid-write")


def test_what_a_killed_save_leaves_is_removed_by_the_next_process_that_takes_the_folder(tmp_path):
    """safetensors writes each file to a hidden `.tmp` + 6 random characters first: a SIGKILL mid-save leaves it.
    A save by a process that does not hold the folder's lock leaves it (it could be a live writer's); `--resume`,
    which takes the lock first, removes it, and the checkpoint saved before the kill resumes."""
    training = make_training(6, env_id="ALE/Pong-v5", eval_episodes=0, checkpoint_every=0, save_model=False,
                             sequence_length=8, random_steps=12)  # fmt: skip
    save_training_state(str(tmp_path), training, "drama_xs")
    kill_mid_save(tmp_path)
    (left,) = safetensors_temporaries(tmp_path)
    assert left.stat().st_size > 0
    save_training_state(str(tmp_path), training, "drama_xs")  # this process holds no lock there
    assert left.exists() and not (tmp_path / "agent.safetensors.tmp").exists()
    resumed = run(tmp_path, "--resume", str(tmp_path), "--total-timesteps", "12")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming test at step 10" in resumed.stdout and not left.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def corrupt(path: Path) -> None:
    """XOR 64 bytes in the middle of the tensor data (past the JSON header), as a bad disk sector would."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = (start + len(data)) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def test_corrupted_weights_are_detected_in_the_agent_and_the_checkpoint(tmp_path):
    training = make_training(sequence_length=8, random_steps=12)  # Args that load_agent accepts
    save_training_state(str(tmp_path), training, "drama_xs")
    save_agent(training.agent, training.args, str(tmp_path), "drama_xs")
    load_agent(str(tmp_path))
    corrupt(tmp_path / "agent.safetensors")
    with pytest.raises(UserError) as error:
        load_agent(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path / 'agent.safetensors'} is corrupted: its tensors do not match")
    corrupt(tmp_path / CHECKPOINT)
    resumed = run(tmp_path, "--resume", str(tmp_path))
    assert resumed.returncode == 2 and resumed.stderr.strip().splitlines() == [
        f"error: {tmp_path / CHECKPOINT} is corrupted: its tensors do not match the sha256 saved with them; "
        "restore it from a copy, download it again or train anew"
    ]


def test_files_without_a_checksum_still_load_with_one_warning(tmp_path, capsys):
    training = make_training(sequence_length=8, random_steps=12)
    save_agent(training.agent, training.args, str(tmp_path), "drama_xs")
    path = tmp_path / "agent.safetensors"
    metadata = {k: v for k, v in load_metadata(path).items() if k != files.CHECKSUM}
    save_file(load_file(path), path, metadata=metadata)  # as written before checksums
    capsys.readouterr()
    first, second = load_agent(str(tmp_path)).state_dict(), load_agent(str(tmp_path)).state_dict()
    saved = training.agent.state_dict()
    assert all(torch.equal(first[k], saved[k].cpu()) and torch.equal(second[k], saved[k].cpu()) for k in saved)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [f"warning: {path} has no checksum (written before checksums were added): its tensors are "
                        "not verified; saving it again adds one"]  # fmt: skip


def load_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(torch_threads=-1), "--torch-threads must be >= 0, got -1"),
        (dict(seed=-1), "--seed must be in [0, 4294966295], got -1"),
        (dict(seed=2**32), "--seed must be in [0, 4294966295], got 4294967296"),
        (dict(wm_lr=-1.0), "--wm-lr must be positive, got -1.0"),
        (dict(gamma=1.5), "--gamma must be in (0, 1], got 1.5"),
        (dict(train_ratio=float("nan")), "--train-ratio must be a finite number, got nan"),
        (dict(total_timesteps=100), "--total-timesteps 100 is shorter than --random-steps 1032"),
    ],
)
def test_flags_that_make_no_sense_are_refused_before_anything_runs(changes, message):
    with pytest.raises(UserError) as error:
        drama_xs.check_args(dataclasses.replace(drama_xs.Args(), **changes))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_bad_flag_is_one_line_from_the_command_line(tmp_path):
    result = run(tmp_path, "--seed", "-1")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --seed must be in [0, 4294966295], got -1: a seed such as 1"
    ]
    assert not (tmp_path / "runs").exists()  # refused before any folder was made


def test_saved_settings_of_the_wrong_type_are_refused_on_resume(tmp_path):
    training = make_training()
    save_training_state(str(tmp_path), training, "drama_xs")
    saved = read_training_state(str(tmp_path), "drama_xs")
    saved.args["d_model"] = "big"
    with pytest.raises(UserError, match=r"checkpoint.safetensors: 'd_model' is \"big\", but Args.d_model needs an "):
        runs.resume_args(drama_xs.Args(resume=str(tmp_path)), saved)


def test_checksum_is_over_names_dtypes_shapes_and_bytes():
    tensors = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    digest = files.tensor_checksum(tensors)
    assert files.tensor_checksum(dict(reversed(tensors.items()))) == digest  # in name order
    assert files.tensor_checksum({**tensors, "a": tensors["a"].reshape(2, 3)}) != digest
    assert files.tensor_checksum({**tensors, "a": tensors["a"].view(torch.int32)}) != digest
    assert files.tensor_checksum({"c": tensors["a"], "b": tensors["b"]}) != digest
    changed = tensors["a"].clone()
    changed[3] = 3.0000002
    assert files.tensor_checksum({**tensors, "a": changed}) != digest


def test_a_save_interrupted_by_ctrl_c_removes_its_temporary_file(tmp_path):
    def interrupted(temporary: str) -> None:
        Path(temporary).write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(str(tmp_path / CHECKPOINT), interrupted, 10)
    assert list(tmp_path.iterdir()) == []
