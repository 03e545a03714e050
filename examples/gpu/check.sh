#!/usr/bin/env bash
# One GPU check (see check.py): the fused loss against the oracle, its speed against Megatron's
# cross-entropy, GIFT's training step at ~1B parameters, and the TE/FP8 rows where TE is installed.
# Exit status 1 when a check fails. Usage: bash examples/gpu/check.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
exec "${PYTHON:-python3}" examples/gpu/check.py "$@"
