"""``python -m megatron_gift.inspect``: an alias of ``megatron-gift inspect``
(:mod:`megatron_gift.commands.inspect_checkpoint`)."""

from megatron_gift.commands.inspect_checkpoint import main

if __name__ == "__main__":
    main()
