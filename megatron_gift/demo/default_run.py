"""The embedded default job: no downloads, a few minutes on a 2-core CPU.

Stage 1 pretrains a tiny base model with plain next-token loss on the synthetic corpus (all
solution styles). Stage 2 is GIFT post-training from that base on one-style demonstrations.
Stage 1 always runs as one process (TP = PP = DP = 1) with a fixed seed, so every stage-2
layout starts from the same base. ``python -m megatron_gift.demo.default_run --run-dir DIR`` builds
stage 1 alone.
"""

import argparse
import logging
import os
import subprocess
import sys
from typing import Optional

from megatron_gift.core.paths import latest_checkpoint
from megatron_gift.demo import synthetic
from megatron_gift.platform.console import entry_point, quiet_third_party
from megatron_gift.platform.once import build_once

log = logging.getLogger(__name__)
RUN_DIR = os.path.join("runs", "default")
SEED = 1234
_SIZES = {"corpus.jsonl": 6000, "demonstrations.jsonl": 2000, "valid.jsonl": 256}


def data_paths(run_dir: str) -> dict[str, str]:
    return {name: os.path.join(run_dir, "data", name) for name in _SIZES}


def base_overrides(run_dir: str) -> dict:
    """Stage 1: next-token pretraining on the mixed-style corpus."""
    paths = data_paths(run_dir)
    return {
        "gift": {"beta": float("inf")},
        "data": {"train_path": paths["corpus.jsonl"], "text_field": "text"},
        "training": {"train_iters": 300, "micro_batch_size": 16, "global_batch_size": 32,
                     "seed": SEED, "eval_interval": 1000},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 20},
        "checkpoint": {"save": os.path.join(run_dir, "base")},
        "logging": {"metrics_file": os.path.join(run_dir, "base_metrics.jsonl"), "log_interval": 10},
    }


def gift_overrides(run_dir: str) -> dict:
    """Stage 2: GIFT from the base on one-style demonstrations (flags override any of it)."""
    paths = data_paths(run_dir)
    return {
        "data": {"train_path": paths["demonstrations.jsonl"], "valid_path": paths["valid.jsonl"]},
        "training": {"train_iters": 60, "micro_batch_size": 8, "global_batch_size": 16,
                     "eval_interval": 20, "eval_iters": 2},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "lr_decay_style": "constant"},
        # --save and --load the same directory: a second start continues the run (or says
        # it finished); metrics and TensorBoard go under it (run_spec's defaults).
        "checkpoint": {"pretrained_checkpoint": os.path.join(run_dir, "base"),
                       "save": os.path.join(run_dir, "gift"), "load": os.path.join(run_dir, "gift"),
                       "save_interval": 20},
        "logging": {"log_interval": 1},
    }


def prepare(run_dir: str, base_iters: Optional[int] = None) -> None:
    """Write the synthetic data (idempotent) and build the base checkpoint if it is missing
    (``base_iters``: stage 1's iterations, default 300)."""
    paths = data_paths(run_dir)
    os.makedirs(os.path.dirname(paths["corpus.jsonl"]), exist_ok=True)
    for name, path in paths.items():
        if not os.path.isfile(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            if name == "corpus.jsonl":
                synthetic.write_pretraining_corpus(tmp, _SIZES[name], seed=SEED)
            else:
                seed = SEED + 1 if name == "demonstrations.jsonl" else SEED + 2
                synthetic.write_demonstrations(tmp, _SIZES[name], seed=seed)
            os.replace(tmp, path)
    base = os.path.join(run_dir, "base")
    if latest_checkpoint(base) is None:
        _build_base(run_dir, base, base_iters)


def _build_base(run_dir: str, base: str, iters: Optional[int]) -> None:
    """Global rank 0 trains stage 1 in a process of its own; the other ranks wait for it."""
    def build() -> None:
        log.info(f"building the base model (stage 1, one process) in {base}")
        # A world of its own: none of torchrun's rendezvous variables.
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT",
                            "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
               and not k.startswith("TORCHELASTIC_")}
        argv = ["--train-iters", str(iters)] if iters else []
        result = subprocess.run([sys.executable, "-m", "megatron_gift.demo.default_run",
                                 "--run-dir", run_dir, *argv], env=env)
        if result.returncode != 0:
            raise RuntimeError(f"building the base model failed (exit code {result.returncode})")

    build_once(lambda: latest_checkpoint(base) is not None, build,
               is_worker=int(os.environ.get("RANK", "0")) == 0,
               others_wait=int(os.environ.get("WORLD_SIZE", "1")) > 1,
               marker=os.path.join(run_dir, "base.failed"), what="building the base model")


@entry_point
def main() -> None:
    quiet_third_party()
    from megatron_gift.config import parse_config
    from megatron_gift.engine.trainer import train

    parser = argparse.ArgumentParser(description="Build the default job's base model (stage 1).")
    parser.add_argument("--run-dir", default=RUN_DIR)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--train-iters", type=int, default=None,
                        help="stage 1's iterations (default 300)")
    args = parser.parse_args()
    argv = ["--log-level", args.log_level]
    argv += ["--train-iters", str(args.train_iters)] if args.train_iters else []
    train(parse_config(argv, defaults=base_overrides(args.run_dir)))


if __name__ == "__main__":
    main()
