"""How text becomes GPT-2 token shards, prepared behind the training.

`route` decides once where a run's shards come from: FineWeb's and FineWeb-Edu's sample-10BT arrive already in
GPT-2 tokens (fineweb.py); any other source (sources.py: local files, a Hub dataset, a mixture) is tokenized here.
`Preparation` runs it on a thread while training reads the shards as they appear (shards.TokenShards), validation's
first: the first documents of the source, --val_split of them up to shards.VAL_TOKENS (a source too small in
documents: the last share of each one's tokens). batches.py makes batches of the shards.

As a script, `python data.py [--dataset ...]` prepares all of it in the foreground and prints a one-line summary,
so the data can be ready before a GPU is rented.
"""
import atexit
import contextlib
import json
import math
import re
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import chat
import fineweb
from common import EOT, ArgumentParser, DataError, check_hub_reachable, clean_temporaries, write_json
from shards import (HEADER_BYTES, SHARD_MAGIC, SHARD_TOKENS, SHARD_VERSION, SPLITS, VAL_TOKENS, PreparationStopped,
                    TokenShards, read_json, write_shard, writing)
from sources import (HUB_PROBE_SECONDS, DataSpec, Source, add_data_args, characters, count_records, empty_source,
                     iter_records, read_ahead, resolve_source, unreachable)
from tokenizer import THREADS, TOKENIZER_ID, encode_documents, get_tokenizer

# torch is imported inside the functions that build tensors: importing it takes seconds, and
# `python data.py` (text to shards) never needs it.

FORMAT_VERSION = 1  # bump when what prepare() writes changes, so old caches are never reused
CHUNK_CHARS = 4_000_000  # text tokenized per call: about 1 M tokens, enough to keep every core busy

# The first training shard holds this many tokens, each next one twice as many up to SHARD_TOKENS, so training can
# begin on the first within a second or two of tokenizing, and 1 B tokens still make only 14 files.
FIRST_SHARD_TOKENS = 2**22


@dataclass
class _Progress:
    """How far a preparation got; saved after every flush, so a killed run resumes from there, and read by
    TokenShards while the data is still arriving."""
    records: int = 0  # source records consumed, empty ones included
    documents: int = 0  # non-empty documents taken
    replaced: int = 0  # documents whose invalid UTF-8 was replaced
    flushes: int = 0
    exhausted: bool = False  # the source ended before --sample_size documents
    val_complete: bool = False  # validation holds all its documents and its shard is written
    chat: bool = False  # the documents are conversations (TokenShards.chat)
    docs: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    shards: dict = field(default_factory=lambda: {s: [] for s in SPLITS})


@dataclass
class _Chunk:
    """Consecutive non-empty documents, tokenized in one call."""
    texts: list
    ends: list  # records consumed once each document is taken
    replaced: list
    records: int  # records consumed at the end of the chunk (empty ones after the last document too)
    exhausted: bool = False


@dataclass(frozen=True)
class Target:
    """What prepare() writes for a spec, and where: known before anything is read."""
    source: Source
    settings: dict  # everything that changes the prepared data; its hash names the directory
    cache_dir: Path

    @property
    def complete(self) -> bool:
        return (self.cache_dir / "manifest.json").exists()


def target_of(spec: DataSpec, *, source: Source | None = None, shard_tokens: int = SHARD_TOKENS,
              split_seed: int = 0) -> Target:
    """What prepare() writes for a spec and where (`source`: the spec's, resolved already)."""
    source = source or resolve_source(spec, split_seed)
    settings = {"format_version": FORMAT_VERSION, "source": source.identity(), "sample_size": spec.sample_size,
                "val_split": spec.val_split, "split_seed": split_seed, "tokenizer": TOKENIZER_ID,
                "shard_tokens": shard_tokens}
    documents = _few_documents(source, spec)
    if documents and splits_by_tokens(spec, documents):  # only then: the caches of others keep their names
        if source.chat:  # a conversation cut in two would train on half a reply
            raise DataError(f"--chat: {documents} conversation(s) are too few for --val_split {spec.val_split:g} to "
                            "hold whole ones out for validation and train on the rest: give more conversations"
                            + (f", or --val_split {1 / documents:.2g}" if documents > 1 else ""))
        settings["validation"] = LAST_TOKENS
    return Target(source, settings, Path(spec.data_cache) / _cache_name(source, spec, settings))


