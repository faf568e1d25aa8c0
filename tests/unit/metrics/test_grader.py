"""The edit grader is independent of the feature network: another architecture, seed and
training split; it still recognises the digits it never saw; it is refused when it does not fit
the data; and edit-eval reports its verdicts beside the feature network's."""

import json

import pytest
import torch

from latentforge.errors import DataError
from latentforge.metrics.grader import GRADER_DIR, ensure_grader, load_grader


def test_grader_is_independent_and_recognises_unseen_digits(mnist_dir, mnist_features):
    from latentforge.data.dataset import PreparedDataset
    from latentforge.images import to_model_range

    grader = ensure_grader(mnist_dir, log=lambda *_: None)
    config = json.loads((mnist_dir / GRADER_DIR / "config.json").read_text())
    assert config["trained_on"] == "val" and config["seed"] != 0  # the feature network: train split, seed 0
    assert type(grader.model).__name__ != type(mnist_features.model).__name__
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in grader.model.modules())
    mine, theirs = grader.model.state_dict(), mnist_features.model.state_dict()
    assert not [k for k in mine if k.endswith("weight") and k in theirs and mine[k].shape == theirs[k].shape]  # no layer in common
    train = PreparedDataset(mnist_dir).load("train")  # the grader never saw these
    measured = float((grader.predict(to_model_range(train.images)) == train.labels).float().mean())
    assert measured == pytest.approx(grader.accuracy) and measured > 0.9
    # the two networks disagree on some images: they are different judges
    feats_pred = mnist_features.embed(to_model_range(train.images[:2000]))[1].argmax(1)
    assert (grader.predict(to_model_range(train.images[:2000])) != feats_pred).any()


def test_grader_refuses_unlabelled_or_foreign_data(mnist_dir, tmp_path):
    import shutil

    from latentforge.data.prepare import prepare_dataset
    from latentforge.data.sources import SourceOptions
    from latentforge.metrics.grader import train_grader

    ensure_grader(mnist_dir, log=lambda *_: None)
    other = tmp_path / "digits"
    prepare_dataset("digits", other, SourceOptions(count=300, size=8), log=lambda *_: None)
    shutil.copytree(mnist_dir / GRADER_DIR, other / GRADER_DIR)  # a grader planted from other data
    with pytest.raises(DataError, match="trained on other data"):
        load_grader(other)
    config = json.loads((mnist_dir / GRADER_DIR / "config.json").read_text())
    planted = tmp_path / "planted"
    shutil.copytree(mnist_dir, planted)
    config["module"]["class"] = "FeatureClassifier"
    (planted / GRADER_DIR / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="cannot be loaded"):
        load_grader(planted)
    config = json.loads((mnist_dir / GRADER_DIR / "config.json").read_text())
    config["module"]["args"]["width"] *= 4  # (x 10,000 would be gigabytes): refused before anything is built
    (planted / GRADER_DIR / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="config.json with .* of shape .* but model.safetensors holds .* does not belong"):
        load_grader(planted)
    flat = tmp_path / "flat"  # a flat folder of images: no classes
    flat.mkdir()
    import numpy as np
    from PIL import Image

    for i in range(40):
        Image.fromarray(np.full((8, 8), i * 5, np.uint8)).save(flat / f"{i:03d}.png")
    unlabelled = tmp_path / "unlabelled"
    prepare_dataset(f"folder:{flat}", unlabelled, SourceOptions(), log=lambda *_: None)
    with pytest.raises(DataError, match="no class labels"):
        train_grader(unlabelled, log=lambda *_: None)
