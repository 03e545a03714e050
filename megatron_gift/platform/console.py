"""What a person sees: project logging, filtered third-party noise, one-line user errors.

* :func:`setup_logging`: the ``megatron_gift`` logger writes ``[gift] message`` on global rank 0
  at ``info`` (other ranks: warnings only); ``debug`` makes every rank write, each line prefixed
  with its rank. Lines are written above a running progress bar, not through it.
* :func:`quiet_third_party`: the warnings every CPU or TE-less run would repeat
  (:data:`KNOWN_WARNINGS`: Transformer Engine and Apex fallbacks, upstream deprecations) are
  filtered in this process and, through ``PYTHONWARNINGS``, in the processes it starts; the
  ``megatron`` and ``torch.distributed.checkpoint`` loggers keep warnings and errors but lose
  :data:`QUIET_MESSAGES` (GPTModel's deprecation notice, MCore's async-save notice).
  :func:`describe_implementation` says in one line which layers and fallbacks are in use instead.
* :func:`entry_point`: wraps a command's ``main``. A :class:`megatron_gift.errors.UserError` is
  one line ``error: ...`` on stderr, printed once per job and node, and exit status
  :data:`~megatron_gift.errors.USER_ERROR_EXIT`; any other exception keeps its traceback. Both
  are recorded for torchrun (``TORCHELASTIC_ERROR_FILE``), so the launcher's summary names the
  real error as the root cause. A run stopped by a signal while setting up
  (:class:`~megatron_gift.errors.Interrupted`) is one line too, and exits 128 + the signal.
  In a job of several ranks the first rank on a node to hit a user error prints it, whichever
  rank that is, and a rank stopped because of it says nothing more: the error shows once.
* :func:`plain_text`: a docstring as ``--help`` shows it, without reST markup.
"""

import functools
import logging
import os
import re
import sys
import warnings
from typing import Callable, Optional

from megatron_gift.errors import USER_ERROR_EXIT, Interrupted, UserError

LOGGER_NAME = "megatron_gift"
# (message prefix, category) of third-party warnings that carry no news for a user of this
# project: the fallbacks are reported once by describe_implementation instead, the rest are
# upstream deprecation notices about APIs Megatron-Core itself calls. Prefixes hold no comma or
# colon, so they pass to child processes through PYTHONWARNINGS.
KNOWN_WARNINGS = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),
    ("MimoModelConfig is experimental", UserWarning),
    ("torch.distributed is disabled", UserWarning),
    ("The argument order of load has been changed", UserWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)
# Loggers whose warnings repeat on every rank and say nothing actionable: the messages below
# are dropped, anything else they say still reaches stderr.
QUIET_LOGGERS = ("megatron", "torch.distributed.checkpoint")
QUIET_MESSAGES = ("GPTModel IS DEPRECATED", "MCore's async save is deprecated")
_quieted = []
# reST markup that --help shows as plain text: ``literal``; :role:`target`, :role:`~a.b.target`,
# :role:`title <target>`; a "::" opening a literal block, alone on its line or ending a sentence.
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_LONE_BLOCK_MARKER = re.compile(r"^[ \t]*::[ \t]*\n(?:[ \t]*\n)?", re.MULTILINE)
_TRAILING_BLOCK_MARKER = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)


def global_rank() -> int:
    """This process's rank in its job (``RANK``, 0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: str = "info") -> logging.Logger:
    """Configure the project logger for ``level`` (debug | info | warning); returns it."""
    logger = logging.getLogger(LOGGER_NAME)
    rank = global_rank()
    everyone = level == "debug"
    handler = _ProgressBarSafeHandler()
    prefix = f"[gift rank {rank}]" if everyone else "[gift]"
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(getattr(logging, level.upper()) if everyone or rank == 0 else logging.WARNING)
    return logger


def quiet_third_party() -> None:
    """Filter the known third-party warnings here and in child processes; call before
    importing torch or Megatron-Core (idempotent)."""
    if _quieted:
        return
    _quieted.append(True)
    for prefix, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)
    inherited = [f"ignore:{prefix}:{category.__name__}" for prefix, category in KNOWN_WARNINGS]
    existing = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(([existing] if existing else []) + inherited)
    # torch reports at import that the CUDA toolkit has no runtime: true and moot on a CPU.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for name in QUIET_LOGGERS:
        handler = _CurrentStderrHandler()
        handler.addFilter(_DropMessages(QUIET_MESSAGES))
        third_party = logging.getLogger(name)
        third_party.setLevel(logging.WARNING)
        third_party.handlers[:] = [h for h in third_party.handlers
                                   if not isinstance(h, _CurrentStderrHandler)] + [handler]
        third_party.propagate = False


def plain_text(text: Optional[str]) -> str:
    """A reST docstring as plain text for ``--help``: a literal or a role such as
    ``:func:`x``` becomes its text (``:func:`~a.b``` becomes ``b``), and the ``::`` that opens
    a literal block goes (alone on its line) or becomes ``:`` (ending a sentence)."""
    def role(match: re.Match) -> str:
        target = match.group(2)
        return target.rsplit(".", 1)[-1] if match.group(1) else target

    text = _ROLE.sub(role, text or "")
    text = _TRAILING_BLOCK_MARKER.sub(":", _LONE_BLOCK_MARKER.sub("", text))
    return _LITERAL.sub(r"\1", text)


def quiet_gpu_advice() -> None:
    """Without CUDA, drop Megatron-Core's advice on CUDA_DEVICE_MAX_CONNECTIONS (on GPUs it
    stays: set CUDA_DEVICE_MAX_CONNECTIONS=1 as Megatron-LM's launch scripts do)."""
    warnings.filterwarnings("ignore", message="When using async grad allreduce",
                            category=UserWarning)


