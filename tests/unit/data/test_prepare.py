import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from latentforge.data import PreparedDataset, prepare_dataset
from latentforge.data.sources import SourceOptions
from latentforge.errors import DataError

quiet = {"log": lambda *_: None}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, classes=("a", "b"), per_class=4, size=12, mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_mnist5k_has_5000_rows_10_classes(mnist_dir):
    ds = PreparedDataset(mnist_dir)
    m = ds.manifest
    assert m["num_images"] == 5000
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 5000
    assert m["splits"]["val"]["count"] == 500
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert sum(m["splits"]["train"]["class_counts"].values()) == 4500
    train = ds.load("train")
    assert train.images.shape == (4500, 1, 28, 28) and train.images.dtype.is_floating_point is False
    assert set(train.labels.unique().tolist()) == set(range(10))
    # Rows are shuffled on disk: a class-sorted source must not stream one digit at a time.
    assert len(set(train.labels[:50].tolist())) > 5


def test_prepare_is_deterministic(tmp_path):
    a = prepare_dataset("digits", tmp_path / "a", **quiet)
    b = prepare_dataset("digits", tmp_path / "b", **quiet)
    assert a["content_hash"] == b["content_hash"]
    c = prepare_dataset("digits", tmp_path / "c", split_seed=1, **quiet)
    assert c["content_hash"] != a["content_hash"]
    assert a["num_images"] == 1797 and a["image_shape"] == [1, 8, 8]


def test_shapes_factors_are_stored(tmp_path):
    m = prepare_dataset("shapes", tmp_path / "s", SourceOptions(count=50, size=16), **quiet)
    ds = PreparedDataset(tmp_path / "s")
    assert m["attributes"] == ["hue", "size", "x", "y"] and ds.image_shape == (3, 16, 16)
    val = ds.load("val")
    assert set(val.attributes) == {"hue", "size", "x", "y"}
    assert float(val.attributes["size"].min()) >= 0 and float(val.attributes["size"].max()) <= 1
    # Bigger shapes light up more pixels: the stored factor describes the picture.
    train = ds.load("train")
    lit = (train.images.float().amax(1) > 60).flatten(1).float().mean(1)
    corr = np.corrcoef(lit.numpy(), train.attributes["size"].numpy())[0, 1]
    assert corr > 0.8


def test_folder_source_with_classes_and_resize(tmp_path):
    _folder(tmp_path / "imgs", size=20)
    m = prepare_dataset(f"folder:{tmp_path / 'imgs'}", tmp_path / "out", SourceOptions(size=16), val_fraction=0.25, **quiet)
    assert m["class_names"] == ["a", "b"] and m["num_images"] == 8 and m["image_shape"] == [3, 16, 16]
    assert m["splits"]["val"]["count"] == 2


def test_truncated_png_fails_naming_the_file_then_skip_bad_counts_it(tmp_path):
    root = _folder(tmp_path / "imgs")
    bad = root / "b" / "broken.png"
    bad.write_bytes((root / "b" / "0.png").read_bytes()[:60])
    with pytest.raises(DataError) as e:
        prepare_dataset(f"folder:{root}", tmp_path / "out", **quiet)
    assert "broken.png" in str(e.value) and "--skip-bad" in str(e.value)
    assert not (tmp_path / "out").exists()
    m = prepare_dataset(f"folder:{root}", tmp_path / "out", SourceOptions(skip_bad=True), **quiet)
    assert m["skipped"]["count"] == 1 and "broken.png" in m["skipped"]["items"][0]["item"]
    assert m["num_images"] == 8