# A source with too few documents for --val_split of them to leave both splits some (a book, a dump in one file)
# holds out the last --val_split of each document's tokens instead, at most VAL_TOKENS in all (as nanoGPT's
# Shakespeare holds out its last tenth): its settings say so.
LAST_TOKENS = "the last share of each document's tokens"


def splits_by_tokens(spec: DataSpec, documents: int) -> bool:
    """Whether validation is the last --val_split of each document's tokens rather than whole documents: --val_split
    of `documents` rounds to none, or to all of them."""
    return not 0 < round(spec.val_split * documents) < documents


def _few_documents(source: Source, spec: DataSpec) -> int:
    """The documents a run reads, counted exactly only up to the count past which --val_split always holds whole
    documents out on both sides (a large source is not counted; a Hub dataset is not asked)."""
    v = spec.val_split
    limit = min(spec.sample_size, max(math.ceil(1 / v), math.floor(0.5 / (1 - v)) + 1))
    return min(limit, sum(count_records(part, limit) for part in source.parts or (source,)))


def validation_note(spec: DataSpec, route: "Route") -> str | None:
    """The line that says how a source too small in documents is split, or None (whole documents, or FineWeb's
    own validation shard)."""
    if route.target is None or route.target.settings.get("validation") != LAST_TOKENS:
        return None
    return (f"note: --dataset {spec.dataset} has too few documents for --val_split {spec.val_split:g} of them to "
            f"hold some out: validation is the last {spec.val_split:.0%} of each one's tokens "
            f"(at most {VAL_TOKENS:,} in all)")


@dataclass(frozen=True)
class Route:
    """Where a spec's data comes from and where it lands: FineWeb's shards already in GPT-2 tokens (fineweb.py),
    or text tokenized here. Decided once (a run's ranks share rank 0's decision), then prepared by `run`."""
    cache_dir: Path
    repo: fineweb.Repo | None = None  # the pre-tokenized shards, or None: tokenize
    note: str | None = None  # why the text is tokenized though a pre-tokenized copy exists
    files: dict | None = None  # the pre-tokenized repository's shards and their sizes, as the Hub listed them
    target: Target | None = None  # the text to tokenize (repo None), and where its shards go

    def run(self, spec: DataSpec, *, progress: bool = True, say=None, stop: threading.Event | None = None,
            **tokenizing) -> Path:
        """The data prepared, in this thread: by this process, or, where another of this machine is preparing the
        same cache directory, by that one (this one waits, and goes on where that one stops if it stops first)."""
        say = say or (print if progress else None)
        waiting = (lambda: say(f"another process of this machine is preparing {self.cache_dir}: reading what it "
                               "writes")) if say else None
        with writing(self.cache_dir, stop, waiting):
            if self.repo is not None:
                return fineweb.prepare(spec.data_cache, self.repo, spec.sample_size, say, stop, self.files)
            return tokenize(spec, target=self.target, progress=progress, say=say, stop=stop, **tokenizing)


def route_of(spec: DataSpec, *, probe: bool = True, source: Source | None = None, **tokenizing) -> Route:
    """The Route of `spec` (`source`: the spec's, resolved already; else it is resolved here). FineWeb's text with
    GPT-2's tokenizer comes pre-tokenized where the Hub holds it: asked once (probe: the repository's file list),
    unless a run already has it all; without probe (--plan) it is taken to be there. Offline, or with the Hub out
    of reach, DataError in one line naming --dataset PATH."""
    source = source or resolve_source(spec, tokenizing.get("split_seed", 0))
    repo = None if source.files is not None or source.parts else \
        fineweb.repo_for(source.name, source.subset, spec.text_field, spec.chat)
    if repo is None:
        target = target_of(spec, source=source, **tokenizing)
        return Route(target.cache_dir, target=target)
    folder = fineweb.run_folder(spec.data_cache, repo, spec.sample_size)
    if not probe or fineweb.complete(folder):
        return Route(folder, repo)
    try:
        check_hub_reachable(HUB_PROBE_SECONDS)
    except OSError as e:
        raise unreachable(source, e) from None
    files = fineweb.available(repo, spec.dataset)
    if files is not None:
        return Route(folder, repo, files=files)
    target = target_of(spec, source=source, **tokenizing)
    return Route(target.cache_dir, target=target,
                 note=f"note: {repo.repo_id} (FineWeb in GPT-2 tokens) is not on the Hub; streaming {spec.dataset} "
                      "and tokenizing it instead")


