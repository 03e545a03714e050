"""``python -m megatron_gift.convert``: an alias of ``megatron-gift convert``
(:mod:`megatron_gift.commands.convert`)."""

from megatron_gift.commands.convert import main

if __name__ == "__main__":
    main()
