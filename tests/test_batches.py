"""batches.py: which windows each step reads (seed, step, rank, micro-step; never how fast the data arrives), the
validation sample, and the reader threads."""
import itertools
import shutil
import threading
import time

import numpy as np
import pytest
import torch

import batches
import common
import data
import shards as shard_files
import sources
from common import write_json
from helpers import make_corpus, wait_for, write_txt_dir
from shards import SPLITS, TokenShards

SHARD = 500  # tokens per shard: small, so the tiny corpus spans several shards


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A cache prepared once from a generated corpus, for the tests that only read it."""
    root = tmp_path_factory.mktemp("prepared")
    text = write_txt_dir(root / "text", make_corpus(n_docs=120, seed=4))
    spec = sources.DataSpec(dataset=str(text), data_cache=str(root / "cache"), val_split=0.1)
    return data.prepare(spec, shard_tokens=SHARD, progress=False)


def source(prepared, block=16, batch=8, **kwargs) -> batches.BatchSource:
    return batches.BatchSource(TokenShards(prepared, "train"), block, batch, **{"seed": 5} | kwargs)


def global_batch(ranks: list[batches.BatchSource], step: int) -> torch.Tensor:
    """A step's batch over all ranks, in the stream's order: the step's unit k*W + r is rank r's k-th."""
    return torch.cat([rank.micro_batch(step, k)[0] for k in range(ranks[0].grad_accum) for rank in ranks])


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 batches of 8 windows of 17 tokens: the tiny corpus spans several, as a real run's data does."""
    monkeypatch.setattr(batches, "BLOCK_TOKENS", 4 * 8 * 17)


def test_global_batch_is_the_same_for_any_ranks_and_micro_steps(prepared, small_blocks):
    one = source(prepared)
    for step in (0, 1, 5, one.steps_per_epoch - 1, one.steps_per_epoch, 3 * one.steps_per_epoch + 2):
        whole = one.micro_batch(step, 0)[0]
        two_ranks = global_batch([source(prepared, rank=r, world_size=2) for r in range(2)], step)
        two_micro = global_batch([source(prepared, grad_accum=2)], step)
        four = global_batch([source(prepared, rank=r, world_size=2, grad_accum=2) for r in range(2)], step)
        assert whole.shape == (8, 16) and whole.dtype == torch.int64
        assert torch.equal(whole, two_ranks) and torch.equal(whole, two_micro) and torch.equal(whole, four)


def test_batches_depend_only_on_seed_and_step(prepared, small_blocks):
    a, b, other = source(prepared), source(prepared), source(prepared, seed=6)
    x, y = a.micro_batch(7, 0)
    assert torch.equal(x, b.micro_batch(7, 0)[0]) and torch.equal(y, b.micro_batch(7, 0)[1])
    assert not torch.equal(x, other.micro_batch(7, 0)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    epoch = [a.global_windows(s) for s in range(a.steps_per_epoch)]
    assert len(np.unique(np.concatenate(epoch))) == a.steps_per_epoch * 8  # no window twice in a pass
    assert not np.array_equal(a.global_windows(0), a.global_windows(a.steps_per_epoch))  # a new order


def test_the_first_pass_shuffles_within_blocks_and_later_passes_over_the_whole_split(prepared, small_blocks):
    s = source(prepared)
    block = s.block  # 32 windows: 4 steps
    assert block == 32 and s.steps_per_epoch > 8
    first_pass = np.concatenate([s.global_windows(step) for step in range(s.steps_per_epoch)])
    for b in range(s.steps_per_epoch // 4):  # each step reads only its own block's windows
        assert set(first_pass[b * block:(b + 1) * block]) == set(range(b * block, (b + 1) * block))
    assert not np.array_equal(first_pass[:block], np.arange(block))  # shuffled inside the block
    second = s.global_windows(s.steps_per_epoch)
    assert second.max() >= block  # the second pass draws from the whole split at once


def growing_copy(prepared, into, pause: float, stop: threading.Event):
    """The cache at `prepared` written again into `into` a shard at a time, as a preparation would, `pause`
    seconds apart: progress.json lists the shards so far, manifest.json comes last."""
    manifest = (prepared / "manifest.json").read_text()
    record = shard_files.read_json(prepared / "manifest.json")
    into.mkdir()
    listed = {split: [] for split in SPLITS}
    for split in ("val", "train"):
        for name in record["splits"][split]["shards"]:
            if stop.is_set():
                return
            shutil.copy(prepared / name, into / name)
            listed[split].append(name)
            write_json(into / "progress.json", {"shards": listed, "val_complete": True})
            time.sleep(pause)
    (into / "manifest.json").write_text(manifest)


def test_batches_do_not_depend_on_how_fast_the_data_arrives(prepared, small_blocks, tmp_path):
    complete = source(prepared)
    expected = [complete.micro_batch(step, 0) for step in range(2 * complete.steps_per_epoch + 1)]
    stop = threading.Event()
    writer = threading.Thread(target=growing_copy, args=(prepared, tmp_path / "growing", 0.02, stop))
    writer.start()
    try:
        assert wait_for(lambda: (tmp_path / "growing" / "progress.json").exists(), timeout=30)
        growing = source(tmp_path / "growing")
        assert not growing.shards.complete  # it starts while the data still arrives
        waited = []
        growing.on_wait = waited.append
        reader = batches.micro_batches(growing, 0, num_workers=2, pin_memory=False)
        for (x, y), (ex, ey) in zip(reader, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    finally:
        stop.set()
        writer.join()


def test_a_failed_preparation_is_raised_where_a_step_waits_for_its_data(prepared, tmp_path):
    (tmp_path / "partial").mkdir()
    write_json(tmp_path / "partial" / "progress.json", {"shards": {"train": [], "val": []}})
    failure = common.DataError("cannot reach the Hub")
    shards = TokenShards(tmp_path / "partial", "train", failed=lambda: failure)
    reader = batches.micro_batches(batches.BatchSource(shards, 16, 8, seed=0), 0, num_workers=1, pin_memory=False)
    with pytest.raises(common.DataError, match="cannot reach the Hub"):
        next(reader)


def test_too_little_data_is_refused_with_what_to_change(prepared):
    val = TokenShards(prepared, "val")
    with pytest.raises(common.DataError, match=f"data too small for one window of block_size\\+1 = 100001 tokens: "
                                             f"{val.num_tokens:,} tokens in split val"):
        batches.BatchSource(val, block_size=100_000, batch_size=1, seed=0)
    with pytest.raises(common.DataError, match="fewer than one batch of 4096: use a --batch_size of"):
        batches.BatchSource(val, block_size=16, batch_size=4096, seed=0)


def test_the_validation_sample_is_spread_over_the_whole_split_and_fixed(prepared):
    windows = batches.Windows(TokenShards(prepared, "val"), 16)
    total = windows.available()
    sample = windows.spread(10)
    assert len(sample) == 10 and len(set(sample)) == 10 and sample[0] == 0 and sample[-1] >= total * 0.85
    assert np.array_equal(sample, windows.spread(10))
    assert np.array_equal(windows.spread(None), np.arange(total)) and len(windows.spread(10 * total)) == total


@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_readers_yield_micro_batches_in_order_and_leave_the_global_rng_alone(prepared, num_workers):
    s = source(prepared, grad_accum=2, seed=1)
    expected = [s.micro_batch(step, m) for step in range(3, 9) for m in range(2)]
    rng = torch.get_rng_state()
    got = list(itertools.islice(batches.micro_batches(s, 3 * 2, num_workers=num_workers, pin_memory=False), 12))
    assert torch.equal(torch.get_rng_state(), rng)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
