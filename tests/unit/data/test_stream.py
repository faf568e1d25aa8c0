"""The default training data path: exact seeded epochs streamed from Parquet row groups."""

from itertools import islice

import numpy as np
import pytest
import torch

from latentforge.data.dataset import PreparedDataset
from latentforge.data.stream import StreamBatches
from latentforge.images import to_model_range
from latentforge.train.batches import InMemoryBatches

B = 24  # global batch
PIXELS = 3 * 16 * 16


@pytest.fixture(scope="module")
def blocky(tmp_path_factory):
    """600 shapes at 16 px written in row groups of 50 rows (12 blocks in the 540-image train split)."""
    from latentforge.data import prepare
    from latentforge.data.sources import SourceOptions

    out = tmp_path_factory.mktemp("stream") / "shapes"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "ROW_GROUP_BYTES", 50 * PIXELS)
        prepare.prepare_dataset("shapes", out, SourceOptions(count=600, size=16), log=lambda *_: None)
    return out


def stream(path, seed=0, rank=0, world=1, windows_of=120):
    return StreamBatches(path, "train", B, seed, rank, world, window_bytes=windows_of * PIXELS)


def test_every_image_once_per_epoch_in_a_seeded_order(blocky):
    s = stream(blocky)
    assert len(s.blocks) > 8 and len(s.windows(0)) > 3  # really several blocks and windows
    orders = [s.epoch_order(e) for e in range(3)]
    for o in orders:
        assert np.array_equal(np.sort(o), np.arange(s.rows))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert np.array_equal(stream(blocky).epoch_order(1), orders[1])  # same seed, same order
    assert not np.array_equal(stream(blocky, seed=1).epoch_order(0), orders[0])
    # the block order mixes the whole split: the first window does not come from the first blocks only
    assert orders[0][: s.window_rows].max() > s.rows // 2


def test_batches_follow_the_epoch_order_and_drop_the_last_partial_batch(blocky):
    s = stream(blocky)
    split = PreparedDataset(blocky).load("train")
    n = s.batches_per_epoch
    assert n == 540 // B
    batches = list(islice(s.iterate(), 2 * n))
    for epoch in range(2):
        want = to_model_range(split.images[s.epoch_order(epoch)[: n * B]])
        got = torch.cat([b.images for b in batches[epoch * n : (epoch + 1) * n]])
        assert torch.equal(got, want)
        labels = torch.cat([b.labels for b in batches[epoch * n : (epoch + 1) * n]])
        assert torch.equal(labels, split.labels[s.epoch_order(epoch)[: n * B]])


def test_workers_split_each_global_batch_exactly(blocky):
    """Two workers together see exactly the batches of one process (the order ignores the worker count)."""
    one = list(islice(stream(blocky).iterate(), 30))
    ranks = [list(islice(stream(blocky, rank=r, world=2).iterate(), 30)) for r in (0, 1)]
    for i, whole in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][i].images, ranks[1][i].images]), whole.images)


def test_resume_continues_at_the_position_without_rereading(blocky):
    full = stream(blocky)
    straight = list(islice(full.iterate(), 40))
    resumed = stream(blocky)
    tail = list(islice(resumed.iterate(start=30), 10))  # epoch 1, batch 8
    for a, b in zip(straight[30:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # only epoch 1's windows from the resume point on (and one read ahead) were read, not epoch 0's
    assert resumed.blocks_read < full.blocks_read - len(full.blocks) // 2
    # a different worker count resumes at the same place too
    halves = [list(islice(stream(blocky, rank=r, world=2).iterate(start=30), 10)) for r in (0, 1)]
    assert torch.equal(torch.cat([halves[0][3].images, halves[1][3].images]), straight[33].images)


def test_matches_in_memory_batches_when_the_split_fits_one_window(mnist_dir):
    s = StreamBatches(mnist_dir, "train", 64, seed=3)
    assert len(s.windows(0)) == 1
    mem = InMemoryBatches(PreparedDataset(mnist_dir).load("train"), 64, seed=3)
    start = s.batches_per_epoch - 3  # across an epoch boundary
    for a, b in zip(islice(s.iterate(start), 6), islice(mem.iterate(start), 6)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_the_largest_seed_gives_exact_epochs_on_both_loaders(blocky):
    """Seeds go up to 2^63 - 1; the derived epoch and window seeds wrap instead of overflowing torch's."""
    from latentforge.config import MAX_SEED

    s = stream(blocky, seed=MAX_SEED)
    orders = [s.epoch_order(e) for e in range(2)]
    for o in orders:
        assert np.array_equal(np.sort(o), np.arange(s.rows))
    assert not np.array_equal(orders[0], orders[1])
    batch = next(iter(InMemoryBatches(PreparedDataset(blocky).load("train"), B, seed=MAX_SEED).iterate()))
    assert batch.images.shape[0] == B


def test_a_damaged_shard_is_named_with_the_fix_on_every_reader(blocky, tmp_path):
    """A truncated shard (a failed copy, a full disk) or one whose pages are overwritten gives a
    DataError naming the file and `data prepare`, not a pyarrow traceback from a worker."""
    import shutil

    from latentforge.errors import DataError

    cut = tmp_path / "cut"
    shutil.copytree(blocky, cut)
    shard = PreparedDataset(cut).files("train")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for read in (lambda: stream(cut), lambda: PreparedDataset(cut).load("train"),
                 lambda: PreparedDataset(cut).sample("train", 10_000)):
        with pytest.raises(DataError, match=f"{shard.name} is damaged.*data prepare"):
            read()
    garbled = tmp_path / "garbled"
    shutil.copytree(blocky, garbled)
    shard = PreparedDataset(garbled).files("train")[0]
    raw = bytearray(shard.read_bytes())
    raw[8:len(raw) // 2] = bytes(len(raw) // 2 - 8)  # the pages zeroed, the footer intact
    shard.write_bytes(bytes(raw))
    s = stream(garbled, windows_of=10_000)  # the footer reads: the damage shows only when the rows are read
    with pytest.raises(DataError, match=f"{shard.name} is damaged"):
        next(s.iterate(0))
