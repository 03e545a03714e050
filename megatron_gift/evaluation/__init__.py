"""Sampling from and scoring a checkpoint: :mod:`.metrics` (pass@k, intervals, styles, the
GIFT target per token) and :mod:`.sampling` (load, sample, log-probabilities). The command is
``python -m megatron_gift.evaluate``."""
