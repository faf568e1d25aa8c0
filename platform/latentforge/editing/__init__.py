"""Image editing on a loaded checkpoint (pure PyTorch, no Ray): inversion, interpolation,
latent directions and edits, inpainting, denoising."""
