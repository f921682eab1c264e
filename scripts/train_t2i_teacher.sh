#!/usr/bin/env bash
# Train a miniature text-to-image teacher (FLUX or PixArt layout) on captioned Fashion-MNIST.
# Usage: scripts/train_t2i_teacher.sh LAYOUT OUT_DIR [extra robuq train-t2i flags, e.g. --until N]
# Re-running the same command resumes from the newest checkpoint in OUT_DIR.
# Sized for one CPU core per teacher: 49 image tokens, 8000 steps of 64 images.
set -euo pipefail
layout=${1:?usage: $0 flux|pixart OUT_DIR [robuq train-t2i flags...]}
out=${2:?usage: $0 flux|pixart OUT_DIR [robuq train-t2i flags...]}
shift 2
resume=()
if compgen -G "$out/checkpoints/step-*.safetensors" >/dev/null; then resume=(--resume); fi
exec "${PYTHON:-python}" -m robuq.cli train-t2i --layout "$layout" --global-batch-size 64 \
  --steps 8000 --lr 4e-4 --warmup-steps 200 --min-lr-ratio 0.1 --ema-decay 0.9999 --seed 0 \
  --log-every 50 --ckpt-every 250 --keep-checkpoints 3 --device cpu --out-dir "$out" "${resume[@]}" "$@"
