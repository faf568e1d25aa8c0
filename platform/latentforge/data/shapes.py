"""Procedurally drawn shapes with known generating factors.

Each image shows one shape on a black background. The factors are stored with the image so that
editing and disentanglement can be measured against ground truth:

- label `shape`: 0 square, 1 circle, 2 triangle
- `hue` in [0, 1): the colour's hue (full saturation and value)
- `size` in [0, 1]: 0 is the smallest shape (30% of the image side), 1 the largest (70%)
- `x`, `y` in [0, 1]: the centre's position within the range that keeps the shape inside
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

SHAPE_NAMES = ["square", "circle", "triangle"]
FACTOR_NAMES = ["hue", "size", "x", "y"]
_MIN_SIDE, _MAX_SIDE = 0.30, 0.70  # shape extent as a fraction of the image side
_SUPERSAMPLE = 4  # draw at 4x and downsample, so edges are anti-aliased and factors vary smoothly


def draw_shape(shape: int, hue: float, size: float, x: float, y: float, resolution: int = 32) -> np.ndarray:
    """Draw one shape.

    Args:
        shape: 0 square, 1 circle, 2 triangle.
        hue, size, x, y: factors in [0, 1] (see the module docstring).
        resolution: output side in pixels.

    Returns:
        (H, W, 3) uint8 image.
    """
    s = resolution * _SUPERSAMPLE
    side = (_MIN_SIDE + (_MAX_SIDE - _MIN_SIDE) * size) * s
    half = side / 2
    cx = half + x * (s - side)
    cy = half + y * (s - side)
    r, g, b = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
    colour = (int(r * 255), int(g * 255), int(b * 255))
    img = Image.new("RGB", (s, s), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    box = [cx - half, cy - half, cx + half, cy + half]
    if shape == 0:
        draw.rectangle(box, fill=colour)
    elif shape == 1:
        draw.ellipse(box, fill=colour)
    elif shape == 2:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape}; choose 0 (square), 1 (circle) or 2 (triangle)")
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def generate_shapes(count: int, resolution: int = 32, seed: int = 0):
    """Draw `count` shapes with factors sampled uniformly from a seeded generator.

    Returns:
        images (N, H, W, 3) uint8, labels (N,) int64, factors {name: (N,) float32}.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPE_NAMES), size=count).astype(np.int64)
    factors = {name: rng.random(count).astype(np.float32) for name in FACTOR_NAMES}
    images = np.stack(
        [
            draw_shape(int(labels[i]), *(float(factors[n][i]) for n in FACTOR_NAMES), resolution=resolution)
            for i in range(count)
        ]
    ) if count else np.zeros((0, resolution, resolution, 3), np.uint8)
    return images, labels, factors