def test_overwrite_replaces_only_a_prepared_dataset_and_never_its_own_source(tmp_path):
    """--overwrite is for re-preparing a dataset: a run folder, a plain file or the source images
    are refused before anything is read, and left byte for byte as they were."""
    root = _folder(tmp_path / "imgs")
    source = f"folder:{root}"
    images = {p: p.read_bytes() for p in root.rglob("*.png")}
    with pytest.raises(DataError, match="holds the source .* would delete the images it reads"):
        prepare_dataset(source, root, overwrite=True, **quiet)
    with pytest.raises(DataError, match="holds the source"):
        prepare_dataset(source, tmp_path, overwrite=True, **quiet)  # a folder above the source too
    assert {p: p.read_bytes() for p in root.rglob("*.png")} == images
    run = tmp_path / "run"
    (run / "step_000010").mkdir(parents=True)
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared dataset .* nothing there was touched"):
        prepare_dataset(source, run, overwrite=True, **quiet)
    assert (run / "notes.txt").read_text() == "keep me" and (run / "step_000010").is_dir()
    afile = tmp_path / "afile"
    afile.write_text("data")
    with pytest.raises(DataError, match="is a file, not a dataset folder"):
        prepare_dataset(source, afile, overwrite=True, **quiet)
    assert afile.read_text() == "data" and not list(tmp_path.glob(".afile*"))
    out = tmp_path / "out"
    first = prepare_dataset(source, out, SourceOptions(size=16), **quiet)
    again = prepare_dataset(source, out, SourceOptions(size=8), overwrite=True, **quiet)  # a dataset: replaced
    assert first["image_shape"] == [3, 16, 16] and again["image_shape"] == [3, 8, 8]
    assert PreparedDataset(out).image_shape == (3, 8, 8)


def test_empty_folder_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        prepare_dataset(f"folder:{tmp_path / 'empty'}", tmp_path / "o", **quiet)
    with pytest.raises(DataError, match="not a folder"):
        prepare_dataset(f"folder:{tmp_path / 'nope'}", tmp_path / "o", **quiet)


def test_mixed_modes_are_refused_unless_converted(tmp_path):
    root = _folder(tmp_path / "imgs", classes=("a",))
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "a" / "grey.png")
    with pytest.raises(DataError, match="--channels"):
        prepare_dataset(f"folder:{root}", tmp_path / "o", **quiet)
    m = prepare_dataset(f"folder:{root}", tmp_path / "o", SourceOptions(channels=1), **quiet)
    assert m["image_shape"][0] == 1


def test_different_sizes_need_size_flag(tmp_path):
    root = _folder(tmp_path / "imgs", classes=("a",))
    Image.fromarray(np.zeros((20, 10, 3), np.uint8)).save(root / "a" / "tall.png")
    with pytest.raises(DataError, match="--size"):
        prepare_dataset(f"folder:{root}", tmp_path / "o", **quiet)


def test_unknown_source_lists_valid_ones(tmp_path):
    with pytest.raises(DataError, match="mnist5k.*folder:PATH"):
        prepare_dataset("imagenet", tmp_path / "o", **quiet)


def test_parquet_source_validates_schema(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
    pq.write_table(pa.table({"img": imgs, "label": [0, 1, 0, 1, 0, 1]}), tmp_path / "u.parquet")
    with pytest.raises(DataError, match=r"no image column 'image' \(columns: img, label\)"):
        prepare_dataset(f"parquet:{tmp_path / 'u.parquet'}", tmp_path / "o", **quiet)
    m = prepare_dataset(f"parquet:{tmp_path / 'u.parquet'}", tmp_path / "o", SourceOptions(image_column="img"), **quiet)
    assert m["num_images"] == 6 and m["num_classes"] == 2


def test_torchvision_missing_files_say_so(tmp_path):
    with pytest.raises(DataError, match="--download"):
        prepare_dataset(f"torchvision:MNIST:{tmp_path}", tmp_path / "o", **quiet)
    with pytest.raises(DataError, match="FashionMNIST"):
        prepare_dataset("torchvision:ImageNet", tmp_path / "o", **quiet)


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import latentforge.data.prepare as prep

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("digits", tmp_path / "o", **quiet)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_clobbered(tmp_path):
    prepare_dataset("digits", tmp_path / "o", SourceOptions(count=100), **quiet)
    before = json.loads((tmp_path / "o" / "manifest.json").read_text())
    with pytest.raises(DataError, match="already exists"):
        prepare_dataset("digits", tmp_path / "o", **quiet)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text()) == before


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)


def _sheet(tiles: list[np.ndarray], cols: int = 4) -> Image.Image:
    """An RGBA sheet of 32x32 tiles, row-major, empty slots transparent."""
    rows = (len(tiles) + cols - 1) // cols
    sheet = np.zeros((rows * 32 + 3, cols * 32, 4), np.uint8)  # +3: a ragged edge, as the real sheets have
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = t
    return Image.fromarray(sheet, mode="RGBA")


