"""GIFT post-training on Megatron-Core, as Megatron-LM's ``pretrain_gpt.py`` is run:

    torchrun --nproc-per-node N examples/pretrain_gift.py [--config recipe.yaml] [flags] [k=v]

An alias of ``megatron-gift train`` (:mod:`megatron_gift.commands.train`, which says more);
``--help`` lists every flag.
"""

import sys

from megatron_gift.commands.train import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="examples/pretrain_gift.py")
