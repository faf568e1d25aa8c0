"""Config → modules. Builders flatten configs into constructor arguments (no config objects
travel into nn.Modules) and check the config against the dataset it will train on."""

from __future__ import annotations

from latentforge.data.spec import DataSpec
from latentforge.errors import ConfigError
from latentforge.models.blocks import SUPPORTED_RESOLUTIONS
from latentforge.models.architectures import GAN_ARCHITECTURES, VAE_ARCHITECTURES


def check_compatible(model_cfg, spec: DataSpec) -> None:
    """Raise ConfigError when a model config cannot train on this data."""
    c, h, w = spec.image_shape
    problems = []
    if h != w or h not in SUPPORTED_RESOLUTIONS:
        problems.append(
            f"images are {h}x{w}; models support square {', '.join(map(str, SUPPORTED_RESOLUTIONS))} px "
            "(prepare the dataset again with --size N)"
        )
    if c not in (1, 3):
        problems.append(f"images have {c} channels; models support 1 or 3")
    if model_cfg.conditional and spec.num_classes < 2:
        problems.append("model.conditional is true but the dataset has no class labels; set model.conditional=false")
    if problems:
        raise ConfigError("config does not fit the dataset: " + "; ".join(problems))


def build_gan(model_cfg, spec: DataSpec):
    """(generator, discriminator) for a `GANModelConfig`."""
    check_compatible(model_cfg, spec)
    g_cls, d_cls = GAN_ARCHITECTURES[model_cfg.arch]
    c, h, _ = spec.image_shape
    k = spec.num_classes if model_cfg.conditional else 0
    g = g_cls(z_dim=model_cfg.z_dim, channels=c, resolution=h, width=model_cfg.g_width, norm=model_cfg.g_norm,
              num_classes=k, embed_dim=model_cfg.embed_dim)
    d = d_cls(channels=c, resolution=h, width=model_cfg.d_width, norm=model_cfg.d_norm, num_classes=k)
    return g, d


def build_vae(model_cfg, spec: DataSpec):
    """A VAE for a `VAEModelConfig`."""
    check_compatible(model_cfg, spec)
    c, h, _ = spec.image_shape
    return VAE_ARCHITECTURES[model_cfg.arch](
        z_dim=model_cfg.z_dim, channels=c, resolution=h, width=model_cfg.width,
        num_classes=spec.num_classes if model_cfg.conditional else 0, embed_dim=model_cfg.embed_dim,
        likelihood=model_cfg.likelihood,
    )
