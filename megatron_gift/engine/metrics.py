"""Rank-0 observability: a progress bar with the headline numbers, TensorBoard scalars, and a
JSON-lines file with one object per logged iteration (and one per evaluation)."""

import json
import logging
import os

from omegaconf import DictConfig
from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes on global rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, logging_config: DictConfig, total_iters: int, start_iter: int,
                 enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                        disable=not logging_config.progress)
        self.writer = None
        if logging_config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(logging_config.tensorboard_dir)
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
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["iteration"])
            self.writer.flush()
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


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
