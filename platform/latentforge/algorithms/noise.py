"""Counter-based noise that is identical however a global batch is split across workers.

Every random draw of a step (latents, penalty interpolation weights, reparameterisation noise)
is drawn for the whole global batch from a generator seeded by (seed, step, stream), and each
worker keeps its slice. So N workers with batch b and 1 worker with batch N*b see the same
numbers: this is what makes data-parallel training match single-process training exactly. And as
nothing is carried from step to step, a resumed run draws what the uninterrupted run drew.

The draws are made on the worker's device. At 256 px one StyleGAN2 pass's noise maps are 175k
numbers per sample: 11M for a global batch of 64, 83 ms on a host core (measured) and three such
passes a step, against a fraction of a millisecond on a GPU. A CUDA generator gives other numbers
than the CPU's, and PyTorch spreads a large CUDA draw over a grid sized by the GPU's number of
SMs, so large draws also differ between GPU models: runs are exact across worker counts, and a
resume continues the same numbers, on one kind of device (one GPU model).
"""

from __future__ import annotations

import torch

_MASK = (1 << 63) - 1


class GlobalNoise:
    """Per-step noise for one worker.

    Args:
        seed: the run's seed.
        rank: this worker's rank.
        world_size: number of workers.
    """

    # Streams: one per kind of draw within a step; D sub-steps use stream + 10*k. A generator's
    # own random inputs (StyleGAN2's noise maps) use RANDOM_INPUTS * (i + 1) + the stream of their
    # pass (LATENT_D + 10*k, LATENT_G, or PATH_LENGTH for the path-length pass, which reuses
    # LATENT_G's z), i the input's place in its `random_inputs()`.
    LATENT_D, LATENT_G, PENALTY_MIX, REPARAM, AUG_REAL, AUG_FAKE, AUG_G, PATH_LENGTH = 1, 2, 3, 4, 5, 6, 7, 8
    RANDOM_INPUTS = 1000

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)

    def _generator(self, step: int, stream: int) -> torch.Generator:
        key = (self.seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _MASK
        return torch.Generator(self.device).manual_seed(key)

    def _slice(self, full: torch.Tensor, local: int) -> torch.Tensor:
        part = full[self.rank * local : (self.rank + 1) * local]
        return part if self.world_size == 1 else part.clone()  # a view would keep the whole draw alive

    def normal(self, step: int, stream: int, local: int, *shape: int) -> torch.Tensor:
        """(local, *shape) standard normal: this worker's slice of a (world*local, *shape) draw."""
        full = torch.randn(self.world_size * local, *shape, generator=self._generator(step, stream), device=self.device)
        return self._slice(full, local)

    def uniform(self, step: int, stream: int, local: int, *shape: int) -> torch.Tensor:
        """(local, *shape) uniform in [0, 1), sliced like `normal`."""
        full = torch.rand(self.world_size * local, *shape, generator=self._generator(step, stream), device=self.device)
        return self._slice(full, local)
