"""The suite on several cores: ``make test`` runs it in pytest-xdist workers (``-n``), each a
pytest session of its own with its own fork server, tiny world and caches.

What must stay together goes to one worker (:func:`scheduler`): a test file's tests share module
fixtures (a converted model, an export), so a file is one group; both SLURM files share the
session's one two-node cluster (its ports and daemons exist once per machine), so they are one
group. A worker's process starts reach the controller's tier summary through
``workeroutput``.
"""

import os
from collections import Counter

import torch

# Files whose tests share a machine-wide resource: one worker runs them all.
SHARED = {"test_slurm.py": "slurm", "test_slurm_cluster.py": "slurm"}


# The groups that take longest (measured on a 2-core CPU, 2026-12-07), started first: a worker
# that drew a long group last would finish alone. The others follow in collection order.
LONGEST_FIRST = ("tests/test_training.py", "slurm", "tests/test_stopping.py",
                 "tests/test_nemo_aligner.py", "tests/test_hf_conversion.py",
                 "tests/test_rl_handoff.py", "tests/test_gpu_check.py", "tests/test_plan.py",
                 "tests/test_launch.py", "tests/test_reproduce.py")


def group_of(nodeid: str) -> str:
    """The worker group of a test id: its file, or the resource it shares with other files."""
    path = nodeid.split("::", 1)[0]
    return SHARED.get(os.path.basename(path), path)


def longest_first(items: list) -> None:
    """Sort a worker's collected tests (in place, stably) so that :data:`LONGEST_FIRST`'s groups
    come first; every worker sorts alike, so their collections stay equal."""
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))


def scheduler(config, log):
    """pytest-xdist's file-by-file scheduling, with :func:`group_of` as the unit, in collection
    order (:func:`longest_first`). (Its ``xdist_group`` marks cannot do this: pytest 9 no longer
    lets a plugin rename a test id.)"""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    class ByGroup(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ByGroup(config, log)


def share_the_cores() -> None:
    """In a worker: take an equal share of the cores for PyTorch's own threads, so that two
    workers on two cores do not run four spinning threads."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if "PYTEST_XDIST_WORKER" in os.environ and count > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // count))


def send_launches(config, launches: Counter) -> None:
    """In a worker: hand its process starts to the controller."""
    if hasattr(config, "workeroutput"):
        config.workeroutput["launches"] = dict(launches)


def received_launches(node) -> Counter:
    """In the controller: the process starts a finished worker sent."""
    return Counter(getattr(node, "workeroutput", {}).get("launches", {}))
