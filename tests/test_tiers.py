"""The tiers police themselves: a test that starts what its tier does not allow fails, naming
the marker it needs, even where the code under test swallows the error. Each case is refused
before anything starts, so this file starts no process."""

import multiprocessing
import subprocess
from types import SimpleNamespace

import pluggy
import pytest

from support import tiers


def _outcome_of(keywords, action):
    """Run ``action`` as the body of a test with ``keywords``; the exception the tier check
    leaves on the test's outcome (None where it passes)."""
    item = SimpleNamespace(keywords=keywords, nodeid="tests/test_x.py::test_y")
    police = tiers.police(item)
    next(police)
    try:
        action()
    except tiers.TierViolation:
        pass  # as code under test that catches everything would
    outcome = pluggy.Result(None, None)
    with pytest.raises(StopIteration):
        police.send(outcome)
    return outcome.exception


def _program():
    subprocess.run(["true"], check=False)


def _rank():
    multiprocessing.get_context("fork").Process(target=print).start()


@pytest.mark.parametrize("keywords,action,needs", [
    ({}, _program, "system"), ({}, _rank, "distributed"),
    ({"distributed": True}, _program, "system")], ids=["unit-program", "unit-rank",
                                                      "distributed-program"])
def test_a_start_the_tier_does_not_allow_fails_the_test_naming_the_marker(keywords, action, needs):
    started = sum(tiers.launches.values())
    error = _outcome_of(keywords, action)
    assert isinstance(error, pytest.fail.Exception)
    tier = "distributed" if keywords else "unit"
    what = "a program (true)" if action is _program else "a process (ForkProcess-"
    assert str(error).startswith(f"tests/test_x.py::test_y is in the {tier} tier but started "
                                 f"{what}")
    assert str(error).endswith(f": mark it @pytest.mark.{needs} (tests/README.md, 'Tiers')")
    assert sum(tiers.launches.values()) == started  # refused before it started


def test_a_test_that_starts_nothing_passes_in_every_tier():
    for keywords in ({}, {"distributed": True}, {"system": True}):
        assert _outcome_of(keywords, lambda: None) is None


def test_system_wins_over_distributed_and_unmarked_is_unit():
    tier = tiers.tier_of
    assert tier(SimpleNamespace(keywords={"system": True, "distributed": True})) == "system"
    assert tier(SimpleNamespace(keywords={"distributed": True, "slow": True})) == "distributed"
    assert tier(SimpleNamespace(keywords={"slow": True})) == "unit"