def test_crawl_tiles_cut_sheets_into_labelled_distinct_tiles(tmp_path, monkeypatch):
    from latentforge.data.sources import CRAWL_SHEETS, load_crawl_tiles

    def tile(rgb, opaque=1.0):
        t = np.zeros((32, 32, 4), np.uint8)
        t[..., :3] = rgb
        t[: int(32 * opaque), :, 3] = 255  # the top rows opaque, the rest transparent
        return t

    red, green = tile((200, 10, 10)), tile((10, 200, 10), opaque=0.5)
    sheets = {name: [tile((i * 40, 100, 50))] for i, name in enumerate(CRAWL_SHEETS)}
    sheets["floor.png"] = [red, green, red.copy(), tile((0, 0, 255), opaque=0.0), tile((5, 5, 5), opaque=0.03)]
    for name, tiles in sheets.items():
        _sheet(tiles).save(tmp_path / name)
    monkeypatch.setenv("LATENTFORGE_CRAWL_TILES", str(tmp_path))
    src = load_crawl_tiles(SourceOptions())
    labels = list(src.labels)
    floor = list(CRAWL_SHEETS).index("floor.png")
    # the duplicate red, the empty slot and the 3%-opaque tile are dropped; one tile per other sheet
    assert labels.count(floor) == 2 and len(labels) == 2 + len(CRAWL_SHEETS) - 1
    assert src.images.shape[1:] == (32, 32, 3) and src.class_names == list(CRAWL_SHEETS.values())
    g = src.images[labels.index(floor) + 1]
    assert tuple(g[0, 0]) == (10, 200, 10) and tuple(g[31, 0]) == (0, 0, 0)  # transparency composited on black
    big = load_crawl_tiles(SourceOptions(size=64))
    assert big.images.shape[1:] == (64, 64, 3)

    (tmp_path / "wall.png").unlink()
    with pytest.raises(DataError, match="crawl-tiles-data.*make data-deps"):
        load_crawl_tiles(SourceOptions())


def test_emoji_without_their_packages_name_the_package_and_the_command(tmp_path, monkeypatch):
    from latentforge.data.sources import emoji_installed, load_emoji

    monkeypatch.setenv("LATENTFORGE_EMOJI_FONT", str(tmp_path / "missing.ttf"))
    assert not emoji_installed()  # what `make demo` asks before its colour stage
    with pytest.raises(DataError, match="fonts-noto-color-emoji.*make data-deps"):
        load_emoji(SourceOptions())
    (tmp_path / "broken.ttf").write_bytes(b"not a font")
    monkeypatch.setenv("LATENTFORGE_EMOJI_FONT", str(tmp_path / "broken.ttf"))
    monkeypatch.setenv("LATENTFORGE_EMOJI_TEST", str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unicode-data.*make data-deps"):
        load_emoji(SourceOptions())
    (tmp_path / "emoji-test.txt").write_text("# group: Smileys & Emotion\n1F600 ; fully-qualified # 😀 grinning face\n")
    monkeypatch.setenv("LATENTFORGE_EMOJI_TEST", str(tmp_path / "emoji-test.txt"))
    assert emoji_installed()  # both files are there (whether they read is load_emoji's to say)
    with pytest.raises(DataError, match="cannot be read as a colour emoji font"):
        load_emoji(SourceOptions())


def test_emoji_list_reads_groups_and_keeps_one_of_each_skin_tone_family(tmp_path):
    from latentforge.data.sources import _emoji_list

    (tmp_path / "t.txt").write_text(
        "# group: Smileys & Emotion\n"
        "1F600 ; fully-qualified # 😀 grinning face\n"
        "263A ; unqualified # ☺ smiling face\n"
        "# group: People & Body\n"
        "1F44B ; fully-qualified # 👋 waving hand\n"
        "1F44B 1F3FD ; fully-qualified # 👋🏽 waving hand: medium skin tone\n"
        "# group: Component\n"
        "1F3FB ; fully-qualified # 🏻 light skin tone\n"
        "# group: Flags\n"
        "1F1EB 1F1F7 ; fully-qualified # 🇫🇷 flag: France\n")
    assert _emoji_list(tmp_path / "t.txt") == [("\U0001F600", "Smileys & Emotion"), ("\U0001F44B", "People & Body"),
                                               ("\U0001F1EB\U0001F1F7", "Flags")]


_EMOJI_PACKAGES = all(__import__("pathlib").Path(p).is_file() for p in
                      ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/unicode/emoji/emoji-test.txt"))


@pytest.mark.skipif(not _EMOJI_PACKAGES, reason="fonts-noto-color-emoji / unicode-data are not installed (make data-deps)")
def test_emoji_from_the_debian_packages_are_colour_images_in_nine_groups(tmp_path):
    from latentforge.data.sources import load_emoji

    prepare_dataset("emoji", tmp_path / "emoji", SourceOptions(size=32), log=lambda *_: None)
    ds = PreparedDataset(tmp_path / "emoji")
    train, val = ds.load("train"), ds.load("val")
    assert len(train) + len(val) >= 1800 and ds.num_classes == 9 and ds.image_shape == (3, 32, 32)
    assert set(np.unique(train.labels)) == set(range(9))
    assert ds.class_names[0] == "smileys and emotion" and ds.class_names[-1] == "flags"
    x = train.images.float()
    assert x.std() > 40 and (x.max(1).values - x.min(1).values).mean() > 20  # colour, not grey
    again = load_emoji(SourceOptions(size=32, count=50))  # the same glyphs, drawn the same way
    first = load_emoji(SourceOptions(size=32, count=50))
    assert np.array_equal(again.images, first.images) and np.array_equal(again.labels, first.labels)


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/crawl/dat/tiles/main.png").is_file(),
                    reason="Debian's crawl-tiles-data is not installed (make data-deps)")
def test_crawl_tiles_from_the_debian_package(tmp_path):
    prepare_dataset("crawl-tiles", tmp_path / "tiles", SourceOptions(), log=lambda *_: None)
    ds = PreparedDataset(tmp_path / "tiles")
    train, val = ds.load("train"), ds.load("val")
    assert len(train) + len(val) >= 5000 and ds.num_classes == 5 and ds.image_shape == (3, 32, 32)
    assert set(np.unique(train.labels)) == set(range(5))
    assert train.images.float().std() > 20  # colour sprites, not blank slots


def _idx_gz(path, array: np.ndarray, type_code: int = 0x08, truncate: int = 0) -> None:
    import gzip
    import struct

    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - truncate])


