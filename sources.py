"""Where text comes from: the data flags (DataSpec), and the documents of a source, one after another: local files
(a file, directory or glob of .txt, one document a file, or .jsonl/.json/.parquet records), a Hugging Face Hub
dataset streamed with `datasets` (only about --sample_size documents are fetched), or several of them, separated by
commas, as one mixture whose documents are spread in proportion to each source's size (`mixed`). With --chat the
records are conversations (lists of messages), rendered by chat.py. data.py turns the documents into token shards.
"""
import argparse
import codecs
import functools
import heapq
import itertools
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np

import chat
from common import (DataError, check_hub_reachable, first_line, local_data_hint, network_errors, open_fraction,
                    positive_int)
from shards import VAL_TOKENS

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HUB_PROBE_SECONDS = 10.0  # huggingface_hub alone retries ~24 s before giving up; users should wait less
NET_RETRIES = 5  # re-opening the stream after a mid-download error, waiting 2, 4, 8, 16, 32 s


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
        raise unreachable(source, e) from None
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
                raise unreachable(source, e) from None
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


def unreachable(source: Source, error: BaseException) -> DataError:
    """The Hub is out of reach: one line naming the source (a mixture: each of its Hub datasets), and the way on."""
    names = [part.name for part in source.parts if part.files is None] if source.parts else [source.name]
    quoted = ", ".join(map(repr, names))
    several = len(names) > 1
    return DataError(f"cannot reach the Hugging Face Hub for dataset{'s' * several} {quoted} ({first_line(error)}); "
                     f"no local path{'s' * several} {quoted} exist{'s' * (not several)} either; "
                     f"{local_data_hint(source.chat)}")


def empty_source(spec: DataSpec, records: int) -> DataError:
    """The one line for a source with no text in it: what it holds instead."""
    what = "no records" if records == 0 else \
        f"{records:,} .txt file(s), all empty or whitespace" if all_text_files(spec) else \
        f"{records:,} record(s), none with text in field {spec.field!r} (--text_field chooses another)"
    return DataError(f"--dataset {spec.dataset} is empty ({what}): point it at text to train on")


def checked_source(spec: DataSpec) -> Source:
    """The spec's source, resolved; a local one that is not there or holds no text refused in one line before any
    data work (--plan and the run alike, so they give the same answer); a Hub dataset is asked only when it is
    prepared. Reads only up to the first record with text."""
    source = resolve_source(spec)  # a path that is not there: DataError
    parts = source.parts or (source,)
    if any(part.files is None or _has_text(part) for part in parts):
        return source
    raise empty_source(spec, sum(count_records(part, 2**62) for part in parts))


def _has_text(source: Source) -> bool:
    """Whether a local source holds a non-empty document; a .txt file is read only up to its first character that
    is not whitespace (a book or a dump need not be read whole to know)."""
    for path in source.files:
        if not path.lower().endswith(".txt"):
            records = iter_records(replace(source, files=(path,)))
            if any(characters(text) for text, _ in records):
                return True
            continue
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                if decoder.decode(block).strip():
                    return True
    return False


def characters(value: str | list | None) -> int:
    """A document's characters, 0 when it is empty (skipped); a conversation's, over its messages (at least 1)."""
    if isinstance(value, list):
        return max(1, sum(len(m["content"]) for m in value))
    return 0 if not value or value.isspace() else len(value)


def all_text_files(spec: DataSpec) -> bool:
    files = [local_files(name) for name in source_names(spec.dataset)]
    return all(f is not None and all(path.lower().endswith(".txt") for path in f) for f in files)


def read_ahead(iterable, depth: int = 2) -> Iterator:
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
