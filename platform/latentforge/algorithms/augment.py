"""Differentiable augmentation of discriminator inputs for small datasets.

Two published schemes, applied as the papers do: the same transform family on real and fake
images in every D pass and on fakes in the G pass, every transform differentiable so G's gradient
flows through it.

- DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"):
  colour (brightness ±0.5, saturation x[0, 2], contrast x[0.5, 1.5]), translation (up to 1/8 of
  the side, zero fill) and cutout (a square of half the side), each on every image.
- ADA (Karras et al. 2020, "Training GANs with Limited Data"): each transform of the 'bgc' pipeline
  (x-flip, 90° rotations, integer translation, isotropic and anisotropic scaling, rotation,
  fractional translation, brightness, contrast, luma flip, hue rotation, saturation) is applied
  with probability p, and p is tuned during training so that r_t = E[sign(D(x_real))] stays near a
  target (0.6): every `interval` D updates p moves by sign(r_t - target) * images / (kimg * 1000).
  Geometric transforms are one affine warp per image (bilinear, reflection padding), a
  simplification of the paper's upsampled warp with a wavelet filter.

Randomness: every parameter is a function of uniform numbers drawn per image from `GlobalNoise`
for the whole global batch, so any split over workers or accumulation micro-batches sees the same
transforms, and p (updated from an all-reduced r_t) is identical on every worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from latentforge.layout import is_channels_last, relayout

AUGMENTS = ("none", "diffaugment", "ada")
DIFFAUGMENT_OPS = ("color", "translation", "cutout")
N_PARAMS = {"none": 0, "diffaugment": 8, "ada": 32}  # uniform numbers drawn per image


def _normal(u: torch.Tensor) -> torch.Tensor:
    """Standard normal from uniform (0, 1) by the inverse CDF (keeps every draw a uniform)."""
    return math.sqrt(2.0) * torch.erfinv(u.clamp(1e-6, 1 - 1e-6) * 2 - 1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


# --- DiffAugment -------------------------------------------------------------------------------

def _translate(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Shift each image by integer (tx, ty) pixels, filling with zeros (B,) each."""
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1) - ty.view(b, 1, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w) - tx.view(b, 1, 1)
    inside = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).unsqueeze(1)
    idx = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    out = torch.gather(x.flatten(2), 2, idx).view_as(x)
    return out * inside.to(x.dtype)


def diff_augment(x: torch.Tensor, u: torch.Tensor, policy: tuple[str, ...] = DIFFAUGMENT_OPS) -> torch.Tensor:
    """DiffAugment of images in [-1, 1] (B, C, H, W) with per-image uniforms `u` (B, 8)."""
    u = u.to(x.device, torch.float32)
    b, c, h, w = x.shape
    if "color" in policy:
        x = x + _per_image(u[:, 0] - 0.5)  # brightness
        if c > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * _per_image(u[:, 1] * 2) + mean  # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _per_image(u[:, 2] + 0.5) + mean  # contrast
    if "translation" in policy:
        sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        ty = (u[:, 3] * (2 * sh + 1)).long().clamp(max=2 * sh) - sh
        tx = (u[:, 4] * (2 * sw + 1)).long().clamp(max=2 * sw) - sw
        x = _translate(x, tx, ty)
    if "cutout" in policy:
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        cy = (u[:, 5] * (h + (1 - ch % 2))).long()
        cx = (u[:, 6] * (w + (1 - cw % 2))).long()
        ys = torch.arange(h, device=x.device).view(1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, w)
        top, left = (cy - ch // 2).view(b, 1, 1), (cx - cw // 2).view(b, 1, 1)
        hole = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
        x = x * (~hole).unsqueeze(1).to(x.dtype)
    return x


# --- ADA -----------------------------------------------------------------------------------------

def _mat(rows: list[list[torch.Tensor | float]], like: torch.Tensor) -> torch.Tensor:
    """A batch of matrices from rows of per-image tensors or constants → (B, n, n)."""
    b = like.shape[0]
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(b)
                                     for v in row], dim=-1) for row in rows], dim=-2)


