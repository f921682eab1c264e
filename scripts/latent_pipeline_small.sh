#!/usr/bin/env bash
# The paper's chain at toy scale on the CPU (results/latent_pipeline): images → latents → FP teacher →
# AMPN (warm-up QAT, sensitivities, plan, QAT with the plan) → sampling through the VAE → npz → metrics.
# Every part is real but small: 3 Fashion-MNIST classes as 64 px RGB, a *randomly initialised* SD-VAE-class
# AutoencoderKL (no download), DiT-T/2 on 8×8×4 latents. Usage: scripts/latent_pipeline_small.sh WORK_DIR RESULTS_DIR
set -euo pipefail
work=${1:?usage: $0 WORK_DIR RESULTS_DIR}
res=${2:?usage: $0 WORK_DIR RESULTS_DIR}
py=${PYTHON:-python}
mkdir -p "$res"
"$py" scripts/latent_pipeline_inputs.py "$work" 64
"$py" -m robuq.cli latents "$work/images" --vae "$work/vae" --out "$work/latents" --image-size 64 --flip \
  --shard-size 128 --batch-size 32 --num-workers 2 --device cpu --no-progress
"$py" -m robuq.cli train --latents "$work/latents" --model DiT-T/2 --input-size 8 --steps 300 --global-batch-size 32 \
  --lr 3e-4 --warmup-steps 20 --ckpt-every 300 --device cpu --out-dir "$work/teacher" --no-progress
"$py" -m robuq.cli ampn run --teacher "$work/teacher/model.safetensors" --latents "$work/latents" --budget 2 \
  --warmup-qat-steps 60 --steps 120 --global-batch-size 32 --lr 2e-4 --warmup-steps 10 --probe-every 20 \
  --probe-images 32 --calibration-images 32 --ckpt-every 60 --precision bf16 --device cpu --out-dir "$work/ampn" --no-progress
"$py" -m robuq.cli sample --ckpt "$work/ampn/final/model.safetensors" --vae "$work/vae" --num-samples 96 --shard-size 32 \
  --steps 50 --cfg-scale 1.5 --cfg-channels 3 --batch-size 32 --device cpu --out "$work/samples" --no-progress
"$py" -m robuq.cli eval metrics --samples "$work/samples/samples.npz" --reference "$work/reference.npz" \
  --out "$res/metrics.json"
cp "$work/ampn/plan.json" "$work/ampn/final/log.jsonl" "$res/" && cp "$work/samples/grid.png" "$res/samples_grid.png"
cp "$work/ampn/warmup/log.jsonl" "$res/warmup_log.jsonl" && cp "$work/teacher/log.jsonl" "$res/teacher_log.jsonl"
"$py" -c "import numpy as np, json, sys; d = np.load(sys.argv[1]); json.dump({'arr_0': list(d['arr_0'].shape), \
'dtype': str(d['arr_0'].dtype), 'labels': list(d['labels'].shape)}, open(sys.argv[2], 'w'))" \
  "$work/samples/samples.npz" "$res/npz_shape.json"
