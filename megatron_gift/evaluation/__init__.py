"""Sampling from and scoring a checkpoint: :mod:`.policy` (a policy sampled and scored, the
records it reads), :mod:`.metrics` (pass@k, intervals, styles, the GIFT target per token) and
:mod:`.sampling` (load, sample, log-probabilities). The command is ``megatron-gift evaluate``."""
