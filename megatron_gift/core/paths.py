"""Where a checkpoint's parts lie on disk (Megatron-LM's layout); plain file-system facts, no
torch::

    ROOT/latest_checkpointed_iteration.txt      the newest complete iteration (written last)
    ROOT/iter_0000010/                          one iteration, torch_dist (metadata.json, ...)
    ROOT/hf/                                    the base model's HF config + tokenizer, if any
"""

import os
import re
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"
# What an iteration directory holds once torch_dist finished writing it: Megatron-Core's
# metadata.json and the torch.distributed.checkpoint index (written after the shards).
COMPLETE_MARKERS = ("metadata.json", ".metadata")
_ITERATION = re.compile(r"iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    """``root/iter_0000010`` for iteration 10."""
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_checkpoint(path: Optional[str]) -> Optional[str]:
    """The newest complete ``iter_*`` directory under ``path`` (or ``path`` itself when it is
    an iteration directory), or None."""
    if path is None or not os.path.isdir(path):
        return None
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            return iteration_dir(path, int(f.read().strip()))
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    return None


def iterations(root: Optional[str]) -> list[int]:
    """The iterations of the ``iter_*`` directories under ``root``, complete or not, ascending."""
    if root is None or not os.path.isdir(root):
        return []
    found = (_ITERATION.match(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0))))


def is_complete(directory: str) -> bool:
    """True when the iteration ``directory`` was written to the end (its index files exist)."""
    return all(os.path.isfile(os.path.join(directory, name)) for name in COMPLETE_MARKERS)


def holds_checkpoints(root: Optional[str]) -> bool:
    """True when ``root`` has a tracker or any ``iter_*`` directory (a run's checkpoints)."""
    return root is not None and (os.path.isfile(os.path.join(root, TRACKER))
                                 or bool(iterations(root)))


def run_root(path: str) -> str:
    """The checkpoint root of ``path``: its parent when ``path`` is an iteration directory."""
    path = os.path.abspath(path)
    return os.path.dirname(path) if _ITERATION.match(os.path.basename(path)) else path
