"""Where the run executes: the CPU compatibility layer for Megatron-Core (:mod:`.cpu`), work
that one rank does while the others wait (:mod:`.once`), and the console (:mod:`.console`)."""
