"""Ray Data reader for prepared datasets: Parquet shards → decoded float tensors, streamed to
Ray Train workers (each iterates its `get_dataset_shard`). Decoding runs in Ray Data tasks,
not in the training processes."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from latentforge.algorithms.batch import Batch
from latentforge.data.dataset import PreparedDataset
from latentforge.data.stream import wrap_seed


def decode_batch(batch: dict, shape: tuple[int, int, int]) -> dict:
    """Ray Data map_batches fn: raw HWC uint8 bytes → float32 (B, C, H, W) in [-1, 1], labels
    int64 (-1 where a row has none)."""
    c, h, w = shape
    raw = batch["image"]
    flat = np.frombuffer(b"".join(raw.tolist()), dtype=np.uint8)
    images = flat.reshape(len(raw), h, w, c).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    labels = batch["label"]
    labels = np.where(np.equal(labels, None), -1, labels).astype(np.int64) if labels.dtype == object else labels.astype(np.int64)
    return {"image": images, "label": labels}


MATERIALIZE_LIMIT_BYTES = 256 * 1024 * 1024


def read_prepared(path, split: str = "train", materialize_limit: int = MATERIALIZE_LIMIT_BYTES):
    """A Ray Dataset of decoded images for one split of a prepared dataset folder.

    When the decoded split is small (under `materialize_limit` bytes of float32 pixels) it is
    decoded once and kept in the object store: re-reading and re-decoding Parquet at every epoch
    otherwise costs seconds per epoch of pipeline start-up on a small machine. Larger splits stream.
    """
    import ray.data

    ds = PreparedDataset(path)
    files = [str(f) for f in ds.files(split)]
    c, h, w = ds.image_shape
    pipeline = (
        ray.data.read_parquet(files).select_columns(["image", "label"])
        .map_batches(decode_batch, fn_kwargs={"shape": ds.image_shape}, batch_format="numpy")
    )
    decoded_bytes = ds.manifest["splits"][split]["count"] * c * h * w * 4
    return pipeline.materialize() if decoded_bytes <= materialize_limit else pipeline


class ShardBatches:
    """Batches from a worker's Ray Data shard, epoch after epoch.

    Args:
        shard: `ray.train.get_dataset_shard("train")`.
        local_batch: images per worker batch.
        rows_per_worker: rows each worker receives per epoch (equal splits).
        labelled: whether labels are meaningful.
        device: where batches are delivered.
        seed: seeds the local shuffle buffer.
    """

    order = "ray-data"  # a checkpoint's epoch order (train/loop.py): Ray Data's, not reproduced by the others

    def __init__(self, shard, local_batch: int, rows_per_worker: int, labelled: bool, device, seed: int = 0):
        self.shard, self.local, self.labelled, self.device, self.seed = shard, local_batch, labelled, device, seed
        self.batches_per_epoch = max(1, rows_per_worker // local_batch)

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """Batches forever; on resume the first epoch skips `start mod batches_per_epoch` batches, so the
        number of images seen per epoch is kept (the order within an epoch is the shuffle's)."""
        skip = start % self.batches_per_epoch
        epoch = start // self.batches_per_epoch
        while True:
            it = self.shard.iter_torch_batches(
                batch_size=self.local, drop_last=True, local_shuffle_buffer_size=self.local * 8,
                local_shuffle_seed=wrap_seed(self.seed * 1000 + epoch), device=self.device,
            )
            for i, b in enumerate(it):
                if i < skip:
                    continue
                yield Batch(b["image"], b["label"] if self.labelled else None)
            skip, epoch = 0, epoch + 1
