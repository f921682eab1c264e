"""Generate images from a DiT, and turn them into pixels and grids people look at."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from robuq.core.files import atomic_write
from robuq.core.runtime import PRECISIONS, precision_context
from robuq.data.fashion_mnist import CLASS_NAMES
from robuq.diffusion.gaussian import create_diffusion
from robuq.models.dit import DiT
from robuq.core.errors import RobuqError


def guided(model: DiT, cfg_scale: float, cfg_channels: int | None = None):
    """A denoiser ``f(x, t, y)`` that applies classifier-free guidance through ``model.forward_with_cfg``
    (to the first ``cfg_channels`` noise channels; None: all)."""
    if cfg_scale == 1.0 or model.num_classes == 0:
        return lambda x, t, y=None: model(x, t, y)

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        null = torch.full_like(y, model.num_classes)
        out = model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), cfg_scale, cfg_channels
        )
        return out[: len(x)]

    return denoise


@torch.no_grad()
def generate(
    model: DiT,
    labels: torch.Tensor | None,
    num_samples: int,
    sampler: str = "ddpm",
    steps: int = 100,
    cfg_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = True,
    cfg_channels: int | None = None,
    clip_denoised: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Images in [-1, 1], shape (num_samples, C, H, W); identical for the same seed, whatever the device.

    ``precision`` runs the model in fp32, with TF32 matmuls (CUDA) or under bf16 autocast, as training can;
    quantizer statistics, scales and rounding stay fp32 either way, and the sampler's own arithmetic is fp32.

    All noise is drawn from one CPU generator, so a quantized model and its teacher sampled with the same
    seed start from, and are perturbed by, the same noise. Latent models (decoded by a VAE afterwards) are
    sampled with ``clip_denoised=False``, as DiT does: latents do not live in [-1, 1].
    """
    if sampler not in ("ddpm", "ddim"):
        raise RobuqError(f"unknown sampler {sampler!r}; use 'ddpm' or 'ddim'")
    if labels is not None and len(labels) != num_samples:
        raise RobuqError("labels must hold one label per sample")
    model.eval()
    device = next(model.parameters()).device
    diffusion = create_diffusion(
        str(steps) if sampler == "ddpm" else f"ddim{steps}", learn_sigma=model.out_channels != model.in_channels
    )
    if precision not in PRECISIONS:
        raise RobuqError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    model_call = guided(model, cfg_scale, cfg_channels)

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with precision_context(precision, x.device):
            return model_call(x, t, y).float()

    size = model.x_embedder.grid_size * model.patch_size
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    starts = range(0, num_samples, batch_size)
    for start in tqdm(starts, desc=f"sample ({sampler}, {steps} steps)", disable=not progress or len(starts) < 2):
        n = min(batch_size, num_samples - start)
        noise = torch.randn(n, model.in_channels, size, size, generator=generator).to(device)
        kwargs = {} if labels is None else {"y": labels[start : start + n].to(device)}
        run = diffusion.ddpm_sample if sampler == "ddpm" else diffusion.ddim_sample
        chunks.append(
            run(
                denoise,
                noise,
                generator=generator,
                model_kwargs=kwargs,
                progress=progress and len(starts) < 2,
                clip_denoised=clip_denoised,
            ).cpu()
        )
    return torch.cat(chunks)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) → uint8 (N, H, W, 3), grayscale replicated to RGB as image evaluators expect."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def tile(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    """uint8 NHWC images tiled ``columns`` per row on a white canvas, ``pad`` pixels apart."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return canvas


def _picture(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)  # grey images as PIL's "L" mode


def _save(picture: Image.Image, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def row_names(model) -> list[str] | None:
    """A class-conditional model's class names for the rows of its grids: Fashion-MNIST's for a 10-class
    grey-image DiT (the models robuq ships and trains), "class k" for any other, None when unconditional."""
    count = getattr(model, "num_classes", 0)
    if not count:
        return None
    return (
        list(CLASS_NAMES)
        if count == len(CLASS_NAMES) and getattr(model, "in_channels", 0) == 1
        else [f"class {k}" for k in range(count)]
    )


def _label_rows(picture: Image.Image, labels: list[str], row_height: int, top: int = 0) -> Image.Image:
    """``picture`` with a white margin on the left holding each row's label, centred on its row."""
    from PIL import ImageDraw

    font = _font(12)
    margin = max(int(font.getlength(label)) for label in labels) + 8
    canvas = Image.new(picture.mode, (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    ink = 0 if canvas.mode == "L" else (0, 0, 0)
    for r, label in enumerate(labels):
        draw.text((4, top + r * row_height + row_height // 2 - 7), label, fill=ink, font=font)
    return canvas


def save_grid(
    images: np.ndarray,
    path: str | Path,
    columns: int,
    scale: int = 2,
    pad: int = 2,
    row_labels: list[str] | None = None,
) -> Path:
    """Tile uint8 NHWC images into one PNG, ``columns`` per row, each enlarged ``scale`` times; ``row_labels``
    name the rows in a left margin."""
    picture = _picture(tile(images, columns, pad))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if row_labels:
        picture = _label_rows(picture, row_labels, (images.shape[1] + pad) * scale, pad * scale)
    return _save(picture, path)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow ≥ 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def save_comparison(
    panels: dict[str, np.ndarray],
    path: str | Path,
    columns: int,
    title: str,
    scale: int = 2,
    row_labels: list[str] | None = None,
) -> Path:
    """Grids of the same noise and labels side by side, each headed by its name, under a title (and each row
    named by ``row_labels`` on the left): one PNG a reader can tell the models apart in."""
    from PIL import ImageDraw

    grids = [_picture(tile(images, columns)) for images in panels.values()]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    font, gap, line = _font(14), 12, 22
    width = max(sum(g.width for g in grids) + gap * (len(grids) - 1), int(font.getlength(title)) + 8)
    canvas = Image.new(grids[0].mode, (width, 2 * line + max(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(canvas)
    ink = 0 if canvas.mode == "L" else (0, 0, 0)
    draw.text((4, 3), title, fill=ink, font=font)
    x = 0
    for name, grid in zip(panels, grids):
        draw.text((x + 4, line + 3), name, fill=ink, font=font)
        canvas.paste(grid, (x, 2 * line))
        x += grid.width + gap
    if row_labels:
        first = next(iter(panels.values()))
        canvas = _label_rows(canvas, row_labels, (first.shape[1] + 2) * scale, 2 * line + 2 * scale)
    return _save(canvas, path)