def _fashion_files(root, n_train=6, n_val=4):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_val)):
        _idx_gz(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx_gz(root / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def _gz_test_images(root) -> np.ndarray:
    """The pixels of the test split's IDX file, as written: what `val` must hold."""
    import gzip

    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    return np.frombuffer(raw[16:], np.uint8).reshape(-1, 28, 28)


def test_fashion_mnist_keeps_the_official_split_labels_and_pixels(tmp_path, monkeypatch):
    root = _fashion_files(tmp_path / "fm")
    monkeypatch.setenv("LATENTFORGE_FASHION_MNIST", str(root))
    prepare_dataset("fashion-mnist", tmp_path / "out", SourceOptions(), **quiet)
    ds = PreparedDataset(tmp_path / "out")
    train, val = ds.load("train"), ds.load("val")
    assert (len(train), len(val)) == (6, 4) and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "ankle boot"
    got = val.images[:, 0].numpy()  # the test file's pixels, unchanged, as `val`
    assert sorted(map(bytes, got)) == sorted(map(bytes, _gz_test_images(root)))


def test_torchvision_source_keeps_the_official_split(tmp_path):
    """torchvision's own reader on its raw layout (uncompressed IDX under ROOT/FashionMNIST/raw)."""
    import gzip

    fm = _fashion_files(tmp_path / "fm")
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in fm.iterdir():
        with gzip.open(gz) as f:
            (raw / gz.stem).write_bytes(f.read())
    prepare_dataset(f"torchvision:FashionMNIST:{tmp_path / 'tv'}", tmp_path / "out", SourceOptions(), **quiet)
    ds = PreparedDataset(tmp_path / "out")
    train, val = ds.load("train"), ds.load("val")
    assert (len(train), len(val)) == (6, 4) and ds.num_classes == 10
    assert sorted(map(bytes, val.images[:, 0].numpy())) == sorted(map(bytes, _gz_test_images(fm)))


def test_fashion_mnist_refuses_missing_and_damaged_files_with_the_fix(tmp_path, monkeypatch):
    from latentforge.data.sources import load_fashion_mnist

    monkeypatch.setenv("LATENTFORGE_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="dataset-fashion-mnist.*make data-deps"):
        load_fashion_mnist(SourceOptions())
    root = _fashion_files(tmp_path / "fm")
    monkeypatch.setenv("LATENTFORGE_FASHION_MNIST", str(root))
    images = root / "train-images-idx3-ubyte.gz"
    _idx_gz(images, np.zeros((6, 28, 28), np.uint8), truncate=5)
    with pytest.raises(DataError, match="truncated.*reinstall dataset-fashion-mnist"):
        load_fashion_mnist(SourceOptions())
    _idx_gz(images, np.zeros((6, 28, 28), np.uint8), type_code=0x0D)  # floats, not bytes
    with pytest.raises(DataError, match="not an IDX file"):
        load_fashion_mnist(SourceOptions())
    images.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip file"):
        load_fashion_mnist(SourceOptions())
    _idx_gz(images, np.zeros((5, 28, 28), np.uint8))  # 5 images, 6 labels
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist(SourceOptions())


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (make data-deps)")
def test_fashion_mnist_from_the_debian_package():
    from latentforge.data.sources import load_fashion_mnist

    src = load_fashion_mnist(SourceOptions())
    assert src.images.shape == (70_000, 28, 28, 1) and int(src.fixed_split.sum()) == 10_000
    assert np.bincount(src.labels, minlength=10).tolist() == [7000] * 10  # balanced, as published
    assert 60 < src.images.mean() < 90  # clothes on black, not blank


def test_transparent_pixels_are_black_in_a_grey_dataset_as_the_api_reads_them(tmp_path):
    """A grey image with alpha (and an RGBA one prepared as grey) must train on black where it is
    transparent, not on whatever grey the file keeps under alpha 0: that is what Serve's codec
    reads from the same file, so a model never sees at inference what it never trained on."""
    import base64

    from latentforge.serve.codec import decode_image_b64

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    la = np.zeros((12, 12, 2), np.uint8)
    la[..., 0] = 200  # grey 200 everywhere, visible only in the bottom half
    la[6:, :, 1] = 255
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[6:, :, 3] = 255
    files = []
    for i in range(6):
        arr, mode = (la, "LA") if i % 2 else (rgba, "RGBA")
        Image.fromarray(arr, mode).save(root / f"{i}.png")
        files.append((root / f"{i}.png").read_bytes())
    prepare_dataset(f"folder:{tmp_path / 'imgs'}", tmp_path / "o", SourceOptions(channels=1), **quiet)
    ds = PreparedDataset(tmp_path / "o")
    images = torch.cat([ds.load(s).images for s in ("train", "val")])
    assert images.shape[1:] == (1, 12, 12) and len(images) == 6
    assert int(images[:, :, :6].max()) == 0  # transparent: black
    assert set(images[:, :, 6:].unique().tolist()) <= {90, 200}  # opaque: the image's own grey
    for data in files:  # the API reads the same file to the same pixels
        api = decode_image_b64(base64.b64encode(data).decode(), "image", (1, 12, 12), 1024)
        px = ((api[0] + 1) * 127.5).round().to(images.dtype)
        assert any(bool((px == img).all()) for img in images)


# ------------------------------------------------------------------------------------------------
# a user's photo folder as it really is


def _noise(root, names, size=12, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _stored(out) -> dict:
    """split name → set of the stored images' bytes."""
    ds = PreparedDataset(out)
    return {s: {bytes(x.numpy().tobytes()) for x in ds.load(s).images} for s in ("train", "val")}


def test_a_folder_decodes_one_image_at_a_time_not_all_of_them(tmp_path):
    """24 photos of 2400x1600 are 276 MB decoded; prepared to 16 px they are 18 kB. The process's
    peak memory may grow by a few decoded photos, not by all of them (measured in a child process,
    whose peak is its own)."""
    import subprocess
    import sys

    root = tmp_path / "photos"
    root.mkdir()
    yy, xx = np.mgrid[0:1600, 0:2400]
    for i in range(24):
        Image.fromarray(np.stack([(xx + i) % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(
            root / f"{i:02d}.jpg", quality=80)
    code = (
        "from latentforge.data import prepare_dataset\n"
        "from latentforge.data.sources import SourceOptions\n"
        "def kb(key):\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
        "before = kb('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak so far (imports) no longer counts\n"
        f"prepare_dataset('folder:{root}', '{tmp_path / 'out'}', SourceOptions(size=16), log=lambda *_: None)\n"
        "print((kb('VmHWM:') - before) // 1024)\n")
    grown_mb = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])
    assert grown_mb < 150, f"peak memory grew by {grown_mb} MB"  # all 24 decoded: 276 MB more
    assert PreparedDataset(tmp_path / "out").manifest["num_images"] == 24


def test_decoding_a_multi_frame_image_leaves_no_file_open(tmp_path):
    """An animated GIF (or a phone's MPO .jpg) keeps its file open after load(): thousands of them
    exhausted the open-file limit, and the error blamed a good file."""
    import os

    from latentforge.data.sources import decode_image

    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    open_before = len(os.listdir("/proc/self/fd"))
    images = [decode_image(tmp_path / "a.gif", "a.gif") for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) == open_before and images[0].size == (8, 8)


def test_a_real_folder_skips_system_files_and_says_what_it_ignored(tmp_path):
    """macOS `._` files and `__MACOSX`, Synology's `@eaDir` thumbnails and hidden folders are not
    pictures of the dataset; a folder without images is not a class; other files are counted."""
    root = tmp_path / "imgs"
    _noise(root, ["cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png",
                  "cat/.thumbs/1.png", "__MACOSX/cat/x.png", "dog/@eaDir/1.png/SYNOPHOTO_THUMB_S.png"])
    (root / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "cat" / "IMG_1.HEIC").write_bytes(b"not read")
    (root / "notes.txt").write_text("x")
    (root / "empty").mkdir()
    said = []
    m = prepare_dataset(f"folder:{root}", tmp_path / "out", log=said.append)
    assert m["class_names"] == ["cat", "dog"] and m["num_images"] == 4
    assert m["source_notes"]["ignored_files"] == {".heic": 1, ".txt": 1}
    assert any("HEIC" in line for line in said) and any("empty" in line and "not classes" in line for line in said)


def test_loose_images_beside_class_folders_are_refused_and_an_out_inside_the_source_is_not_read(tmp_path):
    root = tmp_path / "imgs"
    _noise(root, [f"{i}.png" for i in range(6)] + ["rejected/x.png"])
    with pytest.raises(DataError, match=r"6 image\(s\) at its top level .* class folders \(rejected\)"):
        prepare_dataset(f"folder:{root}", tmp_path / "o", **quiet)
    (root / "rejected" / "x.png").unlink()
    (root / "rejected").rmdir()
    first = prepare_dataset(f"folder:{root}", root / "prepared", **quiet)  # its --out inside the source
    again = prepare_dataset(f"folder:{root}", root / "prepared", overwrite=True, **quiet)
    assert first["num_images"] == again["num_images"] == 6 and again["num_classes"] == 0
    assert first["content_hash"] == again["content_hash"]


def test_count_takes_a_seeded_sample_of_every_class_and_must_be_positive(tmp_path):
    root = _folder(tmp_path / "imgs", classes=("a", "b"), per_class=10)
    m = prepare_dataset(f"folder:{root}", tmp_path / "o", SourceOptions(count=10), val_fraction=0.0, **quiet)
    counts = m["splits"]["train"]["class_counts"]
    assert m["num_images"] == 10 and counts["0"] > 0 and counts["1"] > 0  # not the first 10 files: all of class a
    for bad in (0, -3):
        with pytest.raises(DataError, match="--count must be positive"):
            prepare_dataset(f"folder:{root}", tmp_path / f"o{bad}", SourceOptions(count=bad), **quiet)


def test_adding_a_photo_moves_no_old_photo_across_the_split_and_copies_share_a_side(tmp_path):
    """The split follows each image's content: with a seeded permutation of positions, one file that
    sorts first moved 80 of 100 validation images into training, which a model trained on the old
    folder then scores as unseen."""
    root = tmp_path / "imgs"
    _noise(root, [f"{i:03d}.png" for i in range(1, 101)])
    before = _stored(prepare_dataset(f"folder:{root}", tmp_path / "v1", **quiet) and tmp_path / "v1")
    _noise(root, ["000.png"], seed=7)  # sorts first
    after = _stored(prepare_dataset(f"folder:{root}", tmp_path / "v2", **quiet) and tmp_path / "v2")
    assert len(before["val"]) == 10 and len(before["val"] - after["val"]) <= 1
    assert len(after["train"] | after["val"]) == 101
    (root / "copy of 001.png").write_bytes((root / "001.png").read_bytes())
    said = []
    m = prepare_dataset(f"folder:{root}", tmp_path / "v3", log=said.append)
    ds = PreparedDataset(tmp_path / "v3")
    sides = [{bytes(x.numpy().tobytes()) for x in ds.load(s).images} for s in ("train", "val")]
    assert m["duplicates"] == 1 and not (sides[0] & sides[1]) and any("exact copies" in line for line in said)


def test_a_split_that_leaves_nothing_to_train_on_is_refused(tmp_path):
    with pytest.raises(DataError, match="leave none to train on"):
        prepare_dataset("digits", tmp_path / "o", SourceOptions(count=2), val_fraction=0.9, **quiet)
    root = tmp_path / "imgs"
    _noise(root, ["1.png"])  # a folder's content split always keeps one image to train on
    assert prepare_dataset(f"folder:{root}", tmp_path / "o", val_fraction=0.9, **quiet)["splits"]["train"]["count"] == 1


def test_a_photo_above_the_pixel_limit_is_decoded_at_a_reduced_scale_when_a_size_is_given(tmp_path, monkeypatch):
    from latentforge.data import sources

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(root / "big.jpg")
    monkeypatch.setattr(sources, "MAX_SOURCE_PIXELS", 10_000)  # as a 48 MP photo against the real limit
    with pytest.raises(DataError, match="more than the 10,000 allowed"):
        prepare_dataset(f"folder:{root}", tmp_path / "o", **quiet)
    m = prepare_dataset(f"folder:{root}", tmp_path / "o", SourceOptions(size=32), **quiet)
    assert m["image_shape"] == [3, 32, 32]


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from latentforge.data import prepare as prep

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.pq, "ParquetWriter", full)
    with pytest.raises(DataError, match="cannot write the dataset to .*No space left on device; free some space"):
        prepare_dataset("digits", tmp_path / "o", SourceOptions(count=50), **quiet)
    assert not list(tmp_path.iterdir())


def test_sixteen_bit_tiffs_are_grey_whatever_their_byte_order(tmp_path):
    """Scanners and microscopes write big-endian 16-bit TIFFs (mode I;16B): grey, like the 8-bit PNG
    beside them, not colour."""
    root = tmp_path / "scans"
    root.mkdir()
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    Image.frombytes("I;16B", (16, 16), ramp.astype(">u2").tobytes()).save(root / "a.tif")
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "b.png")
    m = prepare_dataset(f"folder:{root}", tmp_path / "o", val_fraction=0.0, **quiet)
    assert m["image_shape"] == [1, 16, 16]
    stored = {bytes(x.numpy().tobytes()) for x in PreparedDataset(tmp_path / "o").load("train").images}
    assert np.arange(256, dtype=np.uint8).tobytes() in stored  # scaled to 8 bits, not clipped white


def test_an_oversized_phone_mpo_is_decoded_at_a_reduced_scale_too(tmp_path, monkeypatch):
    from latentforge.data import sources

    root = tmp_path / "imgs"
    root.mkdir()
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (200, 200, 3), dtype=np.uint8)) for i in (0, 1)]
    frames[0].save(root / "phone.jpg", "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(root / "phone.jpg").format == "MPO"
    monkeypatch.setattr(sources, "MAX_SOURCE_PIXELS", 10_000)
    assert prepare_dataset(f"folder:{root}", tmp_path / "o", SourceOptions(size=32), **quiet)["image_shape"] == [3, 32, 32]


def test_no_room_for_the_decoded_images_is_said_before_any_is_written(tmp_path, monkeypatch):
    """The scratch file's space is reserved up front: a sparse mapping filling a disk dies of SIGBUS."""
    import errno
    import os

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    root = _folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"no room for the decoded images .* No space left on device; free some space"):
        prepare_dataset(f"folder:{root}", tmp_path / "out", **quiet)
    assert not (tmp_path / "out").exists()