def prepare(spec: DataSpec, *, progress: bool = True, say=None, **tokenizing) -> Path:
    """The spec's data prepared in this thread (downloaded or tokenized, see Route); the cache directory."""
    route = route_of(spec, **tokenizing)
    if route.note and (say or progress):
        (say or print)(route.note)
    return route.run(spec, progress=progress, say=say, **tokenizing)


def tokenize(spec: DataSpec, *, target: Target | None = None, shard_tokens: int = SHARD_TOKENS, split_seed: int = 0,
             progress: bool = True, say=None, stop: threading.Event | None = None) -> Path:
    """Text to token shards, in this thread; returns the cache directory holding manifest.json and the shards.

    A complete cache made with the same settings is reused at once; an interrupted one resumes from its
    last flush; any setting that changes the result (see `target_of`) gives a different directory. Shards
    appear as they are written (TokenShards reads them while this goes on): validation's first, then
    training's. `progress` shows a bar and prints the summary line, or `say` gets it.
    """
    started, say = time.time(), say or (print if progress else None)
    if not 0 < shard_tokens < 2**31:
        raise ValueError(f"shard_tokens must be in [1, 2**31) (an int32 header field), got {shard_tokens}")
    target = target or target_of(spec, shard_tokens=shard_tokens, split_seed=split_seed)
    if target.complete:
        if say:
            tokens = sum(s["tokens"] for s in read_json(target.cache_dir / "manifest.json")["splits"].values())
            say(f"using the prepared data in {target.cache_dir} ({tokens:,} tokens)")
        return target.cache_dir
    documents = count_records(target.source, spec.sample_size)
    by_tokens = target.settings.get("validation") == LAST_TOKENS
    val_docs = documents if by_tokens else validation_documents(spec, documents)
    clean_temporaries(target.cache_dir)
    state = _load_progress(target.cache_dir)
    state.chat = target.source.chat
    _tokenize_source(target.source, spec, target.cache_dir, state, shard_tokens, val_docs, documents, progress, stop,
                     by_tokens)
    _check_split_sizes(spec, state)
    manifest = _manifest(target, spec, state, val_docs)
    write_json(target.cache_dir / "manifest.json", manifest)  # written last: it marks the cache complete
    (target.cache_dir / "progress.json").unlink(missing_ok=True)
    if say:
        say(_summary(manifest, target.cache_dir, time.time() - started))
    return target.cache_dir


def prepared(spec: DataSpec, **tokenizing) -> Path | None:
    """The cache directory prepare() would return, if it is complete already (nothing is downloaded or asked)."""
    cache_dir = route_of(spec, probe=False, **tokenizing).cache_dir
    return cache_dir if (cache_dir / "manifest.json").exists() else None


def validation_documents(spec: DataSpec, documents: int) -> int:
    """How many of the source's first documents validation holds (before VAL_TOKENS stops it): --val_split of
    the documents the run reads (a source too small for that holds out tokens: LAST_TOKENS); none is refused
    here, before anything is read."""
    if documents == 0:
        raise empty_source(spec, 0)
    held = round(spec.val_split * documents)
    if held == 0:
        raise DataError(f"--val_split {spec.val_split} of {documents:,} documents holds out none for validation: "
                        "use more documents (--sample_size) or a larger --val_split")
    return held


class Preparation:
    """A Route's preparation on a thread of its own, so that training begins on the first shards while the rest
    arrive (TokenShards waits where it needs more). `failed()` is what stopped it: a DataError, or any other
    exception (a bug), to be raised where training reads."""

    running: "weakref.WeakSet[Preparation]" = weakref.WeakSet()  # this process's: stop_all, underway

    def __init__(self, route: Route, spec: DataSpec, say=None, **tokenizing):
        self.cache_dir = route.cache_dir
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(route, spec, say, tokenizing), daemon=True,
                                        name="preparing data")
        self._thread.start()
        Preparation.running.add(self)
        atexit.register(self.close)  # whatever ends the process: an error in start-up, --plan, eval.py

    @classmethod
    def stop_all(cls) -> None:
        """Every preparation of this process asked to stop after the piece it is on (a signal: the process is
        leaving, and no download or tokenizing should begin meanwhile); close() still waits for each."""
        for preparation in list(cls.running):
            preparation._stop.set()

    def _run(self, route: Route, spec: DataSpec, say, tokenizing: dict) -> None:
        try:
            route.run(spec, progress=False, say=say, stop=self._stop, **tokenizing)
        except PreparationStopped:
            pass
        except BaseException as e:  # raised where training reads (TokenShards.wait)
            self._error = e

    def failed(self) -> BaseException | None:
        return self._error

    def close(self) -> None:
        """Stops it after the piece it is on (what it finished stays, for the next run to continue from), and
        waits for that: a thread inside a C++ library when the process exits can abort it."""
        self._stop.set()
        self._thread.join(timeout=30)
        atexit.unregister(self.close)

    def split(self, name: str) -> TokenShards:
        """One of the splits being prepared, as TokenShards reads it while it grows."""
        return TokenShards(self.cache_dir, name, failed=self.failed)


