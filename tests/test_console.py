"""The console: rank-0 logging, filtered third-party noise, one-line user errors that torchrun
names as the root cause, unexpected errors with their traceback."""

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from megatron_gift.errors import USER_ERROR_EXIT, ConfigError
from megatron_gift.platform import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log_everything(level, rank, monkeypatch, capsys):
    monkeypatch.setenv("RANK", str(rank))
    console.setup_logging(level)
    log = logging.getLogger("megatron_gift.engine.trainer")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    return capsys.readouterr().out.splitlines()


def test_rank0_logs_info_other_ranks_only_warnings(monkeypatch, capsys):
    assert _log_everything("info", 0, monkeypatch, capsys) == [
        "[gift] an info line", "[gift] a warning line"]
    assert _log_everything("info", 1, monkeypatch, capsys) == ["[gift] a warning line"]


def test_debug_logs_every_rank_with_its_rank(monkeypatch, capsys):
    assert _log_everything("debug", 3, monkeypatch, capsys) == [
        "[gift rank 3] a debug line", "[gift rank 3] an info line", "[gift rank 3] a warning line"]


def test_the_log_follows_stdout_after_whoever_redirected_it_is_gone(monkeypatch):
    """A command run in-process under a redirected stdout (``support/commands.py``) leaves the
    logger behind: its next line goes to the stdout of the day, not the closed one."""
    import contextlib
    import io

    monkeypatch.setenv("RANK", "0")
    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(first):
        log = console.setup_logging("info")
    first.close()
    with contextlib.redirect_stdout(second):
        log.info("after the first stdout closed")
    assert second.getvalue() == "[gift] after the first stdout closed\n"


def test_known_third_party_noise_is_filtered_and_the_rest_is_not(monkeypatch, capsys):
    monkeypatch.setattr(console, "_quieted", [])
    monkeypatch.setenv("PYTHONWARNINGS", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning)
        warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.",
                      FutureWarning)
        warnings.warn("something new went wrong", UserWarning)
    assert [str(w.message) for w in caught] == ["something new went wrong"]
    assert "ignore:Apex is not installed:UserWarning" in os.environ["PYTHONWARNINGS"]
    megatron = logging.getLogger("megatron.core.models.gpt.gpt_model")
    megatron.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
    megatron.warning("a real Megatron warning")
    logging.getLogger("megatron.core.dist_checkpointing").warning(
        "MCore's async save is deprecated and will be removed")
    assert capsys.readouterr().err == "a real Megatron warning\n"
    for name in console.QUIET_LOGGERS:  # leave the loggers as other tests expect them
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


@pytest.mark.parametrize("first", [0, 1])
def test_a_user_error_is_one_line_from_the_first_rank_and_exit_status_2(monkeypatch, capsys,
                                                                        tmp_path, first):
    """In a job of two ranks the first to hit the error prints it (rank 0 or not), the other
    stays silent."""
    from support.parallel_harness import free_port

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a job of its own

    @console.entry_point
    def main():
        raise ConfigError("gift.beta (--gift-beta) must be >= 0, got -1")

    for rank, printed in ((first, "error: gift.beta (--gift-beta) must be >= 0, got -1\n"),
                          (1 - first, "")):
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == USER_ERROR_EXIT == 2
        assert capsys.readouterr().err == printed
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["extraInfo"]["py_callstack"] == (
        "error: gift.beta (--gift-beta) must be >= 0, got -1\n")


def test_an_unexpected_error_keeps_its_traceback(monkeypatch, tmp_path):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @console.entry_point
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        main()
    callstack = json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"]
    assert "Traceback" in callstack and 'raise RuntimeError("a bug")' in callstack


@pytest.mark.system
def test_torchrun_reports_a_user_error_once_and_as_the_root_cause(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q: 1 + 1 = ?", "response": "2"}\n')
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "2",
         "examples/pretrain_gift.py", "--train-path", str(data),
         "--tensor-model-parallel-size", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    message = ("error: world size 2 is not divisible by tensor x pipeline x context parallel "
               "size = 4 x 1 x 1 (--tensor-model-parallel-size, --pipeline-model-parallel-size, "
               "--context-parallel-size, torchrun --nproc-per-node)")
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines.count(message) == 1  # one rank says it
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "exitcode  : 2" in root_cause and f"traceback : {message}" in root_cause
    assert "megatron_gift" not in "".join(line for line in lines if line.strip().startswith("File"))


def test_plain_text_drops_rest_markup():
    text = ("``python -m x``: see :func:`megatron_gift.a.b`, :mod:`~megatron_gift.rl.handoff`,\n"
            ":class:`the plan <megatron_gift.core.memory.Plan>` and :py:data:`X`::\n"
            "\n"
            "    x --flag\n"
            "\n"
            "::\n"
            "\n"
            "    y\n")
    assert console.plain_text(text) == (
        "python -m x: see megatron_gift.a.b, handoff,\n"
        "the plan and X:\n"
        "\n"
        "    x --flag\n"
        "\n"
        "    y\n")
    assert console.plain_text(None) == ""


RST_MARKUP = re.compile(r"``|:[a-z]+(:[a-z]+)?:`")


@pytest.mark.parametrize("module", ["evaluate", "rl_handoff", "convert", "inspect_checkpoint"])
def test_help_shows_no_rest_markup(module):
    command = importlib.import_module(f"megatron_gift.commands.{module}")
    parser = command.build_parser()
    helps = [parser.format_help()] + [
        sub.format_help() for action in parser._actions
        if isinstance(action, argparse._SubParsersAction) for sub in action.choices.values()]
    for text in helps:
        assert RST_MARKUP.search(text) is None, text
    assert console.plain_text(command.__doc__).splitlines()[0] in helps[0]


def test_the_commands_help_lists_every_subcommand_and_an_unknown_one_is_one_line(capsys):
    from megatron_gift.commands import SUBCOMMANDS, main

    main(["--help"])
    out = capsys.readouterr().out
    assert RST_MARKUP.search(out) is None
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
    with pytest.raises(SystemExit) as stopped:
        main(["trian"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "no subcommand 'trian'" in err and "train" in err


@pytest.mark.parametrize("name", ["train", "convert", "inspect", "plan", "evaluate", "rl-handoff",
                                  "report"])
def test_each_subcommand_answers_help_as_megatron_gift_name(name, capsys):
    from megatron_gift.commands import main

    with contextlib.suppress(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: megatron-gift {name}") and RST_MARKUP.search(out) is None


def test_training_and_planner_help_show_no_rest_markup(capsys):
    """The launcher's --help (every config section's description) and the planner's."""
    from megatron_gift.config.cli import build_parser
    from megatron_gift.commands.plan import main as plan_main

    assert RST_MARKUP.search(build_parser().format_help()) is None
    plan_main(["--help"])
    assert RST_MARKUP.search(capsys.readouterr().out) is None
