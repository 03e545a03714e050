"""``python -m megatron_gift.commands SUBCOMMAND ...`` (also under ``torchrun -m``): the
``megatron-gift`` command."""

from megatron_gift.commands import main

main()
