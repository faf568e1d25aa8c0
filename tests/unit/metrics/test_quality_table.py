"""The quality table compares the real-data floor with the models at the same sample count:
FID falls as the sample count grows, so a 500-image floor beside a 5,000-sample FID misleads."""

from types import SimpleNamespace

from latentforge.bench.quality import COLUMNS, _write_table, table_columns


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_floor_is_shown_in_the_column_scored_with_its_own_sample_count(mnist_dir, tmp_path):
    columns = table_columns(5000, 500)
    assert [c[0] for c in columns[:2]] == ["fid", "fid_at_floor"] and len(columns) == len(COLUMNS) + 1
    assert table_columns(500, 500) == COLUMNS  # equal counts: one FID column is enough
    row = {"preset": "dcgan-mnist", "images": 128000, "train_seconds": 60.0, "samples": 5000,
           "protocol": "5k_train_lfclassifier", "fid": 40.0, "fid_at_floor": 55.0, "recall": 0.7}
    real = {"fid": 1.8, "recall": 0.9, "samples": 500}
    net = SimpleNamespace(backbone="lf-classifier@test", val_accuracy=0.98)
    out = tmp_path / "quality.md"
    _write_table(out, "latentforge bench quality", [row], ["dcgan-mnist"], ("fp32",), (0,), net, real, True,
                 mnist_dir, columns=columns)
    lines = out.read_text().splitlines()
    header = _cells(next(line for line in lines if line.startswith("| preset")))
    model = dict(zip(header, _cells(next(line for line in lines if line.startswith("| dcgan-mnist")))))
    floor = dict(zip(header, _cells(next(line for line in lines if line.startswith("| real val split")))))
    assert model["FID ↓"] == "40.0" and model["FID, 500 samples ↓"] == "55.0"
    assert floor["FID ↓"] == "—" and floor["FID, 500 samples ↓"] == "1.8"
    assert "500" in out.read_text() and "5000-sample FID" in out.read_text()


def test_the_real_floor_uses_as_many_images_as_the_models_where_the_split_has_them(mnist_dir, mnist_features):
    from latentforge.bench.quality import evaluate_real_floor

    assert evaluate_real_floor(mnist_dir, mnist_features, 5000)["samples"] == 500  # all mnist5k has
    part = evaluate_real_floor(mnist_dir, mnist_features, 200)
    assert part["samples"] == 200 and part == evaluate_real_floor(mnist_dir, mnist_features, 200)  # seeded subset
