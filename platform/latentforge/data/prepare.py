"""SOURCE → prepared dataset folder (Parquet shards + manifest.json), written atomically.

Layout of a prepared folder::

    manifest.json                 what this is, where it came from, counts, shape, content hash
    train-00000-of-00002.parquet  one row per image (see `ROW_SCHEMA`)
    val-00000-of-00001.parquet

Pixels are stored raw (HWC uint8 bytes): the images are small, so decoding costs nothing and the
bytes hash reproducibly.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
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
ROW_GROUP_BYTES = 32 * 1024 * 1024  # pixels per Parquet row group: the unit a training stream reads


def _split_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Deterministic validation mask: the first round(n*f) indices of a seeded permutation."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    perm = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, bool)
    mask[perm[:n_val]] = True
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
    n_shards = max(1, -(-len(idx) // ROWS_PER_SHARD))
    _, h, w, c = src.images.shape
    files = []
    for s in range(n_shards):
        part = idx[s * ROWS_PER_SHARD : (s + 1) * ROWS_PER_SHARD]
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
        name = f"{split}-{s:05d}-of-{n_shards:05d}.parquet"
        # bounded row groups, so that streaming 256 px images never reads a whole 4096-row shard at once
        group = max(16, min(ROWS_PER_SHARD, ROW_GROUP_BYTES // (h * w * c)))
        pq.write_table(pa.table(cols), folder / name, compression="zstd", row_group_size=group)
        files.append(name)
    return files


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
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists():
        _check_replaceable(out, source)
    t0 = time.time()
    log(f"loading source {source} ...")
    src = load_source(source, opts)
    n = len(src.images)
    if n == 0:
        raise DataError(f"source {source!r} produced no images")
    val = src.fixed_split if src.fixed_split is not None else _split_mask(n, val_fraction, split_seed)
    # Rows are stored in a seeded shuffled order so that streaming readers with a small shuffle
    # buffer (Ray Data) do not see class-sorted sources (mnist5k is sorted by digit) in long runs.
    order = np.random.default_rng(split_seed + 1).permutation(n)
    splits = {"train": order[~val[order]], "val": order[val[order]]}
    _, h, w, c = src.images.shape
    log(f"writing {n} images ({c}x{h}x{w}) to {out} ...")
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
            "split": {"method": "fixed" if src.fixed_split is not None else "seeded", "val_fraction": val_fraction, "seed": split_seed},
            "splits": split_info,
            "skipped": {"count": len(src.skipped), "items": src.skipped[:100]},
            "content_hash": _content_hash(src, order, val),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    log(
        f"prepared {out}: train {split_info['train']['count']}, val {split_info['val']['count']}, "
        f"{manifest['num_classes']} classes, {len(src.skipped)} skipped, {time.time() - t0:.1f}s"
    )
    return manifest
