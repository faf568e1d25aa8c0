"""LatentForge: GANs and VAEs for image generation and editing, trained, tuned and served on Ray."""

__version__ = "0.1.0"
