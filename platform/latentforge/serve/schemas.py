"""Request schemas and limits. Every request is validated here before anything reaches a model:
unknown fields, out-of-range numbers and NaN/inf are 422s that name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from latentforge.config import Seed, StrictConfig

MAX_TRUNCATION = 10.0


class ServeLimits(StrictConfig):
    """Request limits (configurable per deployment)."""

    max_n: int = Field(64, ge=1, le=4096)  # images per generate request
    max_steps: int = Field(32, ge=2, le=1024)  # images along an interpolation
    max_projection_steps: int = Field(500, ge=1)  # optimisation steps for GAN inversion/inpainting
    max_projection_work: int = Field(1000, ge=1)  # steps × random starts × images inverted, per request
    max_image_side: int = Field(1024, ge=8)  # larger images are refused from the PNG header, before decoding
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # request bodies above this are 413s
    max_alpha: float = Field(10.0, gt=0)  # |alpha| for edits
    # requests per second each client may make through one gateway replica, with bursts of up to
    # rate_burst (a token bucket; None: no limit). A client is its address, or with
    # trust_forwarded_for the first address of X-Forwarded-For (behind your own proxy only:
    # anyone can send that header)
    rate_per_s: float | None = Field(None, gt=0)
    rate_burst: int = Field(20, ge=1)
    trust_forwarded_for: bool = False


class StrictRequest(BaseModel):
    """Base of every HTTP request body: unknown fields, NaN/inf and values of the wrong JSON type
    (true or "3" for a number, 1 for a boolean) are 422s."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class LatentSource(StrictRequest):
    """Where a latent comes from: exactly one of seed, image (base64 PNG), latent (floats)."""

    seed: Seed | None = None
    image: str | None = Field(None, min_length=1)
    latent: list[float] | None = Field(None, min_length=1, max_length=4096)
    label: int | None = Field(None, ge=0)  # class for conditional models
    fit: bool = False  # image of any size and mode: centre-crop, resize and convert it to what the model takes

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("seed", "image", "latent") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of seed, image, latent (got {', '.join(given) or 'none'})")
        return self


class GenerateRequest(StrictRequest):
    n: int = Field(1, ge=1)  # upper bound checked against ServeLimits.max_n
    seed: Seed = 0
    label: int | None = Field(None, ge=0)
    truncation: float | None = Field(None, gt=0, le=MAX_TRUNCATION)
    include_latents: bool = True


class ImageRequest(StrictRequest):
    image: str = Field(min_length=1)  # base64 PNG (or JPEG)
    label: int | None = Field(None, ge=0)
    steps: int | None = Field(None, ge=1)  # GAN projection steps (default per deployment)
    # an image of any size and mode: its centre square resized to the model's side and converted to
    # its channels (as `data prepare --size` makes training images); the mask of an inpainting the same
    fit: bool = False


class InpaintRequest(ImageRequest):
    mask: str = Field(min_length=1)  # base64 PNG, same size; white (>127) marks pixels to fill
    method: Literal["optimize", "chain"] = "optimize"


class InterpolateRequest(StrictRequest):
    a: LatentSource
    b: LatentSource
    steps: int = Field(8, ge=2)
    method: Literal["slerp", "lerp"] | None = None  # default: slerp for a GAN's Gaussian z, lerp for VAE latents and W
    projection_steps: int | None = Field(None, ge=1)


class EditRequest(StrictRequest):
    source: LatentSource
    direction: str = Field(min_length=1, max_length=64)
    alpha: float = Field(ge=-1e6, le=1e6)  # range checked against ServeLimits.max_alpha
    orthogonal_to: list[str] = Field(default_factory=list, max_length=16)
    projection_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _orthogonal_to_others(self):
        if self.direction in self.orthogonal_to:
            raise ValueError(f"orthogonal_to: contains the edited direction {self.direction!r} itself "
                             "(the edit would be projected to nothing)")
        if len(set(self.orthogonal_to)) != len(self.orthogonal_to):
            raise ValueError("orthogonal_to: lists a direction more than once")
        return self
