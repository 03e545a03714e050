"""build_once: one rank works, the others wait on the file system and see its failure."""

import threading
import time

import pytest

from megatron_gift.platform.once import build_once


def test_waiting_rank_sees_the_result_and_the_worker_builds_once(tmp_path):
    result, calls = tmp_path / "result", []

    def build():
        calls.append(1)
        time.sleep(0.3)
        result.write_text("done")

    waiter = threading.Thread(target=lambda: calls.append(build_once(
        result.exists, build, False, str(tmp_path / "m"), "work", poll_s=0.05)))
    waiter.start()
    assert build_once(result.exists, build, True, str(tmp_path / "m"), "work") is True
    waiter.join(5)
    assert calls == [1, False]  # built once; the waiter returned False after it appeared
    assert build_once(result.exists, build, True, str(tmp_path / "m"), "work") is False


def test_a_failure_reaches_the_waiting_ranks_and_an_old_jobs_marker_does_not(tmp_path, monkeypatch):
    marker = tmp_path / "m"
    monkeypatch.setenv("MASTER_PORT", "1111")
    marker.write_text("@:2222\nother\nValueError: from an earlier job")  # another job's marker
    errors = []

    def wait():
        try:
            build_once(lambda: False, None, False, str(marker), "tokenising", poll_s=0.05)
        except RuntimeError as error:
            errors.append(str(error))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not errors  # the old marker was ignored

    def fail():
        raise ValueError("data.jsonl:7: record has no non-empty string field 'response'")

    with pytest.raises(ValueError, match="data.jsonl:7"):
        build_once(lambda: False, fail, True, str(marker), "tokenising")
    waiter.join(5)
    assert errors == ["tokenising failed on the rank doing it: ValueError: data.jsonl:7: record "
                      "has no non-empty string field 'response'"]


def test_a_user_error_reaches_the_waiting_ranks_as_the_same_user_error(tmp_path, monkeypatch):
    """A bad input found by the working rank is the same one-line error on every rank."""
    from megatron_gift.errors import UserError

    monkeypatch.setenv("MASTER_PORT", "1111")
    marker = str(tmp_path / "m")

    def fail():
        raise UserError("data.jsonl:7: not a JSON record")

    raised = []

    def wait():
        try:
            build_once(lambda: False, None, False, marker, "tokenising", poll_s=0.05)
        except UserError as error:
            raised.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    with pytest.raises(UserError):
        build_once(lambda: False, fail, True, marker, "tokenising", poll_s=0.05)
    waiter.join(5)
    assert [str(e) for e in raised] == ["data.jsonl:7: not a JSON record"]


def test_a_failure_leaves_no_marker(tmp_path):
    """The marker shows a failure to the waiting ranks for a moment, then goes; with no rank
    waiting there is none at all."""
    marker = tmp_path / "m"

    def fail():
        raise ValueError("bad data")

    for others_wait in (True, False):
        with pytest.raises(ValueError):
            build_once(lambda: False, fail, True, str(marker), "tokenising", poll_s=0.01,
                       others_wait=others_wait)
        assert list(tmp_path.iterdir()) == []
