"""ResNet GAN family (SNGAN / BigGAN-style) and a ResNet VAE.

Sources of the design (facts, not code): Miyato et al. 2018 "Spectral Normalization for GANs"
(residual G/D for 32-128 px, SN in every D layer, global sum pooling, hinge loss); Miyato & Koyama
2018 (projection discriminator); Brock et al. 2019 "BigGAN" (class-conditional BatchNorm in G, SN
in G too, self-attention at one resolution, orthogonal init); Zhang et al. 2019 "SAGAN"
(self-attention block with a zero-initialised gate).

Generator: z → linear → (C0, base, base) → `n` up-blocks (norm, ReLU, 2x nearest, conv3x3, norm,
ReLU, conv3x3; shortcut: 2x nearest, conv1x1) → norm, ReLU, conv3x3 → tanh.
Discriminator: an "optimised" first down-block on the image, down-blocks (ReLU, conv3x3, ReLU,
conv3x3, avgpool; shortcut conv1x1, avgpool), extra blocks at the base resolution, ReLU, global
sum pooling, linear (+ projection of the label embedding).
Channels follow `blocks.level_channels`: `width` at full resolution, x2 per halving, capped at 8x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.models.blocks import (as_map, flatten_map, in_layout_of, level_channels, maybe_sn, projection_logit,
                                       resolution_plan)
from latentforge.models.vae import LIKELIHOODS, LatentVAE

RESNET_G_NORMS = ("batch", "layer", "none")
RESNET_D_NORMS = ("spectral", "none")


class ConditionalNorm(nn.Module):
    """Norm without its own affine, then a per-class gain and bias (conditional BatchNorm, de Vries
    et al. 2017; BigGAN) or a plain learned one for unconditional models.

    `kind`: 'batch' (BatchNorm statistics), 'layer' (GroupNorm(1): batch-independent, exact under
    data parallelism) or 'none' (affine only).
    """

    def __init__(self, kind: str, channels: int, num_classes: int):
        super().__init__()
        if kind == "batch":
            self.norm = nn.BatchNorm2d(channels, affine=False)
        elif kind == "layer":
            self.norm = nn.GroupNorm(1, channels, affine=False)
        elif kind == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"unknown generator norm {kind!r}; choose one of: {', '.join(RESNET_G_NORMS)}")
        self.num_classes = num_classes
        if num_classes:
            self.gain = nn.Embedding(num_classes, channels)
            self.bias = nn.Embedding(num_classes, channels)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)
        else:
            self.gain = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        if self.num_classes:
            return h * self.gain(labels)[:, :, None, None] + self.bias(labels)[:, :, None, None]
        return h * self.gain[None, :, None, None] + self.bias[None, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN self-attention over the H*W positions, gated by a scalar that starts at 0 (so the
    block begins as the identity). Keys/queries have C/8 channels, values C/2; keys and values are
    max-pooled 2x (as in BigGAN) to quarter the cost."""

    def __init__(self, channels: int, sn: bool):
        super().__init__()
        c8, c2 = max(channels // 8, 1), max(channels // 2, 1)
        self.q = maybe_sn(nn.Conv2d(channels, c8, 1, bias=False), sn)
        self.k = maybe_sn(nn.Conv2d(channels, c8, 1, bias=False), sn)
        self.v = maybe_sn(nn.Conv2d(channels, c2, 1, bias=False), sn)
        self.out = maybe_sn(nn.Conv2d(c2, channels, 1, bias=False), sn)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pool = h % 2 == 0 and w % 2 == 0
        q = flatten_map(self.q(x), 2)  # (B, c8, HW)
        k, v = self.k(x), self.v(x)
        if pool:
            k, v = F.max_pool2d(k, 2), F.max_pool2d(v, 2)
        attn = torch.softmax(q.transpose(1, 2) @ flatten_map(k, 2), dim=-1)  # (B, HW, HW')
        o = (flatten_map(v, 2) @ attn.transpose(1, 2)).view(b, -1, h, w)
        o = in_layout_of(o, self.out)
        return x + self.gate * self.out(o)


class GBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, norm: str, num_classes: int, sn: bool, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.n1 = ConditionalNorm(norm, c_in, num_classes)
        self.c1 = maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), sn)
        self.n2 = ConditionalNorm(norm, c_out, num_classes)
        self.c2 = maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), sn)
        self.skip = maybe_sn(nn.Conv2d(c_in, c_out, 1), sn) if (c_in != c_out or upsample) else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = F.relu(self.n1(x, labels))
        if self.upsample:
            h, x = F.interpolate(h, scale_factor=2.0, mode="nearest"), F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.c2(F.relu(self.n2(self.c1(h), labels)))
        return h + (x if self.skip is None else self.skip(x))


class DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, sn: bool, downsample: bool = True, first: bool = False):
        super().__init__()
        self.downsample, self.first = downsample, first
        self.c1 = maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), sn)
        self.c2 = maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), sn)
        self.skip = maybe_sn(nn.Conv2d(c_in, c_out, 1), sn) if (c_in != c_out or downsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the first block sees the image itself
        h = self.c2(F.relu(self.c1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # "optimised" block: pool, then project (cheaper on the full-resolution image)
            s = F.avg_pool2d(s, 2) if self.downsample else s
            s = s if self.skip is None else self.skip(s)
        else:
            s = s if self.skip is None else self.skip(s)
            s = F.avg_pool2d(s, 2) if self.downsample else s
        return h + s


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, allowed))}")


def _attention_level(attention_res: int, resolution: int, base: int, n: int) -> int | None:
    """The level (0 = base side, n - 1 = half resolution) whose feature maps get self-attention;
    None when `attention_res` is 0. Full resolution is excluded (HW x HW attention maps)."""
    if not attention_res:
        return None
    sides = {base * 2**lvl: lvl for lvl in range(n)}
    if attention_res not in sides:
        raise ValueError(f"attention_res {attention_res} is not a feature-map side below the {resolution}-px output; "
                         f"choose one of {', '.join(map(str, sorted(sides)))}, or 0 for none")
    return sides[attention_res]


