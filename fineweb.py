"""FineWeb already in GPT-2 tokens, fetched from the Hugging Face Hub instead of streamed and tokenized.

llm.c's dev/data/fineweb.py tokenized FineWeb's sample-10BT into shards of 100 M tokens in llm.c's layout (this
repository's own: shards.py), an <|endoftext|> before each document, the first shard held out for validation;
kjj0/fineweb10B-gpt2 holds them (`fineweb_val_000000.bin`, then `fineweb_train_000001.bin` ... `000103.bin`), and
the FineWeb speedrun (modded-nanogpt) downloads them with huggingface_hub. Its record, validation loss 3.28, is
measured on the first 10,485,760 tokens of the validation shard: a run here measures the same tokens.

Which shards there are, the repository's own file list says (one request): a request that fails is never the end
of the data. A run fetches the validation shard's first VAL_TOKENS tokens and, in order, as much of the training
shards as holds its --sample_size documents (counted by their opening <|endoftext|>), into one folder under
--data_cache that every run shares (download.py: each byte fetched once, readable as it arrives). The run's own
folder lists what it reads of them, in progress.json as the bytes arrive, the last training shard growing, so the
first step waits only for the bytes it reads; then in manifest.json. Nothing is tokenized.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

from common import EOT, DataError, first_line, local_data_hint, network_errors, write_json
from download import Download, retrying
from shards import HEADER_BYTES, SHARD_TOKENS, VAL_TOKENS, PreparationStopped, read_json, shard_header

POLL_S = 0.05  # how often the preparation looks at its downloads
LIST_EVERY_S = 0.5  # progress.json rewritten at most this often while a shard arrives (each write syncs the disk)


@dataclass(frozen=True)
class Repo:
    """A Hub dataset of pre-tokenized shards: `{prefix}_val_000000.bin`, then `{prefix}_train_000001.bin`, ..."""
    repo_id: str
    prefix: str

    def file(self, split: str, index: int) -> str:
        return f"{self.prefix}_{split}_{index:06d}.bin"

    @property
    def folder(self) -> str:
        """Where its shards are kept under --data_cache."""
        return self.repo_id.replace("/", "--")


# (--dataset, --subset) -> the same documents in GPT-2 tokens (FineWeb-Edu's from the same author, same layout).
PRETOKENIZED = {("HuggingFaceFW/fineweb", "sample-10BT"): Repo("kjj0/fineweb10B-gpt2", "fineweb"),
                ("HuggingFaceFW/fineweb-edu", "sample-10BT"): Repo("kjj0/finewebedu10B-gpt2", "finewebedu")}


def repo_for(dataset: str, subset: str | None, text_field: str | None, chat: bool) -> Repo | None:
    """The pre-tokenized repository holding this text, if any (its text field and plain text, not conversations)."""
    if chat or text_field not in (None, "text"):
        return None
    return PRETOKENIZED.get((dataset, subset))


def run_folder(data_cache: str, repo: Repo, sample_size: int) -> Path:
    """A run's folder: which tokens of the shared shards its splits are (progress.json, then manifest.json)."""
    key = sha256(f"{repo.repo_id}:{repo.prefix}:{sample_size}:{VAL_TOKENS}".encode()).hexdigest()[:16]
    return Path(data_cache) / f"{repo.folder}-n{sample_size}-{key}"


def complete(folder: Path) -> bool:
    """Whether a run's folder is complete: its manifest.json, and every token it lists still on disk. A manifest
    listing tokens deleted since (a corrupt shard removed, as its error says) is removed: they are fetched again."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return False
    entries = [entry for split in read_json(manifest)["splits"].values() for entry in split["shards"]]
    if all(_holds(folder / entry["file"], entry["tokens"]) for entry in entries):
        return True
    manifest.unlink(missing_ok=True)
    return False


def _holds(path: Path, tokens: int) -> bool:
    try:
        return path.stat().st_size >= HEADER_BYTES + 2 * tokens
    except OSError:
        return False


def listing(repo: Repo) -> dict[str, int]:
    """The repository's shards and their sizes in bytes, as the Hub lists its files (one request)."""
    from huggingface_hub import HfApi
    return {f.path: f.size for f in HfApi().list_repo_tree(repo.repo_id, repo_type="dataset")
            if f.path.startswith(f"{repo.prefix}_") and f.path.endswith(".bin") and getattr(f, "size", None)}