def describe_implementation() -> str:
    """One line: the layer implementation, optimizer kernels, fusions and CPU fallbacks in
    use."""
    import torch

    from megatron_gift.platform import te

    layers = ("Transformer Engine layers" if te.available() else
              "Megatron-Core local layers (Transformer Engine not installed or not importable)")
    try:
        import apex  # noqa: F401
        fused = "Apex fused optimizer kernels"
    except ImportError:
        fused = "torch optimizer kernels (no TE/Apex)"
    from megatron_gift.platform import kernels

    fused = f"{fused}; {kernels.describe(kernels.fusions())}"
    if torch.cuda.is_available():
        device = f"CUDA ({torch.cuda.get_device_name()})"
    else:
        from megatron_gift.platform.cpu import applied_patches

        device = f"CPU/gloo with the CPU compatibility layer ({len(applied_patches())} patches)"
    return f"{layers}; {fused}; {device}"


def entry_point(main: Callable[..., object]) -> Callable[..., None]:
    """Wrap a command's ``main``: user errors become one line and USER_ERROR_EXIT, other
    failures keep their traceback; both are recorded for torchrun's failure summary."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            main(*args, **kwargs)
        except UserError as error:
            _record_for_torchrun(error, user_error=True)
            if _first_to_report() or getattr(error, "every_rank", False):
                print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT)
        except Interrupted as stop:
            if global_rank() == 0 and not os.path.exists(_report_marker()):
                print(str(stop), file=sys.stderr, flush=True)  # else: a rank's error says why
            sys.exit(stop.exit_status)
        except KeyboardInterrupt:
            sys.exit(130)
        except SystemExit:
            raise
        except BaseException as error:
            _record_for_torchrun(error)
            raise

    return wrapper


def _first_to_report() -> bool:
    """Whether this rank prints the user error it hit: the first rank of the job on this node
    to hit one does (it need not be rank 0: a data error on one rank, whose launcher then stops
    the others), the rest say nothing, so the console shows the error once."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    try:
        os.close(os.open(_report_marker(), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no temporary directory: every rank 0 reports, as a lone rank would
        return global_rank() == 0
    return True


def _report_marker() -> str:
    """A file in the temporary directory naming this job's launch on this node (torchrun's
    run id and port, SLURM's job and step, and the launcher's pid: the workers' parent)."""
    import hashlib
    import tempfile

    env = os.environ
    launch = ":".join([env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_PORT", ""),
                       env.get("SLURM_JOB_ID", ""), env.get("SLURM_STEP_ID", ""),
                       str(os.getppid())])
    digest = hashlib.sha256(launch.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"megatron_gift-reported-{digest}")


def _record_for_torchrun(error: BaseException, user_error: bool = False) -> None:
    """Write ``error`` to torchrun's per-rank error file (``TORCHELASTIC_ERROR_FILE``), which
    the launcher reads to name the root cause; nothing outside torchrun. A user error is
    recorded as its one line, anything else with its traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if not user_error:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)
        return
    import json
    import time

    record = {"message": {"message": f"{type(error).__name__}: {error}",
                          "extraInfo": {"py_callstack": f"error: {error}\n",
                                        "timestamp": str(int(time.time()))}}}
    with open(path, "w") as f:
        json.dump(record, f)


class _CurrentStream:
    """A handler's ``stream``: ``sys.<name>`` as it is when a record comes, since the handler
    outlives whoever redirected it when the handler was made (e.g. a caller capturing a
    command's output, then closing what it captured into)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, handler, owner=None):
        return getattr(sys, self.name)

    def __set__(self, handler, stream):  # logging.StreamHandler.__init__ sets one: not kept
        pass


class _ProgressBarSafeHandler(logging.StreamHandler):
    """Writes above a running tqdm progress bar instead of through it, to the current stdout."""

    stream = _CurrentStream("stdout")

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to the current stderr."""

    stream = _CurrentStream("stderr")


class _DropMessages(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)
