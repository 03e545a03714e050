"""Rank-0 observability: a progress bar with the headline numbers, the trackers the config
turns on (TensorBoard, Weights & Biases, MLflow: :mod:`megatron_gift.tracking.loggers`), and a
JSON-lines file with one object per logged iteration (and one per evaluation)."""

import json
import logging
import os
import sys
from typing import Any, Optional

from tqdm import tqdm

from megatron_gift.tracking.loggers import (check_available, close_all, open_trackers,
                                            resolved_config)

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes on global rank 0 only; other ranks get a logger that does nothing.

    ``config``: the run's JobConfig (its ``logging`` section says where to write; the whole of
    it is logged to W&B and MLflow once); ``total_iters``, ``start_iter``: iterations (a start
    past 0 is a resumed run, which continues its W&B and MLflow runs). Every rank checks that
    the trackers' packages are installed, so that a missing one stops every rank before
    anything is written."""

    def __init__(self, config: Any, total_iters: int, start_iter: int, enabled: bool):
        check_available(config.logging)
        self.enabled = enabled
        if not enabled:
            return
        self.trackers = open_trackers(config, start_iter)
        try:
            self._open(config, total_iters, start_iter)
        except BaseException:
            close_all(self.trackers, failed=True)
            raise

    def _open(self, config: Any, total_iters: int, start_iter: int) -> None:
        """Log the config of this start to the trackers; open the bar and the metrics file."""
        logging_config = config.logging
        resolved = resolved_config(config)
        for tracker in self.trackers:
            tracker.log_config(resolved, start_iter)
        self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                        disable=not logging_config.progress)
        self.file = None
        if logging_config.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(logging_config.metrics_file)), exist_ok=True)
            drop_records_after(logging_config.metrics_file, start_iter)
            self.file = open(logging_config.metrics_file, "a")

    def log(self, record: dict, headline: tuple = ("loss", "lr", "grad_norm", "tokens_per_s")) -> None:
        """``record``: dict with ``iteration`` and scalar metrics."""
        if not self.enabled:
            return
        if "loss" in record:
            self.bar.n = record["iteration"]
            self.bar.set_postfix({k: f"{record[k]:.4g}" for k in headline if k in record},
                                 refresh=True)
        else:
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.items()))
        scalars = {key: value for key, value in record.items()
                   if key != "iteration" and isinstance(value, (int, float))}
        for tracker in self.trackers:
            tracker.log_scalars(scalars, record["iteration"])
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self, failed: Optional[bool] = None) -> None:
        """Close the bar, the trackers and the file; ``failed`` (default: whether an exception
        is propagating, as in a ``finally`` block) marks the W&B and MLflow runs failed."""
        if not self.enabled:
            return
        if failed is None:
            failed = sys.exc_info()[0] is not None
        self.bar.close()
        if self.file is not None:
            self.file.close()
        close_all(self.trackers, failed)


def drop_records_after(path: str, iteration: int) -> None:
    """Keep only the records of ``path`` (JSON lines) up to ``iteration``: a run resumed from
    iteration N logs N+1, ... again, which a killed run may already have written."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["iteration"] <= iteration]
    if len(kept) != len(lines):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