def available(repo: Repo, dataset: str) -> dict[str, int] | None:
    """The repository's shards (`listing`), where the Hub holds it and its validation shard; None when it answers
    that it does not (the caller then streams and tokenizes `dataset` instead); DataError when it cannot be asked,
    the request tried again as a download's would be."""
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        files = retrying(lambda: listing(repo), f"listing the files of {repo.repo_id}", threading.Event())
    except RepositoryNotFoundError:
        return None
    except (DataError, *network_errors()) as e:
        raise DataError(f"cannot reach the Hugging Face Hub for dataset {dataset!r} (its GPT-2 tokens, "
                        f"{repo.repo_id}: {first_line(e)}); run the same command again once it answers, or "
                        f"{local_data_hint()}") from None
    return files if repo.file("val", 0) in files else None


def prepare(data_cache: str, repo: Repo, sample_size: int, say=None, stop: threading.Event | None = None,
            files: dict[str, int] | None = None) -> Path:
    """The validation shard's first VAL_TOKENS tokens and as much of the training shards as holds sample_size
    documents, listed in the run's folder as they arrive; manifest.json written once all are there. `files`: the
    repository's `listing`, when asked already. `stop`, an Event: set, it stops between two pieces of a download
    (PreparationStopped); what was downloaded is kept, for the next run to go on from."""
    folder = run_folder(data_cache, repo, sample_size)
    if complete(folder):
        return folder
    started, shared = time.time(), Path(data_cache) / repo.folder
    shared.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(shared / ".cache", ignore_errors=True)  # hf_hub_download's leftovers, from before download.py
    files = files if files is not None else available(repo, repo.repo_id)
    if files is None:
        raise DataError(f"{repo.repo_id} is not on the Hugging Face Hub, or lists no {repo.file('val', 0)}")
    fetching = _Fetching(repo, shared, files, _Training(folder, sample_size))
    try:
        fetching.run(folder, stop or threading.Event())
    finally:
        fetching.cancel()
    manifest = fetching.manifest(sample_size)
    write_json(folder / "manifest.json", manifest)  # last: it marks the folder complete
    (folder / "progress.json").unlink(missing_ok=True)
    if say:
        say(fetching.summary(manifest, time.time() - started, folder))
    return folder


