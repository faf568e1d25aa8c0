"""The model registry: promoted checkpoints with their lineage, on local disk or any pyarrow
filesystem URI.

    REGISTRY/<name>/model.json        what it is: algorithm, data, metrics, lineage (sweep, trial,
                                      hyperparameters, dataset hash, source checkpoint), time
    REGISTRY/<name>/checkpoint/       config.json + model.safetensors (inference only), and
                                      directions/ (edit directions: the checkpoint's own, else the
                                      data-free ones computed at promotion)

An entry exists once its model.json exists: it is written last (locally the whole entry is also
built under a temporary name and renamed). Names are restricted to `[a-z0-9][a-z0-9._-]*` so
that a model id can only ever name an entry, never a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from latentforge import __version__
from latentforge.checkpoint import CONFIG, WEIGHTS, load_checkpoint, resolve_checkpoint, sweep_best, write_inference_copy
from latentforge.editing.directions import DIRECTIONS_DIR, load_directions
from latentforge.editing.space import edit_model, latent_space
from latentforge.errors import LatentForgeError
from latentforge.models.prior import prior_name
from latentforge.storage import finite_json, is_uri, join_uri, json_kind, read_bytes_uri, staged_dir, write_bytes_uri

logger = logging.getLogger(__name__)

ENTRY_FILE = "model.json"
ENTRY_KIND = "latentforge.registry_entry"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # always fullmatch


class RegistryError(LatentForgeError):
    """Unknown or invalid model names, unreadable registries."""


class UnknownModel(RegistryError):
    """No entry with that name."""


def check_name(name: str) -> str:
    """Return `name` if it can name an entry; raise otherwise (no paths, no traversal)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: "gan\n" is no name
        raise RegistryError(
            f"invalid model name {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return name


def _capabilities(algorithm: str, conditional: bool) -> list[str]:
    common = ["generate", "interpolate", "edit", "reconstruct", "inpaint", "denoise"]
    return common + (["class_conditional"] if conditional else [])


def default_name(experiment: str | None) -> str:
    """An entry name from an experiment's name (`dcgan-mnist`, or a YAML's `my GAN v2` → `my-gan-v2`)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", (experiment or "model").lower()).strip("-._")[:64].rstrip("-._")
    return name.replace("..", ".") or "model"


def promote(checkpoint: str | Path, registry: str, name: str | None, lineage: dict | None = None,
            metrics: dict | None = None, overwrite: bool = False) -> dict:
    """Copy a checkpoint's inference files into the registry under `name` (default: the
    experiment's name), with lineage: its config and the weights of the modules inference reads
    (`checkpoint.write_inference_copy`).

    Raises:
        RegistryError: bad name, or the name exists and `overwrite` is false.
    """
    if name is not None:
        check_name(name)
    best = sweep_best(checkpoint)
    if best is not None:  # a sweep folder: its best trial, with the lineage and metrics its own promotion records
        lineage = {"sweep": best["sweep"], "sweep_dir": best["sweep_dir"], "trial_id": best.get("trial_id"),
                   "hyperparameters": best.get("config", {}), **(lineage or {})}
        if metrics is None and best.get("metric_name"):
            metrics = {best["metric_name"]: best.get("metric"), **best.get("metrics", {})}
    ck_path = best["checkpoint"] if best is not None else resolve_checkpoint(checkpoint)
    ck = load_checkpoint(ck_path)
    name = check_name(name or default_name(ck.experiment.get("name")))
    entry_uri = join_uri(registry, name)
    if read_bytes_uri(join_uri(entry_uri, ENTRY_FILE)) is not None and not overwrite:
        raise RegistryError(f"model {name!r} already exists in {registry}; choose another --name or pass --overwrite")
    gen = ck.inference_generator()
    entry = {
        "kind": ENTRY_KIND,
        "latentforge_version": __version__,
        "name": name,
        "created_unix": int(time.time()),
        "algorithm": ck.algorithm,
        "step": ck.step,
        "experiment": ck.experiment.get("name"),
        "z_dim": edit_model(gen).z_dim,  # the size of the latents the API takes and returns (w for W models)
        "latent_space": latent_space(gen),
        "num_classes": gen.num_classes,
        # what a seed's latents are drawn from: a VAE's fitted mixture ("gmm-10") or N(0, I)
        "latent_prior": prior_name(ck.latent_prior),
        "image_shape": list(ck.data.image_shape),
        "class_names": list(ck.data.class_names),
        "dataset_hash": ck.data.content_hash,
        "metrics": metrics or {},
        "lineage": {"source_checkpoint": str(ck_path), **(lineage or {})},
        "capabilities": _capabilities(ck.algorithm, bool(gen.num_classes)),
    }
    with tempfile.TemporaryDirectory(prefix="lf-promote-") as scratch:
        directions_dir = _directions_for(ck_path, gen, ck.algorithm, Path(scratch))
        entry["directions"] = sorted(load_directions(directions_dir.parent)) if directions_dir else []
        slim = write_inference_copy(ck_path, Path(scratch) / "inference")  # no D, no raw G: what serving reads
        files = {f: slim / f for f in (CONFIG, WEIGHTS)}
        if directions_dir is not None:
            files.update({f"{DIRECTIONS_DIR}/{p.name}": p for p in sorted(directions_dir.iterdir()) if p.is_file()})
        # what a download is checked against (and what names the cached copy): the content itself
        entry["files"] = {rel: _sha256_file(src) for rel, src in files.items()}
        # a sweep's recall or a lineage hyperparameter may be NaN or inf: stored as null, so that
        # model.json stays JSON every client can read
        payload = json.dumps(finite_json(entry), indent=2, sort_keys=True, allow_nan=False).encode()
        if is_uri(registry):
            for rel, src in files.items():
                write_bytes_uri(join_uri(entry_uri, "checkpoint", *rel.split("/")), src.read_bytes())
            write_bytes_uri(join_uri(entry_uri, ENTRY_FILE), payload)  # last: the entry now exists
        else:
            with staged_dir(Path(registry) / name, overwrite=overwrite) as tmp:
                for rel, src in files.items():
                    (tmp / "checkpoint" / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, tmp / "checkpoint" / rel)
                (tmp / ENTRY_FILE).write_bytes(payload)
    return entry


def _directions_for(ck_path: Path, generator, algorithm: str, scratch: Path) -> Path | None:
    """The directions folder an entry ships with: the checkpoint's own (`latentforge directions`),
    else the data-free ones computed now (SeFa, GANSpace), so that no server ever computes them on
    a request; None for a model with neither (no first layer exposed, no supervised directions)."""
    from latentforge.editing.directions import data_free_directions, save_directions

    own = ck_path / DIRECTIONS_DIR
    if (own / "directions.json").is_file():
        return own
    found = data_free_directions(generator, algorithm)
    return save_directions(scratch, found) if found else None


def list_entries(registry: str) -> list[dict]:
    """Every complete entry (model.json present), sorted by name."""
    import pyarrow.fs as pafs

    from latentforge.storage import resolve_filesystem

    fs, root = resolve_filesystem(registry)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        return []
    if kind != pafs.FileType.Directory:
        raise RegistryError(f"registry {registry} is a file, not a folder; give the registry folder (--registry)")
    entries = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if info.type != pafs.FileType.Directory or info.base_name.startswith(".") or not NAME_RE.fullmatch(info.base_name):
            continue
        raw = read_bytes_uri(join_uri(registry, info.base_name, ENTRY_FILE))
        if raw is None:
            continue
        try:
            entries.append(_parse_entry(raw, registry, info.base_name))
        except RegistryError as e:  # one damaged entry must not hide the others
            logger.warning("skipping a model: %s", e)
    return sorted(entries, key=lambda e: e["name"])


def is_registry_entry(folder: str | Path) -> bool:
    """Whether a local folder is a registry entry (or its cached copy): a model.json of that kind."""
    return json_kind(Path(folder) / ENTRY_FILE) == ENTRY_KIND


def _parse_entry(raw: bytes, registry: str, name: str) -> dict:
    """A model.json's content, checked to be an entry of this name.

    Raises:
        RegistryError: the file is not JSON, not an entry, or names another model.
    """
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        entry = e
    if isinstance(entry, dict) and entry.get("kind") == ENTRY_KIND and entry.get("name") != name:
        raise RegistryError(f"folder {name!r} in registry {registry} holds model {entry.get('name')!r} (moved by hand?); "
                            f"promote its checkpoint as {name!r}, or move the folder back")
    if not (isinstance(entry, dict) and entry.get("kind") == ENTRY_KIND):
        raise RegistryError(f"model {name!r} in registry {registry} has a damaged {ENTRY_FILE}; promote its checkpoint "
                            f"again with `latentforge registry promote CKPT --name {name} --overwrite`")
    return entry


def show(registry: str, name: str, list_known: bool = True) -> dict:
    """One entry's model.json.

    Args:
        list_known: name the registry's models in the UnknownModel message (a read of every
            entry: for people at a terminal, not for a server answering unknown ids).

    Raises:
        RegistryError / UnknownModel.
    """
    check_name(name)
    raw = read_bytes_uri(join_uri(registry, name, ENTRY_FILE))
    if raw is None:
        known = f" (models: {', '.join(e['name'] for e in list_entries(registry)) or 'none'})" if list_known else ""
        raise UnknownModel(f"no model {name!r} in registry {registry}{known}")
    return _parse_entry(raw, registry, name)


DIRECTION_FILES = ("directions.json", "directions.safetensors")
DEFAULT_CACHE_MAX_BYTES = 20 * 2**30


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_version(entry: dict) -> str:
    """A short hash of a registry entry (model.json, which records every file's SHA-256 and which
    promotion rewrites): what names a downloaded copy, and what Serve routes a model's requests by,
    so that replicas load a re-promoted model instead of serving the copy they hold."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]


