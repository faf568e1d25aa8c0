"""Config → modules. Builders flatten configs into constructor arguments (no config objects
travel into nn.Modules) and check the config against the dataset it will train on.

Every family is built through the constructor contract of `models.interface`, plus the config's
family-specific options for each role."""

from __future__ import annotations

import json

from latentforge.data.spec import DataSpec
from latentforge.errors import ConfigError
from latentforge.models import interface
from latentforge.models.architectures import ModelFamily, get_family


def _family(model_cfg, algorithm: str) -> ModelFamily:
    try:
        return get_family(model_cfg.arch, algorithm)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_compatible(model_cfg, spec: DataSpec, algorithm: str) -> ModelFamily:
    """The config's model family, after checking it can train on this data.

    Raises:
        ConfigError: every way it cannot.
    """
    family = _family(model_cfg, algorithm)
    c, h, w = spec.image_shape
    problems = []
    sizes = family.resolutions
    if h != w or (sizes and h not in sizes):
        problems.append(
            f"images are {h}x{w}; the {family.name!r} family supports square "
            f"{', '.join(map(str, sizes)) or 'images'} px (prepare the dataset again with --size N)"
        )
    if c not in (1, 3):
        problems.append(f"images have {c} channels; models support 1 or 3")
    if model_cfg.conditional and spec.num_classes < 2:
        problems.append("model.conditional is true but the dataset has no class labels; set model.conditional=false")
    if problems:
        raise ConfigError("config does not fit the dataset: " + "; ".join(problems))
    return family


def _construct(family: ModelFamily, role: str, **kwargs):
    cls = family.classes[role]
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build the {role} of model.arch {family.name!r}: {e}") from e
    except Exception as e:  # a plug-in's constructor may raise anything: say whose it was
        raise ConfigError(f"the {role} of model.arch {family.name!r} failed to build: {type(e).__name__}: {e}") from e
    missing = interface.missing_members(module, role)
    if missing:
        raise ConfigError(f"the {role} of model.arch {family.name!r} lacks {', '.join(missing)} "
                          "(the model interface: docs/models.md)")
    try:
        json.dumps(module.init_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the {role} of model.arch {family.name!r} has init_args that are not JSON ({e}); "
                          "a checkpoint records them to rebuild the module") from e
    return module


def build_gan(model_cfg, spec: DataSpec):
    """(generator, discriminator) for a `GANModelConfig`."""
    fam = check_compatible(model_cfg, spec, "gan")
    c, h, _ = spec.image_shape
    k = spec.num_classes if model_cfg.conditional else 0
    g = _construct(fam, "generator", z_dim=model_cfg.z_dim, channels=c, resolution=h, width=model_cfg.g_width,
                   norm=model_cfg.g_norm, num_classes=k, embed_dim=model_cfg.embed_dim, **model_cfg.g_options)
    d = _construct(fam, "discriminator", channels=c, resolution=h, width=model_cfg.d_width, norm=model_cfg.d_norm,
                   num_classes=k, **model_cfg.d_options)
    return g, d


def build_vae(model_cfg, spec: DataSpec):
    """A VAE for a `VAEModelConfig`."""
    fam = check_compatible(model_cfg, spec, "vae")
    c, h, _ = spec.image_shape
    return _construct(fam, "vae", z_dim=model_cfg.z_dim, channels=c, resolution=h, width=model_cfg.width,
                      num_classes=spec.num_classes if model_cfg.conditional else 0, embed_dim=model_cfg.embed_dim,
                      likelihood=model_cfg.likelihood, **model_cfg.options)
