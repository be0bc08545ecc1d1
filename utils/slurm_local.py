"""A single-node Slurm cluster on this machine, for the tests of `utils.sweep` and to try a sweep on Slurm.

    python -m utils.slurm_local start /tmp/slurm     # as root: munged, slurmctld and slurmd, config in /tmp/slurm
    export SLURM_CONF=/tmp/slurm/slurm.conf          # then sbatch, squeue, scontrol, utils.sweep use it
    python -m utils.slurm_local stop /tmp/slurm      # cancels its jobs, stops the daemons

Debian's `slurm-wlm` (22.05) and `munge`, installed with apt-get where missing. Everything the daemons write (a
fresh munge key, the configuration, state, spool, logs, pid files, the munge socket) is in the folder; the daemons
listen on free ports of localhost. One partition, `debug`, with one node of `CPUS` CPUs, no accounting (sacct says
so). Process tracking by /proc (`proctrack/linuxproc`, `task/none`): no cgroups needed. Shorter than Slurm's
defaults: `SlurmdTimeout` (10 s: a dead slurmd shows as a node failure within half a minute) and the credentials'
lifetime (`cred_expire`, 10 s: a requeued job may start again after 11 s instead of 121 s), and the scheduler's
intervals (5 s instead of 60 s and 30 s: a requeued job does start then).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from utils import UserError, command_parser, run_cli

PACKAGES = ("munge", "slurm-wlm")  # slurm-wlm: slurmctld, slurmd and the client commands (sbatch, squeue, ...)
DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in the reverse one
CPUS = 2
PARTITION = "debug"
SLURMD_TIMEOUT_S = 10
CRED_EXPIRE_S = 10  # a requeued job waits this long (+1 s) before it may start again (default: 120 s)


def why_not_here() -> str | None:
    """Why a cluster cannot start on this machine (one line), or None where it can."""
    if sys.platform != "linux":
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as their users)"
    missing = [p for p in ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd") if not os.path.exists(p)]
    if missing and shutil.which("apt-get") is None:
        return f"no {', '.join(os.path.basename(p) for p in missing)} and no apt-get to install {' '.join(PACKAGES)}"
    running = [name for name in ("slurmctld", "slurmd") if pids_named(name)]
    if running:
        return f"another Slurm is running on this machine ({', '.join(running)}): stop it first"
    return None


def pids_named(name: str) -> list[int]:
    """The processes whose executable is named `name` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def install_packages() -> None:
    """apt-get install munge and slurm-wlm where their daemons are missing."""
    if all(os.path.exists(f"/usr/sbin/{daemon}") for daemon in DAEMONS):
        return
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"{' '.join(command)} failed: {last_line(done.stderr or done.stdout)}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path, host: str) -> str:
    """The cluster's slurm.conf: one node (this machine, as `host`), one partition, files in `folder`."""
    return f"""\
ClusterName=drama-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder / "munge.socket"},cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout={SLURMD_TIMEOUT_S}
MinJobAge=300
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A single-node Slurm cluster whose configuration, state and logs are in `folder`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).resolve()
        self.conf = self.folder / "slurm.conf"

    @property
    def environment(self) -> dict[str, str]:
        """This process's environment with SLURM_CONF naming this cluster (for sbatch, squeue, scontrol, ...)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> None:
        """Install the packages where missing, write the configuration, start the daemons, wait for an idle node."""
        why = why_not_here()
        if why:
            raise UserError(why)
        install_packages()
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)  # munged refuses a key in a folder others can write
        key = self.folder / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.folder, socket.gethostname().split(".")[0]))
        (self.folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        self.start_daemon("munged")
        self.start_daemon("slurmctld")
        self.start_daemon("slurmd")
        self.wait_for_node(timeout_s)

    def daemon_command(self, name: str) -> list[str]:
        if name == "munged":
            f = self.folder
            return ["/usr/sbin/munged", f"--socket={f / 'munge.socket'}", f"--key-file={f / 'munge.key'}",
                    f"--pid-file={f / 'munged.pid'}", f"--log-file={f / 'munged.log'}",
                    f"--seed-file={f / 'munged.seed'}", "--force"]  # fmt: skip
        return [f"/usr/sbin/{name}", "-f", str(self.conf)]

    def start_daemon(self, name: str) -> None:
        """Start one daemon (it forks into the background and writes its pid file); one line where it fails."""
        done = subprocess.run(self.daemon_command(name), env=self.environment, capture_output=True, text=True)
        if done.returncode != 0:
            log = self.folder / f"{name}.log"
            why = last_line(log.read_text(errors="replace")) if log.exists() else last_line(done.stderr)
            raise UserError(f"{name} did not start: {why} (log: {log})")

    def pid(self, name: str) -> int | None:
        """The pid of a running daemon of this cluster, or None."""
        try:
            pid = int((self.folder / f"{name}.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.environment, capture_output=True, text=True).stdout

    def node_state(self) -> str:
        """The node's state as sinfo prints it: idle, mixed, allocated, down*, ... ('' while slurmctld is down)."""
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.environment, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    def wait_for_node(self, timeout_s: float, states: tuple[str, ...] = ("idle",)) -> None:
        """Wait until the node is in one of `states` (sinfo's short names: idle, mix, alloc)."""
        deadline = time.time() + timeout_s
        while self.node_state() not in states:
            if time.time() > deadline:
                raise UserError(f"the node is not {' or '.join(states)} after {timeout_s:.0f} s (state "
                                f"'{self.node_state()}'): see {self.folder / 'slurmctld.log'} and "
                                f"{self.folder / 'slurmd.log'}")  # fmt: skip
            time.sleep(0.5)

    def restart_slurmd(self, timeout_s: float = 60) -> None:
        """Start slurmd again (after `kill_slurmd`) and wait until the node serves jobs."""
        self.start_daemon("slurmd")
        self.wait_for_node(timeout_s, ("idle", "mix", "alloc"))

    def kill_slurmd(self) -> None:
        """Kill slurmd and the job steps it started (slurmstepd and their processes), as a node crash would."""
        pid = self.pid("slurmd")
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10)
        for step in pids_named("slurmstepd"):
            for process in [step, *descendants(step)]:
                try:
                    os.kill(process, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)."""
        if self.pid("slurmctld") is not None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.environment, capture_output=True)
            deadline = time.time() + 30
            while time.time() < deadline and self.squeue():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            pid = self.pid(name)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                if not wait_gone(pid, 20):
                    os.kill(pid, signal.SIGKILL)
                    wait_gone(pid, 5)

    def squeue(self) -> str:
        done = subprocess.run(["squeue", "-h"], env=self.environment, capture_output=True, text=True)
        return done.stdout.strip()


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until the process `pid` has ended; whether it did within the time."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser, commands = command_parser("python -m utils.slurm_local", "A single-node Slurm cluster on this machine")
    for name, help in [("start", "install (apt-get) where needed, configure and start munged, slurmctld, slurmd"),
                       ("stop", "cancel the cluster's jobs and stop its daemons")]:  # fmt: skip
        commands.add_parser(name, help=help).add_argument("folder", help="the cluster's configuration, state and logs")
    args = parser.parse_args(argv)

    def command() -> None:
        cluster = LocalSlurm(args.folder)
        if args.command == "stop":
            cluster.stop()
            print(f"stopped the Slurm cluster of {cluster.folder}")
            return
        started = time.time()
        cluster.start()
        print(f"Slurm is up in {time.time() - started:.0f} s: node {socket.gethostname().split('.')[0]}, partition "
              f"{PARTITION}, {CPUS} CPUs. Use it with: export SLURM_CONF={cluster.conf}")  # fmt: skip

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
