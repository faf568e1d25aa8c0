"""Exact, seeded, streaming batches from a prepared split's Parquet row groups (no Ray).

The order of an epoch is a pure function of (seed, epoch, the split's row groups), never of the
worker count, so N workers see exactly the global batches one process sees, and a resumed run
continues at its position on any number of workers:

1. the split's row groups ("blocks") are put in a seeded order (a permutation across the whole
   split; blocks stay in file order when the whole split fits one window);
2. consecutive blocks are grouped into windows of about `window_bytes` of pixels;
3. each window's rows are put in a seeded order;
4. global batch i of the epoch is rows [i*B, (i+1)*B) of that stream; rank r keeps its
   contiguous slice of each (the last incomplete batch of an epoch is dropped).

When the split fits one window (small datasets), step 3 is exactly `InMemoryBatches`' permutation,
so the two loaders give identical batches. Memory is bounded by about three windows (the shuffled
window being consumed, the rows left over from the last one, and the next window read ahead in a
background thread), whatever the split's size. Resuming at
a position skips whole windows without reading them. Every worker reads every window: the price
of batches that do not depend on the worker count (a read, not a decode: pixels are raw).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from latentforge.algorithms.batch import Batch
from latentforge.data.dataset import PreparedDataset, decode_rows, shard_errors
from latentforge.errors import ConfigError, DataError
from latentforge.images import to_model_range

WINDOW_BYTES = 256 * 1024 * 1024  # pixels (uint8) per window; a worker holds about three windows


@dataclass(frozen=True)
class Block:
    """One Parquet row group of the split."""

    file: int  # index into the split's files
    row_group: int
    start: int  # global row index of its first row (rows numbered in file order)
    rows: int


def wrap_seed(x: int) -> int:
    """A derived seed wrapped to the 64 bits `torch.Generator.manual_seed` takes (unchanged below 2^64).

    Seeds go up to 2^63 - 1 (config.MAX_SEED), so products such as `seed * 7919` would overflow it.
    """
    return x & 0xFFFF_FFFF_FFFF_FFFF


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's order (shared with `InMemoryBatches`, so the two loaders agree)."""
    return wrap_seed(seed * 7919 + epoch)


