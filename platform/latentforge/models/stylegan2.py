"""StyleGAN2-style generator and residual discriminator in plain PyTorch (no custom CUDA ops).

Sources of the design (facts, not code): Karras et al. 2019 "A Style-Based Generator" (mapping
network z → w, styles per layer, per-pixel noise inputs with learned strength, style mixing,
truncation in W towards the tracked mean w); Karras et al. 2020 "Analyzing and Improving the Image
Quality of StyleGAN" (weight modulation and demodulation instead of AdaIN, skip-connected toRGB
outputs, residual D, equalised learning rate, minibatch standard deviation, lazy R1, mapping
learning rate x0.01); Karras et al. 2020 "Training GANs with Limited Data" (the small-data
configuration: 2 mapping layers, no style mixing or path-length regulariser on CIFAR-10).

Departures, for speed on CPUs and for pure PyTorch:
- Upsampling is 2x bilinear (align_corners=False), which is the separable [1, 3, 3, 1]/4 filter of
  the reference's upfirdn2d up to the border handling, followed by the 3x3 modulated conv; D
  downsamples by 2x2 average pooling after its second conv.
- Modulation is the reference's non-fused form: x·s → conv with the shared weight → ·d, where the
  demodulation coefficients d = rsqrt(s² · Σ_k w² + 1e-8) come from one (B, in) @ (in, out)
  product; one conv serves the whole batch, so channels_last and bf16 apply as to any conv.
- The minibatch-std groups are consecutive samples (the reference strides them), so a batch split
  across workers in contiguous shards forms the same groups.

Sides follow `blocks.resolution_plan`: 28 px starts from a 7x7 constant, powers of two from 4x4.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from latentforge.models.blocks import flatten_map, in_layout_of, level_channels, projection_logit, resolution_plan

SQRT2 = math.sqrt(2.0)
MIN_Z_DIM = 8


def _act(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (0.2) with StyleGAN's gain √2, which keeps activations at unit variance."""
    return F.leaky_relu(x, 0.2) * SQRT2


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class EqualLinear(nn.Module):
    """A linear layer with the equalised learning rate: weights stored as N(0, 1)/lr_mul and scaled
    by lr_mul/√fan_in at run time (so Adam's step is the same for every layer); `lr_mul` < 1 slows a
    layer down (the mapping network uses 0.01)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_features), lr_mul, activate

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.effective_weight(), self.bias * self.lr_mul)
        return _act(out) if self.activate else out


class EqualConv2d(nn.Module):
    """A conv with the equalised learning rate (weights N(0, 1), scaled by 1/√fan_in at run time)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool = True, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale, self.padding, self.activate = 1 / math.sqrt(c_in * kernel * kernel), kernel // 2, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        return _act(out) if self.activate else out


