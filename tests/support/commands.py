"""A command's ``main`` run in this process, as its program would run: what it prints and the
exit status, without a process start (no 10-30 s import of torch and Megatron-Core per call).
Tests that must see the real program (``--help`` imports, tracebacks, signals) start it."""

import contextlib
import io
import subprocess
from typing import Callable, Sequence


def run_main(main: Callable[[Sequence[str]], None], argv: Sequence[object]) -> subprocess.CompletedProcess:
    """``main(argv)`` with stdout and stderr captured; a ``SystemExit`` becomes the return code
    (0 where ``main`` returns). Anything else ``main`` raises propagates: a traceback is a failure."""
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
