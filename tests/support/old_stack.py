"""A throw-away Python environment with the stack NeMo-Aligner 0.7 runs on, for checks that
what this project writes loads there.

NeMo-Aligner 0.7.0's Dockerfile pins Megatron-LM ``core_r0.10.0`` on ``pytorch:24.07`` (torch
2.4). The environment holds only torch 2.4.0 (CPU use of the PyPI wheel, which brings CUDA
libraries: about 5 GB installed, ~5 min the first time on a fast link), megatron-core 0.10.0
(built from its sdist: there is no Python 3.12 wheel; ~35 s) without its optional
dependencies (psutil is the one its torch_dist strategy imports), numpy < 2 and PyYAML; nothing of this project's venv.

It is created once per machine under ``$MEGATRON_GIFT_CACHE/old-stacks/`` (default
``~/.cache/megatron_gift/old-stacks/``), named after the pins, and reused; a half-built one is
never used (built in a temporary directory, renamed into place when complete).
"""

import os
import shutil
import subprocess
import sys
import tempfile

PINS = ("torch==2.4.0", "megatron-core==0.10.0", "numpy<2", "pyyaml", "packaging", "psutil")
NAME = "mcore0.10.0-torch2.4.0-py3.12"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Read at import (collection), before the test session points MEGATRON_GIFT_CACHE at a
# temporary directory: the environment must outlive the session.
_CACHE = os.environ.get("MEGATRON_GIFT_CACHE") or os.path.expanduser("~/.cache/megatron_gift")


def root() -> str:
    return os.path.join(_CACHE, "old-stacks", NAME)


def python() -> str:
    """The old stack's interpreter, creating the environment first if needed.

    Raises RuntimeError with pip's output when an install step fails.
    """
    target = root()
    exe = os.path.join(target, "bin", "python")
    marker = os.path.join(target, "COMPLETE")
    if os.path.isfile(marker):
        with open(marker) as f:
            if f.read().split() == list(PINS):
                return exe
    os.makedirs(os.path.dirname(target), exist_ok=True)
    build = tempfile.mkdtemp(prefix=NAME + ".", suffix=".tmp", dir=os.path.dirname(target))
    try:
        _create(build)
        with open(os.path.join(build, "COMPLETE"), "w") as f:
            f.write("\n".join(PINS) + "\n")
        # The venv works from any path through bin/python (only its bin/ scripts' first lines
        # name the build directory, and they are not used).
        shutil.rmtree(target, ignore_errors=True)  # an incomplete one
        os.rename(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return exe


def _create(directory: str) -> None:
    base = getattr(sys, "_base_executable", sys.executable)  # this venv's Python 3.12
    _run([base, "-m", "venv", "--clear", directory])
    pip = [os.path.join(directory, "bin", "python"), "-m", "pip", "install", "--quiet"]
    torch, mcore, *rest = PINS
    try:  # the CPU-only wheel where that index is reachable
        _run(pip + ["--timeout", "20", "--retries", "1", "--index-url", TORCH_CPU_INDEX, torch])
    except RuntimeError:
        _run(pip + [torch])  # PyPI's wheel (pulls the CUDA libraries; runs on CPU all the same)
    _run(pip + rest)
    _run(pip + ["--no-deps", "--no-binary", "megatron-core", mcore])


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