def preparations_underway() -> list[Path]:
    """The cache directories this process is preparing now (a Ctrl-C then says that the next run continues them)."""
    return [p.cache_dir for p in list(Preparation.running) if p._thread.is_alive() and p.failed() is None]


def validation_split(spec: DataSpec, *, prepare: bool = True, say=None) -> tuple[TokenShards, Preparation | None]:
    """The spec's validation split, complete, without waiting for training's: that one goes on arriving behind
    (prepare=False: another process of this machine prepares it); and the preparation, to close when done."""
    route = route_of(spec)
    if route.note and say:
        say(route.note)
    preparation = Preparation(route, spec, say=say) if prepare else None
    val = TokenShards(route.cache_dir, "val", failed=preparation.failed if preparation else None, arriving=True)
    val.wait()
    return val, preparation


def _cache_name(source: Source, spec: DataSpec, settings: dict) -> str:
    key = sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{Path(source.name).name}-{source.subset or ''}").strip("_.-")
    return f"{readable[:48]}-n{spec.sample_size}-{key}"


def _load_progress(cache_dir: Path) -> _Progress:
    path = cache_dir / "progress.json"
    return _Progress(**read_json(path)) if path.exists() else _Progress()


def _tokenize_source(source: Source, spec: DataSpec, cache_dir: Path, state: _Progress, shard_tokens: int,
                     val_docs: int, documents: int, show: bool, stop: threading.Event | None,
                     by_tokens: bool = False) -> None:
    """Reads (in a thread), tokenizes (on all cores) and writes shards, from where `state` says."""
    enc = get_tokenizer()
    writer = _ShardWriter(cache_dir, state, shard_tokens, val_docs, spec.val_split if by_tokens else None)
    # A chunk is at most about a quarter shard of tokens (~4 characters a token), so memory stays
    # bounded by the shard being filled; tiny test shards get tiny chunks.
    chunks = _chunks(iter_records(source, skip=state.records), state.records, state.documents,
                     spec.sample_size, chunk_chars=min(CHUNK_CHARS, shard_tokens))
    bar, started, tokens = None, time.time(), 0
    with contextlib.closing(read_ahead(chunks)) as prefetched, ThreadPoolExecutor(THREADS) as pool:
        for chunk in prefetched:
            if stop is not None and stop.is_set():
                writer.flush()  # what is tokenized is kept: the next run continues after it
                raise PreparationStopped
            # Shown from the first chunk on, so a source that fails at once prints its error alone.
            if bar is None:
                bar = tqdm(total=documents, initial=state.documents, unit="doc", unit_scale=True, desc="tokenizing",
                           disable=not show)
            flat, lengths = encode_documents(enc, pool, chunk.texts, source.chat)
            writer.add(chunk, flat, lengths)
            tokens += flat.size
            bar.set_postfix_str(f"{tokens / max(time.time() - started, 1e-6) / 1e6:.2f}M tok/s", refresh=False)
            bar.update(len(chunk.texts))
    if bar is not None:
        bar.close()
    writer.flush()


def _chunks(records, record: int, kept: int, sample_size: int, chunk_chars: int) -> Iterator[_Chunk]:
    """Groups non-empty documents into chunks of about chunk_chars, stopping at sample_size documents."""
    chunk, chars = _Chunk([], [], [], record), 0
    for text, replaced in records if kept < sample_size else ():
        record += 1
        size = characters(text)
        if not size:
            continue  # counted as skipped: records consumed minus documents taken
        chunk.texts.append(text)
        chunk.ends.append(record)
        chunk.replaced.append(replaced)
        kept, chars = kept + 1, chars + size
        if kept == sample_size:
            break
        if chars >= chunk_chars:
            chunk.records = record
            yield chunk
            chunk, chars = _Chunk([], [], [], record), 0
    else:
        chunk.exhausted = kept < sample_size
    chunk.records = record
    yield chunk


