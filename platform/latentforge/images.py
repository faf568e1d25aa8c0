"""Pixel ranges, image grids and PNG encoding (deterministic: the same tensor always gives the same bytes)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1], the range every model consumes and produces."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255] (clamped, rounded)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_chart_png(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
                   width: int = 900, height: int = 520, log_y: bool = False) -> bytes:
    """A plain line chart (one line per series, legend on the right) as PNG, drawn with Pillow.

    Non-finite points are skipped; a series that ends early simply stops.
    """
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 190, 40, height - 50
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
    draw.text((left, 12), title, fill="black", font=font)
    if not pts:
        draw.text((left, height // 2), "no finite points to plot", fill="black", font=font)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(ty(p[1]) for p in pts), max(ty(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (ty(y) - y0) / (y1 - y0) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(80, 80, 80))
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        yy = bottom - (bottom - top) * i / 4
        draw.line([left - 4, yy, left, yy], fill="black")
        draw.text((5, yy - 6), f"{10 ** yv if log_y else yv:.3g}", fill="black", font=font)
        xv = x0 + (x1 - x0) * i / 4
        xx = left + (right - left) * i / 4
        draw.line([xx, bottom, xx, bottom + 4], fill="black")
        draw.text((xx - 10, bottom + 8), f"{xv:.0f}", fill="black", font=font)
    draw.text(((left + right) // 2 - 20, height - 20), x_label, fill="black", font=font)
    draw.text((5, top - 28), y_label + (" (log)" if log_y else ""), fill="black", font=font)
    for i, (name, s) in enumerate(series.items()):
        colour = _PALETTE[i % len(_PALETTE)]
        line = [px(x, y) for x, y in s if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 14 * i
        draw.line([right + 10, ly + 6, right + 30, ly + 6], fill=colour, width=3)
        draw.text((right + 35, ly), name[:24], fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def flatten_alpha(img: Image.Image) -> Image.Image:
    """An image with transparency composited on black (RGB), rather than keeping whatever colour
    sits under alpha 0; an image without transparency as it is."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img


def as_displayed(img: Image.Image) -> Image.Image:
    """A decoded image as a viewer shows it: its EXIF orientation applied (a phone stores its photos
    as the sensor saw them, with the rotation in a tag) and 16-bit grey scaled to 8 bits (PIL's
    convert("L") clips it, turning most of a 16-bit PNG white)."""
    from PIL import ImageOps

    if exif_orientation(img) != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - a damaged EXIF block: shown unrotated, as many viewers do
            pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        if img.mode != "I" or arr.max() > 255:  # a 32-bit "I" image may hold 8-bit values already
            arr = (arr * 255 + 32767) // 65535
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))  # 2-D uint8: mode L
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1: as stored; 5-8: a quarter turn), 1 where the EXIF is missing or damaged."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF (SyntaxError, struct.error, ...) must not make an image unreadable
        return 1
