"""nn.Modules only: GAN generators/discriminators and VAEs, built by name."""

from latentforge.models.dcgan import DCGANDiscriminator, DCGANGenerator
from latentforge.models.architectures import GAN_ARCHITECTURES, MODEL_CLASSES, VAE_ARCHITECTURES, build_module, describe
from latentforge.models.vae import ConvVAE

__all__ = ["ConvVAE", "DCGANDiscriminator", "DCGANGenerator", "GAN_ARCHITECTURES", "MODEL_CLASSES",
           "VAE_ARCHITECTURES", "build_module", "describe"]
