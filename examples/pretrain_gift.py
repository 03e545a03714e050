"""GIFT post-training on Megatron-Core.

    torchrun --nproc-per-node N examples/pretrain_gift.py [--config recipe.yaml] [flags] [k=v]

Without ``--config`` it runs the embedded default (megatron_gift.default_run): GIFT from a tiny
base model on synthetic one-style demonstrations, building the base first when it is missing.
Flags follow Megatron-LM (``--tensor-model-parallel-size``, ``--train-iters``, ``--gift-beta``,
...); ``python examples/pretrain_gift.py --help`` lists them all.
"""

import sys

from megatron_gift import default_run
from megatron_gift.config import parse_config
from megatron_gift.training import train


def main(argv):
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        config = parse_config(argv)
    else:
        config = parse_config(argv, defaults=default_run.gift_overrides(default_run.RUN_DIR))
        default_run.prepare(default_run.RUN_DIR)
    train(config)


if __name__ == "__main__":
    main(sys.argv[1:])
