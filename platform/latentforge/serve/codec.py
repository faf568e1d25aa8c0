"""Images over the wire: base64 PNG in, base64 PNG out, with every check done before decoding."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image

from latentforge.images import to_model_range
from latentforge.errors import LatentForgeError
from latentforge.images import as_displayed, exif_orientation, flatten_alpha, grid_uint8, png_bytes


ACCEPTED_FORMATS = ("PNG", "JPEG")  # the image formats the API documents and decodes; no other parser runs
RETRY_AFTER_S = 5  # what a 503 asks a client to wait (e.g. a model's directions are being computed)


class BadInput(LatentForgeError):
    """A request that cannot be served as sent (→ HTTP 4xx); `status` says which."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keep the status when a replica hands the error back through Ray
        return type(self), (str(self), self.status)


def _open_image(data: str, field: str, size: tuple[int, int], max_side: int, fit: bool = False,
                mask: bool = False, channels: int = 3) -> Image.Image:
    """base64 → a loaded PIL image of exactly `size` (H, W), as a viewer shows it (`as_displayed`);
    with `fit`, of any size up to `max_side`, its centre square resized to `size`
    (`data.sources.resize_square`) after it is converted to `channels`, in that order as `data
    prepare` does it. A `mask` is resized so that every pixel touching a painted (bright) one stays
    painted: a thin stroke must not vanish.

    Raises:
        BadInput: not base64, not an image, too large (checked from the header, before decoding),
            truncated, or (without `fit`) a size the model does not take.
    """
    img, (w, h) = _header(data, field, max_side)
    mh, mw = size
    if (w, h) not in ((mw, mh), (mh, mw)) and not fit:  # (a quarter turn in its EXIF swaps the sides)
        raise BadInput(_size_error(field, w, h, mw, mh))
    if fit and mh != mw:
        raise BadInput(f'{field}: "fit" makes square images and this model takes {mw}x{mh}; send that size')
    try:
        img.load()
    except Exception as e:
        raise BadInput(f"{field}: the image data is truncated or corrupt") from e
    img = as_displayed(img)
    if img.size != (mw, mh) and not fit:  # as displayed, after its EXIF rotation
        raise BadInput(_size_error(field, *img.size, mw, mh))
    if fit:
        from latentforge.data.sources import centre_square, resize_square

        if mask:  # painted = bright, as decode_mask_b64 reads it; resized by coverage, then any coverage counts
            painted = centre_square(flatten_alpha(img).convert("L").point(lambda v: 255 if v >= 128 else 0))
            # in floats: an 8-bit BOX rounds one painted pixel among 36x36 down to nothing
            covered = painted.convert("F").resize((mw, mh), Image.Resampling.BOX)
            return Image.fromarray(np.where(np.asarray(covered) > 0, 255, 0).astype(np.uint8))
        img = flatten_alpha(img).convert("L" if channels == 1 else "RGB")  # transparent pixels black
        if img.size != (mw, mh):
            img = resize_square(img, mh)
    return img


def _plain_base64(data: str) -> str:
    """The forms clients send, as standard padded base64: `base64 FILE` wraps lines, a browser's
    canvas gives a `data:image/png;base64,` URL, and some encoders use the URL-safe alphabet or drop
    the padding."""
    if data.startswith("data:") and "," in data[:100]:
        head, _, data = data.partition(",")
        if not head.endswith(";base64"):
            raise ValueError("a data: URL must be base64 (data:image/png;base64,...)")
    data = "".join(data.split()).translate(_URLSAFE)
    return data + "=" * (-len(data) % 4) if "=" not in data else data


_URLSAFE = str.maketrans("-_", "+/")


def _header(data: str, field: str, max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """base64 → an opened (not yet decoded) image and its size from the header, within `max_side`."""
    try:
        raw = base64.b64decode(_plain_base64(data), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"{field}: not valid base64 ({e}); send the file's bytes base64-encoded (a data: URL, line "
                       "breaks and the URL-safe alphabet are accepted too)") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            # only the documented formats' parsers ever see the bytes (an EPS would reach Ghostscript)
            img = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
        w, h = img.size
    except Image.DecompressionBombError as e:
        raise BadInput(f"{field}: image is far too large ({e})", status=413) from e
    except Exception as e:
        raise BadInput(f"{field}: not a readable image: send a base64 {' or '.join(ACCEPTED_FORMATS)}") from e
    if w > max_side or h > max_side:
        raise BadInput(f"{field}: image is {w}x{h}; the largest accepted side is {max_side}", status=413)
    return img, (w, h)


def _size_error(field: str, w: int, h: int, mw: int, mh: int) -> str:
    return (f"{field}: image is {w}x{h}; this model takes {mw}x{mh} images: resize it, or send "
            '"fit": true to have its centre square resized')


def image_size_b64(data: str, field: str, max_side: int) -> tuple[int, int]:
    """(W, H) of a base64 image as displayed (its EXIF rotation applied), from its header."""
    img, (w, h) = _header(data, field, max_side)
    return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def decode_image_b64(data: str, field: str, shape: tuple[int, int, int], max_side: int, fit: bool = False) -> torch.Tensor:
    """base64 image → (1, C, H, W) in [-1, 1], checked against the model's (C, H, W); with `fit`,
    resized (`_open_image`) and converted to the model's channels (a colour image's luma for a
    grey model).

    Raises:
        BadInput: as `_open_image`, or (without `fit`) a channel count the model does not take.
    """
    c, mh, mw = shape
    # transparent pixels are black, as in prepared datasets and on the playground's canvas
    img = flatten_alpha(_open_image(data, field, (mh, mw), max_side, fit, channels=c))
    grey = img.mode in ("1", "L", "I", "I;16", "F")
    if c == 1 and not grey:  # a colour image whose channels are all equal is grey (a browser canvas's PNG is RGBA)
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    channels = 1 if grey else 3
    if channels != c:
        convert = "convert it to greyscale" if c == 1 else "convert it to RGB"
        raise BadInput(f"{field}: image has {channels} channel(s) (mode {img.mode}); this model takes {c}: {convert}, "
                       'or send "fit": true')
    arr = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.uint8).reshape(mh, mw, c)
    return to_model_range(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None])


def decode_mask_b64(data: str, shape: tuple[int, int, int], max_side: int, fit: bool = False) -> torch.Tensor:
    """base64 mask image of any mode (grey, RGB, RGBA: its brightness counts, transparent pixels
    count as black) → (1, 1, H, W) observed-pixel mask (1 = keep; white in the image = fill); `fit`
    resizes it as the image."""
    _, h, w = shape
    img = _open_image(data, "mask", (h, w), max_side, fit, mask=True)
    # transparent pixels are black (kept) whatever colour they store: an editor exports a mask layer's
    # untouched area as transparent white
    keep = torch.from_numpy(np.asarray(flatten_alpha(img).convert("L"), dtype=np.uint8) < 128).float()[None, None]
    if keep.mean() == 1.0:
        raise BadInput("mask: no pixel is marked for filling (paint the region to fill in white)")
    return keep


def encode_png_b64(image: torch.Tensor) -> str:
    """(C, H, W) in [-1, 1] → base64 PNG (native size)."""
    return base64.b64encode(png(image)).decode("ascii")


def png(image: torch.Tensor) -> bytes:
    """(C, H, W) in [-1, 1] → PNG bytes."""
    return png_bytes(grid_uint8(image[None], nrow=1, pad=0))
