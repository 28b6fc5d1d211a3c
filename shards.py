"""Token shards on disk: llm.c's format (a 256 x int32 header: magic, version, token count; then uint16 tokens),
and reading a split's shards, whole or while they are still being written.

data.py writes shards (tokenizing text), fineweb.py downloads them (FineWeb already tokenized); both describe a
split in the cache directory's progress.json as it grows and in manifest.json once complete, and TokenShards
reads either. One process of a machine writes a cache directory at a time (`writing`); the others read it.
"""
import contextlib
import json
import os
import threading
import time
from bisect import bisect_right
from pathlib import Path
from typing import Iterator

import numpy as np

import chat
from common import DataError, atomic_write, first_line

SHARD_MAGIC = 20240520  # llm.c's magic number and version for uint16 token shards
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 100_000_000  # tokens a shard holds, as llm.c's FineWeb shards (and kjj0/fineweb10B-gpt2's) do
SPLITS = ("train", "val")
# Validation holds at most this many tokens, the size of the FineWeb speedrun's validation set (the first
# 10,485,760 tokens of fineweb_val_000000.bin): a figure good to about 0.001, and a final evaluation that takes
# seconds on a GPU.
VAL_TOKENS = 10_485_760
POLL_S = 0.05  # how often a reader waiting for data looks for new shards


class PreparationStopped(Exception):
    """A preparation stopped by its owner before its end (data.Preparation.close): what it wrote is kept."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); delete {path.parent} and prepare again") from None


def write_shard(path: Path, arrays: list[np.ndarray]) -> None:
    """One llm.c token shard: a 256 x int32 header (magic, version, token count), then uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, sum(a.size for a in arrays)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype="<u2").data)


def shard_header(path: Path, fix: str) -> tuple[int, int]:
    """(file size, the token count its header promises) of a file whose header is a token shard's; DataError
    naming it otherwise, ending with `fix`."""
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror or e}); {fix}") from None
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path} is not a token shard (bad header magic); {fix}")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path} has shard version {header[1]}, expected {SHARD_VERSION}; {fix}")
    return size, int(header[2])


def check_shard(path: Path) -> int:
    """The token count of a shard whose header and length are right; DataError naming it otherwise."""
    fix = f"delete {path.parent} and prepare the data again"
    size, count = shard_header(path, fix)
    if size != HEADER_BYTES + 2 * count:
        raise DataError(f"{path} is truncated or corrupt: {size:,} bytes, its header promises "
                        f"{count:,} tokens ({HEADER_BYTES + 2 * count:,} bytes); {fix}")
    return count


def check_prefix(path: Path, tokens: int, fix: str) -> int:
    """`tokens`, where the shard's header is right and its file holds its first `tokens` tokens (the rest may be
    still arriving, or never be needed); DataError naming it otherwise."""
    size, count = shard_header(path, fix)
    if count < tokens or size < HEADER_BYTES + 2 * tokens:
        raise DataError(f"{path} is truncated or corrupt: {size:,} bytes, {count:,} tokens in its header, and "
                        f"{tokens:,} tokens listed as there; {fix}")
    return tokens


def check_tokens(path: Path, tokens: np.ndarray, first: int, vocabulary: int, fix: str) -> None:
    """DataError naming the file if a token id of `tokens` (its tokens from `first` on) is past the vocabulary:
    the model's embedding has no row for it."""
    if tokens.size and int(tokens.max()) >= vocabulary:
        at = int(np.argmax(tokens >= vocabulary))
        raise DataError(f"{path} holds token id {int(tokens[at]):,} (its token {first + at:,}), outside the "
                        f"vocabulary of {vocabulary:,}: the file is corrupt; {fix}")


@contextlib.contextmanager
def writing(folder: Path, stop: threading.Event | None = None, on_wait=None) -> Iterator[None]:
    """Inside: this process alone writes `folder` (its shards, progress.json, manifest.json). Meanwhile another
    process preparing the same folder waits here, its readers following what this one writes, and goes on
    from where this one got if it stops first; the kernel lets a killed process's lock go. on_wait() once if it
    waits; PreparationStopped if `stop` is set meanwhile."""
    from filelock import FileLock, Timeout  # a well-kept flock(2) wrapper, which huggingface_hub depends on
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".writing.lock")
    while True:
        try:
            lock.acquire(timeout=4 * POLL_S)
            break
        except Timeout:
            if stop is not None and stop.is_set():
                raise PreparationStopped from None
            if on_wait is not None:
                on_wait()
                on_wait = None
    try:
        yield
    finally:
        lock.release()


