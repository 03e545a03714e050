"""Who this process is in its job, from the launcher's environment: torchrun's variables, else
SLURM's (one process per GPU started by ``srun``). Imports nothing heavy.

=================  ==========================  ==============================================
torchrun           SLURM (srun)                meaning
=================  ==========================  ==============================================
RANK               SLURM_PROCID                global rank
WORLD_SIZE         SLURM_STEP_NUM_TASKS        processes in the job step
LOCAL_RANK         SLURM_LOCALID               rank on this node
LOCAL_WORLD_SIZE   SLURM_STEP_TASKS_PER_NODE   processes on this node
                   (this node's entry)
MASTER_ADDR        first host of               where rank 0 listens
                   SLURM_STEP_NODELIST
                   (``scontrol show hostnames``)
MASTER_PORT        :func:`slurm_master_port`   its port, unless MASTER_PORT is set
=================  ==========================  ==============================================

SLURM's variables are adopted only by a task that ``srun`` started (:func:`is_srun_task`): a
batch script, an ``salloc`` shell and the programs they run directly carry SLURM's job
variables too, and a plain process there runs as a world of one.
"""

import logging
import os
import re
import shutil
import subprocess
from typing import Mapping, MutableMapping, Optional

from megatron_gift.errors import UserError

# MASTER_PORT under SLURM: below Linux's ephemeral range (32768-60999), where the kernel picks
# outgoing ports, and above the well-known ones.
PORT_FIRST = 20000
PORT_COUNT = 12000
RESTART_STRIDE = 4999  # prime to PORT_COUNT: each restart moves the port, 12000 before a repeat
# Step ids from here up name SLURM's special steps (batch, extern, interactive, pending).
FIRST_SPECIAL_STEP_ID = 0xFFFFFFF0
# Set to the pid of the process that adopted SLURM's ranks; inherited by the processes it starts.
ADOPTED_BY = "MEGATRON_GIFT_SLURM_TASK_PID"

log = logging.getLogger(__name__)
_warned_not_a_task = []


def adopt_slurm_ranks(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set torchrun's variables from SLURM's where torchrun's are absent and this process is one
    of ``srun``'s tasks (:func:`is_srun_task`); returns whether it did (idempotent: a second call
    finds RANK set). Any other process keeps its environment and runs as a world of one."""
    if "RANK" in environ:
        return False
    if not is_srun_task(environ):
        _note_not_a_task(environ)
        return False
    world = _int_var(environ, "SLURM_STEP_NUM_TASKS")
    rank = _int_var(environ, "SLURM_PROCID")
    if not 0 <= rank < world:
        raise UserError(f"SLURM_PROCID={rank} is not a rank of a step of {world} tasks "
                        "(SLURM_STEP_NUM_TASKS): start the ranks with srun, which sets both")
    port = environ.get("MASTER_PORT") or str(slurm_master_port(
        _int_var(environ, "SLURM_JOB_ID", "0"), _int_var(environ, "SLURM_RESTART_COUNT", "0")))
    environ.update(RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(_int_var(environ, "SLURM_LOCALID", "0")),
                   LOCAL_WORLD_SIZE=str(_tasks_on_this_node(environ)), MASTER_PORT=port)
    environ.setdefault("MASTER_ADDR", first_host(environ.get("SLURM_STEP_NODELIST")
                                                 or environ.get("SLURM_JOB_NODELIST", "")))
    environ["MEGATRON_GIFT_RANKS_FROM"] = "SLURM"
    environ[ADOPTED_BY] = str(os.getpid())
    return True


def is_srun_task(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is a task that ``srun`` started, and so one rank of its step.

    ``srun`` gives each task ``SLURM_STEP_ID`` (the step's number), ``SLURM_STEP_NUM_TASKS``
    and ``SLURM_PROCID``. A batch script has ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``
    but no step id (SLURM 22.05), an ``salloc`` shell neither, and an interactive step has a
    special step id (>= 0xFFFFFFF0); none of them is a rank. A process started by a rank that
    adopted these variables inherits them but is not a task (``MEGATRON_GIFT_SLURM_TASK_PID``
    names another process). The environment decides, not the process tree: batch scripts run
    under ``slurmstepd`` as well, and a container's pid namespace hides its parents."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    if not step.isdigit() or int(step) >= FIRST_SPECIAL_STEP_ID:
        return False
    if environ.get(ADOPTED_BY, str(os.getpid())) != str(os.getpid()):
        return False
    return "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ


def slurm_master_port(job_id: int, restart_count: int = 0) -> int:
    """Rank 0's port for a SLURM job: ``20000 + (job id + 4999 x restart count) % 12000``.

    Always in 20000-31999, below the kernel's ephemeral ports, so no outgoing connection holds
    it; a requeued job (``SLURM_RESTART_COUNT`` + 1) takes another port, so its rank 0 does not
    find it still held by the previous start (a rank killed late, a socket in TIME_WAIT)."""
    if job_id < 0 or restart_count < 0:
        raise UserError(f"SLURM job id {job_id} and restart count {restart_count} must not be "
                        "negative: set MASTER_PORT to choose rank 0's port")
    return PORT_FIRST + (job_id + RESTART_STRIDE * restart_count) % PORT_COUNT


def device_index(local_rank: int, visible_devices: int,
                 local_world_size: Optional[int] = None) -> int:
    """The index, among this process's visible devices, of the device that local rank
    ``local_rank`` takes: ``local_rank % visible_devices``.

    That is ``local_rank`` where every rank of the node sees all its GPUs (torchrun, plain
    srun), 0 where SLURM binds one GPU to each task (``--gpus-per-task 1``, ``--gpu-bind``: each
    sees one device, with ``CUDA_VISIBLE_DEVICES`` naming its own) and the rank's turn among its
    own devices otherwise. ``local_world_size`` (when known) bounds ``local_rank``."""
    if visible_devices < 1:
        raise UserError(f"no visible device for local rank {local_rank} (visible devices: "
                        f"{visible_devices}): check CUDA_VISIBLE_DEVICES and the job's GPUs")
    if local_rank < 0 or (local_world_size is not None and local_rank >= local_world_size):
        raise UserError(f"LOCAL_RANK={local_rank} is not a rank of a node of "
                        f"{local_world_size} processes (LOCAL_WORLD_SIZE): start the ranks "
                        "with torchrun or srun, which set both")
    return local_rank % visible_devices


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (``node[1-4],gpu7`` -> ``node1``), expanded by
    ``scontrol show hostnames``; ``127.0.0.1`` for an empty list."""
    if not nodelist:
        return "127.0.0.1"
    if shutil.which("scontrol") is None:
        return _first_of_simple_list(nodelist)
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out[0] if out else _first_of_simple_list(nodelist)


