"""The architecture catalogue: model families for configs, module classes for checkpoints (the
promoted-model registry is `latentforge.registry`).

A family is registered with `register_model(name, algorithm=..., generator=..., ...)`; a config
names it in `model.arch`. A user's own family needs no registration: `model.arch:
my_package.my_module:MyGenerator` names a generator class whose `discriminator_class` attribute is
its discriminator (GANs), or a VAE class (see `models.plugins` for when such modules are imported).

Checkpoints record each module's class: a registered name, or for plug-ins the 'module:Class'
reference with the distribution and version that provided it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from latentforge.models import interface, plugins
from latentforge.models.classifier import FeatureClassifier, GraderClassifier
from latentforge.models.dcgan import DCGANDiscriminator, DCGANGenerator
from latentforge.models.prior import GaussianMixturePrior
from latentforge.models.resnet import ResNetDiscriminator, ResNetGenerator, ResNetVAE
from latentforge.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from latentforge.models.vae import ConvVAE


@dataclass(frozen=True)
class ModelFamily:
    """A named architecture family.

    classes: role → class ('generator' and 'discriminator' for GANs, 'vae' for VAEs).
    options: role → pydantic model of that role's family-specific constructor keywords
        (`model.g_options` / `model.d_options` / `model.options` in a config).
    resolutions: image sides the family supports.
    """

    name: str
    algorithm: str
    classes: dict[str, type[nn.Module]]
    options: dict[str, type[BaseModel]] = field(default_factory=dict)
    resolutions: tuple[int, ...] = ()
    description: str = ""
    plugin: bool = False


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


FAMILIES: dict[str, ModelFamily] = {}
MODEL_CLASSES: dict[str, type[nn.Module]] = {"FeatureClassifier": FeatureClassifier, "GraderClassifier": GraderClassifier,
                                             "GaussianMixturePrior": GaussianMixturePrior}
_ROLES = {"gan": ("generator", "discriminator"), "vae": ("vae",)}


def register_model(name: str, *, algorithm: str, classes: dict[str, type[nn.Module]],
                   options: dict[str, type[BaseModel]] | None = None, resolutions: tuple[int, ...] = (),
                   description: str = "") -> ModelFamily:
    """Add a family to the catalogue (and its classes to what checkpoints may name).

    Raises:
        ValueError: a taken name, a wrong set of roles, or a class that lacks the interface.
    """
    if name in FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    if algorithm not in _ROLES or set(classes) != set(_ROLES[algorithm]):
        raise ValueError(f"a {algorithm!r} family needs classes for {_ROLES.get(algorithm)}, got {sorted(classes)}")
    for role, cls in classes.items():
        missing = interface.missing_members(cls, role)
        if missing:
            raise ValueError(f"{cls.__name__} lacks the {role} interface: {', '.join(missing)}")
        if MODEL_CLASSES.get(cls.__name__, cls) is not cls:
            raise ValueError(f"another class is already registered as {cls.__name__!r}; checkpoints name classes by "
                             "name, so rename the class")
        MODEL_CLASSES[cls.__name__] = cls
    fam = ModelFamily(name, algorithm, dict(classes), dict(options or {}), resolutions, description)
    FAMILIES[name] = fam
    return fam


class ResNetGOptions(NoOptions):
    blocks_per_stage: int = Field(1, ge=1, le=8)  # residual blocks per resolution
    attention_res: int = Field(0, ge=0)  # feature-map side with self-attention (0: none)
    spectral_norm: bool = False  # spectral norm in G as well (BigGAN, SAGAN)


class ResNetDOptions(NoOptions):
    extra_blocks: int = Field(1, ge=0, le=8)  # non-downsampling blocks at the base resolution
    attention_res: int = Field(0, ge=0)  # feature-map side with self-attention (0: none)


class ResNetVAEOptions(NoOptions):
    learn_sigma: bool = False  # Gaussian decoder: learn one log-std per channel
    blocks_per_stage: int = Field(1, ge=1, le=8)  # decoder residual blocks per resolution


class StyleGAN2GOptions(NoOptions):
    w_dim: int = Field(128, ge=8, le=1024)  # size of w (512 in the paper)
    mapping_layers: int = Field(2, ge=1, le=8)  # mapping FC layers (8 in the paper, 2 for small data as in ADA's CIFAR config)
    style_mixing: float = Field(0.0, ge=0, le=1)  # share of training samples with two ws (0.9 in the paper, 0 in ADA's CIFAR config)
    noise: bool = True  # per-pixel noise inputs (fixed noise in eval mode)
    output: Literal["linear", "tanh"] = "linear"  # the images' last op: linear as the reference, tanh bounds them to [-1, 1]


class StyleGAN2DOptions(NoOptions):
    mbstd_group: int = Field(4, ge=0, le=32)  # minibatch-std group size (0: off)


register_model("dcgan", algorithm="gan", classes={"generator": DCGANGenerator, "discriminator": DCGANDiscriminator},
               resolutions=(8, 16, 28, 32, 64), description="DCGAN-style transposed-conv G, strided-conv D")
register_model("resnet", algorithm="gan", classes={"generator": ResNetGenerator, "discriminator": ResNetDiscriminator},
               options={"generator": ResNetGOptions, "discriminator": ResNetDOptions},
               resolutions=(16, 28, 32, 64, 128, 256),
               description="SNGAN/BigGAN-style residual G and D, conditional norms, projection D, self-attention")
register_model("stylegan2", algorithm="gan",
               classes={"generator": StyleGAN2Generator, "discriminator": StyleGAN2Discriminator},
               options={"generator": StyleGAN2GOptions, "discriminator": StyleGAN2DOptions},
               resolutions=(8, 16, 28, 32, 64, 128, 256),
               description="StyleGAN2-style mapping network, modulated convs, noise, W-space editing; residual D with R1")
register_model("conv_vae", algorithm="vae", classes={"vae": ConvVAE}, resolutions=(8, 16, 28, 32, 64),
               description="convolutional encoder and decoder")
register_model("resnet_vae", algorithm="vae", classes={"vae": ResNetVAE}, options={"vae": ResNetVAEOptions},
               resolutions=(16, 28, 32, 64, 128),
               description="residual encoder and decoder, Gaussian decoder with fixed or learned sigma")


def family_names(algorithm: str | None = None) -> list[str]:
    return [n for n, f in FAMILIES.items() if algorithm in (None, f.algorithm)]


def get_family(arch: str, algorithm: str, *, trusted: bool = False) -> ModelFamily:
    """The family a config's `model.arch` names: a registered name or a plug-in reference.

    Args:
        trusted: import a plug-in even if it is not allowed (only for names the user just typed;
            configs the user loads allow their plug-in through `config.load_experiment`).

    Raises:
        ValueError: unknown name (listing the valid ones), or a plug-in of the wrong kind.
        plugins.PluginError: a plug-in that is not allowed or cannot be imported.
    """
    if arch in FAMILIES:
        fam = FAMILIES[arch]
        if fam.algorithm != algorithm:
            raise ValueError(f"model.arch {arch!r} is a {fam.algorithm} family; a {algorithm} experiment needs "
                             f"one of: {', '.join(family_names(algorithm))}")
        return fam
    if not plugins.is_plugin_ref(arch):
        raise ValueError(f"unknown model.arch {arch!r}; choose one of: {', '.join(family_names(algorithm))}, "
                         "or a plug-in as package.module:ClassName")
    cls = plugins.load_plugin_class(arch, trusted=trusted)
    if algorithm == "gan":
        d_cls = getattr(cls, "discriminator_class", None)
        if not (isinstance(d_cls, type) and issubclass(d_cls, nn.Module)):
            raise ValueError(f"plug-in generator {arch} needs a `discriminator_class` attribute naming its "
                             "discriminator (an nn.Module class)")
        classes = {"generator": cls, "discriminator": d_cls}
    else:
        classes = {"vae": cls}
    for role, c in classes.items():
        plugins.class_ref(c)  # top-level classes only: a checkpoint must be able to name them
        missing = interface.missing_members(c, role)
        if missing:
            raise ValueError(f"plug-in {c.__module__}:{c.__qualname__} lacks the {role} interface: {', '.join(missing)}")
    return ModelFamily(arch, algorithm, classes, plugin=True)


def _resolve_class(spec: dict) -> type[nn.Module]:
    name = spec["class"]
    if name in MODEL_CLASSES:
        return MODEL_CLASSES[name]
    if plugins.is_plugin_ref(name):
        return plugins.load_plugin_class(name, provenance=spec.get("plugin"))
    raise KeyError(f"unknown model class {name!r}; choose one of: {', '.join(MODEL_CLASSES)}, "
                   "or a plug-in recorded as package.module:ClassName")


def model_class(name: str) -> type[nn.Module]:
    """The registered class called `name` (plug-ins only when allowed).

    Raises:
        KeyError: with the list of valid names.
        plugins.PluginError: a plug-in that is not allowed or cannot be imported.
    """
    return _resolve_class({"class": name})


class SharedArgs(BaseModel):
    """Bounds on the constructor keywords every family shares, as a checkpoint records them: a
    planted config.json must not make a constructor loop or allocate without limit (the training
    configs bound the same values when they load; a checkpoint skips that path)."""

    model_config = ConfigDict(extra="allow")
    z_dim: int = Field(1, ge=1, le=1024)
    channels: int = Field(1, ge=1, le=4)
    resolution: int = Field(8, ge=1, le=1024)
    width: int = Field(4, ge=1, le=512)
    num_classes: int = Field(0, ge=0, le=100_000)
    embed_dim: int = Field(1, ge=1, le=1024)


def check_module_args(cls: type[nn.Module], args) -> None:
    """Validate a registered class's checkpoint keywords against its family's bounds and options.

    Raises:
        ValueError: naming the field and the bound (plug-ins check their own arguments).
    """
    fam_role = next(((f, r) for f in FAMILIES.values() for r, c in f.classes.items() if c is cls), None)
    if fam_role is None:  # a class outside the catalogue (the classifier, plug-ins)
        return
    if not isinstance(args, dict):
        raise ValueError(f"args of {cls.__name__} must be a mapping, got {type(args).__name__}")
    fam, role = fam_role
    try:
        shared = SharedArgs.model_validate(args)
        if "resolution" in args and fam.resolutions and shared.resolution not in fam.resolutions:
            raise ValueError(f"resolution {shared.resolution} is not one of the {fam.name!r} family's "
                             f"{', '.join(map(str, fam.resolutions))}")
        schema = fam.options.get(role)
        if schema is not None:
            own = {k: v for k, v in args.items() if k in schema.model_fields}
            schema.model_validate(own)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"{cls.__name__} arguments out of bounds: {problems}") from None


def build_module(spec: dict) -> nn.Module:
    """Instantiate a module from a checkpoint's record {'class', 'args'[, 'plugin']}, after its
    arguments are checked against its family's bounds."""
    cls = _resolve_class(spec)
    check_module_args(cls, spec["args"])
    return cls(**spec["args"])


def describe(module: nn.Module) -> dict:
    """A module's record for a checkpoint: {'class', 'args'} plus, for plug-ins, where it came from."""
    cls = type(module)
    if MODEL_CLASSES.get(cls.__name__) is cls:
        return {"class": cls.__name__, "args": dict(module.init_args)}
    return {"class": plugins.class_ref(cls), "args": dict(module.init_args), "plugin": plugins.plugin_provenance(cls)}
