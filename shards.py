"""Token shards on disk: llm.c's format (a 256 x int32 header: magic, version, token count; then uint16 tokens),
and reading a split's shards, whole or while they are still being written.

data.py writes shards (tokenizing text), fineweb.py downloads them (FineWeb already tokenized); both describe a
split in the cache directory's progress.json as it grows and in manifest.json once complete, and TokenShards
reads either.
"""
import json
import threading
import time
from bisect import bisect_right
from pathlib import Path

import numpy as np

from common import UserError, atomic_write, first_line

SHARD_MAGIC = 20240520  # llm.c's magic number and version for uint16 token shards
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "val")
# Validation holds at most this many tokens, the size of the FineWeb speedrun's validation set (the first
# 10,485,760 tokens of fineweb_val_000000.bin): a figure good to about 0.001, and a final evaluation that takes
# seconds on a GPU.
VAL_TOKENS = 10_485_760
POLL_S = 0.05  # how often a reader waiting for data looks for new shards


class DataError(UserError):
    """A problem with the data the user can fix (a path, a flag, the network)."""


class Stopped(Exception):
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


def check_shard(path: Path) -> int:
    """The token count of a shard whose header and length are right; DataError naming it otherwise."""
    fix = f"delete {path.parent} and prepare the data again"
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"cannot read shard {path} ({e.strerror or e}); {fix}") from None
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path} is not a token shard (bad header magic); {fix}")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path} has shard version {header[1]}, expected {SHARD_VERSION}; {fix}")
    expected = HEADER_BYTES + 2 * int(header[2])
    if size != expected:
        raise DataError(f"{path} is truncated or corrupt: {size:,} bytes, its header promises "
                        f"{int(header[2]):,} tokens ({expected:,} bytes); {fix}")
    return int(header[2])


class TokenShards:
    """One split ("train" or "val") of a cache, its shards' headers checked on load, memory-mapped on use, as
    prepare() writes it: whole once manifest.json exists, else growing as progress.json lists new shards.

    A shard entry is a file name in the cache, or {"file": path relative to the cache, "tokens": n} for the first
    n tokens of a file elsewhere (the downloaded shards of fineweb.py). `wait` blocks until the split holds
    enough tokens or is complete, raising what stopped the preparation (`failed`, when it runs in this process).
    `arriving`: the split is being written now, here or by another process, so that nothing yet is no error.
    """

    def __init__(self, cache_dir, split: str, *, failed=None, arriving: bool | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cache_dir, self.split, self.failed = Path(cache_dir), split, failed
        self.paths: list[Path] = []
        self.offsets = [0]
        self.complete = False  # no more shards will come
        self.chat = False  # conversations (chat.render), each starting with <|endoftext|>
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # reader threads refresh it side by side
        self.refresh()
        arriving = failed is not None if arriving is None else arriving  # being written: absent means not yet
        if not self.paths and not self.complete and not arriving and not self._progress_path().exists():
            raise DataError(f"no prepared data in {self.cache_dir} (manifest.json is missing); run python data.py")

    @property
    def num_tokens(self) -> int:
        """The split's tokens so far (all of them once complete)."""
        return self.offsets[-1]

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
        for entry in entries[len(self.paths):]:
            name, take = (entry, None) if isinstance(entry, str) else (entry["file"], entry["tokens"])
            path = self.cache_dir / name
            count = check_shard(path)
            self.paths.append(path)  # before its offset: a reader never looks past the last offset
            self.offsets.append(self.offsets[-1] + (count if take is None else min(take, count)))
        self.complete = complete  # last: a reader that sees it sees every shard

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
        if k not in self._maps:
            count = self.offsets[k + 1] - self.offsets[k]
            self._maps[k] = np.memmap(self.paths[k], dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
        return self._maps[k]
