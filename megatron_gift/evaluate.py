"""``python -m megatron_gift.evaluate``: an alias of ``megatron-gift evaluate``
(:mod:`megatron_gift.commands.evaluate`)."""

from megatron_gift.commands.evaluate import main

if __name__ == "__main__":
    main()
