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
