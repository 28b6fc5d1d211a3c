"""Token shards to training batches: which windows each step reads, and reading them ahead of the model.

A batch goes from a shard file to the model in three hops: micro_batches -> BatchSource.__getitem__ ->
shards.TokenShards.read. BatchSource's docstring is the contract: micro-batches depend only on the seed and their
place in the stream, never on how fast the data arrives nor on how many a step takes, so a resumed run and a run on
several GPUs read exactly what an uninterrupted single-process run reads.
"""
from __future__ import annotations

import atexit
import itertools
import threading
from typing import Iterator

import numpy as np
import torch

import chat
from common import EOT, DataError
from shards import TokenShards

# The first pass shuffles windows within blocks of about this many tokens (a whole number of batches): it
# reads the data as it arrives, and a block is the most it waits for. Later passes shuffle the whole split.
BLOCK_TOKENS = 2**22


def batches_per_pass(num_tokens: int, block_size: int, batch_size: int) -> int:
    """Whole batches of (block_size + 1)-token windows in one pass over num_tokens (at least 1): the steps of
    an epoch, and the most validation batches worth reading."""
    return max(1, num_tokens // (block_size + 1) // batch_size)


class PackedConversations:
    """A split of conversations (chat.render's, each starting with <|endoftext|>) as rows of `window` tokens.

    Each row starts where a conversation does and holds whole ones in their order, as many as fit (next fit),
    then padding (<|endoftext|>, no target counts it). Packed rather than one to a row: a short exchange alone
    would leave most of its row padding. No mask keeps a conversation from attending to the one before it in
    its row: pretraining packs documents the same way, nanochat packs its conversations so too, and each
    begins with <|endoftext|>, which the model knows as the start of a new text.

    A conversation longer than the window is cut after its last whole exchange that fits (the ones after it
    are left out); one whose first exchange alone does not fit is left out. Never cut inside a turn. The
    packing reads the whole split, so it waits for the split to be complete.
    """

    def __init__(self, shards: TokenShards, window: int):
        shards.wait()
        self.shards, self.window = shards, window
        starts = shards.positions(EOT)
        lengths = np.diff(starts, append=shards.num_tokens)
        ends = np.concatenate(([-1], shards.positions(chat.ASSISTANT_END)))  # -1: no reply ends before it
        last_end = ends[np.searchsorted(ends, starts + window) - 1]  # the last reply ending inside the window
        keep = (lengths <= window) | (last_end >= starts)
        self.cut, self.left_out = int(((lengths > window) & keep).sum()), int((~keep).sum())
        self.conversations = len(starts)
        self.starts = starts[keep]
        self.lengths = np.where(lengths <= window, lengths, last_end + 1 - starts)[keep]
        self.first = self._pack(self.lengths, window)  # row r holds conversations first[r] .. first[r+1] - 1

    @staticmethod
    def _pack(lengths: np.ndarray, window: int) -> np.ndarray:
        first, used = [], window
        for i, n in enumerate(lengths.tolist()):
            if used + n > window:  # a new row
                first.append(i)
                used = 0
            used += n
        return np.array(first + [len(lengths)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.first) - 1

    def row(self, r: int) -> np.ndarray:
        """Row r's `window` tokens: its conversations, then padding."""
        out, at = np.full(self.window, EOT, dtype=np.uint16), 0
        for start, n in zip(self.starts[self.first[r]:self.first[r + 1]].tolist(),
                            self.lengths[self.first[r]:self.first[r + 1]].tolist()):
            out[at:at + n] = self.shards.read(start, n)
            at += n
        return out

    def note(self) -> str:
        """What packing made of the split, in a line."""
        fill = self.lengths.sum() / max(1, len(self) * self.window)
        return (f"conversations: {len(self.starts):,} of {self.conversations:,} in {len(self):,} rows of {self.window} "
                f"tokens ({fill:.0%} conversation, the rest padding); {self.cut:,} cut after their last whole "
                f"exchange that fits, {self.left_out:,} left out (their first exchange alone is longer)")


class Windows:
    """A split as windows of block_size + 1 tokens (or, for conversations, packed rows of that size), read as
    (x, y) pairs of CPU int64 tensors: y is x shifted by one token, -1 where no loss counts (with
    conversations, every token but the assistant's)."""

    def __init__(self, shards: TokenShards, block_size: int):
        self.shards, self.window = shards, block_size + 1
        self.packed = PackedConversations(shards, self.window) if shards.chat else None

    def available(self) -> int:
        """Windows whose tokens are there now (all of them once the split is complete)."""
        return len(self.packed) if self.packed else self.shards.num_tokens // self.window

    def read(self, windows: np.ndarray):
        if self.packed is None:
            w = np.stack([self.shards.read(int(i) * self.window, self.window) for i in windows])  # (b, T+1)
        else:
            w = np.stack([self.packed.row(int(i)) for i in windows])  # (b, T+1)
        x = torch.from_numpy(w[:, :-1].astype(np.int64))  # (b, T), astype makes each one contiguous
        y = torch.from_numpy(w[:, 1:].astype(np.int64))  # (b, T), the next token of each position
        if self.packed is not None:
            y[torch.from_numpy(~chat.trained(w)[:, 1:])] = -1  # the loss counts the assistant's tokens only
        return x, y

    def spread(self, n: int | None) -> np.ndarray:
        """n window indices spread evenly over the whole (complete) split, or all of them (None, or n too many):
        a fixed sample that a run's evaluations read every time."""
        total = self.available()
        if n is None or n >= total:
            return np.arange(total)
        return np.arange(n) * total // n


class BatchSource:
    """The training batches of one split, as a stream of micro-batches.

    Contract. The split's windows are read in a fixed order, micro_size b at a time: unit u is positions
    [u*b, (u+1)*b) of that order, a pair x, y of CPU int64 tensors of shape (b, block_size) (Windows.read). A step
    takes the next G_s units for each of W ranks (G_s, its accumulation, is what a batch-size schedule varies),
    interleaved: the step's unit k*W + r is rank r's k-th, so rank r reads units r, r+W, r+2W, ... in order
    whatever each step's size (`source[i]`, its i-th, is unit i*W + r). Units depend only on (seed, u) and the
    split's tokens, never on what was read before nor on how fast the split arrives: a run resumed after u units
    reads exactly what an uninterrupted one would, and one rank with G = 2W reads what W ranks with G = 2 read.

    How. The first pass reads the windows in the order they arrive, shuffled within blocks of K windows (K a
    multiple of the full batch B = W*G*b, about BLOCK_TOKENS): position p is window k*K + perm(seed, 0, k)[p % K]
    with k = p // K, so a unit waits only for its own block. A pass holds P = N // B * B positions for N windows
    (the N % B left over go unused); pass e >= 1 reads window perm(seed, e)[p - e*P] of a permutation of all N.
    """

    def __init__(self, shards: TokenShards, block_size: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1):
        if batch_size % (world_size * grad_accum):
            raise DataError(f"batch size {batch_size} is not divisible by world_size * grad_accum = "
                            f"{world_size} * {grad_accum} = {world_size * grad_accum}")
        self.windows = Windows(shards, block_size)
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.micro_size = batch_size // (world_size * grad_accum)
        self.block = batch_size * max(1, BLOCK_TOKENS // (batch_size * self.windows.window))  # K windows
        self.on_wait = None  # on_wait(tokens there) while a unit waits for its data
        self._permutation: tuple[tuple, np.ndarray] | None = None  # (its key, a permutation), the last one used
        if shards.complete:
            self._check_size()

    @property
    def packed(self) -> PackedConversations | None:
        return self.windows.packed

    def __getitem__(self, index: int):
        return self.micro(index)

    def micro(self, index: int, stop: threading.Event | None = None):
        """This rank's index-th micro-batch (None if `stop` is set while it waits for its data)."""
        windows = self.unit_windows(index * self.world_size + self.rank, stop)
        return None if windows is None else self.windows.read(windows)

    def micro_batch(self, step: int, micro: int):
        """This rank's micro-batch `micro` of step `step`, every step of G micro-batches (no batch schedule)."""
        return self[step * self.grad_accum + micro]

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in a pass, once the whole split is there (it waits for it)."""
        self.shards.wait(on_wait=self.on_wait)
        self._check_size()
        return self.windows.available() // self.batch_size

    def steps_at_least(self) -> int:
        """Full batches of the first pass that the data there now already holds."""
        return self.windows.available() // self.batch_size

    def global_windows(self, step: int) -> np.ndarray:
        """The window indices of step `step`'s batch over all ranks and micro-steps (no batch schedule)."""
        units = self.batch_size // self.micro_size
        return np.concatenate([self.unit_windows(u) for u in range(step * units, (step + 1) * units)])

    def unit_windows(self, unit: int, stop: threading.Event | None = None) -> np.ndarray | None:
        """The window indices of unit `unit`, once its data is there (None if `stop` is set while it waits)."""
        b, K = self.micro_size, self.block
        position = unit * b
        block, offset = divmod(position, K)  # K is a multiple of b: a unit lies in one block, and in one pass
        self.shards.wait((block + 1) * K * self.windows.window, self.on_wait, stop)
        if stop is not None and stop.is_set():
            return None
        if not self.shards.complete:  # the first pass, its block whole
            return block * K + self._permuted((0, block), K)[offset:offset + b]
        self._check_size()
        total = self.windows.available()
        epoch, i = divmod(position, total // self.batch_size * self.batch_size)
        if epoch == 0:  # the first pass (its last block shorter than K)
            return block * K + self._permuted((0, block), min(K, total - block * K))[offset:offset + b]
        return self._permuted((epoch,), total)[i:i + b]

    def _permuted(self, key: tuple, n: int) -> np.ndarray:
        cached = self._permutation  # read once: reader threads share this source
        if cached is None or cached[0] != (*key, n):
            cached = ((*key, n), np.random.default_rng([self.seed % 2**63, *key]).permutation(n))
            self._permutation = cached
        return cached[1]

    def _check_size(self) -> None:
        """The complete split holds at least one batch of windows, or DataError saying what to change."""
        windows, split = self.windows.available(), self.shards.split
        if windows == 0 and self.packed:
            raise DataError(f"no conversation in split {split} has a first exchange that fits in "
                            f"block_size+1 = {self.windows.window} tokens; use a larger block size")
        if windows == 0:
            raise DataError(f"data too small for one window of block_size+1 = {self.windows.window} tokens: "
                            f"{self.shards.num_tokens:,} tokens in split {split}; use more documents "
                            "(--sample_size, or a larger --val_split for val) or a smaller block size")
        if windows < self.batch_size:
            what = "rows of conversations" if self.packed else f"windows of {self.windows.window} tokens"
            raise DataError(f"split {split} has {windows:,} {what}, fewer than one batch of {self.batch_size}: "
                            f"use a --batch_size of {windows:,} or less"
                            + ("" if self.packed else ", a smaller --block_size, or more documents (--sample_size)"))


def micro_batches(source: BatchSource, first: int, *, num_workers: int, pin_memory: bool) -> Iterator:
    """source[i] for this rank's micro-batches from the first-th on, in order and without end (a run's length may
    be planned as it goes, and each step takes as many as it needs), read ahead by num_workers threads (0: in
    the caller's).

    Threads, not processes: reading a batch is a copy out of memory-mapped shards (numpy releases the GIL for
    it), and threads end with the process whatever stops it, where reader processes can outlive an error.
    """
    if num_workers == 0:
        for i in itertools.count(first):
            yield _pinned(source[i], pin_memory)
        return
    readers = _Readers(source, first, num_workers, pin_memory)
    try:
        yield from readers
    finally:  # on close(): the threads joined
        readers.close()


def at_context(batch: tuple, context: int) -> tuple:
    """A micro-batch (x, y) of (b, T) as (b * T/context, context): each window cut into pieces of `context`
    positions, their targets with them (a shorter context at the same tokens, for a context schedule)."""
    return tuple(t.view(-1, context) for t in batch)


def _pinned(batch, pin_memory: bool):
    return tuple(t.pin_memory() for t in batch) if pin_memory else batch


class _Readers:
    """Threads reading micro-batches first, first + 1, ... at most `ahead` beyond the one the caller waits for;
    the caller gets them in order, or the exception reading one raised."""

    def __init__(self, source: BatchSource, first: int, threads: int, pin_memory: bool):
        self.source, self.pin_memory = source, pin_memory
        self.next = self.wanted = first  # the next index to read; the next one the caller takes
        self.ahead = 2 * threads
        self.done: dict[int, tuple] = {}  # index -> (batch, None) or (None, exception)
        self.cond, self.stop = threading.Condition(), threading.Event()
        self.threads = [threading.Thread(target=self._read, daemon=True, name=f"batch reader {k}")
                        for k in range(threads)]
        for thread in self.threads:
            thread.start()
        atexit.register(self.close)  # whatever ends the process

    def _read(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stop.is_set() or self.next < self.wanted + self.ahead)
                if self.stop.is_set():
                    return
                index, self.next = self.next, self.next + 1
            try:
                result = (_pinned(self.source.micro(index, self.stop), self.pin_memory), None)
            except BaseException as e:  # the caller raises it when it reaches this index
                result = (None, e)
            with self.cond:
                self.done[index] = result
                self.cond.notify_all()

    def __iter__(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.wanted in self.done)
                batch, error = self.done.pop(self.wanted)
                self.wanted += 1
                self.cond.notify_all()
            if error is not None:
                raise error
            yield batch

    def close(self) -> None:
        """The threads stopped, and gone once the batch each is reading is read: a thread still inside torch when
        the process exits can abort it ("terminate called without an active exception")."""
        with self.cond:
            self.stop.set()
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(timeout=10)
        atexit.unregister(self.close)