class _Training:
    """The training split as shards arrive: each shard's tokens as they come, the split ending right before
    document sample_size + 1 opens, or with the last shard the repository lists."""

    def __init__(self, folder: Path, sample_size: int):
        self.folder, self.sample_size = folder, sample_size
        self.entries: list[dict] = []
        self.documents, self.per_shard = 0, 0
        self.done = self.exhausted = False
        self._path: Path | None = None  # the shard being taken in: its token count, tokens taken, documents opened
        self._count = self._taken = self._opened = 0

    def entry(self, path: Path, tokens: int) -> dict:
        return {"file": os.path.relpath(path, self.folder), "tokens": int(tokens)}

    def take(self, download: Download, size: int) -> bool:
        """Takes in the tokens of the download that arrived since the last look (`size`: its file's bytes, as the
        Hub lists them); whether there were any."""
        path, length = download.path, download.length
        if path != self._path:
            if length < HEADER_BYTES:
                return False
            self._path, self._count, self._taken, self._opened = path, _token_count(path, size), 0, 0
        there = min(self._count, (length - HEADER_BYTES) // 2)
        if there <= self._taken:
            return False
        new = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES + 2 * self._taken, shape=(there - self._taken,))
        starts = np.flatnonzero(new == EOT)
        wanted = self.sample_size - self.documents
        if len(starts) > wanted:  # document sample_size + 1 opens here: the split ends before it
            there, self.done = self._taken + int(starts[wanted]), True
        self.documents += min(wanted, len(starts))
        self._opened += min(wanted, len(starts))
        self.per_shard = max(self.per_shard, self._opened)
        # The last document wanted runs to the end of the shard (a document crossing into the next is cut there).
        self.done |= self.documents == self.sample_size and there == self._count
        if there > self._taken and self._taken == 0:
            self.entries.append(self.entry(path, there))
        elif there > self._taken:
            self.entries[-1]["tokens"] = there
        self._taken = there
        return True

    def took_all(self, path: Path) -> bool:
        """Whether every token of the shard at `path` is taken in."""
        return path == self._path and self._taken == self._count

    def shards_ahead(self) -> int:
        """Downloads worth having under way: two where the documents still wanted surely need two more shards
        (known once a shard is in: before, a second would share the link with the first step's bytes)."""
        return 2 if self.per_shard and self.sample_size - self.documents > 1.5 * self.per_shard else 1


def _token_count(path: Path, size: int) -> int:
    """The token count in a downloaded shard's header, which must account for all of the file as the Hub lists it."""
    fix = f"delete {path} and run the same command again"
    _, count = shard_header(path, fix)
    if HEADER_BYTES + 2 * count != size:
        raise DataError(f"{path}'s header promises {count:,} tokens ({HEADER_BYTES + 2 * count:,} bytes), but the "
                        f"Hub lists {size:,} bytes for it; {fix}")
    return count


