"""GIFT post-training on Megatron-Core.

    torchrun --nproc-per-node N examples/pretrain_gift.py [--config recipe.yaml] [flags] [k=v]

With neither ``--config`` nor ``--train-path`` it runs the embedded default
(megatron_gift.engine.default_run): GIFT from a tiny base model on synthetic one-style
demonstrations, building the base first when it is missing. A real run names its data and base
model, e.g. ``--pretrained-checkpoint /models/Qwen2.5-Math-7B --train-path sft.parquet --save
DIR``. Flags follow Megatron-LM (``--tensor-model-parallel-size``, ``--train-iters``,
``--gift-beta``, ...); ``python examples/pretrain_gift.py --help`` lists them all.
"""

import sys

from megatron_gift.config import parse_config
from megatron_gift.engine import default_run
from megatron_gift.platform.console import entry_point, quiet_third_party, setup_logging


@entry_point
def main(argv: list[str]) -> None:
    quiet_third_party()
    if _names_its_job(argv):
        config = parse_config(argv)
    else:
        config = parse_config(argv, defaults=default_run.gift_overrides(default_run.RUN_DIR))
        setup_logging(config.logging.log_level)
        default_run.prepare(default_run.RUN_DIR)
    from megatron_gift.engine.trainer import train

    train(config)


def _names_its_job(argv: list[str]) -> bool:
    """True when the command line brings a recipe or its own training data."""
    return any(arg.split("=")[0] in ("--config", "--train-path") or arg.startswith("data.train_path=")
               for arg in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
