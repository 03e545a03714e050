"""GIFT post-training on Megatron-Core.

    torchrun --nproc-per-node N examples/pretrain_gift.py [--config recipe.yaml] [flags] [k=v]

``--load DIR`` alone continues the run saved in DIR (its stored config, with any flags given
now applied over it). With neither ``--config`` nor ``--train-path`` it runs the embedded
default (megatron_gift.engine.default_run): GIFT from a tiny base model on synthetic one-style
demonstrations, building the base first when it is missing. A real run names its data and base
model, e.g. ``--pretrained-checkpoint /models/Qwen2.5-Math-7B --train-path sft.parquet --save
DIR``. Flags follow Megatron-LM (``--tensor-model-parallel-size``, ``--train-iters``,
``--gift-beta``, ...); ``python examples/pretrain_gift.py --help`` lists them all.
"""

import sys

from megatron_gift.config import parse_config
from megatron_gift.platform.console import entry_point, quiet_third_party, setup_logging
from megatron_gift.platform.launcher_env import adopt_slurm_ranks


@entry_point
def main(argv: list[str]) -> None:
    adopt_slurm_ranks()  # started by srun: rank and world from SLURM, before anything reads them
    quiet_third_party()
    setup_logging(parse_config(argv).logging.log_level)
    from megatron_gift.engine.job import job_config
    from megatron_gift.engine.trainer import train

    train(job_config(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
