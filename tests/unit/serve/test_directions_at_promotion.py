"""Edit directions are computed when a model is promoted, travel with it (URI registries too), and
are never computed on a request: generation never waits for them, and an old entry without them
answers "computing" (503 for an edit) while a background thread computes them."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from helpers import tiny
from latentforge.editing import directions as directions_mod
from latentforge.editing.directions import load_directions, top_components
from latentforge.registry import local_checkpoint, promote, show
from latentforge.serve.codec import BadInput
from latentforge.serve.engine import ModelRuntime
from latentforge.serve.schemas import EditRequest, GenerateRequest


def test_lanczos_top_components_match_the_full_svd_where_the_spectrum_is_flat():
    # wide like a DCGAN's first layer, with the top singular values within 1% of each other: a
    # randomized SVD gets such vectors wrong by tens of degrees
    gen = torch.Generator().manual_seed(0)
    n, f, k = 400, 900, 5
    u = torch.linalg.qr(torch.randn(n, 40, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(f, 40, generator=gen, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([10.0, 9.95, 9.9, 9.85, 9.8, 9.75]), torch.linspace(5, 1, 34)]).double()
    x = (u * s) @ v.T
    s_fast, vt_fast = top_components(x, k)
    _, s_full, vt_full = torch.linalg.svd(x, full_matrices=False)
    assert torch.allclose(s_fast, s_full[:k], rtol=1e-9)
    assert torch.allclose((vt_fast * vt_full[:k]).sum(1).abs(), torch.ones(k, dtype=torch.float64), atol=1e-9)
    assert (vt_fast.gather(1, vt_fast.abs().argmax(1, keepdim=True)) > 0).all()  # the sign convention
    again = top_components(x.clone(), k)[1]
    assert torch.equal(again, vt_fast)  # deterministic: a fixed start vector


@pytest.fixture(scope="module")
def gan_run(mnist_dir, tmp_path_factory):
    from latentforge.train.local import train_local

    root = tmp_path_factory.mktemp("promote")
    train_local(tiny("dcgan-mnist", train__steps=2, train__checkpoint_every=2), mnist_dir, root / "run", log=lambda *_: None)
    return root / "run"


def _no_directions_allowed(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("directions were computed where they must not be")
    monkeypatch.setattr("latentforge.serve.engine.data_free_directions", refuse)


def test_promotion_stores_data_free_directions_and_serving_only_reads_them(gan_run, tmp_path, monkeypatch):
    entry = promote(gan_run, str(tmp_path / "reg"), "gan")
    stored = load_directions(tmp_path / "reg" / "gan" / "checkpoint")
    assert entry["directions"] == sorted(stored) and {"sefa:0", "pca:4"} <= set(stored)
    _no_directions_allowed(monkeypatch)
    rt = ModelRuntime("gan", local_checkpoint(str(tmp_path / "reg"), "gan"), projection_steps=5, restarts=1)
    rt.prepare_directions(background=True)
    assert rt.directions_ready and rt.directions_info()["status"] == "ready"
    edited = rt.edit(EditRequest(source={"seed": 1}, direction="pca:0", alpha=2.0))
    assert len(edited["images"]) == 1


def test_generation_never_touches_directions_and_an_old_entry_computes_them_in_the_background(
        gan_run, tmp_path, monkeypatch):
    promote(gan_run, str(tmp_path / "reg"), "old")
    ck = tmp_path / "reg" / "old" / "checkpoint"
    import shutil

    shutil.rmtree(ck / "directions")  # an entry promoted before promotion stored directions
    release = threading.Event()
    real = directions_mod.data_free_directions

    def slow(model, algorithm):
        release.wait(30)
        return real(model, algorithm)

    monkeypatch.setattr("latentforge.serve.engine.data_free_directions", slow)
    rt = ModelRuntime("old", ck, projection_steps=5, restarts=1)
    first = rt.generate_many([GenerateRequest(n=2, seed=3)])[0]  # no directions needed, none waited for
    assert len(first["images"]) == 2 and not rt.directions_ready
    rt.prepare_directions(background=True)
    info = rt.directions_info()
    assert info["status"] == "computing" and info["directions"] == []
    with pytest.raises(BadInput) as busy:
        rt.edit(EditRequest(source={"seed": 1}, direction="sefa:0", alpha=1.0))
    assert busy.value.status == 503 and "being computed" in str(busy.value)
    release.set()
    deadline = time.monotonic() + 60
    while not rt.directions_ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.directions_info()["status"] == "ready"
    assert rt.edit(EditRequest(source={"seed": 1}, direction="sefa:0", alpha=1.0))["images"]


def test_uri_registry_carries_directions_and_replicas_pick_up_an_overwrite(gan_run, mnist_dir, tmp_path, monkeypatch):
    registry = f"file://{tmp_path / 'remote'}"
    promote(gan_run, registry, "gan")
    cache = tmp_path / "cache"
    first = local_checkpoint(registry, "gan", cache)
    assert set(load_directions(first)) == set(show(registry, "gan")["directions"])
    assert local_checkpoint(registry, "gan", cache) == first  # reused, not downloaded again

    # a download cut short (no config.json, the completeness mark) is finished, never used half-done
    (first / "config.json").unlink()
    assert local_checkpoint(registry, "gan", cache) == first and (first / "config.json").is_file()

    # promote --overwrite: a new version folder with the new weights
    from safetensors.numpy import load_file

    from latentforge.train.local import train_local

    a = load_file(str(first / "model.safetensors"))

    train_local(tiny("dcgan-mnist", train__steps=4, train__checkpoint_every=4, train__seed=5), mnist_dir,
                tmp_path / "run2", log=lambda *_: None)
    promote(tmp_path / "run2", registry, "gan", overwrite=True)
    import os

    os.utime(first, (1, 1))  # not used for a while (a version used in the last 2 minutes may be loading elsewhere)
    second = local_checkpoint(registry, "gan", cache)
    assert second != first and json.loads((second / "config.json").read_text())["step"] == 4
    b = load_file(str(second / "model.safetensors"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert not first.exists()  # the superseded version is deleted, not left to fill the disk


def test_a_damaged_download_is_refused_and_never_cached(gan_run, tmp_path):
    from latentforge.registry import RegistryError

    registry = f"file://{tmp_path / 'remote'}"
    promote(gan_run, registry, "gan")
    weights = tmp_path / "remote" / "gan" / "checkpoint" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100] + bytes(100))  # a truncated / corrupted object in the store
    cache = tmp_path / "cache"
    with pytest.raises(RegistryError, match="does not match the hash"):
        local_checkpoint(registry, "gan", cache)
    assert not list(cache.rglob("model.safetensors"))  # nothing half-good left behind
    weights.write_bytes(good)
    path = local_checkpoint(registry, "gan", cache)
    assert (path / "model.safetensors").read_bytes() == good


def test_the_download_cache_is_bounded_and_evicts_the_least_recently_used(gan_run, tmp_path):
    import os

    registry = f"file://{tmp_path / 'remote'}"
    for name in ("a", "b", "c"):
        promote(gan_run, registry, name)
    cache = tmp_path / "cache"
    a = local_checkpoint(registry, "a", cache)
    size = sum(f.stat().st_size for f in a.rglob("*") if f.is_file())
    b = local_checkpoint(registry, "b", cache, max_bytes=int(2.5 * size))
    os.utime(a, (1, 1)), os.utime(b, (2, 2))
    assert local_checkpoint(registry, "a", cache, max_bytes=int(2.5 * size)) == a  # a hit: a is now the newest
    os.utime(a, (3, 3))  # (a version used in the last two minutes stays: another replica may be loading it)
    c = local_checkpoint(registry, "c", cache, max_bytes=int(2.5 * size))  # over the bound: b, least recent, goes
    assert a.exists() and c.exists() and not b.exists()
    os.utime(a, (4, 4)), os.utime(c, (5, 5))
    tiny_bound = local_checkpoint(registry, "b", cache, max_bytes=1)  # the version just fetched always stays
    assert tiny_bound.exists() and not a.exists() and not c.exists()
    fresh = local_checkpoint(registry, "a", cache, max_bytes=1)  # and one used moments ago stays too
    assert fresh.exists() and tiny_bound.exists()


def test_a_prune_in_another_replica_mid_download_cannot_leave_a_config_only_copy(gan_run, tmp_path, monkeypatch):
    """Replicas on a node share the download cache. One's prune deleted the version another was
    writing file by file; the writer then added config.json, the completeness mark, to an empty
    folder, and every later load was a 'hit' on a copy without weights. Downloads now land in a
    folder of their own and are renamed into place whole."""
    import latentforge.registry as reg

    registry = f"file://{tmp_path / 'remote'}"
    promote(gan_run, registry, "gan")
    promote(gan_run, registry, "other")
    cache = tmp_path / "cache"
    other = local_checkpoint(registry, "other", cache)
    real_read, seen = reg.read_bytes_uri, []

    def read_and_prune(uri):
        data = real_read(uri)
        if uri.endswith("config.json"):  # the weights are in: the other replica prunes everything it may
            models = other.parent.parent  # the registry's folder in the cache
            seen.append(sorted(p.name for p in (models / "gan").iterdir()) if (models / "gan").exists() else [])
            reg.prune_cache(models, keep=other, max_bytes=0)
        return data
    monkeypatch.setattr(reg, "read_bytes_uri", read_and_prune)
    path = local_checkpoint(registry, "gan", cache)
    assert seen == [[]] or all(name.startswith(".") for name in seen[0])  # nothing published half-written
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # the download folder is gone
