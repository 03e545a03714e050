"""A throw-away two-node SLURM cluster on this one machine, for tests of sbatch scripts.

``LocalSlurmCluster`` starts one ``slurmctld`` and two ``slurmd`` daemons (nodes ``node1`` and
``node2``, both at 127.0.0.1, each slurmd on its own port, started as ``slurmd -N node1`` and
``slurmd -N node2``) with a private ``slurm.conf`` in a fresh temporary directory: state, spool,
log and pid files all live there, the ports are free ones picked at start, and the client
commands find the cluster through ``SLURM_CONF`` (``cluster.env``). Munge authentication reuses
a running ``munged`` on its default socket; where there is none, a private ``munged`` is started
on a socket in the temporary directory (with a root-owned copy of ``/etc/munge/munge.key``, as
munged insists that its key belongs to the user it runs as) and slurm.conf points at it with
``AuthInfo=socket=...``. The names ``node1`` and ``node2`` are made resolvable by one line in
``/etc/hosts``, which is removed again on exit. On exit the jobs are cancelled and every daemon
the cluster started is stopped by its pid (SIGTERM, then SIGKILL).

The cluster runs as root (``SlurmUser=root``), without cgroups (``ProctrackType=proctrack/
linuxproc``, ``TaskPlugin=task/none``), without accounting (so there is no ``sacct``: ``wait``
polls ``scontrol show job -o`` and remembers the last state it saw, since a finished job
disappears after ``MinJobAge`` seconds), without PMIx (``MpiDefault=none``; use
``srun --mpi=none`` or ``--mpi=pmi2``), with ``JobRequeue=1`` and ``KillWait=30``.
``sbatch`` exports the caller's whole environment to the job (``--export=ALL`` is its default).

Behaviour measured with Debian bookworm's Slurm 22.05.8 on this cluster:

* Signals. ``scancel --signal=TERM JOBID`` (no ``--full``) is the form that reaches a job
  step's tasks, i.e. the processes that ``srun`` started: they get SIGTERM, while the batch shell
  and ``srun`` itself do not (the job goes on if the tasks trap it; slurmstepd still writes
  ``*** STEP J.0 ... CANCELLED ***`` to the job's output). ``--full`` signals the batch step as
  well: the batch shell, its children and ``srun``, and ``srun`` answers SIGTERM by killing its
  step (``srun: forcing job termination``), so the tasks die of SIGKILL and never see the TERM.
  ``--batch`` signals the batch shell, but neither ``srun`` nor the steps' tasks. ``#SBATCH
  --signal=TERM@N`` (without ``B:``), like the plain scancel, reaches the steps' tasks and not the
  batch shell; slurmctld sends it from a periodic check (about every 30 s), so it may come well
  after the job has N seconds left (with ``--time=1``: ``@55`` came 10 s into the job, while a
  15 s job with ``@59`` ended without it).
* Requeue. ``scontrol requeue $SLURM_JOB_ID`` from inside the job sends SIGTERM to every process
  of the job (batch shell, its children, step tasks), SIGKILL after ``KillWait`` to what is left,
  and puts the job back in the queue: PENDING with reason ``BeginTime``, held back for
  ``AuthInfo=cred_expire`` seconds (120 by default, 10 here) before it may start again. The batch
  script then runs again from the top, with ``SLURM_RESTART_COUNT=1`` (the variable is unset on
  the first run), and ``scontrol show job`` reports ``Restarts=1``. The output file is truncated
  on the new run unless the job asked for ``--open-mode=append``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

from support.parallel_harness import free_port

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NEEDED_PROGRAMS = ["sbatch", "slurmctld", "slurmd", "munged"]
NODES = ("node1", "node2")
HOSTS_FILE = "/etc/hosts"
HOSTS_MARK = "# local-slurm-test-cluster"
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"
TERMINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT",
}

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN_DIRS)
    return shutil.which(name, path=path)


def _missing_programs() -> List[str]:
    return [name for name in NEEDED_PROGRAMS if _which(name) is None]


def ensure_slurm(install_timeout: float = 300.0) -> Optional[str]:
    """None when Slurm and munge are installed (installing them with apt as root if need be).

    Otherwise returns why not, for a test skip."""
    missing = _missing_programs()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed (missing {', '.join(missing)}) and this is not root to install it"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed (missing {', '.join(missing)}) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES]
    deadline = time.monotonic() + install_timeout
    log = []

    def run(cmd: List[str]) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            log.append(f"{' '.join(cmd)}: out of time")
            return False
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            log.append(f"{' '.join(cmd)}: timed out")
            return False
        if proc.returncode != 0:
            log.append(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout[-800:]}")
        return proc.returncode == 0

    # A stale package list makes the install fail; then update the lists and try once more.
    ok = run(install) or (run(["apt-get", "update", "-q"]) and run(install))
    missing = _missing_programs()
    if ok and not missing:
        return None
    detail = log[-1] if log else f"still missing {', '.join(missing)}"
    return f"could not install Slurm ({' '.join(SLURM_PACKAGES)}): {detail}"


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"({e})"


def parse_scontrol_line(line: str) -> Dict[str, str]:
    """``Key=Value Key2=Value two ...`` (one line of ``scontrol show ... -o``) as a dict.

    A value may hold spaces (``Command``, ``Reason``): a token without ``=`` at a key position
    belongs to the value before it."""
    info: Dict[str, str] = {}
    last = None
    for token in line.strip().split(" "):
        m = re.match(r"^([A-Za-z][A-Za-z0-9_:/\-]*)=(.*)$", token)
        if m and (last is None or m.group(1) not in info):
            last = m.group(1)
            info[last] = m.group(2)
        elif last is not None:
            info[last] += " " + token
    return info


# A caller's own launcher variables (a test process that once was rank 0 of a world of one)
# must not reach a job: its ranks take theirs from SLURM.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


class LocalSlurmCluster:
    """Context manager: a two-node Slurm cluster (``node1``, ``node2``) on 127.0.0.1."""

    def __init__(self, start_timeout: float = 60.0, cpus_per_node: Optional[int] = None,
                 keep_workdir: bool = False, cred_expire: int = 10):
        self.cred_expire = cred_expire
        self.start_timeout = start_timeout
        self.cpus_per_node = cpus_per_node or max(1, min(os.cpu_count() or 1, 4))
        self.keep_workdir = keep_workdir
        self.workdir: str = ""
        self.conf_path: str = ""
        self.env: Dict[str, str] = {}
        self._procs: Dict[str, subprocess.Popen] = {}
        self._hosts_line: Optional[str] = None
        self._last_state: Dict[int, Dict[str, str]] = {}
        self.munge_socket: Optional[str] = None

    # ---------------------------------------------------------------- start
    def __enter__(self) -> "LocalSlurmCluster":
        reason = ensure_slurm()
        if reason:
            raise RuntimeError(reason)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="local-slurm-")
        os.chmod(self.workdir, 0o755)  # munged wants every directory above its socket searchable
        for sub in ("state", "spool", *(f"spool/{n}" for n in NODES), "log", "run", "munge", "jobs"):
            os.makedirs(os.path.join(self.workdir, sub), mode=0o755)
        self._ensure_hosts()
        self._ensure_munge()
        self.conf_path = os.path.join(self.workdir, "slurm.conf")
        with open(self.conf_path, "w") as f:
            f.write(self.slurm_conf())
        self.env = dict(os.environ, SLURM_CONF=self.conf_path)
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf_path])
        self._wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
                       "slurmctld to answer scontrol ping")
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", self.conf_path])
        self._wait_for(self._nodes_idle, "both nodes to be idle in sinfo")

    def slurm_conf(self) -> str:
        w = self.workdir
        if not getattr(self, "_ports", None):
            ports: List[int] = []
            while len(ports) < 3:
                port = free_port()
                if port not in ports:
                    ports.append(port)
            self._ports = tuple(ports)
        ctld_port, port1, port2 = self._ports
        lines = [
            "ClusterName=localtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={port1}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmctldPidFile={w}/run/slurmctld.pid",
            f"SlurmdPidFile={w}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={w}/log/slurmctld.log",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            # A requeued job becomes eligible by the clock, not by an event: schedule often.
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "JobRequeue=1",
            "KillWait=30",
            "MinJobAge=30",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
        ]
        # cred_expire also holds a requeued job back from starting again (default 120 s).
        auth_info = [f"cred_expire={self.cred_expire}"]
        if self.munge_socket and self.munge_socket != DEFAULT_MUNGE_SOCKET:
            auth_info.insert(0, f"socket={self.munge_socket}")
        lines.append(f"AuthInfo={','.join(auth_info)}")
        for node, port in zip(NODES, (port1, port2)):
            lines.append(f"NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _ensure_hosts(self) -> None:
        with open(HOSTS_FILE) as f:
            text = f.read()
        known = set()
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if fields and fields[0] == "127.0.0.1":
                known.update(fields[1:])
        missing = [n for n in NODES if n not in known]
        if not missing:
            return
        self._hosts_line = f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK} {os.getpid()}"
        with open(HOSTS_FILE, "a") as f:
            f.write(("" if text.endswith("\n") or not text else "\n") + self._hosts_line + "\n")

    def _remove_hosts_line(self) -> None:
        if not self._hosts_line:
            return
        try:
            with open(HOSTS_FILE) as f:
                lines = f.read().splitlines(keepends=True)
            kept = [l for l in lines if l.rstrip("\n") != self._hosts_line]
            with open(HOSTS_FILE, "w") as f:
                f.write("".join(kept))
        except OSError:
            pass
        self._hosts_line = None

    def _munge_works(self, sock: str) -> bool:
        try:
            enc = subprocess.run([_which("munge") or "munge", "-n", "-S", sock], capture_output=True,
                                 timeout=10)
            if enc.returncode != 0:
                return False
            dec = subprocess.run([_which("unmunge") or "unmunge", "-S", sock], input=enc.stdout,
                                 capture_output=True, timeout=10)
            return dec.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _ensure_munge(self) -> None:
        if self._munge_works(DEFAULT_MUNGE_SOCKET):
            self.munge_socket = DEFAULT_MUNGE_SOCKET
            return
        key = "/etc/munge/munge.key"
        if not os.path.exists(key):
            os.makedirs("/etc/munge", exist_ok=True)
            mungekey = _which("mungekey")
            if mungekey:
                subprocess.run([mungekey, "--create", f"--keyfile={key}"], check=True,
                               capture_output=True, timeout=30)
            else:
                with open(key, "wb") as f:
                    f.write(os.urandom(1024))
            os.chmod(key, 0o400)
            try:
                shutil.chown(key, "munge", "munge")
            except (LookupError, OSError):
                pass
        # munged refuses a key that is not owned by the user it runs as: use a private copy.
        mdir = os.path.join(self.workdir, "munge")
        private_key = os.path.join(mdir, "munge.key")
        shutil.copyfile(key, private_key)
        os.chmod(private_key, 0o400)
        self.munge_socket = os.path.join(mdir, "munge.socket")
        self._spawn("munged", [
            _which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={private_key}",
            f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed",
            f"--log-file={self.workdir}/log/munged.log",
        ])
        self._wait_for(lambda: self._munge_works(self.munge_socket), "munged to answer")

    def _spawn(self, name: str, cmd: List[str]) -> None:
        log = os.path.join(self.workdir, "log", f"{name}.out")
        env = dict(self.env or os.environ)
        if self.conf_path:
            env["SLURM_CONF"] = self.conf_path
        with open(log, "ab") as out:
            self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=env,
                                                 start_new_session=True)

    def _wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}\n{self.log_tails()}")
            if predicate():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {self.start_timeout:.0f} s waiting for {what}\n"
                           f"{self.log_tails()}")

    def _nodes_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        states = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        return all(states.get(n, "").rstrip("*~#") == "idle" for n in NODES)

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        logdir = os.path.join(self.workdir, "log") if self.workdir else ""
        if not logdir or not os.path.isdir(logdir):
            return "(no logs)"
        for path in sorted(os.path.join(logdir, name) for name in os.listdir(logdir)):
            if os.path.getsize(path):
                parts.append(f"--- {os.path.basename(path)} (last {lines} lines) ---\n{_tail(path, lines)}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- use
    def _run(self, cmd: List[str], check: bool = True, cwd: Optional[str] = None,
             timeout: float = 30) -> subprocess.CompletedProcess:
        env = self.env or dict(os.environ, SLURM_CONF=self.conf_path)
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def run(self, cmd: List[str], **kw) -> subprocess.CompletedProcess:
        """Runs a Slurm client command (scontrol, scancel, squeue ...) against this cluster."""
        return self._run(cmd, **kw)

    def sbatch(self, args: List[str], cwd: Optional[str] = None,
               env: Optional[Dict[str, str]] = None) -> int:
        """Submits ``sbatch --parsable ARGS`` (from ``cwd``, with ``env`` added to ``self.env``)."""
        run_env = {k: v for k, v in self.env.items() if k not in LAUNCHER_VARIABLES}
        run_env.update(env or {})
        proc = subprocess.run(["sbatch", "--parsable", *args], env=run_env, cwd=cwd or self.workdir,
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def _query(self, job_id: int) -> Dict[str, str]:
        proc = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        info = parse_scontrol_line(proc.stdout.splitlines()[0])
        self._last_state[job_id] = info
        return info

    def job_info(self, job_id: int) -> Dict[str, str]:
        """``scontrol show job -o JOB`` as a dict (JobState, Restarts, ExitCode, ...).

        Once slurmctld has forgotten the job (MinJobAge after it ended) this is the last one seen,
        with ``Gone=1`` added; {} for a job never seen."""
        info = self._query(job_id)
        if info:
            return info
        last = self._last_state.get(job_id)
        return dict(last, Gone="1") if last else {}

    def wait(self, job_id: int, timeout: float = 60, states=TERMINAL_STATES) -> str:
        """Polls until the job is in one of ``states`` (default: finished); returns its state.

        A job that has disappeared (after MinJobAge) counts as in the last state seen."""
        deadline = time.monotonic() + timeout
        state, info = "", {}
        while True:
            info = self._query(job_id)
            if not info:
                last = self._last_state.get(job_id, {})
                state = last.get("JobState", "UNKNOWN")
                if state in TERMINAL_STATES or not last:
                    return state
            else:
                state = info.get("JobState", "")
                if state in states:
                    return state
            if time.monotonic() > deadline:
                brief = {k: info.get(k) for k in ("JobState", "Reason", "Restarts", "NodeList")}
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s: {brief}\n"
                                   f"{self.log_tails(10)}")
            time.sleep(0.5)

    # ---------------------------------------------------------------- stop
    def _active_jobs(self) -> List[str]:
        return self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()

    def _cancel_all(self) -> None:
        """Kills every job still there (SIGKILL to all its steps and its batch shell)."""
        if "slurmctld" not in self._procs or self._procs["slurmctld"].poll() is not None:
            return
        try:
            jobs = self._active_jobs()
            if jobs:
                self._run(["scancel", "--signal=KILL", "--full", *jobs], check=False, timeout=10)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and self._active_jobs():
                    time.sleep(0.3)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _job_processes(self) -> List[int]:
        """Processes of this cluster's jobs that are still alive: slurmstepd (detached from
        slurmd), batch scripts, srun and tasks, known by ``SLURM_CONF`` pointing at our config.

        The job's own processes come first, their slurmstepd after them."""
        if not self.conf_path:
            return []
        needle = f"SLURM_CONF={self.conf_path}".encode()
        ours = {os.getpid()} | {p.pid for p in self._procs.values()}
        tasks, stepds = [], []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in ours:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                        continue
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except (OSError, IndexError):
                continue
            if needle not in environ:
                continue
            if comm == "slurmstepd":
                stepds.append(int(entry))
            elif any(v.startswith(b"SLURM_JOB_ID=") for v in environ):
                tasks.append(int(entry))
        return tasks + stepds

    def _kill_job_processes(self) -> None:
        for pid in self._job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cancel_all()
        self._kill_job_processes()  # what a job left behind (say, one stuck in its KillWait)
        # slurmds first, then slurmctld, munged last (the others need it to shut down cleanly).
        order = [n for n in self._procs if n.startswith("slurmd")] + \
                [n for n in ("slurmctld", "munged") if n in self._procs]
        for name in order:
            proc = self._procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._kill_job_processes()
        self._procs.clear()
        self._remove_hosts_line()
        if self.workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