class MappingNetwork(nn.Module):
    """z [+ label embedding] → w: normalised inputs, `layers` equalised FC layers at lr x`lr_mul`.
    Tracks the mean w (`w_avg`) during training, the centre of truncation and of W-space inversion."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, num_classes: int, lr_mul: float = 0.01,
                 w_avg_beta: float = 0.995):
        super().__init__()
        self.num_classes, self.w_avg_beta = num_classes, w_avg_beta
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.layers = nn.Sequential(*[EqualLinear(a, b, lr_mul=lr_mul, activate=True) for a, b in zip(dims, dims[1:])])
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, update_avg: bool = True) -> torch.Tensor:
        x = _normalize_2nd_moment(z)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is class-conditional: pass labels")
            y = self.embed(F.one_hot(labels, self.num_classes).to(x.dtype))
            x = torch.cat([x, _normalize_2nd_moment(y)], dim=1)
        w = self.layers(x)
        if update_avg and self.training and torch.is_grad_enabled():  # the G pass (not D's no-grad fakes, not eval)
            with torch.no_grad():
                mean = w.detach().float().mean(0)
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(mean)  # the global batch's mean: every worker keeps the same w_avg
                    mean /= dist.get_world_size()
                self.w_avg.lerp_(mean, 1 - self.w_avg_beta)
        return w


class ModulatedConv2d(nn.Module):
    """A conv whose input channels are scaled per sample by a style s = A(w) (A's bias starts at 1),
    optionally demodulated so each output channel has unit expected variance again."""

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.scale, self.padding = 1 / math.sqrt(c_in * kernel * kernel), kernel // 2
        self.demodulate, self.up = demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # (B, in)
        weight = self.weight * self.scale
        if not self.demodulate:  # toRGB: the style's scale is folded into the weight's (as the reference)
            s = s * self.scale
            weight = self.weight
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        out = F.conv2d(x * s[:, :, None, None].to(x.dtype), weight.to(x.dtype), padding=self.padding)
        if self.demodulate:
            d = (s.float().square() @ weight.float().square().sum(dim=(2, 3)).T + 1e-8).rsqrt()  # (B, out)
            out = out * d[:, :, None, None].to(out.dtype)
        return out


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv → + noise·strength → + bias → leaky ReLU.

    Noise is fresh per forward pass in training and a fixed buffer in eval mode (the reference's
    noise_mode 'const'), so a seed always gives the same image and inversion is deterministic."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, side: int, up: bool, noise: bool):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim, up=up)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.use_noise, self.side = noise, side
        if noise:
            self.noise_strength = nn.Parameter(torch.zeros(()))
            self.register_buffer("noise_const", torch.randn(1, 1, side, side))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`noise`: this forward's (B, 1, side, side) noise map in training (drawn here when None)."""
        x = self.conv(x, w)
        if self.use_noise:
            if not self.training:
                n = self.noise_const.to(x.dtype)
            else:
                n = torch.randn_like(x[:, :1]) if noise is None else noise.to(x.dtype)
            x = x + n * self.noise_strength.to(x.dtype)
        return _act(x + self.bias.to(x.dtype)[None, :, None, None])


class ToRGB(nn.Module):
    def __init__(self, c_in: int, channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias.to(x.dtype)[None, :, None, None]


class StyleGAN2Generator(nn.Module):
    """z [+ labels] → images; W space: `mapping(z, labels)` → w (B, w_dim), `synthesis(ws)` with
    ws (B, w_dim) for W or (B, num_ws, w_dim) for W+ (one w per layer).

    Args:
        z_dim, channels, resolution, width, norm, num_classes, embed_dim: the shared contract; norm
            must be 'none' (demodulation replaces normalisation), embed_dim is unused (labels are
            embedded to w_dim in the mapping network, as the reference).
        w_dim: size of w.
        mapping_layers: FC layers in the mapping network (8 in the paper, 2 for small data).
        style_mixing: probability that a training sample switches to a second z's w at a random layer.
        noise: per-pixel noise inputs.
        output: 'linear' (the reference: images are the summed toRGB outputs, unbounded) or 'tanh'
            (bounded to [-1, 1] like the DCGAN and ResNet generators). On near-binary data such as
            digits the linear output overshoots (half the pixels of an early generator lie beyond
            ±1), and this generator collapsed to one glyph within 200-600 steps; with tanh it keeps
            diverse digits (docs/quality-models.md).
    """

    def __init__(self, *, z_dim: int, channels: int, resolution: int, width: int = 32, norm: str = "none",
                 num_classes: int = 0, embed_dim: int = 32, w_dim: int = 128, mapping_layers: int = 2,
                 style_mixing: float = 0.0, noise: bool = True, output: str = "linear"):
        super().__init__()
        if norm != "none":
            raise ValueError(f"the stylegan2 generator takes g_norm 'none' (demodulation normalises), got {norm!r}")
        if output not in ("linear", "tanh"):
            raise ValueError(f"output is 'linear' or 'tanh', got {output!r}")
        if not 0.0 <= style_mixing <= 1.0:
            raise ValueError(f"style_mixing is a probability in [0, 1], got {style_mixing}")
        if z_dim < MIN_Z_DIM:
            # the mapping network normalises z onto a sphere: at z_dim 1 every z is ±1, two images in all
            raise ValueError(f"the stylegan2 generator needs model.z_dim >= {MIN_Z_DIM} (got {z_dim}): it normalises z onto "
                             "a sphere, which leaves too few directions below that")
        self.init_args = dict(z_dim=z_dim, channels=channels, resolution=resolution, width=width, norm=norm,
                              num_classes=num_classes, embed_dim=embed_dim, w_dim=w_dim, mapping_layers=mapping_layers,
                              style_mixing=style_mixing, noise=noise, output=output)
        self.z_dim, self.num_classes, self.w_dim, self.style_mixing = z_dim, num_classes, w_dim, style_mixing
        self.output = output
        base, n = resolution_plan(resolution)
        self.mapping_net = MappingNetwork(z_dim, w_dim, mapping_layers, num_classes)
        c0 = level_channels(width, n, 0)
        self.const = nn.Parameter(torch.randn(c0, base, base))
        self.convs = nn.ModuleList([SynthesisLayer(c0, c0, w_dim, base, up=False, noise=noise)])
        self.to_rgbs = nn.ModuleList([ToRGB(c0, channels, w_dim)])
        for level in range(n):
            c_in, c_out, side = level_channels(width, n, level), level_channels(width, n, level + 1), base * 2 ** (level + 1)
            self.convs.append(SynthesisLayer(c_in, c_out, w_dim, side, up=True, noise=noise))
            self.convs.append(SynthesisLayer(c_out, c_out, w_dim, side, up=False, noise=noise))
            self.to_rgbs.append(ToRGB(c_out, channels, w_dim))
        self.num_ws = len(self.convs) + len(self.to_rgbs)  # one w per modulated layer

    # --- W space ------------------------------------------------------------------------------
    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping_net.w_avg

    def mapping(self, z: torch.Tensor, labels: torch.Tensor | None = None, truncation_psi: float = 1.0) -> torch.Tensor:
        """z → w (B, w_dim); truncation_psi < 1 pulls w towards the mean w (truncation in W)."""
        w = self.mapping_net(z, labels)
        if truncation_psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w

    def broadcast_ws(self, ws: torch.Tensor) -> torch.Tensor:
        """(B, w_dim) or (B, num_ws, w_dim) → (B, num_ws, w_dim).

        Raises:
            ValueError: any other shape.
        """
        if ws.dim() == 2 and ws.shape[1] == self.w_dim:
            return ws[:, None].expand(-1, self.num_ws, -1)
        if ws.dim() == 3 and ws.shape[1:] == (self.num_ws, self.w_dim):
            return ws
        raise ValueError(f"ws must be (B, {self.w_dim}) or (B, {self.num_ws}, {self.w_dim}); got {tuple(ws.shape)}")

    def random_inputs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The random numbers a training forward draws, per sample, by name: (distribution, shape).

        A training loop that draws them for the global batch from counter-based noise and hands
        each worker its slice (`randomness=`) makes N workers train exactly as one, and a resume
        continue the same numbers. Style mixing takes a second z and two uniforms (the mixing
        coin and the cut layer); every noise layer a map of its side."""
        spec: dict[str, tuple[str, tuple[int, ...]]] = {}
        if self.style_mixing > 0:
            spec["mix_z"] = ("normal", (self.z_dim,))
            spec["mix_u"] = ("uniform", (2,))
        for j, layer in enumerate(self.convs):
            if layer.use_noise:
                spec[f"noise{j}"] = ("normal", (1, layer.side, layer.side))
        return spec

    def synthesis(self, ws: torch.Tensor, randomness: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """w (B, w_dim) or W+ (B, num_ws, w_dim) → images (B, C, H, W), not clamped (tanh-bounded
        with output='tanh'). `randomness`: noise maps by name (`random_inputs`), training only."""
        r = randomness or {}
        ws = self.broadcast_ws(ws)
        # a copy, not an expand: a view of a parameter made under no_grad still "requires grad" as a
        # leaf, which autograd hooks (FlopCounterMode, module trackers) cannot attach to
        x = self.const.unsqueeze(0).repeat(len(ws), 1, 1, 1).to(ws.dtype)
        x = in_layout_of(x, self.convs[0].conv)  # channels_last where the model was put in it
        img = None
        i = 0
        for k, rgb in enumerate(self.to_rgbs):
            for j in (range(0, 1) if k == 0 else range(2 * k - 1, 2 * k + 1)):
                x = self.convs[j](x, ws[:, i], r.get(f"noise{j}"))
                i += 1
            y = rgb(x, ws[:, i]).float()  # the skip sum in fp32 under bf16, as stylegan2-ada's SynthesisBlock keeps it
            i += 1
            img = y if img is None else F.interpolate(img, scale_factor=2.0, mode="bilinear", align_corners=False) + y
        return torch.tanh(img) if self.output == "tanh" else img

    def style_weight(self) -> torch.Tensor:
        """Every modulated layer's affine map from w to its styles, stacked: (Σ c_in, w_dim); SeFa
        in W factorises it (Shen & Zhou 2021, their StyleGAN variant)."""
        return torch.cat([m.affine.effective_weight() for m in self.modules() if isinstance(m, ModulatedConv2d)])

    def path_lengths(self, z: torch.Tensor, labels: torch.Tensor | None, y: torch.Tensor,
                     randomness: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """|J_wᵀ y| per sample (B,), for the path-length regulariser (Karras et al. 2020, sec. 3.2):
        J the Jacobian of the image with respect to the per-layer ws, y a random image-space
        direction (N(0, 1)/√(H·W), drawn by the caller so every worker draws the same numbers),
        squared norms averaged over layers as the reference does. Differentiable (create_graph).
        `randomness`: the noise maps, as for `forward` (style mixing does not apply here)."""
        ws = self.mapping_net(z, labels, update_avg=False)[:, None].repeat(1, self.num_ws, 1)
        img = self.synthesis(ws, randomness)
        (grad,) = torch.autograd.grad((img * y).sum(), ws, create_graph=True)
        return grad.square().sum(2).mean(1).sqrt()

    # --- the generator interface --------------------------------------------------------------
    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                randomness: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`randomness`: this batch's draws of `random_inputs()` in training; missing ones are drawn
        here from torch's generator."""
        r = randomness or {}
        if randomness is not None and self.training:  # a partial dict would quietly fall back to torch's generator
            missing = self.random_inputs().keys() - r.keys()
            if missing:
                raise ValueError(f"randomness lacks {sorted(missing)}, which random_inputs() names")
        w = self.mapping_net(z, labels)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if self.training and self.style_mixing > 0:
            # A random share of the batch takes a second z's w from a random layer on (the
            # regulariser that keeps neighbouring styles from correlating).
            z2 = r["mix_z"].to(z.dtype) if "mix_z" in r else torch.randn_like(z)
            u = r["mix_u"].float() if "mix_u" in r else torch.rand(len(z), 2, device=z.device)
            w2 = self.mapping_net(z2, labels, update_avg=False)  # w_avg tracks the first z only, as the reference's
            cut = 1 + (u[:, 1:] * (self.num_ws - 1)).long().clamp(max=self.num_ws - 2)  # uniform over 1..num_ws-1
            cut = torch.where(u[:, :1] < self.style_mixing, cut, self.num_ws)
            later = torch.arange(self.num_ws, device=z.device)[None] >= cut  # (B, num_ws)
            ws = torch.where(later[:, :, None], w2[:, None], ws)
        return self.synthesis(ws, r)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self(z, labels).clamp(-1, 1)


class _DBlock(nn.Module):
    """Residual D block: conv3x3 → conv3x3 → 2x average pool, plus a 1x1 pooled shortcut, summed and
    scaled by 1/√2 (StyleGAN2's 'resnet' D)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv0 = EqualConv2d(c_in, c_in, 3, activate=True)
        self.conv1 = EqualConv2d(c_in, c_out, 3, activate=True)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.skip(F.avg_pool2d(x, 2))
        x = F.avg_pool2d(self.conv1(self.conv0(x)), 2)
        return (x + y) / SQRT2


def mbstd_group_size(batch: int, group: int) -> int:
    """The group size `minibatch_stddev` uses for a batch: the largest divisor of it up to `group`."""
    g = min(group, batch)
    while batch % g:
        g -= 1
    return g


def minibatch_stddev(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append one channel: the std over groups of `group` consecutive samples, averaged over
    channels and pixels (Karras et al. 2018). Groups shrink to a divisor of the batch."""
    b, c, h, w = x.shape
    g = mbstd_group_size(b, group)
    y = x.float().reshape(b // g, g, c, h, w)
    # the variance written out, as stylegan2-ada-pytorch does: torch.var over a dim that is not
    # the innermost takes a slow path on a CPU, 39 ms against 2.7 ms for 128x256x7x7 in either
    # layout, a quarter of stylegan2-mnist's whole step (docs/performance.md)
    y = (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)  # (b/g, c, h, w), biased
    y = (y + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b/g,)
    y = y.repeat_interleave(g)[:, None, None, None].expand(b, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


class StyleGAN2Discriminator(nn.Module):
    """image [+ labels] → logit (B,): fromRGB, residual down-blocks to the base side, minibatch std,
    conv, FC, and a linear head (+ a projection of the label for conditional models).

    Args:
        channels, resolution, width, norm, num_classes: the shared contract; norm must be 'none'
            (StyleGAN2 regularises D with R1: set gan.r1_weight).
        mbstd_group: samples per minibatch-std group (0 turns the layer off).
    """

    def __init__(self, *, channels: int, resolution: int, width: int = 32, norm: str = "none",
                 num_classes: int = 0, mbstd_group: int = 4):
        super().__init__()
        if norm != "none":
            raise ValueError(f"the stylegan2 discriminator takes d_norm 'none' (regularise it with gan.r1_weight), got {norm!r}")
        self.init_args = dict(channels=channels, resolution=resolution, width=width, norm=norm,
                              num_classes=num_classes, mbstd_group=mbstd_group)
        self.num_classes, self.mbstd_group = num_classes, mbstd_group
        base, n = resolution_plan(resolution)
        self.from_rgb = EqualConv2d(channels, level_channels(width, n, n), 1, activate=True)
        self.blocks = nn.Sequential(*[_DBlock(level_channels(width, n, level), level_channels(width, n, level - 1))
                                      for level in range(n, 0, -1)])
        c = level_channels(width, n, 0)
        self.conv = EqualConv2d(c + (1 if mbstd_group else 0), c, 3, activate=True)
        self.fc = EqualLinear(c * base * base, c, activate=True)
        self.head = EqualLinear(c, 1)
        self.embed = nn.Embedding(num_classes, c) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.blocks(in_layout_of(self.from_rgb(x), self.blocks[0].conv0))  # 1-channel input: NCHW
        if self.mbstd_group:
            h = minibatch_stddev(h, self.mbstd_group)
        h = self.fc(flatten_map(self.conv(h)))
        return projection_logit(self.head, self.embed, h, labels)