class _ShardWriter:
    """Collects each split's documents; a flush writes what each holds as a shard, then the progress.

    Validation takes the source's first documents, val_docs of them until they hold VAL_TOKENS; its shard is
    flushed the moment it is complete, so training can start. Training's shards grow from FIRST_SHARD_TOKENS
    to shard_tokens. Shards hold whole documents: a flush follows the document that completes validation or
    brings training's buffer to its shard's size, so shard boundaries depend only on the documents, never on
    how they were chunked, and a resumed run writes exactly the shards an uninterrupted one would.
    """

    def __init__(self, cache_dir: Path, state: _Progress, shard_tokens: int, val_docs: int,
                 val_share: float | None = None):
        """val_share: validation takes that share of each document's last tokens instead (LAST_TOKENS)."""
        self.cache_dir, self.state, self.shard_tokens, self.val_docs = cache_dir, state, shard_tokens, val_docs
        self.val_share = val_share
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)

    def add(self, chunk: _Chunk, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self.val_share is not None:
            return self._add_cut(chunk, tokens, lengths)
        state = self.state
        is_val = self._validation(lengths)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        start = 0
        while start < len(lengths):
            end, full = self._fill_point(lengths, is_val, start)
            self._take(tokens[offsets[start]:offsets[end]], lengths[start:end], is_val[start:end])
            state.records = chunk.ends[end - 1]
            state.documents += end - start
            state.replaced += sum(chunk.replaced[start:end])
            state.val_complete |= state.docs["val"] >= self.val_docs or state.tokens["val"] >= VAL_TOKENS
            if full:
                self.flush()
            start = end
        state.records, state.exhausted = chunk.records, chunk.exhausted

    def _validation(self, lengths: np.ndarray) -> np.ndarray:
        """Which of these documents, the next ones of the source, validation takes: while it holds fewer than
        val_docs documents and VAL_TOKENS tokens."""
        state = self.state
        if state.val_complete:
            return np.zeros(len(lengths), dtype=bool)
        before = state.tokens["val"] + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        return (np.arange(len(lengths)) < self.val_docs - state.docs["val"]) & (before < VAL_TOKENS)

    def _shard_size(self) -> int:
        return min(self.shard_tokens, FIRST_SHARD_TOKENS << min(len(self.state.shards["train"]), 30))

    def _fill_point(self, lengths: np.ndarray, is_val: np.ndarray, start: int) -> tuple[int, bool]:
        """The end of the documents that complete validation or fill a training shard (and True), or of the
        chunk (and False)."""
        lengths, is_val = lengths[start:], is_val[start:]
        train = self.buffered["train"] + np.cumsum(np.where(is_val, 0, lengths))
        val_docs = self.state.docs["val"] + np.cumsum(is_val)
        val_tokens = self.state.tokens["val"] + np.cumsum(np.where(is_val, lengths, 0))
        val_done = is_val & ((val_docs >= self.val_docs) | (val_tokens >= VAL_TOKENS))
        hits = np.flatnonzero((train >= self._shard_size()) | val_done)
        return (start + int(hits[0]) + 1, True) if hits.size else (start + len(lengths), False)

    def _add_cut(self, chunk: _Chunk, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Each document cut in two: its last val_share of tokens to validation (until it holds VAL_TOKENS), the
        rest to training. Flushed after the document that fills a training shard or validation, as `add` does."""
        state, start = self.state, 0
        for i, length in enumerate(lengths.tolist()):
            held = min(round(self.val_share * length), max(0, VAL_TOKENS - state.tokens["val"]))
            for split, part in (("train", tokens[start:start + length - held]),
                                ("val", tokens[start + length - held:start + length])):
                if part.size:
                    self.buffers[split].append(part)
                    self.buffered[split] += part.size
                    state.docs[split] += 1
                    state.tokens[split] += part.size
            start += length
            state.records, state.documents = chunk.ends[i], state.documents + 1
            state.replaced += chunk.replaced[i]
            filled = state.tokens["val"] >= VAL_TOKENS and not state.val_complete
            state.val_complete |= filled
            if filled or self.buffered["train"] >= self._shard_size():
                self.flush()
        state.records, state.exhausted = chunk.records, chunk.exhausted

    def _take(self, tokens: np.ndarray, lengths: np.ndarray, is_val: np.ndarray) -> None:
        token_is_val = np.repeat(is_val, lengths)
        for split, mask, docs in (("train", ~token_is_val, ~is_val), ("val", token_is_val, is_val)):
            part = tokens[mask]
            if part.size:
                self.buffers[split].append(part)
                self.buffered[split] += part.size
            self.state.docs[split] += int(docs.sum())
            self.state.tokens[split] += int(part.size)

    def flush(self) -> None:
        """Writes what is buffered, then the progress file that lets a killed run resume after it (and readers
        see the new shards)."""
        if not any(self.buffered.values()):
            return
        state = self.state
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                if self.buffered[split]:
                    name = f"{split}_{state.flushes:06d}.bin"
                    write_shard(self.cache_dir / name, self.buffers[split])
                    state.shards[split].append(name)
                self.buffers[split], self.buffered[split] = [], 0
            state.flushes += 1
            write_json(self.cache_dir / "progress.json", asdict(state))
        except OSError as e:  # a full disk, a read-only --data_cache
            raise DataError(f"cannot write to {self.cache_dir} ({e.strerror or e}); the finished shards are kept: "
                            "fix that and run the same command again to continue") from None


def _check_split_sizes(spec: DataSpec, state: _Progress) -> None:
    if state.documents == 0:
        raise empty_source(spec, state.records)
    for split, other in (("val", "train"), ("train", "val")):
        if state.docs[split] == 0:
            raise DataError(f"the {split} split is empty: {state.documents:,} documents with --val_split "
                            f"{spec.val_split} put every one in {other}; use more documents or change --val_split")


def _manifest(target: Target, spec: DataSpec, state: _Progress, val_docs: int) -> dict:
    source = target.source
    return {
        "format_version": FORMAT_VERSION,
        "cache_key": target.cache_dir.name,
        "source": {"dataset": spec.dataset, "subset": source.subset, "text_field": spec.field,
                   "local_files": None if source.files is None else len(source.files),
                   **({"mixture": [part.name for part in source.parts]} if source.parts else {})},
        "sample_size": spec.sample_size,
        "tokenizer": {"name": "gpt2", "id": TOKENIZER_ID, "eot": EOT, "n_vocab": 50257},
        "split": {"val_fraction": spec.val_split, "seed": target.settings["split_seed"], "val_documents": val_docs,
                  "rule": f"the last {spec.val_split:.0%} of each document's tokens, until they hold {VAL_TOKENS:,}"
                          if target.settings.get("validation") == LAST_TOKENS else
                          f"the source's first documents (local files in a seeded order), {val_docs:,} of them or "
                          f"until they hold {VAL_TOKENS:,} tokens"},
        "shard_format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_bytes": HEADER_BYTES,
                         "dtype": "uint16", "shard_tokens": target.settings["shard_tokens"]},
        "records_read": state.records,
        "documents": state.documents,
        "source_exhausted": state.exhausted,
        "skipped": {"empty or whitespace-only": state.records - state.documents},
        "invalid_utf8_replaced": state.replaced,
        "splits": {s: {"documents": state.docs[s], "tokens": state.tokens[s], "shards": state.shards[s]}
                   for s in SPLITS},
        # Conversations, each <|endoftext|> and its turns (chat.render); TokenShards reads this key.
        **({"chat": {"format": chat.FORMAT, "tokens": chat.SPECIAL_TOKENS}} if source.chat else {}),
    }


def _summary(manifest: dict, cache_dir: Path, seconds: float) -> str:
    splits = manifest["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    shards = sum(len(s["shards"]) for s in splits.values())
    size = sum((cache_dir / name).stat().st_size for s in splits.values() for name in s["shards"])
    line = (f"prepared {manifest['documents']:,} documents ({splits['train']['documents']:,} train, "
            f"{splits['val']['documents']:,} val), {tokens:,} tokens, {shards} shards, {size / 1e6:,.1f} MB "
            f"in {seconds:.1f} s; skipped {manifest['skipped']['empty or whitespace-only']:,} documents "
            f"(empty or whitespace-only); invalid UTF-8 replaced in {manifest['invalid_utf8_replaced']:,} documents")
    if manifest["source_exhausted"]:
        line += f"; the source has only {manifest['documents']:,} documents (--sample_size {manifest['sample_size']:,})"
    return f"{line} -> {cache_dir}"


# ----------------------------------------------------------------------------- the script

def main(argv=None) -> None:
    parser = ArgumentParser(description="Prepare GPT-2 token shards from a Hub dataset or local text.")
    add_data_args(parser)
    args = parser.parse_args(argv)
    try:
        prepare(DataSpec.from_args(args))
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the finished shards are kept; run the same command again to continue")


if __name__ == "__main__":
    main()
