"""The architecture catalogue: architecture names for configs, class names for checkpoints
(the promoted-model registry is `latentforge.registry`).

Checkpoints name a class from `MODEL_CLASSES`; nothing else can be instantiated from a file.
"""

from __future__ import annotations

from torch import nn

from latentforge.models.classifier import FeatureClassifier
from latentforge.models.dcgan import DCGANDiscriminator, DCGANGenerator
from latentforge.models.vae import ConvVAE

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "DCGANGenerator": DCGANGenerator,
    "DCGANDiscriminator": DCGANDiscriminator,
    "ConvVAE": ConvVAE,
    "FeatureClassifier": FeatureClassifier,
}

# Architecture names used in presets, and the classes they build.
GAN_ARCHITECTURES = {"dcgan": (DCGANGenerator, DCGANDiscriminator)}
VAE_ARCHITECTURES = {"conv_vae": ConvVAE}


def model_class(name: str) -> type[nn.Module]:
    """The registered class called `name`.

    Raises:
        KeyError: with the list of valid names.
    """
    try:
        return MODEL_CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown model class {name!r}; choose one of: {', '.join(MODEL_CLASSES)}") from None


def build_module(class_name: str, args: dict) -> nn.Module:
    """Instantiate a registered class from its recorded constructor arguments."""
    return model_class(class_name)(**args)


def describe(module: nn.Module) -> dict:
    """{'class': name, 'args': constructor arguments} for a registered module."""
    name = type(module).__name__
    model_class(name)
    return {"class": name, "args": dict(module.init_args)}