class ResNetGenerator(nn.Module):
    """z (B, z_dim) [+ labels] → image (B, C, H, W) in [-1, 1].

    Args:
        z_dim, channels, resolution, width, norm, num_classes, embed_dim: the shared constructor
            contract (`models.interface`); conditioning is by class-conditional norms, so
            `embed_dim` is unused and kept for the contract.
        blocks_per_stage: residual blocks per resolution (the first of each upsamples).
        attention_res: feature-map side that gets a self-attention block (0: none).
        spectral_norm: spectral norm in G too (BigGAN; SAGAN).
    """

    def __init__(self, *, z_dim: int, channels: int, resolution: int, width: int = 32, norm: str = "batch",
                 num_classes: int = 0, embed_dim: int = 32, blocks_per_stage: int = 1, attention_res: int = 0,
                 spectral_norm: bool = False):
        super().__init__()
        _check("generator norm", norm, RESNET_G_NORMS)
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be at least 1, got {blocks_per_stage}")
        self.init_args = dict(z_dim=z_dim, channels=channels, resolution=resolution, width=width, norm=norm,
                              num_classes=num_classes, embed_dim=embed_dim, blocks_per_stage=blocks_per_stage,
                              attention_res=attention_res, spectral_norm=spectral_norm)
        self.z_dim, self.num_classes = z_dim, num_classes
        base, n = resolution_plan(resolution)
        attn_level = _attention_level(attention_res, resolution, base, n)
        self.base, self.c0 = base, level_channels(width, n, 0)
        self.project = maybe_sn(nn.Linear(z_dim, self.c0 * base * base), spectral_norm)
        blocks: list[nn.Module] = []
        for level in range(n):
            c_in, c_out = level_channels(width, n, level), level_channels(width, n, level + 1)
            blocks.append(GBlock(c_in, c_out, norm, num_classes, spectral_norm))
            blocks += [GBlock(c_out, c_out, norm, num_classes, spectral_norm, upsample=False)
                       for _ in range(blocks_per_stage - 1)]
            if attn_level == level + 1:
                blocks.append(SelfAttention(c_out, spectral_norm))
        if attn_level == 0:
            blocks.insert(0, SelfAttention(self.c0, spectral_norm))
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = ConditionalNorm(norm, width, 0)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)

    def first_layer(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(z)

    def first_layer_weight(self) -> torch.Tensor:
        return self.project.weight

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and labels is None:
            raise ValueError("this generator is class-conditional: pass labels")
        first = self.blocks[0]  # self-attention at the base side comes before the first block
        h = as_map(self.project(z), self.c0, self.base, first.q if isinstance(first, SelfAttention) else first.c1)
        for block in self.blocks:
            h = block(h) if isinstance(block, SelfAttention) else block(h, labels)
        return torch.tanh(self.to_image(F.relu(self.out_norm(h, None))))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self(z, labels)


class ResNetDiscriminator(nn.Module):
    """image [+ labels] → logit (B,); a projection discriminator when `num_classes` > 0.

    Args:
        channels, resolution, width, norm, num_classes: the shared contract; norm 'spectral' puts
            spectral norm on every layer (SNGAN), 'none' leaves them plain (with R1, StyleGAN-style).
        extra_blocks: non-downsampling blocks at the base resolution (SNGAN's CIFAR D has 2).
        attention_res: feature-map side that gets a self-attention block (0: none).
    """

    def __init__(self, *, channels: int, resolution: int, width: int = 32, norm: str = "spectral",
                 num_classes: int = 0, extra_blocks: int = 1, attention_res: int = 0):
        super().__init__()
        _check("discriminator norm", norm, RESNET_D_NORMS)
        self.init_args = dict(channels=channels, resolution=resolution, width=width, norm=norm,
                              num_classes=num_classes, extra_blocks=extra_blocks, attention_res=attention_res)
        self.num_classes = num_classes
        sn = norm == "spectral"
        base, n = resolution_plan(resolution)
        attn_level = _attention_level(attention_res, resolution, base, n)
        blocks: list[nn.Module] = []
        c_prev = channels
        for level in range(n, 0, -1):  # full resolution → base; each block halves the side
            c = level_channels(width, n, level - 1)
            blocks.append(DBlock(c_prev, c, sn, first=level == n))
            if attn_level == level - 1:
                blocks.append(SelfAttention(c, sn))
            c_prev = c
        blocks += [DBlock(c_prev, c_prev, sn, downsample=False) for _ in range(extra_blocks)]
        self.blocks = nn.Sequential(*blocks)
        self.head = maybe_sn(nn.Linear(c_prev, 1), sn)
        self.embed = maybe_sn(nn.Embedding(num_classes, c_prev), sn) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling (B, C)
        return projection_logit(self.head, self.embed, h, labels)


class ResNetVAE(LatentVAE):
    """A VAE with a residual encoder (D blocks without spectral norm) and decoder (G blocks with
    batch-independent GroupNorm), for 32-128 px.

    Args:
        z_dim, channels, resolution, width, num_classes, embed_dim, likelihood: the shared contract.
        learn_sigma: Gaussian decoder only: learn one log-std per channel instead of the
            configured fixed `vae.decoder_sigma` (`decoder_log_sigma` is then used by the loss).
        blocks_per_stage: residual blocks per resolution in the decoder.
    """

    def __init__(self, *, z_dim: int, channels: int, resolution: int, width: int = 32, num_classes: int = 0,
                 embed_dim: int = 16, likelihood: str = "gaussian", learn_sigma: bool = False,
                 blocks_per_stage: int = 1):
        super().__init__()
        _check("likelihood", likelihood, LIKELIHOODS)
        if learn_sigma and likelihood != "gaussian":
            raise ValueError("learn_sigma needs likelihood 'gaussian'")
        self.init_args = dict(z_dim=z_dim, channels=channels, resolution=resolution, width=width,
                              num_classes=num_classes, embed_dim=embed_dim, likelihood=likelihood,
                              learn_sigma=learn_sigma, blocks_per_stage=blocks_per_stage)
        self.z_dim, self.num_classes, self.likelihood = z_dim, num_classes, likelihood
        base, n = resolution_plan(resolution)
        cond = embed_dim if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        enc: list[nn.Module] = []
        c_prev = channels
        for level in range(n, 0, -1):
            c = level_channels(width, n, level - 1)
            enc.append(DBlock(c_prev, c, sn=False, first=level == n))
            c_prev = c
        self.encoder = nn.Sequential(*enc, nn.ReLU())
        self.to_posterior = nn.Linear(c_prev * base * base + cond, 2 * z_dim)
        self.base, self.c0 = base, level_channels(width, n, 0)
        self.project = nn.Linear(z_dim + cond, self.c0 * base * base)
        dec: list[nn.Module] = []
        for level in range(n):
            c_in, c_out = level_channels(width, n, level), level_channels(width, n, level + 1)
            dec.append(GBlock(c_in, c_out, "layer", 0, sn=False))
            dec += [GBlock(c_out, c_out, "layer", 0, sn=False, upsample=False) for _ in range(blocks_per_stage - 1)]
        self.decoder_blocks = nn.ModuleList(dec)
        self.out_norm = ConditionalNorm("layer", width, 0)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)
        self.decoder_log_sigma = nn.Parameter(torch.full((channels,), -2.3)) if learn_sigma else None

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_map(self.encoder(x))

    @property
    def latent_projection(self) -> nn.Linear:
        return self.project

    def from_projection(self, p: torch.Tensor) -> torch.Tensor:
        h = as_map(p, self.c0, self.base, self.decoder_blocks[0].c1)
        for block in self.decoder_blocks:
            h = block(h, None)
        return self.to_image(F.relu(self.out_norm(h, None)))
