"""Image grids and PNG encoding (deterministic: the same tensor always gives the same bytes)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from latentforge.data.dataset import to_uint8


def grid_uint8(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) float in [-1, 1].
        nrow: images per row (default: about sqrt(N)).
        pad: pixels between tiles (dark grey).

    Returns:
        (H', W', C) uint8 with C in {1, 3}.
    """
    x = to_uint8(images).cpu().numpy()  # (N, C, H, W)
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 40, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        out[y0 : y0 + h, x0 : x0 + w] = x[i].transpose(1, 2, 0)
    return out


def png_bytes(array_hwc: np.ndarray, upscale: int = 1) -> bytes:
    """Encode (H, W, C) uint8 as PNG, optionally upscaled (nearest) for legibility."""
    img = Image.fromarray(array_hwc[..., 0] if array_hwc.shape[-1] == 1 else array_hwc)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def grid_png(images: torch.Tensor, nrow: int | None = None, upscale: int | None = None) -> bytes:
    """PNG of a grid; small images are upscaled so a 28 px digit is visible on screen."""
    h = images.shape[-1]
    scale = upscale if upscale is not None else max(1, 64 // h)
    return png_bytes(grid_uint8(images, nrow), upscale=scale)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → (H, W, C) uint8."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    return arr[..., None] if arr.ndim == 2 else arr
