"""FineWeb already in GPT-2 tokens, fetched from the Hugging Face Hub instead of streamed and tokenized.

llm.c's dev/data/fineweb.py tokenized FineWeb's sample-10BT into shards of 100 M tokens in llm.c's layout (this
repository's own: shards.py), an <|endoftext|> before each document, the first shard held out for validation;
kjj0/fineweb10B-gpt2 holds them (`fineweb_val_000000.bin`, then `fineweb_train_000001.bin` ... `000103.bin`), and
the FineWeb speedrun (modded-nanogpt) downloads them with huggingface_hub. Its record, validation loss 3.28, is
measured on the first 10,485,760 tokens of the validation shard: a run here measures the same tokens.

A run downloads the validation shard and as many training shards as hold its --sample_size documents (counted
by their opening <|endoftext|>), in order, and lists each in progress.json as it lands, so training begins after
the first two. The shards go to one folder under --data_cache, shared by every run; a run's own folder lists
what it reads of them. Nothing is tokenized.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

from common import EOT, first_line, local_data_hint, write_json
from shards import HEADER_BYTES, SHARD_TOKENS, VAL_TOKENS, DataError, Stopped, check_shard

RETRIES = 3  # a shard's download tried again after a network error (huggingface_hub resumes it), 5, 10 and 20 s apart


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


def available(repo: Repo, dataset: str) -> bool:
    """Whether the Hub holds the repository's validation shard: False when it answers that it does not (the
    caller then streams and tokenizes `dataset` instead); DataError when it cannot be asked."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
    try:
        get_hf_file_metadata(hf_hub_url(repo.repo_id, repo.file("val", 0), repo_type="dataset"))
        return True
    except (RepositoryNotFoundError, EntryNotFoundError):
        return False
    except (HfHubHTTPError, OSError) as e:
        raise DataError(f"cannot reach the Hugging Face Hub for dataset {dataset!r} (its GPT-2 tokens, "
                        f"{repo.repo_id}: {first_line(e)}); {local_data_hint()}") from None


def prepare(data_cache: str, repo: Repo, sample_size: int, say=None, stop=None) -> Path:
    """The validation shard and the training shards that hold sample_size documents, downloaded in order (two at
    a time where more are surely needed); the run's folder, its manifest.json written once all are there. `stop`,
    an Event: set, it stops between shards (data.Stopped)."""
    folder = run_folder(data_cache, repo, sample_size)
    if (folder / "manifest.json").exists():
        return folder
    started, shared = time.time(), Path(data_cache) / repo.folder
    _quiet_progress_bars()
    val = _Fetch(repo, repo.file("val", 0), shared)
    listed = {"train": [], "val": []}
    reached = _Training(folder, sample_size)
    upcoming = [_Fetch(repo, repo.file("train", 1), shared)]  # with the validation shard: the first step needs both
    val_path = val.result()
    listed["val"] = [reached.entry(val_path, min(VAL_TOKENS, check_shard(val_path)))]
    _list(folder, listed)
    index = 1
    while not reached.done:
        if stop is not None and stop.is_set():  # what is downloaded stays: the next run takes it from there
            raise Stopped
        path = upcoming.pop(0).result()
        if path is None:  # no such shard: the repository holds fewer documents than asked for
            reached.exhausted = True
            break
        reached.take(path)
        listed["train"] = reached.entries
        _list(folder, listed)
        index += 1
        if not reached.done:
            upcoming += [_Fetch(repo, repo.file("train", i), shared)
                         for i in range(index + len(upcoming), index + reached.shards_ahead())]
    if not reached.entries:
        raise DataError(f"{repo.repo_id} holds no training shard ({repo.file('train', 1)})")
    manifest = {"source": {"pretokenized": repo.repo_id, "files": repo.prefix}, "sample_size": sample_size,
                "documents": reached.documents, "source_exhausted": reached.exhausted,
                "split": {"val": f"the first {VAL_TOKENS:,} tokens of {repo.file('val', 0)}, as the FineWeb "
                                 "speedrun measures its validation loss"},
                "splits": {split: {"shards": entries, "tokens": sum(e["tokens"] for e in entries)}
                           for split, entries in listed.items()}}
    write_json(folder / "manifest.json", manifest)  # last: it marks the folder complete
    (folder / "progress.json").unlink(missing_ok=True)
    if say:
        exhausted = f"; {repo.repo_id} holds only {reached.documents:,}" if reached.exhausted else ""
        say(f"fetched {reached.documents:,} documents ({manifest['splits']['train']['tokens']:,} training tokens in "
            f"{len(reached.entries)} shards) and {manifest['splits']['val']['tokens']:,} validation tokens of "
            f"{repo.repo_id} in {time.time() - started:.1f} s{exhausted} -> {folder}")
    return folder


