"""SOURCE → prepared dataset folder (Parquet shards + manifest.json), written atomically.

Layout of a prepared folder::

    manifest.json                 what this is, where it came from, counts, shape, content hash
    train-00000-of-00002.parquet  one row per image (see `ROW_SCHEMA`)
    val-00000-of-00001.parquet

Pixels are stored raw (HWC uint8 bytes): the images are small, so decoding costs nothing and the
bytes hash reproducibly.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import time
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq

from latentforge import __version__
from latentforge.data.sources import SourceImages, SourceOptions, load_source
from latentforge.errors import DataError
from latentforge.storage import atomic_write_json, json_kind, staged_dir

MANIFEST = "manifest.json"
DATASET_KIND = "latentforge.dataset"
DATASET_FORMAT_VERSION = 1
ROWS_PER_SHARD = 4096
SHARD_BYTES = 256 * 1024 * 1024  # pixels per shard at most (fewer rows at large sizes: 1,365 at 256 px RGB)
ROW_GROUP_BYTES = 32 * 1024 * 1024  # pixels per Parquet row group: the unit a training stream reads


def _split_mask(n: int, val_fraction: float, seed: int, keys: list[bytes] | None = None) -> np.ndarray:
    """Deterministic validation mask of about round(n*f) images.

    Without `keys`: the first round(n*f) indices of a seeded permutation. With `keys` (a digest of
    each image's pixels): the images whose seeded hash of their key ranks below the round(n*f)-th,
    so the split follows each image's content, not its position in the listing. Adding a file to a
    folder then moves at most the one image at the boundary (a permutation of n+1 rows reshuffles
    most of them), and exact copies share a side (no image is both trained on and held out).
    """
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    mask = np.zeros(n, bool)
    if keys is None:
        mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
        return mask
    salt = seed.to_bytes(8, "little", signed=True)
    rank = np.asarray([int.from_bytes(hashlib.sha256(salt + k).digest()[:8], "little") for k in keys], np.uint64)
    if n_val:
        cut = np.sort(rank)[min(n_val, n - 1)]  # the first training image's rank: copies stay on one side of it
        mask = rank < cut
    return mask


def _content_hash(src: SourceImages, order: np.ndarray, val: np.ndarray) -> str:
    """sha256 over every stored byte that matters: shape, pixels, labels, attributes, split."""
    h = hashlib.sha256()
    h.update(str(src.images.shape[1:]).encode())
    for i in order:
        h.update(b"v" if val[i] else b"t")
        h.update(src.images[i].tobytes())
        if src.labels is not None:
            h.update(int(src.labels[i]).to_bytes(8, "little", signed=True))
        for k in sorted(src.attributes):
            h.update(np.float32(src.attributes[k][i]).tobytes())
    return "sha256:" + h.hexdigest()


def _write_split(folder: Path, split: str, src: SourceImages, idx: np.ndarray) -> list[str]:
    """Shards of at most SHARD_BYTES of pixels, written one row group at a time: only one row
    group's images (32 MB) are ever copied into memory, whatever the dataset's size."""
    _, h, w, c = src.images.shape
    row_bytes = h * w * c
    per_shard = max(16, min(ROWS_PER_SHARD, SHARD_BYTES // row_bytes))
    # bounded row groups, so that streaming 256 px images never reads a whole shard at once
    group = max(16, min(per_shard, ROW_GROUP_BYTES // row_bytes))
    n_shards = max(1, -(-len(idx) // per_shard))
    files = []
    for s in range(n_shards):
        name = f"{split}-{s:05d}-of-{n_shards:05d}.parquet"
        _write_shard(folder / name, src, idx[s * per_shard : (s + 1) * per_shard], group)
        files.append(name)
    return files


def _write_shard(path: Path, src: SourceImages, rows: np.ndarray, group: int) -> None:
    _, h, w, c = src.images.shape
    writer = None
    try:
        for g in range(0, max(1, len(rows)), group):  # an empty split still gets one (empty) shard
            part = rows[g : g + group]
            cols = {
                "image": pa.array([src.images[i].tobytes() for i in part], type=pa.binary()),
                "height": pa.array(np.full(len(part), h, np.int32)),
                "width": pa.array(np.full(len(part), w, np.int32)),
                "channels": pa.array(np.full(len(part), c, np.int32)),
                "label": pa.array(src.labels[part] if src.labels is not None else [None] * len(part), type=pa.int64()),
                "source_index": pa.array(part.astype(np.int64)),
            }
            for k in sorted(src.attributes):
                cols[f"attr_{k}"] = pa.array(src.attributes[k][part].astype(np.float32))
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=group)
    finally:
        if writer is not None:
            writer.close()


def _check_replaceable(out: Path, source: str) -> None:
    """`--overwrite` replaces a prepared dataset (or an empty folder), never anything else: not a
    run folder, not a file, and not the images it is about to read.

    Raises:
        DataError: `out` is something else.
    """
    _, sep, rest = source.partition(":")
    # folder:PATH, parquet:PATH, torchvision:NAME:ROOT
    for candidate in ([Path(rest).expanduser(), Path(rest.partition(":")[2]).expanduser()] if sep and rest else []):
        if not (str(candidate) not in ("", ".") and candidate.exists()):
            continue
        src, dst = candidate.resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise DataError(f"--out {out} holds the source {source!r}: writing the dataset there would delete the "
                            "images it reads; choose an --out outside the source")
    if not out.is_dir():
        raise DataError(f"--out {out} is a file, not a dataset folder; --overwrite replaces only a prepared dataset: "
                        "choose another --out")
    if json_kind(out / MANIFEST) != DATASET_KIND and any(out.iterdir()):
        raise DataError(f"--out {out} is not a prepared dataset (no LatentForge {MANIFEST}): --overwrite replaces "
                        "only a prepared dataset, so nothing there was touched; choose another --out")


def prepare_dataset(
    source: str,
    out: str | Path,
    opts: SourceOptions | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Turn a data source into a prepared dataset folder.

    Args:
        source: a SOURCE spec (see `latentforge.data.sources`).
        out: the folder to create; it appears only when everything was written.
        opts: source options (size, channels, skip_bad, count, seed, ...).
        val_fraction: share of images held out for validation, in [0, 0.9].
        split_seed: seed of the train/validation permutation.
        overwrite: replace an existing folder at `out`.
        log: progress printer.

    Returns:
        The manifest written to `out/manifest.json`.

    Raises:
        DataError: the source is unknown, unreadable, empty or inconsistent.
    """
    opts = opts or SourceOptions()
    if not 0.0 <= val_fraction <= 0.9:
        raise DataError(f"--val-fraction must be in [0, 0.9] (got {val_fraction})")
    if opts.size is not None and not 4 <= opts.size <= 1024:
        raise DataError(f"--size must be between 4 and 1024 pixels (got {opts.size})")
    if opts.channels not in (None, 1, 3):
        raise DataError(f"--channels must be 1 or 3 (got {opts.channels})")
    if opts.count is not None and opts.count <= 0:
        raise DataError(f"--count must be positive (got {opts.count})")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists():
        _check_replaceable(out, source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out.parent} ({e.strerror}); choose another --out") from None
    _remove_abandoned(out, log)
    t0 = time.time()
    log(f"loading source {source} ...")
    # decoded images of a user's folder wait for the split in a file beside --out, not in memory
    opts = dataclasses.replace(opts, scratch=out.parent, log=log)
    return _prepare(source, out, opts, val_fraction, split_seed, overwrite, log, t0)


def _remove_abandoned(out: Path, log) -> None:
    """Folders a killed prepare left beside `out` (`.NAME.partial-*`, `.NAME.old-*`: hidden, possibly
    gigabytes), once they are an hour old (not those another prepare is writing now)."""
    import shutil

    for old in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        try:
            # ctime: a rename (how an .old-* is made) updates it, where mtime keeps the dataset's age
            if old.is_dir() and time.time() - old.stat().st_ctime > 3600:
                log(f"removing {old}, left by an interrupted prepare")
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # gone meanwhile (another prepare cleaned it), or not ours to remove
            pass


def _prepare(source: str, out: Path, opts: SourceOptions, val_fraction: float, split_seed: int, overwrite: bool,
             log, t0: float) -> dict:
    try:
        src = load_source(source, opts)
    except OSError as e:  # an unreadable folder, a disconnected share
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # a download or cache that could not be written
            raise DataError(f"cannot write while reading the source {source!r}: {e.filename or ''} {e.strerror}; free "
                            "some space") from None
        raise DataError(f"cannot read the source {source!r}: {e.filename or ''} {e.strerror or e}".replace("  ", " ")
                        + "; check that it is readable") from None
    n = len(src.images)
    if n == 0:
        raise DataError(f"source {source!r} produced no images")
    val = src.fixed_split if src.fixed_split is not None else _split_mask(n, val_fraction, split_seed, src.keys)
    if val.all():
        fix = ("the source's official split holds them all out: raise --count" if src.fixed_split is not None else
               "add images or lower --val-fraction")
        raise DataError(f"{n} image(s) with --val-fraction {val_fraction} leave none to train on; {fix}")
    duplicates = n - len(set(src.keys)) if src.keys is not None else 0
    if duplicates:
        log(f"warning: {duplicates} image(s) are exact copies of others (after conversion); each copy stays in the "
            "split of its original")
    # Rows are stored in a seeded shuffled order so that streaming readers with a small shuffle
    # buffer (Ray Data) do not see class-sorted sources (mnist5k is sorted by digit) in long runs.
    order = np.random.default_rng(split_seed + 1).permutation(n)
    splits = {"train": order[~val[order]], "val": order[val[order]]}
    _, h, w, c = src.images.shape
    if h != w:
        log(f"warning: the images are {w}x{h}, not square; the models train on squares: pass --size N to "
            "centre-crop and resize them")
    log(f"writing {n} images ({c}x{h}x{w}) to {out} ...")
    try:
        manifest = _write(out, src, splits, order, val, source, opts, val_fraction, split_seed, overwrite, duplicates)
    except OSError as e:  # a full disk, a read-only or vanished folder: the partial folder is already gone
        raise DataError(f"cannot write the dataset to {out}: {e.strerror or e}; free some space or choose another "
                        "--out (nothing was left behind)") from None
    split_info = manifest["splits"]
    log(
        f"prepared {out}: train {split_info['train']['count']}, val {split_info['val']['count']}, "
        f"{manifest['num_classes']} classes, {len(src.skipped)} skipped, {time.time() - t0:.1f}s"
    )
    return manifest


def _write(out: Path, src: SourceImages, splits: dict, order: np.ndarray, val: np.ndarray, source: str,
           opts: SourceOptions, val_fraction: float, split_seed: int, overwrite: bool, duplicates: int) -> dict:
    n = len(src.images)
    _, h, w, c = src.images.shape
    with staged_dir(out, overwrite=overwrite) as tmp:
        split_info = {}
        for name, idx in splits.items():
            info = {"count": int(len(idx)), "files": _write_split(tmp, name, src, idx)}
            if src.labels is not None:
                counts = np.bincount(src.labels[idx], minlength=len(src.class_names or []))
                info["class_counts"] = {str(k): int(v) for k, v in enumerate(counts)}
            split_info[name] = info
        manifest = {
            "kind": DATASET_KIND,
            "format_version": DATASET_FORMAT_VERSION,
            "latentforge_version": __version__,
            "created_unix": int(time.time()),
            "source": source,
            "source_options": {"size": opts.size, "channels": opts.channels, "count": opts.count, "seed": opts.seed},
            "encoding": "raw_uint8_hwc",
            "image_shape": [int(c), int(h), int(w)],  # (C, H, W)
            "num_images": int(n),
            "num_classes": len(src.class_names) if src.labels is not None else 0,
            "class_names": src.class_names if src.labels is not None else [],
            "attributes": sorted(src.attributes),
            "split": {"method": "fixed" if src.fixed_split is not None else "content" if src.keys is not None else "seeded",
                      "val_fraction": val_fraction, "seed": split_seed},
            "splits": split_info,
            "skipped": {"count": len(src.skipped), "items": src.skipped[:100]},
            "duplicates": duplicates,
            **({"source_notes": src.notes} if src.notes else {}),
            "decoder": {"pillow": PIL.__version__},  # JPEG pixels can differ between libjpeg versions
            "content_hash": _content_hash(src, order, val),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def ensure_prepared(folder: str | Path, source: str, content_hash: str | None = None, log=print) -> None:
    """The dataset `source` at `folder`, prepared there (with default options) where this node has
    none yet: a cluster job's workers on other machines do not see the folder the driver prepared,
    and a built-in source prepares to the same bytes anywhere. Processes on one node take a lock,
    so one prepares and the others wait for it.

    Args:
        content_hash: the driver's dataset; a folder with other content is refused.

    Raises:
        DataError: the source cannot be prepared here, or it gave other data than the driver's.
    """
    import fcntl
    import socket

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            lock = open(folder.with_name(f".{folder.name}.lock"), "a")
        except OSError as e:
            raise DataError(f"{folder} has no prepared dataset on {socket.gethostname()} and it cannot be prepared "
                            f"there ({e.strerror}): prepare it with `latentforge data prepare {source} --out {folder}`, "
                            "or put it on storage every node mounts") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (folder / MANIFEST).is_file():
                log(f"preparing {source} into {folder} on {socket.gethostname()}")
                prepare_dataset(source, folder, log=log)
    if content_hash:
        from latentforge.data.dataset import PreparedDataset

        found = PreparedDataset(folder).content_hash
        if found != content_hash:
            raise DataError(f"the dataset at {folder} on {socket.gethostname()} ({found}) is not the one the run was "
                            f"started with ({content_hash}): put the prepared folder on storage every node mounts at "
                            "the same path")