def local_checkpoint(registry: str, name: str, cache_dir: str | Path | None = None,
                     max_bytes: int = DEFAULT_CACHE_MAX_BYTES) -> Path:
    """A local folder holding the entry's checkpoint; for URIs a download into `cache_dir`
    (default: one fixed folder per registry under the temp dir, so repeated loads reuse it).

    The download folder is named by the hash of the entry's model.json, which records the SHA-256
    of every file and which promotion rewrites: a replica that loads the model after `promote
    --overwrite` gets the new weights, never a mix. Each file is checked against its hash and
    written into a folder of the download's own, which is renamed into place whole: a download cut
    short or damaged is never used, and the next load starts it again. Edit directions come along.

    The cache is bounded: after a download, older versions of the same model are deleted (a replica
    holds the weights it loaded in memory), then the least recently used versions of other models
    until the cache holds at most `max_bytes` (the version just fetched always stays)."""
    entry = show(registry, name)
    if not is_uri(registry):
        return Path(registry) / name / "checkpoint"
    version = entry_version(entry)
    # one folder per registry, inside a given cache_dir too: two apps (staging, production) sharing
    # it deleted each other's copy of a model of the same name as "another version"
    root = (Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "latentforge-registry-cache") / \
        hashlib.sha256(registry.encode()).hexdigest()[:16]
    cache = root / name / version
    wanted = [WEIGHTS] + [f"{DIRECTIONS_DIR}/{f}" for f in DIRECTION_FILES if entry.get("directions")] + [CONFIG]
    if _holds(cache, wanted):
        os.utime(cache)  # recently used: the last to be evicted
        return cache
    hashes = entry.get("files") or {}  # entries promoted before hashes were recorded have none
    # Downloaded into a folder of its own, then renamed into place whole: replicas on a node share
    # the cache, and one's prune could delete a version another was writing file by file, which
    # then held config.json alone and passed for complete ever after.
    staging = cache.parent / f".{version}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        for rel in wanted:
            data = read_bytes_uri(join_uri(registry, name, "checkpoint", *rel.split("/")))
            if data is None:
                raise RegistryError(f"registry entry {name!r} is missing checkpoint/{rel}; promote it again")
            if rel in hashes and hashlib.sha256(data).hexdigest() != hashes[rel]:
                raise RegistryError(f"registry entry {name!r}: the downloaded checkpoint/{rel} does not match the hash in "
                                    "its model.json (damaged, or replaced during the download); retry, or promote it again")
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        if cache.exists() and not _holds(cache, wanted):  # an incomplete leftover (an earlier version's download)
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.rename(staging, cache)
        except OSError:
            if not _holds(cache, wanted):  # not another replica's finished copy of the same version
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.utime(cache)
    prune_cache(root, keep=cache, max_bytes=max_bytes)
    return cache