class _Training:
    """The training split as shards arrive: each shard whole, the last one cut before document sample_size + 1."""

    def __init__(self, folder: Path, sample_size: int):
        self.folder, self.sample_size = folder, sample_size
        self.entries: list[dict] = []
        self.documents, self.per_shard = 0, 0
        self.done = self.exhausted = False

    def entry(self, path: Path, tokens: int) -> dict:
        return {"file": os.path.relpath(path, self.folder), "tokens": int(tokens)}

    def take(self, path: Path) -> None:
        count = check_shard(path)
        starts = np.flatnonzero(np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,)) == EOT)
        wanted = self.sample_size - self.documents
        if len(starts) > wanted:  # document sample_size + 1 opens in this shard: the split ends before it
            count, self.done = int(starts[wanted]), True
        self.documents += min(wanted, len(starts))
        self.done |= self.documents == self.sample_size
        self.per_shard = max(self.per_shard, len(starts))
        if count:
            self.entries.append(self.entry(path, count))

    def shards_ahead(self) -> int:
        """Downloads worth having under way: two where the documents still wanted surely need two more shards."""
        return 2 if self.sample_size - self.documents > 1.5 * self.per_shard else 1


class _Fetch:
    """One shard downloading on a thread of its own (a daemon: an error elsewhere never waits for it)."""

    def __init__(self, repo: Repo, filename: str, folder: Path):
        self.repo, self.filename, self.folder = repo, filename, folder
        self._path: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"downloading {filename}")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._path = self._download()
        except BaseException as e:  # raised by result()
            self._error = e

    def _download(self) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
        path = self.folder / self.filename
        if _whole(path):  # downloaded by an earlier run: nothing to ask the Hub
            return path
        for attempt in range(RETRIES + 1):
            try:
                return Path(hf_hub_download(self.repo.repo_id, self.filename, repo_type="dataset",
                                            local_dir=self.folder))
            except EntryNotFoundError:
                return None
            except (HfHubHTTPError, OSError) as e:
                if attempt == RETRIES:
                    raise DataError(f"downloading {self.filename} of {self.repo.repo_id} failed ({first_line(e)}); "
                                    "what was downloaded is kept: run the same command again to continue") from None
                time.sleep(5 * 2 ** attempt)

    def result(self) -> Path | None:
        """The shard's path once downloaded; None if the repository has no such file."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._path


def _whole(path: Path) -> bool:
    try:
        check_shard(path)
        return True
    except DataError:
        return False


def _list(folder: Path, listed: dict) -> None:
    """progress.json: the splits so far, for TokenShards (validation is whole from the first listing)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "progress.json", {"shards": listed, "val_complete": bool(listed["val"])})


def _quiet_progress_bars() -> None:
    """huggingface_hub's own bars would interleave with the training's."""
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()


SHARD_BYTES = 2 * SHARD_TOKENS + HEADER_BYTES


def shards_for(tokens: float) -> int:
    """Training shards that hold about `tokens` tokens."""
    return max(1, -(-int(tokens) // SHARD_TOKENS))


def describe(repo: Repo, sample_size: int, tokens_per_document: float) -> str:
    """What a run will fetch, for --plan: the shards that hold sample_size documents, at an estimate."""
    return (f"{repo.repo_id}, already in GPT-2 tokens: about {shards_for(sample_size * tokens_per_document):,} "
            f"training shard(s) of 100 M tokens (200 MB each) for {sample_size:,} documents, and the validation "
            "shard; training starts once the validation shard and the first training shard are in")