class TokenShards:
    """One split ("train" or "val") of a cache, its shards' headers checked on load and their token ids before a
    step reads them (on first use), memory-mapped on use, as prepare() writes it: whole once manifest.json exists,
    else growing as progress.json lists new shards, or more of its last one.

    A shard entry is a file name in the cache, or {"file": path relative to the cache, "tokens": n} for the first
    n tokens of a file elsewhere (the downloaded shards of fineweb.py, the last of which may still be arriving:
    a later listing gives it more tokens). `wait` blocks until the split holds enough tokens or is complete,
    raising what stopped the preparation (`failed`, when it runs in this process). `arriving`: the split is being
    written now, here or by another process, so that nothing yet is no error.
    """

    def __init__(self, cache_dir, split: str, *, failed=None, arriving: bool | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cache_dir, self.split, self.failed = Path(cache_dir), split, failed
        self.paths: list[Path] = []
        self.offsets = [0]
        self.complete = False  # no more shards will come
        self.chat = False  # conversations (chat.render), each starting with <|endoftext|>
        self._shared: list[bool] = []  # each shard: a file fineweb.py shares between runs (not this cache's own)
        self._maps: dict[int, np.ndarray] = {}
        self._checked: dict[int, int] = {}  # each shard: its tokens whose ids are checked
        self._lock = threading.Lock()  # reader threads refresh and map it side by side
        self.refresh()
        arriving = failed is not None if arriving is None else arriving  # being written: absent means not yet
        if not self.paths and not self.complete and not arriving and not self._progress_path().exists():
            raise DataError(f"no prepared data in {self.cache_dir} (manifest.json is missing); run python data.py")

    @property
    def num_tokens(self) -> int:
        """The split's tokens so far (all of them once complete)."""
        return self.offsets[-1]

    @property
    def vocabulary(self) -> int:
        """Token ids the split may hold: GPT-2's, and for conversations chat.py's turn tokens too."""
        return chat.VOCAB_SIZE if self.chat else chat.GPT2_VOCAB

    def _progress_path(self) -> Path:
        return self.cache_dir / "progress.json"

    def refresh(self) -> None:
        """Takes in the shards written since the last look."""
        with self._lock:
            if not self.complete:
                self._refresh()

    def _refresh(self) -> None:
        manifest = self.cache_dir / "manifest.json"
        if manifest.exists():
            record = read_json(manifest)
            entries, complete = record["splits"][self.split]["shards"], True
        elif self._progress_path().exists():
            record = read_json(self._progress_path())
            entries = record["shards"][self.split]
            complete = self.split == "val" and record.get("val_complete", False)
        else:
            return
        self.chat = bool(record.get("chat"))
        if self.paths and len(entries) >= len(self.paths):
            self._grow(entries[len(self.paths) - 1])
        for entry in entries[len(self.paths):]:
            shared = not isinstance(entry, str)
            path = self._path(entry)
            count = check_prefix(path, entry["tokens"], self._fix(path, True)) if shared else check_shard(path)
            self.paths.append(path)  # before its offset: a reader never looks past the last offset
            self._shared.append(shared)
            self.offsets.append(self.offsets[-1] + count)
        self.complete = complete  # last: a reader that sees it sees every shard

    def _grow(self, entry) -> None:
        """The last shard listed again, with more of its tokens there now (a download under way). A listing by
        another process that knows fewer of them changes nothing."""
        if isinstance(entry, str) or self._path(entry) != self.paths[-1]:
            return
        if entry["tokens"] > self.offsets[-1] - self.offsets[-2]:
            check_prefix(self.paths[-1], entry["tokens"], self._fix(self.paths[-1], True))
            self.offsets[-1] = self.offsets[-2] + entry["tokens"]

    def _path(self, entry) -> Path:
        """An entry's file: a name in the cache, or a path relative to it (normalised: it names the file in errors)."""
        return self.cache_dir / entry if isinstance(entry, str) else Path(os.path.normpath(self.cache_dir / entry["file"]))

    def _fix(self, path: Path, shared: bool) -> str:
        """What to do about a bad shard: a shared download is fetched again once deleted; this cache's own
        shards are prepared again with the whole cache."""
        return f"delete {path} and run the same command again" if shared else \
            f"delete {self.cache_dir} and prepare the data again"

    def check(self) -> None:
        """Every token id of the split so far checked now, rather than where a step first reads it."""
        for k in range(len(self.paths)):
            self._map(k)

    def wait(self, tokens: int | None = None, on_wait=None, stop: threading.Event | None = None) -> None:
        """Until the split holds `tokens` tokens (None: all of them) or is complete; on_wait(held) about once a
        second meanwhile. Raises the preparation's failure, or DataError if another process's preparation
        left progress.json unchanged for good (it cannot know: it waits)."""
        told = time.monotonic()
        while not self.complete and (tokens is None or self.num_tokens < tokens):
            error = self.failed() if self.failed else None
            if error is not None:
                raise error if isinstance(error, DataError) else DataError(
                    f"preparing the data failed: {type(error).__name__}: {first_line(error)}")
            if stop is not None and stop.is_set():
                return
            time.sleep(POLL_S)
            self.refresh()
            if on_wait is not None and time.monotonic() - told >= 1.0:
                on_wait(self.num_tokens)
                told = time.monotonic()

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split, as if its shards were one array (they must be there)."""
        out = np.empty(length, dtype=np.uint16)
        done, k = 0, bisect_right(self.offsets, start) - 1
        while done < length:
            local = start + done - self.offsets[k]
            piece = self._map(k)[local:local + length - done]
            out[done:done + len(piece)] = piece
            done, k = done + len(piece), k + 1
        return out

    def positions(self, token: int) -> np.ndarray:
        """Where `token` occurs in the split so far, in order (int64)."""
        found = [np.flatnonzero(self._map(k) == token) + self.offsets[k] for k in range(len(self.paths))]
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def _map(self, k: int) -> np.ndarray:
        """Shard k's tokens listed so far, their ids checked once (a shard listed again with more tokens is
        mapped again, and its new tokens checked)."""
        count = self.offsets[k + 1] - self.offsets[k]
        mapped = self._maps.get(k)
        if mapped is not None and len(mapped) >= count:
            return mapped
        with self._lock:
            checked = self._checked.get(k, 0)
            if checked < count:  # else another reader thread mapped it meanwhile
                mapped = np.memmap(self.paths[k], dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
                check_tokens(self.paths[k], mapped[checked:], checked, self.vocabulary,
                             self._fix(self.paths[k], self._shared[k]))
                self._checked[k], self._maps[k] = count, mapped
            return self._maps[k]
