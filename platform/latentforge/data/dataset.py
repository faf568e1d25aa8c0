"""Reading a prepared dataset folder (no Ray): manifest, splits in memory, a torch Dataset."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from latentforge.data.prepare import DATASET_KIND, MANIFEST
from latentforge.errors import DataError
from latentforge.storage import read_json


@dataclass
class Split:
    """One split held in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor | None  # (N,) int64, None for unlabeled data
    attributes: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (N,) float32

    def __len__(self) -> int:
        return self.images.shape[0]


def decode_rows(image_bytes: list[bytes], height: int, width: int, channels: int) -> np.ndarray:
    """Raw HWC bytes of equal-sized images → (N, C, H, W) uint8."""
    flat = np.frombuffer(b"".join(image_bytes), dtype=np.uint8)
    return flat.reshape(len(image_bytes), height, width, channels).transpose(0, 3, 1, 2)


@contextlib.contextmanager
def shard_errors(path: str | Path) -> Iterator[None]:
    """Turn a damaged or truncated Parquet shard (a failed copy, a full disk, a hand edit) into a
    `DataError` naming the shard and the fix, rather than a pyarrow or NumPy traceback."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        hint = "retry once the storage is reachable; if it persists, " if isinstance(e, OSError) else ""
        raise DataError(f"{path} is damaged or unreadable ({type(e).__name__}: {str(e)[:200]}); {hint}prepare the "
                        "dataset again (latentforge data prepare SOURCE OUT --overwrite)") from e


CHUNK_BYTES = 32 * 1024 * 1024  # pixels per chunk of `PreparedDataset.chunks`


class PreparedDataset:
    """A prepared dataset folder written by `prepare_dataset`.

    Args:
        path: the folder holding `manifest.json` and the Parquet shards.

    Raises:
        DataError: the folder is missing, incomplete or not a LatentForge dataset.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            hint = "run `latentforge data prepare SOURCE --out DIR` first"
            if self.path.is_dir():
                raise DataError(f"{self.path} has no {MANIFEST}: it is not a prepared dataset (or was interrupted); {hint}")
            if self.path.is_file():
                raise DataError(f"{self.path} is a file; give the dataset's folder ({self.path.parent} if this is its "
                                f"{MANIFEST})")
            raise DataError(f"dataset folder {self.path} does not exist; {hint}")
        try:
            self.manifest = read_json(self.path / MANIFEST)
        except Exception as e:
            raise DataError(f"{self.path / MANIFEST} is unreadable: {e}") from e
        kind = self.manifest.get("kind") if isinstance(self.manifest, dict) else None
        if kind != DATASET_KIND:
            raise DataError(f"{self.path / MANIFEST} does not describe a LatentForge dataset (kind={kind!r})")
        self._cache: dict[str, Split] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.manifest["image_shape"]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def attributes(self) -> list[str]:
        return list(self.manifest.get("attributes", []))

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def files(self, split: str) -> list[Path]:
        """The Parquet shards of `split` ('train' or 'val')."""
        if split not in self.manifest["splits"]:
            raise DataError(f"unknown split {split!r}; choose one of: {', '.join(self.manifest['splits'])}")
        files = [self.path / f for f in self.manifest["splits"][split]["files"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"dataset {self.path} is missing shard(s) {', '.join(missing)}; prepare it again")
        return files

    def load(self, split: str) -> Split:
        """Read a whole split into memory (cached)."""
        if split not in self._cache:
            import pyarrow.parquet as pq

            c, h, w = self.image_shape
            images, labels, attrs = [], [], {a: [] for a in self.attributes}
            for f in self.files(split):
                with shard_errors(f):
                    t = pq.read_table(f)
                    images.append(decode_rows(t.column("image").to_pylist(), h, w, c))
                    if self.num_classes:
                        labels.append(t.column("label").to_numpy())
                    for a in self.attributes:
                        attrs[a].append(t.column(f"attr_{a}").to_numpy())
            n = sum(len(x) for x in images)
            if n != self.manifest["splits"][split]["count"]:
                raise DataError(f"dataset {self.path}: split {split!r} has {n} rows, manifest says {self.manifest['splits'][split]['count']}; prepare it again")
            self._cache[split] = Split(
                images=torch.from_numpy(np.concatenate(images) if images else np.zeros((0, c, h, w), np.uint8)),
                labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)) if self.num_classes else None,
                attributes={a: torch.from_numpy(np.concatenate(v).astype(np.float32)) for a, v in attrs.items()},
            )
        return self._cache[split]

    def chunks(self, split: str, rows: int = 1024) -> Iterator[Split]:
        """The whole split in its stored order, at most `rows` images (and CHUNK_BYTES of pixels) at a
        time: what a pass over a split larger than memory uses (statistics, not training)."""
        import pyarrow.parquet as pq

        c, h, w = self.image_shape
        rows = max(1, min(rows, CHUNK_BYTES // (c * h * w)))  # pyarrow merges row groups up to `rows`
        columns = ["image"] + (["label"] if self.num_classes else [])
        for f in self.files(split):
            with shard_errors(f):
                batches = pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns)
                for b in batches:
                    images = torch.from_numpy(decode_rows(b.column("image").to_pylist(), h, w, c).copy())  # writable
                    labels = torch.from_numpy(b.column("label").to_numpy().astype(np.int64)) if self.num_classes else None
                    yield Split(images, labels)

    def sample(self, split: str, n: int, seed: int = 0, max_bytes: int = 512 << 20) -> Split:
        """A seeded random subset of at most `n` images of `split`, reading only as many shards as
        it needs (a split larger than memory is never read whole).

        Args:
            max_bytes: also stop at this many bytes of pixels (fewer images at large sizes).
        """
        import pyarrow.parquet as pq

        c, h, w = self.image_shape
        n = max(1, min(n, max_bytes // (c * h * w)))
        gen = torch.Generator().manual_seed(seed)
        files = self.files(split)
        images, labels, have = [], [], 0
        for i in torch.randperm(len(files), generator=gen).tolist():
            with shard_errors(files[i]):
                t = pq.read_table(files[i], columns=["image"] + (["label"] if self.num_classes else []))
                images.append(decode_rows(t.column("image").to_pylist(), h, w, c))
                if self.num_classes:
                    labels.append(t.column("label").to_numpy())
            have += t.num_rows
            if have >= n:
                break
        all_images = torch.from_numpy(np.concatenate(images)) if images else torch.zeros(0, c, h, w, dtype=torch.uint8)
        images.clear()  # the shards' own arrays: the peak is the joined array and the pick, not three copies
        pick = torch.randperm(len(all_images), generator=gen)[:n]
        return Split(images=all_images[pick],
                     labels=torch.from_numpy(np.concatenate(labels).astype(np.int64))[pick] if self.num_classes else None)