def _apply(p_mask: torch.Tensor, m: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Per image: the matrix `m` where the transform is applied, the identity elsewhere."""
    return torch.where(p_mask.view(-1, 1, 1), m, eye)


def ada_augment(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """ADA 'bgc' pipeline with probability `p` per transform, uniforms `u` (B, 32)."""
    if p <= 0:
        return x
    u = u.to(x.device, torch.float32)
    b, c, h, w = x.shape
    one, zero = torch.ones(b, device=x.device), torch.zeros(b, device=x.device)
    eye3 = torch.eye(3, device=x.device).expand(b, 3, 3)
    rot_p = 1 - math.sqrt(max(1 - p, 0.0))  # two rotations, so that their union has probability p

    def rot(theta):
        cs, sn = torch.cos(theta), torch.sin(theta)
        return _mat([[cs, -sn, zero], [sn, cs, zero], [zero, zero, one]], one)

    # Geometric: a 3x3 matrix per image mapping output coordinates ([-1, 1]) to input coordinates.
    g = eye3
    flip = 1 - 2 * (u[:, 1] < 0.5).float()
    g = g @ _apply(u[:, 0] < p, _mat([[flip, zero, zero], [zero, one, zero], [zero, zero, one]], one), eye3)
    k = (u[:, 3] * 4).floor().clamp(max=3)
    g = g @ _apply(u[:, 2] < p, rot(k * math.pi / 2), eye3)
    tx, ty = ((u[:, 5] * 2 - 1) * 0.125 * w).round() * 2 / w, ((u[:, 6] * 2 - 1) * 0.125 * h).round() * 2 / h
    g = g @ _apply(u[:, 4] < p, _mat([[one, zero, tx], [zero, one, ty], [zero, zero, one]], one), eye3)
    s = torch.exp2(_normal(u[:, 8]) * 0.2)
    g = g @ _apply(u[:, 7] < p, _mat([[s, zero, zero], [zero, s, zero], [zero, zero, one]], one), eye3)
    g = g @ _apply(u[:, 9] < rot_p, rot((u[:, 10] * 2 - 1) * math.pi), eye3)
    a = torch.exp2(_normal(u[:, 12]) * 0.2)
    g = g @ _apply(u[:, 11] < p, _mat([[a, zero, zero], [zero, 1 / a, zero], [zero, zero, one]], one), eye3)
    g = g @ _apply(u[:, 13] < rot_p, rot((u[:, 14] * 2 - 1) * math.pi), eye3)
    fx, fy = _normal(u[:, 16]) * 0.125 * 2, _normal(u[:, 17]) * 0.125 * 2
    g = g @ _apply(u[:, 15] < p, _mat([[one, zero, fx], [zero, one, fy], [zero, zero, one]], one), eye3)
    if not torch.equal(g, eye3):
        grid = F.affine_grid(g[:, :2, :].to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # Colour: a 4x4 affine matrix per image acting on RGB (brightness and contrast only for grey).
    eye4 = torch.eye(4, device=x.device).expand(b, 4, 4)
    col = eye4
    bright = _normal(u[:, 19]) * 0.2
    col = _apply(u[:, 18] < p, _mat([[one, zero, zero, bright], [zero, one, zero, bright], [zero, zero, one, bright],
                                     [zero, zero, zero, one]], one), eye4) @ col
    con = torch.exp2(_normal(u[:, 21]) * 0.5)
    col = _apply(u[:, 20] < p, _mat([[con, zero, zero, zero], [zero, con, zero, zero], [zero, zero, con, zero],
                                     [zero, zero, zero, one]], one), eye4) @ col
    if c == 3:
        v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=x.device) / math.sqrt(3)  # the luma axis
        vv = torch.outer(v, v).expand(b, 4, 4)
        flip = (u[:, 23] < 0.5).float().view(-1, 1, 1)
        col = _apply(u[:, 22] < p, eye4 - 2 * vv * flip, eye4) @ col  # luma flip
        theta = (u[:, 25] * 2 - 1) * math.pi
        col = _apply(u[:, 24] < p, _rotate_about_luma(theta, one, zero), eye4) @ col  # hue
        sat = torch.exp2(_normal(u[:, 27]) * 1.0).view(-1, 1, 1)
        col = _apply(u[:, 26] < p, vv + (eye4 - vv) * sat, eye4) @ col  # saturation
        col = col.clone()
        col[:, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0], device=x.device)
        flat = x.flatten(2)  # (B, 3, HW)
        x = (col[:, :3, :3].to(x.dtype) @ flat + col[:, :3, 3:].to(x.dtype)).view_as(x)
    else:
        x = x * col[:, 0, 0].view(-1, 1, 1, 1).to(x.dtype) + col[:, 0, 3].view(-1, 1, 1, 1).to(x.dtype)
    return x


def _rotate_about_luma(theta: torch.Tensor, one: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """4x4 rotation by `theta` around the (1, 1, 1) axis (Rodrigues' formula)."""
    ax = 1 / math.sqrt(3)
    cs, sn = torch.cos(theta), torch.sin(theta)
    t = 1 - cs
    r = [[cs + ax * ax * t, ax * ax * t - ax * sn, ax * ax * t + ax * sn, zero],
         [ax * ax * t + ax * sn, cs + ax * ax * t, ax * ax * t - ax * sn, zero],
         [ax * ax * t - ax * sn, ax * ax * t + ax * sn, cs + ax * ax * t, zero],
         [zero, zero, zero, one]]
    return _mat(r, one)


# --- the schedule of ADA's probability ----------------------------------------------------------

@dataclass
class AdaState:
    """ADA's augmentation probability and its running statistic.

    Args:
        p: the current probability.
        target: the wanted r_t = E[sign(D(real))].
        interval: D updates between adjustments.
        kimg: thousands of images over which p can move from 0 to 1.
        images_per_update: real images in one D update over all workers (the global batch).
        reduce_mean: averages a tensor over workers (identity in one process), so every worker
            computes the same r_t and p.
    """

    p: float = 0.0
    target: float = 0.6
    interval: int = 4
    kimg: float = 100.0
    images_per_update: int = 64
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    sign_sum: float = 0.0
    updates: int = 0
    last_rt: float = 0.0

    def observe(self, real_logits: torch.Tensor) -> None:
        """Record one D update's real logits; adjust p every `interval` updates."""
        self.sign_sum += float(real_logits.detach().sign().double().mean())
        self.updates += 1
        if self.updates % self.interval == 0:
            local = torch.tensor([self.sign_sum / self.interval], dtype=torch.float64, device=real_logits.device)
            rt = float(self.reduce_mean(local).cpu()[0])
            step = self.images_per_update * self.interval / (self.kimg * 1000)
            sign = (rt > self.target) - (rt < self.target)
            self.p = min(max(self.p + sign * step, 0.0), 1.0)
            self.last_rt, self.sign_sum = rt, 0.0

    def sync(self, device) -> None:
        """Every worker holds the workers' mean partial sum (a collective: all call it). r_t is the
        mean of the partial sums, so the next adjustment is unchanged, and the checkpoint rank 0
        writes holds the global sum: before, a resume mid-interval gave every worker rank 0's."""
        local = torch.tensor([self.sign_sum], dtype=torch.float64, device=device)
        self.sign_sum = float(self.reduce_mean(local).cpu()[0])

    def state_dict(self) -> dict:
        return {"p": self.p, "sign_sum": self.sign_sum, "updates": self.updates, "last_rt": self.last_rt}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.sign_sum = float(state["p"]), float(state["sign_sum"])
        self.updates, self.last_rt = int(state["updates"]), float(state["last_rt"])


class Augmenter:
    """The configured augmentation for one run: draws parameters from `GlobalNoise` streams and
    holds ADA's state. `kind` 'none' is the identity."""

    def __init__(self, kind: str, policy: tuple[str, ...] = DIFFAUGMENT_OPS, ada: AdaState | None = None):
        if kind not in AUGMENTS:
            raise ValueError(f"unknown augmentation {kind!r}; choose one of: {', '.join(AUGMENTS)}")
        unknown = [op for op in policy if op not in DIFFAUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown DiffAugment ops {unknown}; choose from: {', '.join(DIFFAUGMENT_OPS)}")
        self.kind, self.policy = kind, tuple(policy)
        self.ada = ada if ada is not None else (AdaState() if kind == "ada" else None)

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @property
    def n_params(self) -> int:
        return N_PARAMS[self.kind]

    @property
    def probability(self) -> float:
        """The probability reported in the metrics: ADA's p, 1 for DiffAugment, 0 for none."""
        return self.ada.p if self.ada is not None else (1.0 if self.kind == "diffaugment" else 0.0)

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Augment in fp32 outside autocast (bf16 would round the uniforms and the warp grid, so
        the G pass would see other transforms than the D pass), then return x's dtype."""
        if self.kind == "none":
            return x
        layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        with torch.autocast(device_type=x.device.type, enabled=False):
            # NCHW inside (the transforms' outputs are NCHW), x's layout outside, both ways
            xf, uf = relayout(x, torch.contiguous_format).float(), u.float()
            out = diff_augment(xf, uf, self.policy) if self.kind == "diffaugment" else ada_augment(xf, uf, self.ada.p)
        return relayout(out.to(x.dtype), layout)


NO_AUGMENT = Augmenter("none")
