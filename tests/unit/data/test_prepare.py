import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
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
