"""``python -m megatron_gift.rl_handoff``: an alias of ``megatron-gift rl-handoff``
(:mod:`megatron_gift.commands.rl_handoff`)."""

from megatron_gift.commands.rl_handoff import main

if __name__ == "__main__":
    main()