class StreamBatches:
    """Global batches streamed from a prepared split, this worker's slice of each.

    Args:
        dataset_dir: a prepared dataset folder.
        split: 'train' or 'val'.
        global_batch_size: images per global batch (a multiple of `world_size`).
        seed: seeds every epoch's order.
        rank, world_size: this worker's place.
        device: where batches are delivered.
        window_bytes: pixels (uint8) per shuffle window.
    """

    def __init__(self, dataset_dir, split: str, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", window_bytes: int = WINDOW_BYTES):
        import pyarrow.parquet as pq

        if global_batch_size % world_size:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by {world_size} workers")
        ds = PreparedDataset(dataset_dir)
        self.files = ds.files(split)
        self.shape = ds.image_shape
        self.labelled = ds.num_classes > 0
        blocks, start = [], 0
        for f, path in enumerate(self.files):
            with shard_errors(path):
                meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                blocks.append(Block(f, g, start, rows))
                start += rows
        if start != ds.manifest["splits"][split]["count"]:
            raise DataError(f"dataset {ds.path}: split {split!r} has {start} rows, the manifest says "
                            f"{ds.manifest['splits'][split]['count']}; prepare it again")
        if start < global_batch_size:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is larger than the {split} split ({start} images)")
        self.blocks, self.rows = blocks, start
        self.global_batch_size, self.seed, self.rank, self.world_size = global_batch_size, seed, rank, world_size
        self.local = global_batch_size // world_size
        self.device = torch.device(device)
        self.batches_per_epoch = start // global_batch_size
        self.window_rows = max(1, window_bytes // int(np.prod(self.shape)))
        self.blocks_read = 0  # row groups read so far (tests check that resuming skips)

    # ------------------------------------------------------------------------------ the order
    @property
    def fits_one_window(self) -> bool:
        """The whole split is one window: blocks in file order, rows in `InMemoryBatches`' order."""
        return self.rows <= self.window_rows

    @property
    def order(self) -> str:
        """How an epoch's order is made (saved with a checkpoint; `InMemoryBatches.order`)."""
        return "whole-split" if self.fits_one_window else f"windows-of-{self.window_rows}"

    def windows(self, epoch: int) -> list[list[Block]]:
        """The epoch's windows: consecutive blocks of its block order, about `window_rows` rows each."""
        if self.fits_one_window:
            return [list(self.blocks)]
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = [self.blocks[i] for i in torch.randperm(len(self.blocks), generator=gen).tolist()]
        windows, current, rows = [], [], 0
        for b in order:
            current.append(b)
            rows += b.rows
            if rows >= self.window_rows:
                windows.append(current)
                current, rows = [], 0
        if current:
            windows.append(current)
        return windows

    def _window_perm(self, epoch: int, w: int, n: int, single: bool) -> torch.Tensor:
        seed = epoch_seed(self.seed, epoch) if single else wrap_seed(epoch_seed(self.seed, epoch) * 1_000_003 + w + 1)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row indices (file order) in the order the epoch visits them, before batching."""
        windows = self.windows(epoch)
        out = []
        for w, blocks in enumerate(windows):
            ids = np.concatenate([np.arange(b.start, b.start + b.rows) for b in blocks])
            out.append(ids[self._window_perm(epoch, w, len(ids), self.fits_one_window).numpy()])
        return np.concatenate(out)

    # ------------------------------------------------------------------------------ reading
    def _read(self, blocks: list[Block]) -> tuple[np.ndarray, np.ndarray | None]:
        """A window's images (N, C, H, W) uint8 and labels (N,) int64, in block order."""
        import pyarrow.parquet as pq

        c, h, w = self.shape
        images, labels = [], []
        handles: dict[int, pq.ParquetFile] = {}
        for b in blocks:
            with shard_errors(self.files[b.file]):
                pf = handles.setdefault(b.file, pq.ParquetFile(self.files[b.file]))
                table = pf.read_row_group(b.row_group, columns=["image", "label"] if self.labelled else ["image"])
                images.append(decode_rows(table.column("image").to_pylist(), h, w, c))
                if self.labelled:
                    labels.append(table.column("label").to_numpy())
            self.blocks_read += 1
        return np.concatenate(images), (np.concatenate(labels).astype(np.int64) if self.labelled else None)

    def _windows_from(self, start: int) -> Iterator[tuple[int, int, int, list[Block]]]:
        """(epoch, window index, rows to skip in it, blocks) from global batch `start` on, forever."""
        epoch, batch = divmod(start, self.batches_per_epoch)
        skip = batch * self.global_batch_size
        while True:
            for w, blocks in enumerate(self.windows(epoch)):
                n = sum(b.rows for b in blocks)
                if skip >= n:  # wholly consumed before the resume point: not read
                    skip -= n
                    continue
                yield epoch, w, skip, blocks
                skip = 0
            epoch, skip = epoch + 1, 0

    def iterate(self, start: int = 0) -> Iterator[Batch]:
        """This worker's batches forever, positioned after `start` global batches."""
        single = self.fits_one_window
        source = self._windows_from(start)
        ahead = _ReadAhead(lambda: next(source), self._read)
        epoch, taken = divmod(start, self.batches_per_epoch)  # global batches taken in this epoch
        pending_images, pending_labels = [], []  # rows of the epoch's stream not yet batched
        buffered = 0
        current_epoch = epoch
        while True:
            (ep, w, skip, blocks), (images, labels) = ahead.next()
            if ep != current_epoch:  # a new epoch: the last partial batch of the old one is dropped
                current_epoch, taken, pending_images, pending_labels, buffered = ep, 0, [], [], 0
            perm = self._window_perm(ep, w, len(images), single).numpy()[skip:]
            pending_images.append(images[perm])
            if labels is not None:
                pending_labels.append(labels[perm])
            del images, labels  # the shuffled copy replaces the window as read
            buffered += len(perm)
            if buffered < self.global_batch_size:
                continue
            stream_images = pending_images[0] if len(pending_images) == 1 else np.concatenate(pending_images)
            stream_labels = None
            if pending_labels:
                stream_labels = pending_labels[0] if len(pending_labels) == 1 else np.concatenate(pending_labels)
            pending_images = pending_labels = None
            full = (buffered // self.global_batch_size) * self.global_batch_size
            for g0 in range(0, full, self.global_batch_size):
                if taken >= self.batches_per_epoch:
                    break
                lo = g0 + self.rank * self.local
                x = to_model_range(torch.from_numpy(stream_images[lo : lo + self.local]))
                y = None if stream_labels is None else torch.from_numpy(stream_labels[lo : lo + self.local])
                taken += 1
                yield Batch(x, y).to(self.device)
            # copies, so that the window's array is freed rather than kept alive by a small view
            pending_images = [stream_images[full:].copy()]
            pending_labels = [stream_labels[full:].copy()] if stream_labels is not None else []
            buffered -= full
            del stream_images, stream_labels


class _ReadAhead:
    """Reads the next window in a background thread while the current one is consumed
    (pyarrow releases the GIL while it reads)."""

    def __init__(self, next_item, read):
        self._next_item, self._read = next_item, read
        self._result = None
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        def work():
            try:
                item = self._next_item()
                self._result = (item, self._read(item[3]))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self._result = e

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread

    def next(self):
        self._thread.join()
        result, self._result = self._result, None  # the consumer alone holds the window now
        if isinstance(result, BaseException):
            raise result
        self._thread = self._start()
        return result
