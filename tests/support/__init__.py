"""Test support: the multi-rank harness, the local SLURM cluster, the old NeMo stack."""
