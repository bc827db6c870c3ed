"""A throw-away Slurm cluster of N nodes on this one machine, for integration tests.

Installs Debian's slurm-wlm + munge when ``slurmctld`` is missing (root only), writes a
slurm.conf for this host into a private directory (``/etc/slurm`` is left alone; clients
find the file through ``SLURM_CONF``), starts munged, slurmctld and one slurmd per node by
hand (no systemd needed) and stops them again.

Node ``nI`` (I = 1..N) is a slurmd on loopback address 127.0.0.(I+1) with its own port,
started as ``slurmd -N nI`` inside its own mount namespace (``unshare -m``) in which a
private folder is bind-mounted over ``SlurmdSpoolDir``: the daemons share the host's
filesystem (like nodes sharing an NFS home) but not their spool, pid file or job state.
Every daemon is stopped by its PID.

Use it from pytest through the session fixture ``slurm_cluster`` (import it into the
test module), or by hand::

    python tests/slurm_cluster.py start    # prints "export SLURM_CONF=..."
    python tests/slurm_cluster.py stop

Outside CI (env ``CI`` unset or false) a machine where Slurm cannot be installed makes the
tests skip with the reason; under ``CI=true`` they fail instead, so a broken CI image is
never mistaken for a green run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_BASE = Path(os.environ.get("HNCSE_SLURM_TEST_DIR", "/tmp/hncse-test-slurm"))
MUNGE_SOCKET_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_SOCKET_DIR / "munged.pid"
DEFAULT_NODES = int(os.environ.get("HNCSE_SLURM_TEST_NODES", "2"))
# Ports: slurmctld, then one per node. Another port base lets a second cluster run beside.
PORT_BASE = int(os.environ.get("HNCSE_SLURM_PORT_BASE", "16817"))
# Finished jobs must stay visible to `scontrol show job` (there is no accounting database).
MIN_JOB_AGE_S = 3600
CRED_EXPIRE_S = int(os.environ.get("HNCSE_SLURM_CRED_EXPIRE", "5"))
# Slurm states in which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
     "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
)


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def _run(cmd: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise SlurmUnavailable(
            f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def slurm_installed() -> bool:
    return all(_which(b) for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"))


def install_slurm() -> None:
    """apt-get install slurm-wlm + munge, without letting dpkg start the daemons."""
    if slurm_installed():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not _which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    # policy-rc.d exiting 101 tells invoke-rc.d "not allowed": the packages install without
    # trying to start services (there is no systemd here anyway).
    policy = Path("/usr/sbin/policy-rc.d")
    wrote_policy = not policy.exists()
    if wrote_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "update", "-qq"], timeout=300, env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
             timeout=600, env=env)
    finally:
        if wrote_policy:
            policy.unlink(missing_ok=True)
    if not slurm_installed():
        raise SlurmUnavailable("apt-get install finished but slurmctld/slurmd/sbatch are missing")


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(1, int(line.split()[1]) // 1024 - 1024)
    return 1024


def detect_node_hardware(fallback_cpus: int) -> tuple[int, str]:
    """(CPUs, topology) as slurmd itself sees this machine (`slurmd -C`), so the node never
    comes up drained for claiming more sockets/cores/threads than it has."""
    slurmd = _which("slurmd")
    proc = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30) if slurmd else None
    line = proc.stdout.splitlines()[0] if proc and proc.returncode == 0 and proc.stdout else ""
    fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    keys = ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    if "CPUs" not in fields:
        return fallback_cpus, ""
    return int(fields["CPUs"]), " ".join(f"{k}={fields[k]}" for k in keys if k in fields)


def node_names(nodes: int) -> list[str]:
    return [f"n{i}" for i in range(1, nodes + 1)]


def node_addr(index: int) -> str:
    """Loopback address of node n<index+1> (127.0.0.2, 127.0.0.3, ...)."""
    return f"127.0.0.{index + 2}"


def slurm_conf_text(base: Path, hostname: str, cpus: int, mem_mb: int, topology: str = "",
                    nodes: int = 1, proctrack: str = "linuxproc") -> str:
    names = node_names(nodes)
    node_lines = "\n".join(
        f"NodeName={name} NodeAddr={node_addr(i)} NodeHostname={hostname} Port={PORT_BASE + 1 + i} "
        f"CPUs={cpus} {topology} RealMemory={mem_mb} State=UNKNOWN"
        for i, name in enumerate(names))
    return f"""\
