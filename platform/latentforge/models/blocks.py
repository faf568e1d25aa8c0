"""Convolutional stacks shared by the GAN and VAE models: resolution plans, norms, up/down stacks."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from latentforge.layout import is_channels_last, relayout

SUPPORTED_RESOLUTIONS = (8, 16, 28, 32, 64, 128, 256)  # each family lists the ones it supports
G_NORMS = ("batch", "layer", "none")
D_NORMS = ("spectral", "layer", "instance", "none")


def resolution_plan(resolution: int) -> tuple[int, int]:
    """Split a resolution into (base side, number of 2x stages): 28 → (7, 2), 32 → (4, 3).

    Raises:
        ValueError: the resolution is not supported.
    """
    if resolution == 28:
        return 7, 2
    if resolution in SUPPORTED_RESOLUTIONS:
        return 4, int(math.log2(resolution // 4))
    raise ValueError(
        f"unsupported resolution {resolution}; choose one of {', '.join(map(str, SUPPORTED_RESOLUTIONS))} "
        "(prepare the dataset with --size N)"
    )


def level_channels(width: int, n_stages: int, level: int) -> int:
    """Channels at a level: `width` at full resolution (level n), doubling per halving, capped at 8x."""
    return width * min(2 ** (n_stages - level), 8)


def feature_norm(kind: str, channels: int) -> nn.Module:
    """A norm over (B, C, H, W) feature maps: batch | layer | instance | none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W), batch-independent
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # InstanceNorm with affine parameters
    if kind in ("none", "spectral"):
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of: batch, layer, instance, spectral, none")


def maybe_sn(module: nn.Module, use: bool) -> nn.Module:
    """Wrap a conv/linear layer in spectral normalisation when `use` is true."""
    return spectral_norm(module) if use else module


def with_label_embedding(v: torch.Tensor, embed: nn.Module | None, labels: torch.Tensor | None,
                         what: str) -> torch.Tensor:
    """[v, embed(labels)] for a class-conditional `what` (generator, VAE); v itself otherwise.

    Raises:
        ValueError: a conditional model called without labels.
    """
    if embed is None:
        return v
    if labels is None:
        raise ValueError(f"this {what} is class-conditional: pass labels")
    return torch.cat([v, embed(labels)], dim=1)


