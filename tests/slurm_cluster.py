"""A SLURM cluster of one node or several in a temporary folder, for tests that submit the real batch templates.

munged (its own socket and key), slurmctld and slurmd run from a slurm.conf written under ``root``
with free ports, so the cluster touches nothing outside that folder and several can coexist on a
machine. ``start`` waits until ``sinfo`` reports every node idle; anything that keeps it from getting
there raises ``ClusterError`` naming the failed piece and its log. ``stop`` ends every daemon it
started. Needs Debian's slurm-wlm and munge (launch/install.sh installs them) and root, since
slurmd starts jobs as their submitting user.

One node (``nodes=1``) is this machine under its own name at 127.0.0.1. Several (``nodes=2``: n1, n2)
follow ../shared/multinode.md: node i's slurmd runs in its own UTS + mount namespace (hostname n<i>,
its own TmpFS, an /etc/hosts naming the nodes, name lookups kept to that file) on the machine's
network stack at the loopback address 127.0.0.(i+1), and a TaskProlog keeps Open MPI, Gloo and NCCL
on the loopback interface. Nothing leaves loopback: no address, interface or route is added.
``kill_node`` ends every process of a node at once (a node crash) and ``restart_node`` brings it
back cleaned like a rebooted node.
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

FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
LOOPBACK_VARIABLES = (
    "OMPI_MCA_btl_tcp_if_include",
    "OMPI_MCA_oob_tcp_if_include",
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
)
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
    raise ClusterError(
        f"SLURM test cluster: '{name}' not found; install slurm-wlm and munge "
        "(make install / launch/install.sh does, as root)"
    )


class SlurmCluster:
    def __init__(
        self,
        root: Path,
        cpus: int | None = None,
        nodes: int = 1,
        slurmd_timeout: int = 10,
        kill_wait: int = 10,
        cred_expire: int = 10,
        message_timeout: int = 10,
    ):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        # One node: this machine by its name. Several: n1, n2, ... at 127.0.0.2, 127.0.0.3, ...
        self.nodes = [self.host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
        self.node = self.nodes[0]
        # Seconds: a silent node is down after slurmd_timeout (noticed in about 2.5 x message_timeout:
        # 27 s at 10, 10 s at 3); a cancelled step's tasks get SIGKILL kill_wait after SIGTERM; a
        # requeued job starts again once its credential expires (cred_expire).
        self.slurmd_timeout, self.kill_wait, self.cred_expire = slurmd_timeout, kill_wait, cred_expire
        self.message_timeout = message_timeout
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        munge = self.munge_socket.parent  # munged's own folder: socket, log, pid, seed (owned by munge)
        self.logs = {"munged": munge / "munged.log", "slurmctld": self.root / "log" / "slurmctld.log"}
        self._pid_files = {"munged": munge / "munged.pid", "slurmctld": self.root / "run" / "slurmctld.pid"}
        for node in self.nodes:
            self.logs[node] = self.root / "log" / f"slurmd-{node}.log"
            self._pid_files[node] = self.root / "run" / f"slurmd-{node}.pid"
        self._namespaces: dict[str, str] = {}  # node -> its UTS namespace ("uts:[inode]"), several nodes only

    @property
    def multinode(self) -> bool:
        return len(self.nodes) > 1

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM client commands (sbatch, squeue, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- start / stop ---------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        if os.geteuid() != 0:
            raise ClusterError(
                "SLURM test cluster: needs root (slurmd starts jobs as their user; munged runs as munge)"
            )
        self._programs = {name: _program(name) for name in PROGRAMS}
        for folder in ("munge", "log", "run", "spool/ctld", "tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munged(self._programs)
            self._write_conf()
            self._run_daemon("slurmctld", [self._programs["slurmctld"], "-f", str(self.conf)])
            for node in self.nodes:
                self._start_slurmd(node)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_slurmd(self, node: str) -> None:
        """slurmd of ``node``; with several nodes in fresh UTS + mount namespaces, cleaned like a rebooted
        node first (a killed slurmstepd leaves pmix sockets and folders that make a requeued job's
        launch fail there: "Cannot bind() UNIX socket ... Address already in use")."""
        spool = self.root / "spool" / node
        for leftover in spool.glob("*") if spool.exists() else ():
            if leftover.is_socket() or leftover.name.startswith("pmix."):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        tmp = self.root / node / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in (spool, tmp):
            folder.mkdir(parents=True, exist_ok=True)
        slurmd = [self._programs["slurmd"], "-f", str(self.conf), "-N", node]
        if not self.multinode:
            self._run_daemon(node, slurmd)
            return
        r = self.root
        setup = [f"hostname {node}", f"mount --bind {r}/hosts /etc/hosts", f"mount --bind {tmp} {r}/tmp"]
        # Name lookups stay in the hosts file: without this, torch's c10d store asks the machine's DNS
        # server for the names of ::ffff:127.0.0.x peers (../shared/multinode.md).
        setup += [
            f"mount --bind {r}/{name} /etc/{name}"
            for name in ("nsswitch.conf", "resolv.conf")
            if Path("/etc", name).exists()
        ]
        self._run_daemon(
            node,
            [
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                " && ".join([*setup, "exec " + " ".join(slurmd)]),
            ],
        )
        self._namespaces[node] = os.readlink(f"/proc/{self._pid(node)}/ns/uts")

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
        self._run_daemon(
            "munged",
            [
                "runuser",
                "-u",
                "munge",
                "--",
                programs["munged"],
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={self.logs['munged']}",
                f"--pid-file={self._pid_files['munged']}",
                f"--seed-file={folder / 'seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"SLURM test cluster: munged did not open {self.munge_socket}; "
                    f"see {self.logs['munged']}:\n{self._tail('munged')}"
                )
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        if self.multinode:
            addresses = {node: f"127.0.0.{i + 2}" for i, node in enumerate(self.nodes)}
            (r / "hosts").write_text(
                Path("/etc/hosts").read_text() + "".join(f"{a} {n}\n" for n, a in addresses.items())
            )
            nsswitch = [line for line in _read("/etc/nsswitch.conf").splitlines() if not line.startswith("hosts:")]
            (r / "nsswitch.conf").write_text("\n".join([*nsswitch, "hosts: files"]) + "\n")
            (r / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            # "export X=Y" lines a TaskProlog prints land in every task's environment. Open MPI's TCP
            # transport leaves out 127.0.0.0/8 by default and would take the machine's own interface.
            prolog = r / "taskprolog.sh"
            prolog.write_text(
                "#!/bin/sh\n"
                + "".join(f'[ -n "${{{name}:-}}" ] || echo "export {name}=lo"\n' for name in LOOPBACK_VARIABLES)
            )
            prolog.chmod(0o755)
            per_node = f"TmpFS={r}/tmp\nTaskProlog={prolog}\n"
        else:
            addresses, per_node = {self.node: "127.0.0.1"}, ""
        nodes = "".join(
            f"NodeName={node} NodeAddr={addresses[node]} Port={port} CPUs={self.cpus} State=UNKNOWN\n"
            for node, port in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=dali-ba-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/spool/ctld
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={self.logs["slurmctld"]}
SlurmdLogFile={r}/log/slurmd-%n.log
{per_node}ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=600
ReturnToService=2
{"SlurmdParameters=config_overrides" + chr(10) if self.cpus > (os.cpu_count() or 1) else ""}SlurmdTimeout={self.slurmd_timeout}
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait={self.kill_wait}
MessageTimeout={self.message_timeout}
InactiveLimit=0
{nodes}PartitionName=test Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe={"YES" if self.multinode else "NO"}
""")  # noqa: E501 - slurm.conf takes one setting a line

    def _run_daemon(self, name: str, command: list[str]) -> None:
        """Start a daemon (it forks itself) and check that it is alive and wrote its pid file."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
        if done.returncode != 0:
            raise ClusterError(
                f"SLURM test cluster: {name} failed to start (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}; see {self.logs[name]}:\n{self._tail(name)}"
            )
        deadline = time.monotonic() + 10
        while self._pid(name) is None:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"SLURM test cluster: {name} did not stay up; see {self.logs[name]}:\n{self._tail(name)}"
                )
            time.sleep(0.1)

    def _wait_idle(self, timeout: float, nodes: list[str] | None = None) -> None:
        nodes = nodes or self.nodes
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name in ("slurmctld", *nodes):
                if self._pid(name) is None:
                    raise ClusterError(
                        f"SLURM test cluster: {_daemon(name)} stopped; see {self.logs[name]}:\n{self._tail(name)}"
                    )
            done = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %T %E"], capture_output=True, text=True, env=self.env, timeout=10
            )
            states = {line.split()[0]: " ".join(line.split()[1:]) for line in done.stdout.splitlines() if line.strip()}
            if all(states.get(node, "").split()[:1] == ["idle"] for node in nodes):
                return
            if any(states.get(node, "").split()[:1] in (["inval"], ["drain"], ["drained"]) for node in nodes):
                break  # slurmctld refused the node: waiting will not help
            time.sleep(0.3)
        logs = "\n".join(f"and {self.logs[n]}:\n{self._tail(n, 6)}" for n in nodes)
        raise ClusterError(
            f"SLURM test cluster: nodes {', '.join(nodes)} not idle (sinfo state and reason: "
            f"{states!r}); see {self.logs['slurmctld']}:\n{self._tail('slurmctld', 6)}\n{logs}"
        )

    def stop(self) -> None:
        """Cancel every job and wait (briefly) for it to go, end slurmd, slurmctld and munged, then end any
        process still carrying this cluster's SLURM_CONF (job steps outlive a killed slurmd)."""
        if self._pid("slurmctld") is not None:
            subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                done = subprocess.run(
                    ["squeue", "-h", "-t", "all"], capture_output=True, text=True, env=self.env, timeout=10
                )
                if done.returncode or not any(state in done.stdout for state in (" R ", " CG ", " PD ")):
                    break
                time.sleep(0.3)
        for name in (*self.nodes, "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is not None:
                _end([pid])
            self._pid_files[name].unlink(missing_ok=True)
        _end(self._leftovers() + [pid for node in self._namespaces for pid in self._node_processes(node)])
        self._namespaces.clear()

    # -- nodes (several-node clusters) ------------------------------------------------------------
    def kill_node(self, node: str) -> None:
        """A node crash: SIGKILL to every process of ``node`` (slurmd, slurmstepd, the job's tasks)."""
        for pid in self._node_processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart_node(self, node: str, timeout: float = 30) -> None:
        """Bring ``node`` back after ``kill_node``, cleaned like a rebooted node, and wait until it is idle."""
        self.kill_node(node)
        self._start_slurmd(node)
        self._wait_idle(timeout, [node])

    def on_node(self, node: str, *command: str, **kwargs) -> subprocess.CompletedProcess:
        """Run ``command`` inside ``node``'s namespaces (its hostname, mounts and hosts file)."""
        return subprocess.run(
            ["nsenter", "-t", str(self._pid(node)), "--uts", "--mount", "--", *command],
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )

    def task_processes(self, job_id: str, command: str = "") -> dict[int, str]:
        """Live processes started by job ``job_id``'s steps (SLURM_JOB_ID and SLURM_STEP_ID in their
        environment: tasks and their children, not srun) whose command line holds ``command``:
        pid -> node (by UTS namespace; one node: its name)."""
        job, nodes = f"\0SLURM_JOB_ID={job_id}\0".encode(), {ns: node for node, ns in self._namespaces.items()}
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    environ = b"\0" + (entry / "environ").read_bytes()
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if (
                        job in environ
                        and b"\0SLURM_STEP_ID=" in environ
                        and command in cmdline
                        and _alive(int(entry.name))
                    ):
                        found[int(entry.name)] = nodes.get(os.readlink(entry / "ns" / "uts"), self.node)
        return found

    def _node_processes(self, node: str) -> list[int]:
        """Processes in ``node``'s UTS namespace (as recorded when its slurmd started)."""
        namespace = self._namespaces.get(node)
        found = []
        for entry in Path("/proc").iterdir() if namespace else ():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "ns" / "uts") == namespace:
                        found.append(int(entry.name))
        return found

    def keep_logs(self, destination: Path) -> Path:
        """Copy the daemons' logs and the jobs' output files to ``destination`` (for a failed run)."""
        destination.mkdir(parents=True, exist_ok=True)
        for path in [*self.logs.values(), *self.root.glob("*.out"), *self.root.glob("log/*")]:
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
            raise ClusterError(
                f"SLURM test cluster: {what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}"
            )
        return done

    # -- jobs -----------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id (for an array, the array job id)."""
        done = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=cwd,
            timeout=60,
        )
        if done.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` fields of the job (one dict per array task); [] once forgotten."""
        done = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, env=self.env, timeout=30
        )
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
        raise ClusterError(
            f"job {job_id} not done after {timeout:.0f}s: {states}; slurmd log {self.logs[self.node]}:\n"
            f"{self._tail(self.node)}"
        )


def _daemon(name: str) -> str:
    return name if name in ("munged", "slurmctld") else f"slurmd of {name}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


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
