"""Shared fixtures: tiny data written by the tests themselves, so nothing depends on a download."""

from __future__ import annotations

import os
import sys

# Before numpy and scipy load OpenBLAS, which reads this once: with two OpenBLAS threads on the shared 2-core
# machine, scipy's sqrtm of a 256×256 matrix (every FID) took 4.1 s against 0.07 s with one, measured side by side.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from robuq.data.fashion_mnist import write_idx  # noqa: E402
from robuq.models.dit import DiT, DiTConfig  # noqa: E402

# One thread: the tests' tensors are tiny, and on a shared 2-core machine a second OpenMP worker that waits
# for a descheduled partner made tests up to ten times slower (tests/test_benchmarks.py, 2 threads against 1,
# measured side by side). The threaded kernels' work split is tested where it is asked for
# (test_deploy_export.py::test_exported_blocks_give_the_same_bits_at_any_thread_count).
torch.set_num_threads(1)


def tiny_config(**overrides) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=48, depth=2, num_heads=2, num_classes=10)
    base.update(overrides)
    return DiTConfig(**base)


def perturbed(model: DiT, std: float = 0.02) -> DiT:
    """``model`` with noise added to its trainable weights: adaLN-Zero starts with a zero output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_dit() -> DiT:
    torch.manual_seed(0)
    return perturbed(DiT(tiny_config()))  # adaLN-Zero starts with a zero output: give tests a non-trivial function


@pytest.fixture
def fmnist_dir(tmp_path):
    """A Fashion-MNIST folder with 96 train and 32 test images of simple, class-dependent patterns."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 6, 4:24] = 230
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def tiny_diffusers_dit(seed: int = 0, shared_embedders: bool = False, **overrides):
    """A small random diffusers DiTTransformer2DModel (skips the test without diffusers). ``shared_embedders``
    gives every block block 0's timestep/class embedder, as converted checkpoints have."""
    diffusers = pytest.importorskip("diffusers")
    base = dict(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**base)
    if shared_embedders:
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def run_diffusers(model, seed: int = 1, batch: int = 2):
    """The output of a diffusers DiT on fixed random latents, timesteps and labels."""
    size, channels = model.config.sample_size, model.config.in_channels
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.config.num_embeds_ada_norm, (batch,), generator=g)
    return model(x, timestep=t, class_labels=y).sample


CLASSES = ("n001_circle", "n002_bar", "n003_noise")


def make_image_folder(root, per_class: int = 4, seed: int = 0):
    """Three classes of RGB images of assorted sizes (larger and smaller than the crop, not square)."""
    rng = np.random.default_rng(seed)
    sizes = [(80, 64), (64, 96), (150, 140), (50, 70)]
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
            arr[h // 3 : 2 * h // 3, :, c] = 220  # a class-coloured band
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(arr).save(root / name / f"img{i}{suffix}")
    return root


def tensor_byte_offset(path) -> int:
    """The file offset of the first byte of a PyTorch zip checkpoint's first tensor (data/0)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def robuq_under_torchrun(processes: int) -> list[str]:
    """The start of a ``robuq`` command line run by torchrun in ``processes`` local processes (gloo on the CPU);
    the subcommand and its options follow."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "robuq.cli",
    ]
