"""TensorFlow 1's ``tf.image.resize_bilinear`` (align_corners=False), which the ADM evaluator's graph applies.

TF1 maps output pixel i to input coordinate i · (in / out), with no half-pixel offset (PyTorch's
``align_corners=False`` uses (i + ½) · in/out − ½), so the image shifts towards the top-left and the last
rows and columns repeat the input's edge. Every step is done in float32 in TF's order — the scale as a
float32 quotient, the coordinate as a float32 product, the lower tap floor(x), the upper tap
min(ceil(x), in − 1), and top = tl + (tr − tl)·Δx, bottom likewise, out = top + (bottom − top)·Δy — so that
the result matches TF's kernel to the last bit or one ulp.
"""

from __future__ import annotations

import torch
from robuq.core.errors import RobuqError


def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    coord = torch.arange(out_size, dtype=torch.float32) * scale
    lower = coord.floor()
    lerp = coord - lower
    upper = coord.ceil().clamp(max=in_size - 1)
    return lower.long().to(device), upper.long().to(device), lerp.to(device)


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) → (N, C, *size) float32, as TF1's resize_bilinear with align_corners=False."""
    if images.ndim != 4:
        raise RobuqError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    x = images.to(torch.float32)
    y0, y1, dy = _taps(x.shape[2], size[0], x.device)
    x0, x1, dx = _taps(x.shape[3], size[1], x.device)
    top_rows, bottom_rows = x[:, :, y0, :], x[:, :, y1, :]
    top = top_rows[..., x0] + (top_rows[..., x1] - top_rows[..., x0]) * dx
    bottom = bottom_rows[..., x0] + (bottom_rows[..., x1] - bottom_rows[..., x0]) * dx
    return top + (bottom - top) * dy[:, None]
