"""nn.Modules only: GAN generators/discriminators and VAEs, built by family name."""

from latentforge.models.architectures import FAMILIES, MODEL_CLASSES, build_module, describe, get_family, register_model
from latentforge.models.dcgan import DCGANDiscriminator, DCGANGenerator
from latentforge.models.resnet import ResNetDiscriminator, ResNetGenerator, ResNetVAE
from latentforge.models.vae import ConvVAE

__all__ = ["ConvVAE", "DCGANDiscriminator", "DCGANGenerator", "FAMILIES", "MODEL_CLASSES", "ResNetDiscriminator",
           "ResNetGenerator", "ResNetVAE", "build_module", "describe", "get_family", "register_model"]
