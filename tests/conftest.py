import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from support import tiers, workers  # noqa: E402  (after the path insert)

if not torch.cuda.is_available():
    # Triton's kernels (the GIFT loss's fused passes) run on CPU tensors in its interpreter; the
    # flag is read when a kernel is defined, so it is set before anything imports Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Every test gets its tier (``unit`` where it is neither ``distributed`` nor ``system``);
    ``gpu`` tests need CUDA: skipped, with the reason, where there is none."""
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if tiers.tier_of(item) == "unit":
            item.add_marker(pytest.mark.unit)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
    if "PYTEST_XDIST_WORKER" in os.environ:
        workers.longest_first(items)


def pytest_configure(config):
    workers.share_the_cores()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n``: whole groups to a worker (:func:`support.workers.scheduler`)."""
    return workers.scheduler(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from tiers.police(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from tiers.police(item)


def pytest_terminal_summary(terminalreporter):
    """Process launches per tier, beside ``--durations``: the suite's cost is its launches."""
    terminalreporter.write_line(tiers.summary())


def pytest_sessionfinish(session):
    workers.send_launches(session.config, tiers.launches)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_testnodedown(node, error):
    """A worker's process starts, added to the session's (under ``make test``'s workers)."""
    tiers.launches.update(workers.received_launches(node))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Conversions and tokenised data go to a temporary cache, never the user's."""
    previous = os.environ.get("MEGATRON_GIFT_CACHE")
    os.environ["MEGATRON_GIFT_CACHE"] = str(tmp_path_factory.mktemp("megatron_gift_cache"))
    yield
    if previous is None:
        os.environ.pop("MEGATRON_GIFT_CACHE")
    else:
        os.environ["MEGATRON_GIFT_CACHE"] = previous


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """Runs a test started as subprocesses (``parallel_harness.start_run``) end with it."""
    yield
    from support.parallel_harness import stop_started_runs

    stop_started_runs()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Synthetic data and one tiny base checkpoint, built once and shared by the session."""
    from support.parallel_harness import make_tiny_world

    return make_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture
def world_of_one():
    """A one-rank gloo world with Megatron's parallel state (TP = PP = 1)."""
    from megatron.core import parallel_state

    from support.parallel_harness import one_rank_world

    with one_rank_world():
        parallel_state.initialize_model_parallel()
        yield
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="session")
def slurm():
    """A throw-away two-node SLURM cluster on this machine (``tests/slurm_cluster.py``), Debian's
    packages installed first where this runs as root; skipped, with the reason, where SLURM
    cannot be had."""
    from support.slurm_cluster import LocalSlurmCluster, ensure_slurm

    reason = ensure_slurm()
    if reason is not None:
        pytest.skip(reason)
    with LocalSlurmCluster() as cluster:
        yield cluster