class _Fetching:
    """The downloads of one run's data: validation's first (start-up waits for all of it, on a link it would
    otherwise share), then the training shards in order, one ahead of the shard being read where the documents
    still wanted surely need it; what has arrived listed in progress.json."""

    def __init__(self, repo: Repo, shared: Path, files: dict[str, int], training: _Training):
        self.repo, self.shared, self.files, self.training = repo, shared, files, training
        self.names = sorted(name for name in files if name.startswith(f"{repo.prefix}_train_"))
        if not self.names:
            raise DataError(f"{repo.repo_id} lists no training shard ({repo.file('train', 1)}, ...)")
        val = repo.file("val", 0)
        self.val = Download(repo.repo_id, val, shared, min(files[val], HEADER_BYTES + 2 * VAL_TOKENS))
        self.downloads: list[Download] = []
        self.next = 0  # the index in `names` of the next shard to download
        self.listed: dict[str, list] = {"train": training.entries, "val": []}

    def _download(self, index: int) -> Download:
        name = self.names[index]
        return Download(self.repo.repo_id, name, self.shared, self.files[name])

    def run(self, folder: Path, stop: threading.Event) -> None:
        """Until validation and the training split are all there, listing them in progress.json as they arrive:
        at once where a reader may be waiting for a whole split or shard, else at most every LIST_EVERY_S."""
        listed_at, unlisted = 0.0, False
        while not (self.training.done and self.listed["val"]):
            self._raise_failure()
            if stop.is_set():
                raise PreparationStopped
            validation = self._take_validation()
            unlisted |= self._take_training()
            moved = self._next_shard()
            if validation or (unlisted and (moved or self.training.done or
                                            time.monotonic() - listed_at >= LIST_EVERY_S)):
                _list(folder, self.listed)
                listed_at, unlisted = time.monotonic(), False
            if not moved:
                time.sleep(POLL_S)

    def _raise_failure(self) -> None:
        for download in (self.val, *self.downloads):
            if download.error is not None:
                raise download.error

    def _take_validation(self) -> bool:
        if self.listed["val"] or self.val.length < self.val.want:
            return False
        count = _token_count(self.val.path, self.files[self.val.filename])
        self.listed["val"] = [self.training.entry(self.val.path, min(VAL_TOKENS, count))]
        return True

    def _take_training(self) -> bool:
        if self.training.done or not self.downloads:
            return False
        download = self.downloads[0]
        return self.training.take(download, self.files[download.filename])

    def _next_shard(self) -> bool:
        """Past the shard being read once all of it is taken in: the next downloads begun, or, at the end of the
        repository's list, the split complete (all of it); whether it moved on."""
        if not self.downloads:  # the first, once validation is all there
            return bool(self.listed["val"]) and self._more()
        if self.training.done or not self.training.took_all(self.downloads[0].path):
            return False
        if len(self.downloads) == 1 and self.next == len(self.names):
            self.training.done = self.training.exhausted = True
            return True
        self.downloads.pop(0)
        return self._more()

    def _more(self) -> bool:
        """The next training shards begun, as many as worth having under way."""
        while len(self.downloads) < self.training.shards_ahead() and self.next < len(self.names):
            self.downloads.append(self._download(self.next))
            self.next += 1
        return True

    def cancel(self) -> None:
        """Downloads no longer wanted stopped: what they wrote stays, for a run that wants more."""
        for download in (self.val, *self.downloads):
            download.cancel()

    def manifest(self, sample_size: int) -> dict:
        return {"source": {"pretokenized": self.repo.repo_id, "files": self.repo.prefix}, "sample_size": sample_size,
                "documents": self.training.documents, "source_exhausted": self.training.exhausted,
                "split": {"val": f"the first {VAL_TOKENS:,} tokens of {self.repo.file('val', 0)}, as the FineWeb "
                                 "speedrun measures its validation loss"},
                "splits": {split: {"shards": entries, "tokens": sum(e["tokens"] for e in entries)}
                           for split, entries in self.listed.items()}}

    def summary(self, manifest: dict, seconds: float, folder: Path) -> str:
        t, splits = self.training, manifest["splits"]
        exhausted = f"; {self.repo.repo_id} holds only {t.documents:,} (its file list ends with {self.names[-1]})" \
            if t.exhausted else ""
        return (f"fetched {t.documents:,} documents ({splits['train']['tokens']:,} training tokens in "
                f"{len(t.entries)} shards) and {splits['val']['tokens']:,} validation tokens of {self.repo.repo_id} "
                f"in {seconds:.1f} s{exhausted} -> {folder}")


def _list(folder: Path, listed: dict) -> None:
    """progress.json: the splits so far, for TokenShards (validation is whole from the first listing)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "progress.json", {"shards": listed, "val_complete": bool(listed["val"])})


SHARD_BYTES = 2 * SHARD_TOKENS + HEADER_BYTES


def shards_for(tokens: float) -> int:
    """Training shards that hold about `tokens` tokens."""
    return max(1, -(-int(tokens) // SHARD_TOKENS))


def disk_bytes(tokens: float) -> int:
    """The most a run of about `tokens` training tokens fetches: whole shards (its last one is fetched only as far
    as its documents go, unless another run wants more), and validation's first VAL_TOKENS."""
    return shards_for(tokens) * SHARD_BYTES + HEADER_BYTES + 2 * VAL_TOKENS


def describe(repo: Repo, sample_size: int, tokens_per_document: float) -> str:
    """What a run will fetch, for --plan: the shards that hold sample_size documents, at an estimate."""
    return (f"{repo.repo_id}, already in GPT-2 tokens: about {shards_for(sample_size * tokens_per_document):,} "
            f"training shard(s) of 100 M tokens (200 MB each) for {sample_size:,} documents, and the first "
            f"{2 * VAL_TOKENS / 1e6:.0f} MB of the validation shard; training starts once those {2 * VAL_TOKENS / 1e6:.0f} "
            "MB and the first block of the first training shard are in")
