"""Where the run executes: the CPU compatibility layer for Megatron-Core (:mod:`.cpu`), the
process group (:mod:`.distributed`) and who this rank is in it (:mod:`.launcher_env`), the fused
kernels installed (:mod:`.kernels`), work that one rank does while the others wait
(:mod:`.once`), the save directory's lock (:mod:`.run_lock`), and the console
(:mod:`.console`)."""
