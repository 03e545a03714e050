"""``megatron-gift train``: GIFT post-training on Megatron-Core.

::

    megatron-gift train [--config recipe.yaml] [flags] [section.key=value ...]
    torchrun --nproc-per-node N $(which megatron-gift) train [--config recipe.yaml] [flags]
    torchrun --nproc-per-node N -m megatron_gift.commands.train [--config recipe.yaml] [flags]
    torchrun --nproc-per-node N examples/pretrain_gift.py [...]    (Megatron-LM's habit)

``--load DIR`` alone continues the run saved in DIR (its stored config, with any flags given
now applied over it). With neither ``--config`` nor ``--train-path`` it runs the embedded
default job: GIFT from a tiny base model on synthetic one-style demonstrations, building the
base first when it is missing. A real run names its data and base model, e.g.
``--pretrained-checkpoint /models/Qwen2.5-Math-7B --train-path sft.parquet --save DIR``. Flags
follow Megatron-LM (``--tensor-model-parallel-size``, ``--train-iters``, ``--gift-beta``, ...);
``--help`` lists them all.
"""

import sys
from typing import Optional, Sequence

from megatron_gift.config import parse_config
from megatron_gift.config.cli import build_parser
from megatron_gift.platform.console import entry_point, quiet_third_party, setup_logging
from megatron_gift.platform.launcher_env import adopt_slurm_ranks


@entry_point
def main(argv: Optional[Sequence[str]] = None, prog: str = "megatron-gift train") -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser(prog).print_help()
        return
    adopt_slurm_ranks()  # started by srun: rank and world from SLURM, before anything reads them
    quiet_third_party()
    setup_logging(parse_config(argv).logging.log_level)
    from megatron_gift.demo import default_run
    from megatron_gift.engine.job import job_config
    from megatron_gift.engine.trainer import train

    train(job_config(argv, default_job=default_run))


if __name__ == "__main__":
    main()