# Written by tests/slurm_cluster.py: {nodes}-node test cluster on one machine. Safe to delete.
ClusterName=hncsetest
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (BeginTime = requeue time + cred_expire + 1; default 120 s). Short for fast tests.
AuthInfo=cred_expire={CRED_EXPIRE_S}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={PORT_BASE}
StateSaveLocation={base}/state
# Each slurmd sees its own private folder here (bind mount in its own mount namespace).
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/spool/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/{proctrack}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule pending work (e.g. a requeued job whose BeginTime just passed) every second
# instead of every minute.
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
MinJobAge={MIN_JOB_AGE_S}
KillWait=10
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=300
{node_lines}
PartitionName=debug Nodes={",".join(names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints Key=Value pairs; values may contain spaces
    (Command=..., WorkDir=...), so split at ' Key=' boundaries."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z:/_]+)=(.*?)(?=\s[A-Za-z:/_]+=|$)", line.strip()):
        out[m.group(1)] = m.group(2)
    return out


@dataclass
class SlurmCluster:
    """Handle on a running cluster of ``nodes`` nodes (see module docstring)."""

    base: Path = DEFAULT_BASE
    nodes: int = DEFAULT_NODES
    proctrack: str = "linuxproc"  # ProctrackType=proctrack/<this>
    hostname: str = field(default_factory=socket.gethostname)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    started_munge: bool = False
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _lock: object = None

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return node_names(self.nodes)

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands and for jobs (sbatch exports it)."""
        return dict(os.environ, SLURM_CONF=str(self.conf),
                    PATH=os.environ.get("PATH", "") + ":" + SBIN_PATH)

    def node_spool(self, name: str) -> Path:
        return self.base / f"spool-{name}"

    def _pid_files(self) -> list[Path]:
        return [self.base / "slurmctld.pid"] + [self.node_spool(n) / "slurmd.pid" for n in self.node_names]

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0, lock_timeout: float = 900.0) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd needs root")
        if not _which("unshare"):
            raise SlurmUnavailable("unshare (util-linux) is needed to give each slurmd its own spool")
        install_slurm()
        self._acquire_lock(lock_timeout)
        self._stop_stale_daemons()
        shutil.rmtree(self.base, ignore_errors=True)
        for sub in ("state", "spool", "log", *(f"spool-{n}" for n in self.node_names)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.cpus, self._topology = detect_node_hardware(self.cpus)
        self._write_conf()
        self._start_munge()
        # -D: stay in the foreground so the process is ours to stop; -i: no old state.
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            self.start_node(name, wait=False)
        self.wait_nodes_idle(timeout)
        return self

    def _write_conf(self) -> None:
        self.conf.write_text(slurm_conf_text(self.base, self.hostname, self.cpus, _mem_mb(),
                                             getattr(self, "_topology", ""), self.nodes, self.proctrack))

    def _spawn(self, key: str, args: list[str]) -> None:
        log = open(self.base / "log" / "daemons.out", "ab")
        self._procs[key] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start_node(self, name: str, wait: bool = True, timeout: float = 30.0) -> None:
        """slurmd -N NAME in its own mount namespace, its private spool bind-mounted over
        SlurmdSpoolDir (util-linux unshare makes the new namespace's mounts private). exec
        keeps the PID: the Popen's pid is slurmd's own."""
        spool = self.base / "spool"
        script = (f"mount --bind {shlex.quote(str(self.node_spool(name)))} {shlex.quote(str(spool))} && "
                  f"exec {shlex.quote(_which('slurmd'))} -D -c -f {shlex.quote(str(self.conf))} -N {name}")
        self._spawn(f"slurmd:{name}", [_which("unshare"), "-m", "sh", "-c", script])
        if wait:
            self.wait_nodes_idle(timeout, names=[name])

    def stop_node(self, name: str, timeout: float = 10.0) -> None:
        """Stop one node's slurmd (by PID); the controller still believes the node is up."""
        proc = self._procs.pop(f"slurmd:{name}", None)
        pid = proc.pid if proc else _read_pid(self.node_spool(name) / "slurmd.pid")
        if pid:
            _stop_pid(pid, timeout)
        if proc:
            proc.wait(timeout=timeout)

    def reconfigure(self, proctrack: str, timeout: float = 30.0) -> None:
        """Restart every daemon with another ProctrackType (slurmd reads it only at start)."""
        self._stop_daemons()
        self.proctrack = proctrack
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            self.start_node(name, wait=False)
        self.wait_nodes_idle(timeout)

    def resume_nodes(self, timeout: float = 30.0) -> None:
        """Bring nodes that a test let fail (DOWN/DRAIN) back to idle."""
        self.command("scontrol", "update", f"NodeName={','.join(self.node_names)}", "State=RESUME",
                     check=False)
        self.wait_nodes_idle(timeout)

    def _cancel_jobs(self, timeout: float = 20.0) -> None:
        """Jobs still running when the cluster stops would leave their slurmstepd and
        ranks behind: cancel them and wait (bounded) until they are gone."""
        try:
            ids = self.command("squeue", "-h", "-o", "%i", check=False, timeout=10).split()
            if ids:
                self.command("scancel", *ids, check=False, timeout=10)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.command(
                        "squeue", "-h", "-o", "%i", check=False, timeout=10).split():
                    time.sleep(0.5)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def _stop_daemons(self) -> None:
        if self._procs or any(p.exists() for p in self._pid_files()):
            self._cancel_jobs()
        if self.conf.exists() and _which("scontrol"):
            try:
                subprocess.run([_which("scontrol"), "shutdown"], env=self.env,
                               capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for proc in self._procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _stop_pid(proc.pid)
                proc.wait(timeout=10)
        self._procs.clear()
        for pid_file in self._pid_files():  # started by another process (CLI)
            pid = _read_pid(pid_file)
            if pid:
                _stop_pid(pid)
            pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop_daemons()
        if self.started_munge or (self.base / "munge-started").exists():
            pid = _read_pid(MUNGE_PID_FILE)
            if pid:
                _stop_pid(pid)
            (self.base / "munge-started").unlink(missing_ok=True)
            self.started_munge = False
        self._release_lock()

    def _acquire_lock(self, timeout: float) -> None:
        """One cluster per machine (fixed ports): a second test session waits for the first."""
        import fcntl

        if self._lock is not None:
            return
        self.base.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{self.base}.lock", "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = lock
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise SlurmUnavailable(f"another session holds {self.base}.lock for > {timeout} s")
                time.sleep(1)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    def _stop_stale_daemons(self) -> None:
        """A crashed earlier session may have left our daemons running (they hold the ports)."""
        for pid_file in self._pid_files():
            pid = _read_pid(pid_file)
            if pid:
                _stop_pid(pid)

    def _start_munge(self) -> None:
        if self._munge_works():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run([_which("mungekey"), "--create", "--keyfile", str(key)])
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        for d in (MUNGE_SOCKET_DIR, Path("/var/log/munge"), Path("/var/lib/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        MUNGE_SOCKET_DIR.chmod(0o755)
        stale = _read_pid(MUNGE_PID_FILE)
        if stale and not _pid_alive(stale):
            MUNGE_PID_FILE.unlink(missing_ok=True)
        # munged daemonises itself; run it as its own user like the init script does.
        _run(["runuser", "-u", "munge", "--", _which("munged")])
        self.started_munge = True
        (self.base / "munge-started").write_text("1")
        deadline = time.monotonic() + 10
        while not self._munge_works():
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not come up (see /var/log/munge/munged.log)")
            time.sleep(0.1)

    @staticmethod
    def _munge_works() -> bool:
        munge, unmunge = _which("munge"), _which("unmunge")
        if not (munge and unmunge):
            return False
        cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run([unmunge], input=cred.stdout, capture_output=True,
                              timeout=10).returncode == 0

    def node_states(self) -> dict[str, str]:
        out = subprocess.run([_which("sinfo"), "-h", "-N", "-o", "%N %T"], env=self.env,
                             capture_output=True, text=True, timeout=10)
        return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)

    def wait_nodes_idle(self, timeout: float = 30.0, names: list[str] | None = None) -> None:
        names = names or self.node_names
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for key, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(
                        f"{key} exited with {proc.returncode}; logs in {self.base / 'log'}:\n"
                        + self.logs_tail())
            states = self.node_states()
            if all(states.get(n) == "idle" for n in names):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"nodes not idle after {timeout} s (states {states}):\n" + self.logs_tail())

    def logs_tail(self, lines: int = 30) -> str:
        parts = []
        names = ["slurmctld.log", *(f"slurmd-{n}.log" for n in self.node_names), "daemons.out"]
        for name in names:
            path = self.base / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ---------------------------------------------------------------- jobs
    def command(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        exe = _which(args[0]) or args[0]
        proc = subprocess.run([exe, *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, script: str | Path, *args: str, sbatch_options: Iterable[str] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        job_env = self.env
        job_env.update(env or {})
        proc = subprocess.run([_which("sbatch"), "--parsable", *sbatch_options, str(script), *args],
                              env=job_env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, BatchFlag...)."""
        out = self.command("scontrol", "show", "job", "-o", str(job_id))
        return parse_scontrol_record(out.splitlines()[0]) if out.strip() else {}

    def wait_job(self, job_id: int, until=None, timeout: float = 120, poll: float = 0.5,
                 on_poll=None) -> dict[str, str]:
        """Poll until `until(job_info)` is true (default: job reached a terminal state)."""
        until = until or (lambda j: j.get("JobState") in TERMINAL_STATES)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if on_poll:
                on_poll(info)
            if until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} "
                           f"(Reason={info.get('Reason')}) after {timeout} s:\n{info}")


_SHARED: dict[str, object] = {"cluster": None, "users": 0}


def slurm_cluster_or_skip() -> Iterator[SlurmCluster]:
    """Body of the pytest fixture: skip (or fail under CI) when Slurm is unavailable.

    Every test module that imports the fixture gets its own session-scoped copy from
    pytest; they share one cluster (started by the first, stopped by the last), since a
    second start would wait on the first one's machine-wide lock."""
    import pytest

    if _SHARED["cluster"] is None:
        cluster = SlurmCluster()
        try:
            cluster.start()
        except (SlurmUnavailable, subprocess.TimeoutExpired, OSError) as exc:
            cluster.stop()
            message = f"Slurm test cluster unavailable: {exc}"
            if in_ci():
                pytest.fail(message + "\n(CI=true: failing instead of skipping)")
            pytest.skip(message)
        _SHARED["cluster"] = cluster
    _SHARED["users"] += 1
    try:
        yield _SHARED["cluster"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["cluster"].stop()
            _SHARED["cluster"] = None


try:
    import pytest as _pytest

    @_pytest.fixture(scope="session")
    def slurm_cluster() -> Iterator[SlurmCluster]:
        yield from slurm_cluster_or_skip()
except ImportError:  # usable as a plain script without pytest
    pass


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "start"
    cluster = SlurmCluster()
    if cmd == "start":
        cluster.start()
        # Detach: the daemons keep running after this script exits; `stop` uses pid files.
        cluster._procs.clear()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if cmd == "stop":
        cluster.stop()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
