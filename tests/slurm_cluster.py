"""A one-node SLURM cluster in a temporary folder, for tests that submit the real batch templates.

munged (its own socket and key), slurmctld and slurmd run from a slurm.conf written under ``root``
with free ports, so the cluster touches nothing outside that folder and several can coexist on a
machine. ``start`` waits until ``sinfo`` reports the node idle; anything that keeps it from getting
there raises ``ClusterError`` naming the failed piece and its log. ``stop`` ends every daemon it
started. Needs Debian's slurm-wlm and munge (launch/install.sh installs them) and root, since
slurmd starts jobs as their submitting user.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")


class ClusterError(RuntimeError):
    """The test cluster could not start or answer; the message names what failed and where its log is."""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _program(name: str) -> str:
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/usr/bin", "/sbin"]:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ClusterError(f"SLURM test cluster: '{name}' not found; install slurm-wlm and munge "
                       "(make install / launch/install.sh does, as root)")


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        munge = self.munge_socket.parent  # munged's own folder: socket, log, pid, seed (owned by munge)
        self.logs = {"munged": munge / "munged.log", "slurmctld": self.root / "log" / "slurmctld.log",
                     "slurmd": self.root / "log" / "slurmd.log"}
        self._pid_files = {"munged": munge / "munged.pid", "slurmctld": self.root / "run" / "slurmctld.pid",
                           "slurmd": self.root / "run" / "slurmd.pid"}

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM client commands (sbatch, squeue, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- start / stop ---------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        if os.geteuid() != 0:
            raise ClusterError("SLURM test cluster: needs root (slurmd starts jobs as their user; munged runs as munge)")
        programs = {name: _program(name) for name in PROGRAMS}
        for folder in ("munge", "log", "run", "spool/ctld", "spool/d"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munged(programs)
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                self._run_daemon(daemon, [programs[daemon], "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munged(self, programs: dict[str, str]) -> None:
        """munged as user munge with its own socket; the machine's key, created if the package made none."""
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            self._check([programs["mungekey"], "--create", "--keyfile", str(key)], "mungekey")
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        folder = self.munge_socket.parent
        shutil.chown(folder, "munge", "munge")
        folder.chmod(0o755)
        self._run_daemon("munged", ["runuser", "-u", "munge", "--", programs["munged"], f"--socket={self.munge_socket}",
                                    f"--key-file={key}", f"--log-file={self.logs['munged']}",
                                    f"--pid-file={self._pid_files['munged']}", f"--seed-file={folder / 'seed'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise ClusterError(f"SLURM test cluster: munged did not open {self.munge_socket}; "
                                   f"see {self.logs['munged']}:\n{self._tail('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, d_port = _free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=dali-ba-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/spool/ctld
SlurmdSpoolDir={r}/spool/d
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={self.logs['slurmctld']}
SlurmdLogFile={self.logs['slurmd']}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=10
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _run_daemon(self, name: str, command: list[str]) -> None:
        """Start a daemon (it forks itself) and check that it is alive and wrote its pid file."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
        if done.returncode != 0:
            raise ClusterError(f"SLURM test cluster: {name} failed to start (exit {done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-500:]}; see {self.logs[name]}:\n{self._tail(name)}")
        deadline = time.monotonic() + 10
        while self._pid(name) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"SLURM test cluster: {name} did not stay up; see {self.logs[name]}:\n{self._tail(name)}")
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if self._pid(name) is None:
                    raise ClusterError(f"SLURM test cluster: {name} stopped; see {self.logs[name]}:\n{self._tail(name)}")
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T %E"], capture_output=True, text=True, env=self.env, timeout=10)
            state = done.stdout.strip() or done.stderr.strip()
            if state.split()[:1] == ["idle"]:
                return
            if state.split()[:1] in (["inval"], ["drain"], ["drained"]):
                break  # slurmctld refused the node: waiting will not help
            time.sleep(0.3)
        raise ClusterError(f"SLURM test cluster: node {self.node} not idle (sinfo state and reason: "
                           f"{state!r}); see {self.logs['slurmctld']}:\n{self._tail('slurmctld', 6)}\n"
                           f"and {self.logs['slurmd']}:\n{self._tail('slurmd', 6)}")

    def stop(self) -> None:
        """Cancel every job and wait (briefly) for it to go, end slurmd, slurmctld and munged, then end any
        process still carrying this cluster's SLURM_CONF (job steps outlive a killed slurmd)."""
        if self._pid("slurmctld") is not None:
            subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                done = subprocess.run(["squeue", "-h", "-t", "all"], capture_output=True, text=True, env=self.env, timeout=10)
                if done.returncode or not any(state in done.stdout for state in (" R ", " CG ", " PD ")):
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is not None:
                _end([pid])
            self._pid_files[name].unlink(missing_ok=True)
        _end(self._leftovers())

    def keep_logs(self, destination: Path) -> Path:
        """Copy the daemons' logs and the jobs' output files to ``destination`` (for a failed run)."""
        destination.mkdir(parents=True, exist_ok=True)
        for path in [*self.logs.values(), *self.root.glob("*.out")]:
            if path.is_file():
                shutil.copy2(path, destination / path.name)
        return destination

    def _leftovers(self) -> list[int]:
        """Processes (slurmstepd, job tasks) whose environment names this cluster's slurm.conf."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def _pid(self, name: str) -> int | None:
        """The daemon's pid if its pid file names a live process."""
        try:
            pid = int(self._pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def _tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check(self, command: list[str], what: str) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"SLURM test cluster: {what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
        return done

    # -- jobs -----------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id (for an array, the array job id)."""
        done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` fields of the job (one dict per array task); [] once forgotten."""
        done = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                              env=self.env, timeout=30)
        if done.returncode != 0:
            return []
        return [dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, until=None) -> list[dict[str, str]]:
        """Poll until every task of the job has finished (or ``until(tasks)`` is true); returns its tasks."""
        deadline = time.monotonic() + timeout
        tasks: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            tasks = self.job(job_id)
            if tasks and (until(tasks) if until else all(t["JobState"] in FINISHED for t in tasks)):
                return tasks
            time.sleep(0.5)
        states = ", ".join(f"{t.get('JobId')}={t.get('JobState')} ({t.get('Reason')})" for t in tasks) or "unknown"
        raise ClusterError(f"job {job_id} not done after {timeout:.0f}s: {states}; slurmd log {self.logs['slurmd']}:\n"
                           f"{self._tail('slurmd')}")


def _end(pids: list[int], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
