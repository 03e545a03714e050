"""Who this process is in its job, from the launcher's environment: torchrun's variables, else
SLURM's (one process per GPU started by ``srun``). Imports nothing heavy.

=================  ==========================  ==============================================
torchrun           SLURM (srun)                meaning
=================  ==========================  ==============================================
RANK               SLURM_PROCID                global rank
WORLD_SIZE         SLURM_NTASKS                processes in the job
LOCAL_RANK         SLURM_LOCALID               rank on this node (the GPU it takes)
LOCAL_WORLD_SIZE   SLURM_NTASKS_PER_NODE       processes on this node
MASTER_ADDR        first host of               where rank 0 listens
                   SLURM_JOB_NODELIST
                   (``scontrol show hostnames``)
MASTER_PORT        20000 + job id % 20000      its port, unless MASTER_PORT is set
=================  ==========================  ==============================================
"""

import os
import shutil
import subprocess
from typing import MutableMapping, Optional

SLURM_NAMES = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}


def adopt_slurm_ranks(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set torchrun's variables from SLURM's where torchrun's are absent and this is a SLURM
    job step; returns whether it did (idempotent: a second call finds RANK set)."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    for name, slurm_name in SLURM_NAMES.items():
        environ[name] = environ.get(slurm_name, "0")
    environ["LOCAL_WORLD_SIZE"] = str(_tasks_on_this_node(environ))
    environ.setdefault("MASTER_ADDR", first_host(environ.get("SLURM_STEP_NODELIST")
                                                 or environ.get("SLURM_JOB_NODELIST", "")))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    environ["MEGATRON_GIFT_RANKS_FROM"] = "SLURM"
    return True


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
    slurm = ", ".join(f"{k}={environ[k]}" for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
                                                    "SLURM_JOB_NODELIST") if k in environ)
    return f"{names} (from {source}{'; ' + slurm if slurm else ''})"


def _tasks_on_this_node(environ: MutableMapping[str, str]) -> int:
    """``SLURM_NTASKS_PER_NODE``, else the first count of ``SLURM_TASKS_PER_NODE``
    (``8(x2)`` -> 8), else 1."""
    value: Optional[str] = environ.get("SLURM_NTASKS_PER_NODE") or environ.get(
        "SLURM_TASKS_PER_NODE")
    if not value:
        return 1
    return int(value.split("(")[0].split(",")[0])


def _first_of_simple_list(nodelist: str) -> str:
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first
