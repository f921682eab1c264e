"""Inputs of the small end-to-end latent run (results/latent_pipeline): an ImageNet-style folder of 64 px RGB
images made from Fashion-MNIST (3 classes, tinted per class), a randomly initialised AutoencoderKL of the
SD-VAE class saved locally, and a reference .npz of the centre-cropped images for `robuq eval metrics`.

Usage: python scripts/latent_pipeline_inputs.py OUT_DIR [PER_CLASS]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from robuq.data.fashion_mnist import load_fashion_mnist
from robuq.data.image_stream import StreamingImageFolder

CLASSES = {0: "n00000000_tshirt", 1: "n00000001_trouser", 7: "n00000007_sneaker"}
TINTS = {0: (1.0, 0.6, 0.6), 1: (0.6, 1.0, 0.6), 7: (0.6, 0.6, 1.0)}


def main(out: Path, per_class: int) -> None:
    images, labels = load_fashion_mnist("train")
    for label, name in CLASSES.items():
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            rgb = (images[index][..., None] * np.array(TINTS[label])).astype(np.uint8)
            Image.fromarray(rgb).resize((72, 64), Image.BICUBIC).save(out / "images" / name / f"{i:04d}.png")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            latent_channels=4,
            norm_num_groups=8,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    vae.save_pretrained(out / "vae")
    folder = StreamingImageFolder(out / "images", 64)
    np.savez(out / "reference.npz", arr_0=np.stack([folder.load(i) for i in range(len(folder))]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64)
