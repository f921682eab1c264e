#!/usr/bin/env bash
# The paper's experiment: DiT-XL/2 on ImageNet 256 → W1.58A2 (RobuQ + AMPN) → 50k samples → metrics.
#
# Usage: scripts/imagenet_dit_xl.sh IMAGENET_TRAIN_DIR VAE_DIR DIT_XL_2_256_PT OUT_DIR [GPUS]
#   IMAGENET_TRAIN_DIR  ImageNet's train/ folder (one n0xxxxxxx sub-folder per class)
#   VAE_DIR             a local copy of stabilityai/sd-vae-ft-ema (or -mse), save_pretrained layout
#   DIT_XL_2_256_PT     the reference DiT-XL-2-256x256.pt (facebookresearch/DiT)
#   GPUS                processes per node for torchrun (default 1)
# Every stage resumes: re-running the same command skips finished shards, stages and checkpoints.
# Environment overrides (tests/test_recipe_torchrun.py runs this script at toy size on the CPU with them):
# STEPS, BATCH, SAMPLES, IMAGE_SIZE, WARMUP_QAT, LR_WARMUP, CKPT_EVERY, PROBE_EVERY, SAMPLE_STEPS, PRECISION,
# NUM_WORKERS, CALIBRATION, SHARD_SIZE, LATENT_SHARD_SIZE.
#
# Hyper-parameters. From the paper (docs/method.md §2, §7, §8): DiT-XL/2 at 256 px, ternary weights and the
# RobuQ preset, AMPN at an average of 2 activation bits after ~1,000 warm-up QAT steps, AdamW, 350k QAT
# iterations, 250-step DDPM sampling, 50,000 samples, cfg up to 4.0 (FID reported beside IS/Precision).
# GUESSED (the paper does not state them): learning rate 1e-4 with 1,000 warm-up steps and a cosine
# schedule, global batch 256, robuq qat's default recipe (loss "mix" = diffusion + distillation, ternary latent
# weights at 5x the learning rate, full-precision layers trained; results/convergence.md), EMA 0.9999, the
# per-token scale rule of the preset, cfg 1.5 for the headline FID, AMPN's 128 calibration images,
# horizontal flips in the latent cache, --cfg-channels 3 (the reference sampler's behaviour).
set -euo pipefail
images=${1:?usage: $0 IMAGENET_TRAIN_DIR VAE_DIR DIT_XL_2_256_PT OUT_DIR [GPUS]}
vae=${2:?usage}
teacher=${3:?usage}
out=${4:?usage}
gpus=${5:-1}
steps=${STEPS:-350000}
batch=${BATCH:-256}
samples=${SAMPLES:-50000}
size=${IMAGE_SIZE:-256}
workers=${NUM_WORKERS:-8}
run() { "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m robuq.cli "$@"; }

# 1. Latents of ImageNet (× 0.18215, with mirrored copies), sharded, resumable.
run latents "$images" --vae "$vae" --out "$out/latents" --image-size "$size" --flip --batch-size 64 --num-workers "$workers" \
  --shard-size "${LATENT_SHARD_SIZE:-1024}"

# 2-4. AMPN in one schedule of $steps: warm-up QAT at 4 bits, sensitivities, exact allocation at 2 bits, QAT with the plan.
run ampn run --teacher "$teacher" --latents "$out/latents" --preset robuq --budget 2 --warmup-qat-steps "${WARMUP_QAT:-1000}" \
  --steps "$steps" --global-batch-size "$batch" --lr 1e-4 --warmup-steps "${LR_WARMUP:-1000}" --ema-decay 0.9999 \
  --precision "${PRECISION:-bf16}" --grad-checkpoint --num-workers "$workers" --probe-every "${PROBE_EVERY:-1000}" \
  --ckpt-every "${CKPT_EVERY:-5000}" --log-every 100 --calibration-images "${CALIBRATION:-128}" --out-dir "$out/ampn"

# 5. The compact file (packed ternary weights).
"${PYTHON:-python}" -m robuq.cli export "$out/ampn/final/model.safetensors" --out "$out/dit-xl2-w1.58a2.robuq.safetensors" --report

# 6. 50,000 samples, labels uniform at random, 250 DDPM steps, decoded by the VAE, one samples.npz.
for cfg in 1.5 4.0; do
  run sample --ckpt "$out/ampn/final/model.safetensors" --vae "$vae" --num-samples "$samples" --steps "${SAMPLE_STEPS:-250}" \
    --cfg-scale "$cfg" --cfg-channels 3 --batch-size 125 --shard-size "${SHARD_SIZE:-1000}" --precision "${PRECISION:-bf16}" \
    --out "$out/samples-cfg$cfg"
done

# 7. Metrics against ADM's ImageNet-256 reference batch (VIRTUAL_imagenet256_labeled.npz) with the FID Inception.
if [[ -n "${REFERENCE_NPZ:-}" && -n "${INCEPTION_WEIGHTS:-}" ]]; then
  for cfg in 1.5 4.0; do
    "${PYTHON:-python}" -m robuq.cli eval metrics --samples "$out/samples-cfg$cfg/samples.npz" --reference "$REFERENCE_NPZ" \
      --extractor inception --inception-weights "$INCEPTION_WEIGHTS" --out "$out/metrics-cfg$cfg.json"
  done
else
  echo "set REFERENCE_NPZ and INCEPTION_WEIGHTS to score the samples (robuq eval metrics)"
fi