def projection_logit(head: nn.Module, embed: nn.Module | None, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """A discriminator's logit from pooled features h (B, F): w·h, plus <embed(y), h> for a
    projection discriminator (Miyato & Koyama, 2018)."""
    logit = head(h).squeeze(1)
    if embed is not None:
        if labels is None:
            raise ValueError("this discriminator is class-conditional: pass labels")
        logit = logit + (embed(labels) * h).sum(dim=1)
    return logit


def weight_is_channels_last(conv: nn.Module) -> bool:
    """Whether a conv's weight was put in channels_last (read without running a spectral-norm
    parametrisation, whose every evaluation in training mode is a power iteration)."""
    w = conv.parametrizations.weight.original if parametrize.is_parametrized(conv, "weight") else conv.weight
    return is_channels_last(w)


def in_layout_of(h: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """`h` in the memory layout of `conv`, the conv that reads it (see `relayout`)."""
    return relayout(h, torch.channels_last) if weight_is_channels_last(conv) else h


def as_map(flat: torch.Tensor, channels: int, side: int, next_conv: nn.Module) -> torch.Tensor:
    """(B, C*side*side) → (B, C, side, side) in the layout of `next_conv` (see `relayout`)."""
    return in_layout_of(flat.view(-1, channels, side, side), next_conv)


def flatten_map(h: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """`h.flatten(start_dim)` of a (B, C, H, W) map in (C, H, W) order whatever h's layout, with
    its gradient handed back in h's layout (see `relayout`)."""
    return relayout(h, torch.contiguous_format).flatten(start_dim)


class _TransposedConvByConvs(torch.autograd.Function):
    """`conv_transpose2d`, with its backward written as the two ordinary convolutions it is: the
    input gradient of a transposed conv is a conv of the output gradient with the same weight, and
    its weight gradient is a conv's weight gradient with the roles of input and output swapped
    (<g, convT(x, W)> = <conv(g, W), x>). Same numbers as PyTorch's own backward (fp32 to 1e-6,
    bf16 bit for bit here); the backward is itself differentiable (R1 / GP / path length through G)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = (stride, padding, groups, dilation), bias is not None
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, groups, dilation = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(grad, weight, None, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.ops.aten.convolution_backward(x, grad, weight, None, stride, padding, dilation, False, (0, 0),
                                                     groups, (False, True, False))[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None


class TransposedConv2d(nn.ConvTranspose2d):
    """`nn.ConvTranspose2d` (same parameters, same state dict, same outputs) whose backward, on a
    CPU in channels_last, runs as ordinary convolutions (`_TransposedConvByConvs`).

    PyTorch's CPU backward of a channels_last transposed conv gains nothing from bf16: dcgan-mnist's
    two G layers took 4.8 and 6.6 ms in bf16 against 5.3 and 6.0 in fp32, where the same backward as
    convolutions takes 3.4 and 3.4 ms (docs/performance.md). Everything else keeps PyTorch's own
    path: NCHW (as the conv form was no faster there in fp32), CUDA, no-grad passes, and
    output padding of a stride or more (which the conv form cannot invert)."""

    _AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if (output_size is not None or x.device.type != "cpu" or not torch.is_grad_enabled()
                or not is_channels_last(x) or self.padding_mode != "zeros"
                or any(op >= s for op, s in zip(self.output_padding, self.stride))):
            return super().forward(x, output_size)
        conf = (self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        if not (torch.is_autocast_enabled("cpu") and x.dtype in self._AUTOCAST_CASTS):
            return _TransposedConvByConvs.apply(x, self.weight, self.bias, *conf)  # dtype mismatches raise as in PyTorch
        dtype = torch.get_autocast_dtype("cpu")  # cast here as autocast would: input, weight and bias
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _TransposedConvByConvs.apply(x.to(dtype), self.weight.to(dtype), bias, *conf)


class UpStack(nn.Module):
    """Latent vector → feature map at full resolution: a linear projection to (C0, base, base),
    then 2x transposed-conv stages, then a 3x3 conv to the output channels (no activation).

    Args:
        in_dim: input vector size.
        out_channels: image channels.
        resolution: output side.
        width: channels at full resolution (doubling per halving, capped at 8x).
        norm: 'batch' or 'none' after the projection and each stage.
    """

    def __init__(self, *, in_dim: int, out_channels: int, resolution: int, width: int, norm: str):
        super().__init__()
        base, n = resolution_plan(resolution)
        self.base, self.c0 = base, level_channels(width, n, 0)
        self.project = nn.Linear(in_dim, self.c0 * base * base)
        self.project_norm = feature_norm(norm, self.c0)
        stages = []
        for level in range(n):
            c_in, c_out = level_channels(width, n, level), level_channels(width, n, level + 1)
            stages += [TransposedConv2d(c_in, c_out, 4, 2, 1), feature_norm(norm, c_out), nn.ReLU(inplace=True)]
        self.stages = nn.Sequential(*stages)
        self.to_image = nn.Conv2d(width, out_channels, 3, 1, 1)

    def from_projection(self, p: torch.Tensor) -> torch.Tensor:  # (B, C0*base*base) → (B, C, H, W)
        h = torch.relu(self.project_norm(as_map(p, self.c0, self.base, self.stages[0])))
        return self.to_image(self.stages(h))

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # (B, in_dim) → (B, C, H, W)
        return self.from_projection(self.project(v))


class DownStack(nn.Module):
    """Image → flat features: a 2x strided conv per stage, LeakyReLU(0.2), optional norm.

    The first conv has no norm (as in DCGAN); spectral norm, when chosen, wraps every conv.
    Output features have size `out_features` = C_base * base * base.
    """

    def __init__(self, *, in_channels: int, resolution: int, width: int, norm: str):
        super().__init__()
        base, n = resolution_plan(resolution)
        sn = norm == "spectral"
        layers: list[nn.Module] = []
        c_prev = in_channels
        for level in range(n, 0, -1):  # full resolution → base
            c = level_channels(width, n, level)
            layers.append(maybe_sn(nn.Conv2d(c_prev, c, 4, 2, 1), sn))
            if level != n:
                layers.append(feature_norm(norm, c))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_prev = c
        self.stages = nn.Sequential(*layers)
        self.out_features = c_prev * base * base

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, F)
        return flatten_map(self.stages(x))
