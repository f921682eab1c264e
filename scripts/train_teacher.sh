#!/usr/bin/env bash
# Train the Fashion-MNIST teacher that ships as src/robuq/assets/teacher-fmnist-dit-t4.safetensors.
# Usage: scripts/train_teacher.sh OUT_DIR [extra robuq train flags, e.g. --resume or --until N]
# Sized for a 2-core CPU: 28x28 images (no padding), patch 4 -> 49 tokens, 7000 steps of 128 images.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [robuq train flags...]}
shift
exec "${PYTHON:-python}" -m robuq.cli train --model DiT-T/4 --input-size 28 --global-batch-size 128 \
  --steps 7000 --lr 4e-4 --warmup-steps 200 --min-lr-ratio 0.1 --ema-decay 0.9999 --seed 0 \
  --log-every 50 --ckpt-every 250 --keep-checkpoints 2 --device cpu --out-dir "$out" "$@"
