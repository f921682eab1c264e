#!/usr/bin/env bash
# The full AMPN pipeline on the shipped teacher at one average-bit budget (the reference runs of results/ampn.md):
# one 2000-step QAT schedule: its first 1000 steps at 4 bits, sensitivities, exact allocation, 1000 steps with the plan.
# Usage: scripts/ampn_teacher.sh BUDGET OUT_DIR [extra robuq ampn run flags]
# Re-running the same command resumes: finished stages are skipped, QAT stages continue from checkpoints.
set -euo pipefail
budget=${1:?usage: $0 BUDGET OUT_DIR [flags...]}
out=${2:?usage: $0 BUDGET OUT_DIR [flags...]}
shift 2
exec "${PYTHON:-python}" -m robuq.cli ampn run --preset robuq --budget "$budget" --warmup-qat-steps 1000 \
  --steps 2000 --global-batch-size 32 --lr 2e-4 --warmup-steps 50 --loss mix --probe-every 100 \
  --log-every 25 --ckpt-every 250 --seed 0 --device cpu --out-dir "$out" "$@"