def describe_rendezvous(environ: MutableMapping[str, str] = os.environ) -> str:
    """What a rank tried when it looked for its peers: address, port and where the values came
    from, for an error message."""
    source = environ.get("MEGATRON_GIFT_RANKS_FROM", "torchrun or the environment")
    names = ", ".join(f"{k}={environ.get(k)}" for k in
                      ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    slurm = ", ".join(f"{k}={environ[k]}" for k in ("SLURM_JOB_ID", "SLURM_STEP_ID",
                                                    "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                                                    "SLURM_JOB_NODELIST") if k in environ)
    return f"{names} (from {source}{'; ' + slurm if slurm else ''})"


def tasks_per_node(spec: str, node_id: int) -> int:
    """Node ``node_id``'s entry of a SLURM tasks-per-node list (``2(x3),1``: nodes 0-2 run 2,
    node 3 runs 1); the last entry for a node past the list."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise UserError(f"cannot read the SLURM tasks-per-node list {spec!r}: expected "
                            "entries like 8 or 8(x2); set LOCAL_WORLD_SIZE")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def _tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """This node's entry of ``SLURM_STEP_TASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE``),
    else 1."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    return tasks_per_node(spec, _int_var(environ, "SLURM_NODEID", "0")) if spec else 1


def _int_var(environ: Mapping[str, str], name: str, default: Optional[str] = None) -> int:
    """An integer variable of the launcher; a UserError naming it when it is not one."""
    value = environ.get(name, default)
    if value is None or not value.strip().isdigit():
        raise UserError(f"{name}={value} is not a non-negative integer: SLURM sets it for each "
                        "task of srun; unset it, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                        "and MASTER_PORT yourself")
    return int(value)


def _note_not_a_task(environ: Mapping[str, str]) -> None:
    """Say once that a process in a SLURM job of several tasks runs alone."""
    ntasks = environ.get("SLURM_NTASKS", "1")
    if _warned_not_a_task or not ntasks.isdigit() or int(ntasks) <= 1:
        return
    _warned_not_a_task.append(True)
    log.warning(f"SLURM job {environ.get('SLURM_JOB_ID', '?')} has {ntasks} tasks, but this "
                "process was not started by srun: it runs as a single process (start the ranks "
                "with srun, as examples/slurm/gift.sbatch does)")


def _first_of_simple_list(nodelist: str) -> str:
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first
