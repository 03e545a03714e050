"""The suite's three tiers, told apart by what a test may start.

- ``unit``: starts no process at all (no ranks, no subprocess); what runs after every edit.
- ``distributed`` (marker): ranks forked by :mod:`support.parallel_harness` (``multiprocessing``
  processes); no subprocess.
- ``system`` (marker): real launchers and programs (torchrun, SLURM, a script under
  ``examples/``, the NeMo-Aligner era stack); anything goes.

While a test sets up and runs, every process start is counted against its tier, and a start its
tier does not allow fails the test, naming the program and the marker it needs: a tier cannot
quietly become slower than its name. Fixtures count against the first test that needs them.
"""

import multiprocessing.process
from multiprocessing.managers import BaseManager
import subprocess
import sys
from collections import Counter

import pytest

TIERS = ("unit", "distributed", "system")
# What each tier may start: "process" is a multiprocessing process (a harness rank),
# "subprocess" a program.
_ALLOWED = {"unit": set(), "distributed": {"process"}, "system": {"process", "subprocess"}}
_FIX = {"process": "distributed", "subprocess": "system"}

launches = Counter()  # tier -> processes started
_current = []  # [(tier, nodeid, violations)] while a test sets up or runs


def tier_of(item) -> str:
    """``system`` where marked so, else ``distributed`` where marked so, else ``unit``."""
    if "system" in item.keywords:
        return "system"
    if "distributed" in item.keywords:
        return "distributed"
    return "unit"


class TierViolation(Exception):
    """A test started a process its tier does not allow."""


def _record(kind: str, what: str) -> None:
    if not _current:
        return
    if _during_import():
        launches["import"] += 1
        return
    tier, nodeid, violations = _current[-1]
    if kind not in _ALLOWED[tier]:  # refused before it starts
        message = (f"{nodeid} is in the {tier} tier but started {what}: mark it "
                   f"@pytest.mark.{_FIX[kind]} (tests/README.md, 'Tiers')")
        violations.append(message)
        raise TierViolation(message)
    launches[tier] += 1


def _during_import() -> bool:
    """Whether a module is being imported: a start then is the module's, paid once per process
    by whichever test imports it first (megatron.core's ``package_info`` runs ``git rev-parse``)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


_popen_execute_child = subprocess.Popen._execute_child
_process_start = multiprocessing.process.BaseProcess.start


def _counted_execute_child(self, args, *rest, **kwargs):
    program = args if isinstance(args, str) else " ".join(map(str, args[:3]))
    _record("subprocess", f"a program ({program})")
    return _popen_execute_child(self, args, *rest, **kwargs)


def _counted_start(self):
    if _is_manager(self):
        return _process_start(self)
    _record("process", f"a process ({self.name})")
    return _process_start(self)


def _is_manager(process) -> bool:
    """Whether ``process`` is a ``multiprocessing`` manager's server: Megatron-Core's
    dist-checkpoint writer starts one per process, once, for its results queue
    (``dist_checkpointing/strategies/filesystem_async.py``, ``get_write_results_queue``), so the
    first test to save a checkpoint would pay it for all; not a launch a test chooses."""
    target = getattr(process, "_target", None)
    return getattr(target, "__func__", None) is BaseManager._run_server.__func__


subprocess.Popen._execute_child = _counted_execute_child
multiprocessing.process.BaseProcess.start = _counted_start


def police(item):
    """A hook wrapper's body: counts (and polices) the process starts of ``item`` while the
    wrapped phase runs; a violation fails the test even where the code under test swallowed the
    exception."""
    violations = []
    _current.append((tier_of(item), item.nodeid, violations))
    try:
        outcome = yield
    finally:
        _current.pop()
    if violations:
        outcome.force_exception(pytest.fail.Exception(violations[0], pytrace=False))


def summary() -> str:
    """One line: the processes each tier started in this session."""
    counts = ", ".join(f"{tier} {launches[tier]}" for tier in TIERS)
    return f"process starts by tier: {counts} (and {launches['import']} by imports)"
