"""Where a checkpoint's parts lie on disk (Megatron-LM's layout); plain file-system facts, no
torch::

    ROOT/latest_checkpointed_iteration.txt      the newest complete iteration (written last)
    ROOT/iter_0000010/                          one iteration, torch_dist (metadata.json, ...)
    ROOT/hf/                                    the base model's HF config + tokenizer, if any
"""

import os
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"


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
