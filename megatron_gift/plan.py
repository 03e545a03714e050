"""``python -m megatron_gift.plan``: an alias of ``megatron-gift plan``
(:mod:`megatron_gift.commands.plan`)."""

from megatron_gift.commands.plan import main

if __name__ == "__main__":
    main()