def _holds(folder: Path, files: list[str]) -> bool:
    return all((folder / rel).is_file() for rel in files)


def _tree_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:  # another replica's prune of the same shared cache
            pass
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


CACHE_IN_USE_S = 120  # a cached version used this recently may be loading in another replica
PARTIAL_ABANDONED_S = 3600  # a download folder this old belongs to a replica that died


def prune_cache(root: Path, keep: Path, max_bytes: int) -> list[Path]:
    """Delete the cached versions that `keep` supersedes (same model, other version), then the
    least recently used ones until the cache holds at most `max_bytes`; and downloads abandoned
    for an hour. A version used in the last two minutes stays (another replica on the node may be
    loading it). Returns what was deleted."""
    now = time.time()
    versions = [v for v in root.glob("*/*") if v.is_dir() and v != keep and not v.name.startswith(".")]
    removed = [v for v in root.glob("*/.*.partial-*") if now - _mtime(v) > PARTIAL_ABANDONED_S]
    removed += [v for v in versions if v.parent == keep.parent and now - _mtime(v) > CACHE_IN_USE_S]
    # the least recently used first; one used in the last two minutes stays even over the bound
    rest = sorted((v for v in versions if v.parent != keep.parent and now - _mtime(v) > CACHE_IN_USE_S), key=_mtime)
    sizes = {v: _tree_bytes(v) for v in rest}
    total = _tree_bytes(keep) + sum(sizes.values())
    for v in rest:
        if total <= max_bytes:
            break
        removed.append(v)
        total -= sizes[v]
    for v in removed:
        shutil.rmtree(v, ignore_errors=True)
    return removed
