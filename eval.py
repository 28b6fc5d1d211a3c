"""Score a model: HellaSwag accuracy, CORE (DCLM's 22 tasks), and its loss on a training run's validation split.

    python eval.py --checkpoint ./checkpoints/model_best_val.pt         # HellaSwag validation, 10,042 items
    python eval.py --checkpoint gpt2 --dataset PATH --sample_size N     # ...and the val loss of that data
    python eval.py --checkpoint CKPT --hellaswag FILE.jsonl --device cpu --json OUT.json
    python eval.py --checkpoint CKPT --limit 500                        # the first 500 items: a quick look
    python eval.py --checkpoint CKPT --tasks core                       # CORE, the figure nanochat reports
    python eval.py --checkpoint CKPT --tasks core --core eval_bundle/ --limit 100
    python eval.py --checkpoint CKPT --tasks val --dataset PATH --eval_tokens 1000000
    torchrun --standalone --nproc_per_node 8 eval.py --checkpoint CKPT  # items split over the GPUs

--checkpoint takes what sample.py takes: our .pt, a save_pretrained GPT-2 directory, or a Hub name, so
your model and OpenAI's can be scored on the same items and the same text.

HellaSwag: the validation file of the original release (jsonl: ctx, endings, label) is downloaded once
into --data_cache/hellaswag/; offline, download it elsewhere and pass --hellaswag FILE.jsonl. Scoring
as llm.c and build-nanogpt: the tokens of ctx, then of " " + ending; the cross-entropy of the ending's
tokens only; acc takes the ending with the lowest total loss, acc_norm the lowest mean loss.
CORE: DCLM's eval bundle (core.yaml, eval_meta_data.csv, eval_data/) is downloaded once into
--data_cache/core/; offline, unzip it elsewhere and pass --core DIR. Scored as nanochat's core_eval.py
scores it (the same shuffle, few-shot examples, prompts and rules), so the figures compare with nanochat's;
--limit N takes the first N items of each task after the shuffle.
Validation loss: of the data the checkpoint's run trained on (train_gpt2.py records its data flags), or of
the data flags given (data.py's); the prepared cache is reused and the same validation split scored, whole
or its first --eval_tokens tokens, in windows of --block_size tokens.
It is also given in bits per byte (bpb), which compares with models that use another tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import itertools
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import batches
import data
import runtime
import sources
import tokenizer
from checkpoint import describe, load_model, recorded_data
from common import (EOT, ArgumentParser, UserError, arg_type, check_reachable, first_line,
                    pick_device, positive_int, write_json)
from model import GPT, token_losses
from shards import TokenShards

# The original release's validation file (rowanz/hellaswag); the environment variable HELLASWAG_URL
# points elsewhere (a mirror, or in the tests an address that cannot answer).
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_ITEMS = 10_042  # items in that file: a shorter download is a truncated one
PROBE_SECONDS = 5.0  # an unreachable host fails in milliseconds or hangs; nobody should wait longer
READ_SECONDS = 60.0  # urllib's timeout for each read of the download
HEAD_TOKENS = 4096  # positions put through the output layer at once: 4096 x 50257 fp32 logits = 0.8 GB
TASKS = ("hellaswag", "val", "core")
# With this scoring (llm.c, build-nanogpt); printed beside the result so it can be read at a glance.
REFERENCE = "OpenAI GPT-2 124M: acc_norm 0.2955 (acc 0.2859); GPT-3 125M: 0.337"
# DCLM's eval bundle as nanochat's scripts/base_eval.py downloads it; the environment variable CORE_URL
# points elsewhere (a mirror, or in the tests an address that cannot answer).
CORE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CORE_KINDS = ("multiple_choice", "schema", "language_modeling")  # core.yaml's icl_task_type
SHUFFLE_SEED, FEWSHOT_SEED = 1337, 1234  # nanochat's: the same items, order and examples, so figures compare
CORE_ENCODE_ITEMS = 256  # items tokenized at once, then sorted by length into passes: little padding, little memory
# nanochat's measurements with this scoring (OpenAI's GPT-2 cropped to its 1,024 positions, as here).
CORE_REFERENCE = "OpenAI GPT-2 124M 0.1139, 355M 0.1849, 774M 0.2146, 1.5B 0.2565; nanochat d20 0.2219, d26 0.2602"


Autocast = Callable[[], ContextManager]  # returns the precision context of a forward pass (runtime.Env.autocast)


class EvalError(UserError):
    """A HellaSwag file, a CORE bundle or a download the user can fix."""


class DownloadError(EvalError):
    """A task's data could not be downloaded (offline, refused, cut short): the other tasks are still scored."""


# ----------------------------------------------------------------------------------------------------
# HellaSwag items


@dataclass(frozen=True)
class Item:
    """One HellaSwag question: a context, four candidate endings and the index of the right one."""
    ctx: str
    endings: tuple[str, ...]
    label: int


def parse_item(raw: bytes, where: str) -> Item:
    """One jsonl line as an Item; EvalError naming `where` (FILE:LINE) when it is not a HellaSwag item."""
    try:
        record = json.loads(raw)  # bytes: invalid UTF-8 raises UnicodeDecodeError, a ValueError
    except ValueError as e:
        raise EvalError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected an object with ctx, endings and label, found {type(record).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in record]
    if missing:
        raise EvalError(f"{where}: no field {missing[0]!r} (a HellaSwag item has ctx, endings and label)")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise EvalError(f"{where}: 'ctx' must be non-empty text, found {ctx!r:.40}")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        found = f"{len(endings)} of them" if isinstance(endings, list) else type(endings).__name__
        raise EvalError(f"{where}: 'endings' must be a list of 4 strings, found {found}")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the Hub's parquet conversion stores labels as text: "0" to "3"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise EvalError(f"{where}: 'label' must be 0, 1, 2 or 3 (the right ending), found {label!r:.40}")
    return Item(ctx, tuple(endings), label)


def read_items(path: Path) -> list[Item]:
    """Every item of a HellaSwag jsonl file (blank lines skipped); EvalError at the first bad one."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise EvalError(f"cannot read {path} ({e.strerror or e})") from None
    items = [parse_item(raw, f"{path}:{n}") for n, raw in enumerate(lines, 1) if raw.strip()]
    if not items:
        raise EvalError(f"{path}: no HellaSwag items in it (an empty file?)")
    return items


def hellaswag_url() -> str:
    return os.environ.get("HELLASWAG_URL", HELLASWAG_URL)


def fetch(url: str, path: Path) -> None:
    """The file at `url` written to `path`; OSError or HTTPException (refused, 404, cut mid-way)."""
    with urllib.request.urlopen(url, timeout=READ_SECONDS) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f)


def download(url: str, dest: Path) -> list[Item]:
    """The validation items from `url`, saved to `dest` once they are known whole and valid."""
    def check(fetched: Path, _: Path) -> Path:
        items = read_items(fetched)
        if len(items) != HELLASWAG_ITEMS:
            raise EvalError(f"it holds {len(items):,} items, not HellaSwag validation's {HELLASWAG_ITEMS:,} (cut short?)")
        return fetched

    fetch_into_place(url, dest, "HellaSwag", "download it on a machine online and pass --hellaswag FILE.jsonl", check)
    return read_items(dest)


def fetch_into_place(url: str, dest: Path, what: str, advice: str, check) -> None:
    """The file at `url` into `dest` once check(file, temporary directory) accepts it (EvalError otherwise)
    and returns what to put in place: a file or a directory, moved whole, so that an interrupted or bad
    download leaves nothing behind. Errors are one line naming `what` and the `advice`."""
    try:
        check_reachable(url, PROBE_SECONDS)  # fails in seconds where urllib could hang much longer
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
            fetched = Path(tmp) / "download"
            fetch(url, fetched)
            try:
                ready = check(fetched, Path(tmp))
            except EvalError as e:
                raise DownloadError(f"the download from {url} is not {what} ({e}); {advice}") from None
            os.replace(ready, dest)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"the download from {url} is not a whole zip file ({e}); {advice}") from None
    except (OSError, http.client.HTTPException) as e:  # unreachable, refused, HTTP 404, cut mid-way
        raise DownloadError(f"cannot download {what} from {url} ({first_line(e)}); {advice}") from None


def hellaswag_items(path: str | None, cache_dir) -> list[Item]:
    """The items of --hellaswag FILE, or of the validation file, downloaded into cache_dir on first use."""
    if path is not None:
        return read_items(Path(path))
    cached = Path(cache_dir) / "hellaswag" / "hellaswag_val.jsonl"
    if cached.exists():
        return read_items(cached)
    return download(hellaswag_url(), cached)


# ----------------------------------------------------------------------------------------------------
# CORE: DCLM's eval bundle


@dataclass(frozen=True)
class Task:
    """One of core.yaml's icl_tasks, with its random baseline from eval_meta_data.csv."""
    label: str
    kind: str  # one of CORE_KINDS
    path: Path  # its items, one JSON object a line
    shots: int  # few-shot examples before each item
    delimiter: str  # between a context and its continuation
    baseline: float  # the accuracy of guessing, in percent


@dataclass(frozen=True)
class CoreItem:
    """One line of a task's file: its object (fields checked for the task's kind) and where it came from."""
    record: dict
    where: str  # FILE:LINE


# The fields of an item of each kind, and which of them lists the options `gold` points into.
CORE_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
               "language_modeling": ("context", "continuation")}
CORE_OPTIONS = {"multiple_choice": "choices", "schema": "context_options"}


def parse_core_item(raw: bytes, kind: str, where: str) -> CoreItem:
    """One jsonl line as a CoreItem; EvalError naming `where` when it is not an item of that kind."""
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise EvalError(f"{where}: not valid JSON ({e})") from None
    fields = CORE_FIELDS[kind]
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected an object with {', '.join(fields)}, found {type(record).__name__}")
    missing = [k for k in fields if k not in record]
    if missing:
        raise EvalError(f"{where}: no field {missing[0]!r} (a {kind} item has {', '.join(fields)})")
    for name in fields:
        value = record[name]
        if name == "gold":
            options = record[CORE_OPTIONS[kind]]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(options):
                raise EvalError(f"{where}: 'gold' must be the index of one of the {len(options)} "
                                f"{CORE_OPTIONS[kind]}, found {value!r:.40}")
        elif name == CORE_OPTIONS.get(kind):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise EvalError(f"{where}: {name!r} must be a non-empty list of strings, found {value!r:.40}")
        elif not isinstance(value, str):
            raise EvalError(f"{where}: {name!r} must be text, found {value!r:.40}")
    return CoreItem(record, where)


def read_task(task: Task, limit: int | None = None) -> list[CoreItem]:
    """A task's items, shuffled as nanochat shuffles them, then the first `limit`."""
    try:
        lines = task.path.read_bytes().splitlines()
    except OSError as e:
        raise EvalError(f"cannot read {task.path} ({e.strerror or e})") from None
    items = [parse_core_item(raw, task.kind, f"{task.path}:{n}") for n, raw in enumerate(lines, 1) if raw.strip()]
    random.Random(SHUFFLE_SEED).shuffle(items)  # before anything, so --limit takes the same items as nanochat
    items = items[:limit]
    if len(items) < task.shots + 1:  # each item's examples are other items of the same list
        raise EvalError(f"{task.path}: {len(items)} items, but task {task.label} shows each item {task.shots} "
                        f"others as examples: it needs {task.shots + 1} at least" +
                        (" (raise --limit)" if limit else ""))
    return items


def read_yaml_tasks(path: Path) -> list[dict]:
    """core.yaml's icl_tasks: a list of mappings."""
    import yaml  # PyYAML, which datasets requires; only CORE needs it
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalError(f"cannot read {path} ({e.strerror or e}); is --core the unzipped eval_bundle?") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not valid YAML ({first_line(e)})") from None
    tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        raise EvalError(f"{path}: no 'icl_tasks' list of tasks in it")
    return tasks


def read_baselines(path: Path) -> dict[str, float]:
    """eval_meta_data.csv's "Random baseline" (percent) of each "Eval Task"."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalError(f"cannot read {path} ({first_line(e)})") from None
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise EvalError(f"{path}: no 'Eval Task' and 'Random baseline' columns")
    baselines = {}
    for n, row in enumerate(rows, 2):  # line 1 is the header
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise EvalError(f"{path}:{n}: 'Random baseline' must be a number, found "
                            f"{row['Random baseline']!r:.40}") from None
    return baselines


def make_task(spec: dict, directory: Path, baselines: dict[str, float]) -> Task:
    """One icl_tasks entry as a Task, its file and baseline found; EvalError naming the task otherwise."""
    label = spec.get("label")
    where = f"{directory / 'core.yaml'}: task {label!r}"
    if not isinstance(label, str) or not label:
        raise EvalError(f"{where}: 'label' must be text")
    if spec.get("icl_task_type") not in CORE_KINDS:
        raise EvalError(f"{where}: 'icl_task_type' must be one of {', '.join(CORE_KINDS)}, "
                        f"found {spec.get('icl_task_type')!r:.40}")
    shots = spec.get("num_fewshot")
    shots = shots[0] if isinstance(shots, list) and shots else shots  # DCLM lists them; nanochat takes the first
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise EvalError(f"{where}: 'num_fewshot' must be [N] with N >= 0, found {spec.get('num_fewshot')!r:.40}")
    delimiter = spec.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise EvalError(f"{where}: 'continuation_delimiter' must be text, found {delimiter!r:.40}")
    path = directory / "eval_data" / str(spec.get("dataset_uri"))
    if not path.is_file():
        raise EvalError(f"{where}: no file {path} ('dataset_uri' is under eval_data/)")
    if label not in baselines:
        raise EvalError(f"{directory / 'eval_meta_data.csv'}: no row for task {label!r} (its random baseline)")
    if not 0 <= baselines[label] < 100:
        raise EvalError(f"{directory / 'eval_meta_data.csv'}: task {label!r}: the random baseline must be a "
                        f"percentage below 100, found {baselines[label]}")
    return Task(label, spec["icl_task_type"], path, shots, delimiter, baselines[label])


def read_bundle(directory: Path) -> list[Task]:
    """The tasks of an unzipped eval bundle (core.yaml, eval_meta_data.csv, eval_data/); their items are read later."""
    specs = read_yaml_tasks(directory / "core.yaml")
    baselines = read_baselines(directory / "eval_meta_data.csv")
    tasks = [make_task(spec, directory, baselines) for spec in specs]
    labels = [task.label for task in tasks]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice:
        raise EvalError(f"{directory / 'core.yaml'}: task {twice!r} appears twice")
    return tasks


def core_url() -> str:
    return os.environ.get("CORE_URL", CORE_URL)


def download_bundle(url: str, dest: Path) -> list[Task]:
    """The bundle from `url` (a zip holding eval_bundle/), unzipped into `dest` once it is known whole and valid."""
    def check(archive: Path, tmp: Path) -> Path:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp / "unzipped")  # extractall keeps every member inside it (no "..", no absolute paths)
        root = tmp / "unzipped" / "eval_bundle" if (tmp / "unzipped" / "eval_bundle").is_dir() else tmp / "unzipped"
        for task in read_bundle(root):
            read_task(task)
        return root

    fetch_into_place(url, dest, "CORE's eval bundle", "download eval_bundle.zip on a machine online, unzip it and "
                     "pass --core DIR", check)
    return read_bundle(dest)


def core_bundle(directory: str | None, cache_dir) -> list[Task]:
    """The tasks of --core DIR, or of the bundle downloaded into cache_dir on first use."""
    if directory is not None:
        return read_bundle(Path(directory).expanduser())
    cached = Path(cache_dir) / "core" / "eval_bundle"
    if cached.is_dir():
        return read_bundle(cached)
    return download_bundle(core_url(), cached)


# ----------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Options:
    """A multiple-choice item as tokens (a HellaSwag item, or a CORE item of any kind): one row per option,
    where each row's scored continuation starts, and the right row (0 for language modelling)."""
    rows: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    gold: int


def encode_item(enc, item: Item, window: int) -> Options:
    """A HellaSwag item as a multiple-choice item: rows of ctx's tokens, then " " + ending's, cut to fit a model
    that sees `window` positions; each ending is scored.

    A row of n tokens is fed as its first n-1 and scored on its last n-1, so it may hold window+1.
    The context is cut from the left, once for all four endings, so that they all follow the same text.
    An ending longer than the window on its own (never with GPT-2's 1024 positions, but possible with a
    small model) keeps one context token and is cut from the right: its first `window` tokens are scored.
    """
    ctx = enc.encode_ordinary(item.ctx)
    endings = [enc.encode_ordinary(" " + ending) for ending in item.endings]
    ctx = ctx[-max(1, window + 1 - max(map(len, endings))):]
    return Options(tuple(tuple(ctx + e)[:window + 1] for e in endings), (len(ctx),) * len(endings), item.label)


def collate_rows(rows: list[tuple[tuple[int, ...], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y, both (rows, longest row - 1), from (tokens, start) pairs; y is -1 (not
    scored) except at the tokens from `start` on.

    Shorter rows are padded on the right, where causal attention keeps the padding from the real positions.
    """
    x = torch.zeros(len(rows), max(len(row) for row, _ in rows) - 1, dtype=torch.long)
    y = torch.full_like(x, -1)
    for i, (row, start) in enumerate(rows):
        tokens = torch.tensor(row)
        x[i, :len(row) - 1] = tokens[:-1]
        y[i, start - 1:len(row) - 1] = tokens[start:]  # position j predicts token j+1: the scored tokens
    return x, y


def scored_losses(model: GPT, x: torch.Tensor, y: torch.Tensor,
                  argmax: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At each position where y is not -1, in row-major order (N,): the cross-entropy of its target, and
    with `argmax` whether the target was the most likely token.

    The network runs once over all positions; the output layer only over the scored ones (a HellaSwag
    context is not scored, and its logits would be most of the work), HEAD_TOKENS at a time. The loss
    is the training loss's, position by position (model.token_losses: fp32, the padding ids left out).
    """
    scored = y != -1  # (B, T)
    hidden = model.hidden_states(x)[scored]  # (N, C), the scored positions of all rows
    c, losses, hits = model.config, [], []
    for h, t in zip(hidden.split(HEAD_TOKENS), y[scored].split(HEAD_TOKENS)):
        logits = model.lm_head(h)  # (n, padded vocab)
        losses.append(token_losses(logits, t, c.logit_softcap, c.vocab_size, c.softcap_form))
        if argmax:  # of the raw logits: the soft cap keeps their order; the padding ids are never predicted
            hits.append(logits[:, :c.vocab_size].argmax(-1) == t)
    return torch.cat(losses), torch.cat(hits) if argmax else None


def sum_by_row(y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(rows,): values, one per scored position of y (not -1) in scored_losses' row-major order, summed per row."""
    return torch.zeros(len(y), device=y.device).index_add_(0, (y != -1).nonzero()[:, 0], values)


@torch.no_grad()
def hellaswag_accuracy(model: GPT, items: list[Item], device, autocast: Autocast = contextlib.nullcontext,
                       rank: int = 0, world: int = 1, *, rows: int = 32, progress: bool = False) -> dict:
    """{"acc", "acc_norm", "n"} over `items`, each a multiple-choice item scored as CORE's are (option_scores):
    acc takes the ending of lowest total loss, acc_norm of lowest mean; rank r scores items[r::world] and the
    counts are summed.

    Made to be called between training steps too, on the raw (uncompiled) model, by every rank: the
    model's train/eval mode is restored. `rows`: rows per forward pass (4 an item).
    """
    if not items:
        raise ValueError("no HellaSwag items to score")
    enc = tokenizer.get_tokenizer()
    mine = [encode_item(enc, item, model.config.block_size) for item in items[rank::world]]
    # Rows of like length share a pass, so less of it is padding; the longest first, so a --batch_size
    # too large for memory fails at once rather than at the end.
    mine.sort(key=lambda e: max(map(len, e.rows)), reverse=True)
    counts = torch.zeros(3, dtype=torch.long)
    was_training = model.training
    model.eval()
    # The bar counts all ranks' items, assuming they keep pace with rank 0 (their shares are alike).
    bar = tqdm(total=len(items), unit="item", desc="hellaswag", disable=not progress, dynamic_ncols=True)
    try:
        for batch in option_groups(mine, rows):
            with autocast():
                totals, means, _ = option_scores(model, batch, device)
            counts += torch.tensor([right_by(batch, totals), right_by(batch, means), len(batch)])
            bar.update(min(len(batch) * world, bar.total - bar.n))
    finally:
        model.train(was_training)
        bar.close()
    if world > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return {"acc": right / n, "acc_norm": right_norm / n, "n": n}


def token_bytes(enc) -> torch.Tensor:
    """The UTF-8 length of each token of the vocabulary (n_vocab,); 0 for the special tokens (<|endoftext|>,
    chat.py's turn tokens), which stand for no text."""
    lengths = [len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)]
    for special in enc.special_tokens_set:
        lengths[enc.encode_single_token(special)] = 0
    return torch.tensor(lengths)


def queued_copy(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device`; to a GPU from pinned memory, queued behind its work (a pageable copy waits for it)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, shards: TokenShards, window: int, device,
                    autocast: Autocast = contextlib.nullcontext, rank: int = 0, world: int = 1, *,
                    rows: int = 32, sample: int | None = None, progress: bool = False,
                    stop: Callable[[], bool] | None = None) -> dict | None:
    """{"loss", "tokens", "bpb"}: the mean cross-entropy over the split's windows of window+1 tokens, all of
    them, or `sample` of them spread evenly over the split (batches.Windows.spread: the same ones every time);
    the tail shorter than a window is left out. None if stop() comes true on some rank before a batch (a run
    asked to stop: the whole split can take minutes).

    bpb, bits per byte: the summed loss over (ln 2 x the UTF-8 bytes of the scored tokens), which does not
    depend on the tokenizer. As nanochat counts it, the text only: a target <|endoftext|> has no bytes,
    and its loss is left out of the sum too. train_gpt2.py's evaluations are this function with its compiled
    (and DDP-wrapped) model: `model` is anything that runs GPT.forward.
    """
    windows = batches.Windows(shards, window)
    chosen = windows.spread(sample)
    step = rows * world  # windows a pass scores, over all ranks: every rank runs every pass
    lengths = queued_copy(token_bytes(tokenizer.get_tokenizer()), device)
    was_training = model.training
    model.eval()
    # [loss, tokens, loss of the text tokens, their bytes] in float64: exact counts however many tokens
    # (fp32 is not past 2**24), and a sum of losses that does not drift.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        for k in tqdm(range(-(-len(chosen) // step)), unit="pass", desc="val loss", disable=not progress,
                      dynamic_ncols=True):
            if stop is not None and stopping(stop(), device, world):
                return None
            mine = chosen[k * step + rank * rows:k * step + (rank + 1) * rows]
            x, y = windows.read(np.concatenate((mine, np.zeros(rows - len(mine), dtype=mine.dtype))))
            y[len(mine):] = -1  # rows past the sample fill the last pass: not scored
            x, y = queued_copy(x, device), queued_copy(y, device)
            with autocast():
                _, losses = model(x, y, per_token=True)  # 0 where y is -1
            # Masks multiplied in, not indexed with: a boolean index is a nonzero(), which waits for the GPU.
            y = y.view(-1)
            nbytes = lengths[y.clamp(min=0)] * (y != -1)
            sums[0] += losses.sum()
            sums[1] += (y != -1).sum()
            sums[2] += (losses * (nbytes > 0)).sum()
            sums[3] += nbytes.sum()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, tokens, text_loss, nbytes = sums.tolist()
    return {"loss": loss_sum / tokens, "tokens": int(tokens),
            "bpb": text_loss / (math.log(2) * nbytes) if nbytes else float("nan")}


def stopping(asked: bool, device, world: int) -> bool:
    """Whether any rank asked to stop: every rank must leave the same pass (each runs the same collectives)."""
    if world == 1:
        return asked
    flag = torch.tensor(float(asked), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------------------
# CORE scoring, as nanochat's nanochat/core_eval.py and scripts/base_eval.py score it


def fewshot_examples(items: list[CoreItem], i: int, shots: int) -> list[dict]:
    """Item i's examples: random.Random(1234 + i).sample of the other items' indices, as nanochat draws them.

    sample() picks positions in its population by its length alone, so sampling range(n - 1) and stepping
    over i picks what sampling the list of the other n - 1 indices picks, without building that list
    for each item (20,321 items in a task make 400 million entries).
    """
    if not shots:
        return []
    picked = random.Random(FEWSHOT_SEED + i).sample(range(len(items) - 1), shots)
    return [items[j + (j >= i)].record for j in picked]


def render_prompts(task: Task, item: dict, shots: list[dict]) -> list[str]:
    """The texts to score, each example followed by a blank line, byte for byte as nanochat's templates render them.

    Multiple choice: the query, the delimiter and each choice (one text a choice). Schema: each context
    option, the delimiter and the continuation (one a context option). Language modelling: contexts
    stripped of surrounding whitespace; the prompt without the continuation, stripped, then with it.
    """
    d = task.delimiter
    if task.kind == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{head}{option}{d}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    prompt = f"{head}{item['context'].strip()}{d}"
    # Stripped, or a trailing space (the delimiter) would be a token of its own here, but merge into the
    # continuation's first token in the full text, and the one would not be a prefix of the other.
    return [prompt.strip(), prompt + item["continuation"]]


def common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share."""
    n = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        n += 1
    return n


def encode_options(enc, task: Task, items: list[CoreItem], indices, window: int) -> list[Options]:
    """Items `indices` of a task (after its shuffle) as rows of at most `window` tokens, cut from the left;
    their prompts tokenized in one call, which tiktoken spreads over threads.

    The continuation starts where the rows stop agreeing (multiple choice: the common prefix) or where
    they start agreeing again (schema: the common suffix), or after the prompt (language modelling).
    """
    prompts = [render_prompts(task, items[i].record, fewshot_examples(items, i, task.shots)) for i in indices]
    tokens = iter(enc.encode_ordinary_batch([p for item_prompts in prompts for p in item_prompts]))
    # nanochat's BOS is GPT-2's <|endoftext|>
    return [item_options(task, items[i], [[EOT, *next(tokens)] for _ in item_prompts], window)
            for i, item_prompts in zip(indices, prompts)]


def item_options(task: Task, item: CoreItem, rows: list[list[int]], window: int) -> Options:
    """One item's Options from the tokens of its prompts."""
    if task.kind == "multiple_choice":
        starts = [common_prefix(rows)] * len(rows)
    elif task.kind == "schema":
        suffix = common_prefix([row[::-1] for row in rows])
        starts = [len(row) - suffix for row in rows]
    else:
        without, rows = rows[0], rows[1:]
        if len(without) >= len(rows[0]) or rows[0][:len(without)] != without:
            raise EvalError(f"{item.where}: the context's tokens are not followed by the continuation's in "
                            f"the whole text (nanochat refuses such an item too); change its text")
        starts = [len(without)]
    # Cut from the left to the model's window, as nanochat cuts for OpenAI's GPT-2. A continuation longer
    # than the window on its own (a tiny model's) keeps all but its first token, which has no context left.
    cuts = [max(0, len(row) - window) for row in rows]
    return Options(tuple(tuple(row[cut:]) for row, cut in zip(rows, cuts)),
                   tuple(max(1, start - cut) for start, cut in zip(starts, cuts)), item.record.get("gold", 0))


def option_scores(model: GPT, batch: list[Options], device) -> tuple[list[float], list[float], list[bool]]:
    """For every row of `batch`, in order: the total and the mean loss of its continuation's tokens, and
    whether each of them was the model's most likely token. One forward pass for all."""
    x, y = collate_rows([(row, start) for options in batch for row, start in zip(options.rows, options.starts)])
    x, y = x.to(device), y.to(device)
    losses, hits = scored_losses(model, x, y, argmax=True)
    totals = sum_by_row(y, losses)
    return totals.tolist(), (totals / (y != -1).sum(1)).tolist(), (sum_by_row(y, (~hits).float()) == 0).tolist()


def right_by(batch: list[Options], scores: list[float]) -> int:
    """How many items of `batch` have their gold option scored lowest (the first of equals, as nanochat's
    list.index(min(...)) and torch's argmin pick); `scores` has a row per option, in order."""
    right, k = 0, 0
    for options in batch:
        mine = scores[k:k + len(options.rows)]
        right += mine.index(min(mine)) == options.gold
        k += len(options.rows)
    return right


def count_right(kind: str, batch: list[Options], means: list[float], exact: list[bool]) -> int:
    """How many items of `batch` the model gets right, from option_scores' figures: multiple choice and
    schema by the lowest mean loss, language modelling when every continuation token was the argmax."""
    if kind != "language_modeling":
        return right_by(batch, means)
    starts = itertools.accumulate((len(o.rows) for o in batch), initial=0)
    return sum(exact[k] for k in list(starts)[:-1])


def option_groups(encoded: list[Options], rows: int):
    """Consecutive items in groups of at most `rows` rows; an item with more goes alone."""
    batch: list[Options] = []
    for options in encoded:
        if batch and sum(len(o.rows) for o in batch) + len(options.rows) > rows:
            yield batch
            batch = []
        batch.append(options)
    if batch:
        yield batch


def task_right(model: GPT, task: Task, items: list[CoreItem], device, autocast: Autocast, rank: int, world: int,
               rows: int, bar: tqdm) -> int:
    """How many of this rank's items (rank, rank + world, ... as nanochat strides them) the model gets right."""
    enc, mine = tokenizer.get_tokenizer(), range(rank, len(items), world)
    right = 0
    for a in range(0, len(mine), CORE_ENCODE_ITEMS):
        encoded = encode_options(enc, task, items, mine[a:a + CORE_ENCODE_ITEMS], model.config.block_size)
        encoded.sort(key=lambda o: max(map(len, o.rows)), reverse=True)  # like lengths share a pass: less padding
        for batch in option_groups(encoded, rows):
            with autocast():
                _, means, exact = option_scores(model, batch, device)
            right += count_right(task.kind, batch, means, exact)
            bar.update(min(len(batch) * world, bar.total - bar.n))
    return right


def core_figures(tasks: list[tuple[Task, list[CoreItem]]], right: list[int]) -> dict:
    """{"core", "tasks": {label: {"accuracy", "centered", "n"}}}: centered = (accuracy - baseline) /
    (1 - baseline), 0 for guessing and 1 for all right; CORE is the mean over the tasks (DCLM's definition)."""
    figures = {}
    for (task, items), r in zip(tasks, right):
        accuracy, baseline = r / len(items), task.baseline / 100
        figures[task.label] = {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline),
                               "n": len(items)}
    return {"core": statistics.fmean(f["centered"] for f in figures.values()), "tasks": figures}


@torch.no_grad()
def core_accuracy(model: GPT, tasks: list[tuple[Task, list[CoreItem]]], device,
                  autocast: Autocast = contextlib.nullcontext, rank: int = 0, world: int = 1, *,
                  rows: int = 32, progress: bool = False) -> dict:
    """CORE and each task's figures (core_figures) over `tasks`, each with its items as read_task gives them.

    Every rank scores its share of each task and the counts are summed. An item's options share a forward
    pass; `rows` is rows per pass. Under torchrun the passes hold other items than in one process, so
    figures agree up to rounding.
    """
    was_training = model.training
    model.eval()
    right = torch.zeros(len(tasks), dtype=torch.long, device=device)
    bar = tqdm(total=sum(len(items) for _, items in tasks), unit="item", desc="core", disable=not progress,
               dynamic_ncols=True)
    try:
        for k, (task, items) in enumerate(tasks):
            bar.set_description(f"core {task.label}")
            right[k] = task_right(model, task, items, device, autocast, rank, world, rows, bar)
    finally:
        model.train(was_training)
        bar.close()
    if world > 1:
        dist.all_reduce(right)
    return core_figures(tasks, right.tolist())


# ----------------------------------------------------------------------------------------------------
# Command line


task_list = arg_type(lambda text: text.split(","), lambda tasks: set(tasks) <= set(TASKS),
                     f"a comma-separated list of {', '.join(TASKS)}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="./checkpoints/model_best_val.pt",
                   help="our .pt checkpoint, a save_pretrained directory, or a Hub name (default %(default)s)")
    p.add_argument("--tasks", type=task_list, default=None,
                   help="hellaswag, val, core, or several with commas "
                        "(default: hellaswag, and val too when --dataset is given or the checkpoint records its "
                        "run's data)")
    p.add_argument("--hellaswag", metavar="FILE.jsonl", default=None,
                   help="HellaSwag items in the original release's jsonl (default: download the validation set)")
    p.add_argument("--core", metavar="DIR", default=None,
                   help="core: DCLM's eval bundle unzipped (core.yaml, eval_meta_data.csv, eval_data/) "
                        "(default: download it into --data_cache)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N items (core: of each task, after its shuffle)")
    p.add_argument("--eval_tokens", type=positive_int, default=None,
                   help="val: score about N tokens, in windows spread evenly over the split, as a run's own "
                        "evaluations do (default: all of it)")
    p.add_argument("--block_size", type=positive_int, default=None,
                   help="val: tokens per window (default: the model's; give the run's to compare with another model)")
    p.add_argument("--batch_size", type=positive_int, default=32,
                   help="sequences per forward pass (HellaSwag: 4 per item; core: an item's options, "
                        "which share a pass) (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only; on a CPU, fast only with AVX-512 bf16 or AMX)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results to this JSON file")
    sources.add_data_args(p)  # val: the data flags of the run, so its prepared cache is found again
    return p


def run_data(spec: str) -> dict | None:
    """The data flags the checkpoint's run trained on (train_gpt2.py records them), or None."""
    try:
        return recorded_data(spec)
    except UserError:  # not readable: load_model says so in one line later
        return None


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with args.tasks resolved to a list; contradictions end here, before any work."""
    p = build_parser()
    # Preset to None, --dataset stays None unless given: that tells "the data of my run" from data.py's default.
    args = p.parse_args(argv, namespace=argparse.Namespace(dataset=None))
    named_data = args.dataset is not None
    recorded = None if named_data else run_data(args.checkpoint)
    for name, value in (recorded or {}).items():  # the run's data, where no flag says otherwise
        if getattr(args, name) in (None, p.get_default(name)):
            setattr(args, name, value)
    args.dataset = args.dataset or p.get_default("dataset")
    args.tasks = args.tasks or ["hellaswag", *(["val"] if named_data or recorded else [])]
    if "hellaswag" not in args.tasks and args.hellaswag:
        p.error("--hellaswag belongs to the hellaswag task, which --tasks leaves out")
    if "core" not in args.tasks and args.core:
        p.error("--core belongs to the core task, which --tasks leaves out")
    if not {"hellaswag", "core"} & set(args.tasks) and args.limit:
        p.error("--limit belongs to the hellaswag and core tasks, which --tasks leaves out")
    if "val" not in args.tasks and (args.eval_tokens or args.block_size):
        p.error("--eval_tokens and --block_size belong to the val task: add --tasks hellaswag,val and the data flags")
    if args.hellaswag and not Path(args.hellaswag).expanduser().is_file():
        p.error(f"--hellaswag {args.hellaswag}: no such file")
    if args.core and not Path(args.core).expanduser().is_dir():
        p.error(f"--core {args.core}: no such directory (give the unzipped eval_bundle)")
    if args.json and not Path(args.json).expanduser().absolute().parent.is_dir():
        p.error(f"--json {args.json}: its directory does not exist")
    try:
        pick_device(args.device)
    except UserError as e:
        p.error(str(e))
    return args


# ----------------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, env: runtime.Env) -> dict:
    """The tasks asked for; the data is read (or fails) before the model, which takes longer, is loaded. A task
    whose data cannot be downloaded is left out, and said so in results["not_scored"]; EvalError when that
    leaves nothing to score."""
    items = shards = core = preparation = None
    not_scored = {}
    if "hellaswag" in args.tasks:
        items = downloaded(env, lambda: hellaswag_items(args.hellaswag, args.data_cache)[:args.limit], "hellaswag",
                           not_scored)
    if "core" in args.tasks:
        bundle = downloaded(env, lambda: core_bundle(args.core, args.data_cache), "core", not_scored)
        core = None if bundle is None else [(task, read_task(task, args.limit)) for task in bundle]
    if "val" in args.tasks:  # the training split goes on arriving behind the scoring, for a later run
        say = (lambda line: tqdm.write(line, file=sys.stderr)) if env.master else None
        shards, preparation = data.validation_split(sources.DataSpec.from_args(args), prepare=env.local_rank == 0,
                                                    say=say)
    try:
        return score(args, env, items, shards, core, not_scored)
    finally:
        if preparation is not None:
            preparation.close()


def score(args: argparse.Namespace, env: runtime.Env, items, shards, core, not_scored: dict) -> dict:
    if len(not_scored) == len(args.tasks):  # nothing left to score (val was not asked for): an error, status 1
        raise EvalError("; ".join([*not_scored.values(), "or score the validation loss alone: --tasks val with "
                                   "the data flags of your text or run (--dataset PATH ...)"]))
    model, info = load_model(args.checkpoint)
    model.to(env.device).eval()
    window = args.block_size or model.config.block_size
    if window > model.config.block_size:
        raise EvalError(f"--block_size {window} is longer than the model's window of {model.config.block_size}")
    if env.master:
        tqdm.write(describe(model, info, env.device, env.amp_dtype or torch.float32), file=sys.stderr)
    results = {"checkpoint": args.checkpoint}
    common = dict(device=env.device, autocast=env.autocast, rank=env.rank, world=env.world,
                  rows=args.batch_size, progress=env.master)
    if items is not None:
        results["hellaswag"] = hellaswag_accuracy(model, items, **common)
    if shards is not None:
        sample = None if args.eval_tokens is None else max(1, args.eval_tokens // (window + 1))
        results["val"] = validation_loss(model, shards, window, sample=sample, **common)
    if core is not None:
        results["core"] = core_accuracy(model, core, **common)
    if not_scored:
        results["not_scored"] = not_scored
    return results


def downloaded(env: runtime.Env, read: Callable, task: str, not_scored: dict):
    """read() on each machine's first process first; None where the download it makes fails, with why in
    not_scored[task] (its message says how to give the data instead)."""
    def attempt():
        try:
            return read()
        except DownloadError as e:
            not_scored[task] = str(e)
            return None
    return runtime.local_rank0_first(env, attempt)


def table(results: dict) -> str:
    """The results as a few aligned lines for the terminal."""
    lines = [f"{'task':<10} {'metric':<9} {'value':>7}  "] if {"hellaswag", "val"} & set(results) else []
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines += [f"{'hellaswag':<10} {'acc':<9} {h['acc']:>7.4f}  {h['n']:,} items",
                  f"{'hellaswag':<10} {'acc_norm':<9} {h['acc_norm']:>7.4f}  for comparison, {REFERENCE}"]
    if "val" in results:
        v = results["val"]
        lines += [f"{'val':<10} {'loss':<9} {v['loss']:>7.4f}  {v['tokens']:,} tokens, "
                  f"perplexity {math.exp(min(v['loss'], 50)):.1f}",
                  f"{'val':<10} {'bpb':<9} {v['bpb']:>7.4f}  bits per byte of text, whatever the tokenizer"]
    if "core" in results:
        lines += [""] * bool(lines) + core_table(results["core"])
    return "\n".join(line.rstrip() for line in lines)


def core_table(core: dict) -> list[str]:
    """CORE's lines: each task's accuracy and centered accuracy, then CORE beside the reference figures."""
    width = max(len("CORE task"), *map(len, core["tasks"]))
    lines = [f"{'CORE task':<{width}} {'accuracy':>8} {'centered':>8}  items"]
    lines += [f"{label:<{width}} {f['accuracy']:>8.4f} {f['centered']:>8.4f}  {f['n']:,}"
              for label, f in core["tasks"].items()]
    return lines + [f"{'CORE':<{width}} {'':>8} {core['core']:>8.4f}  mean centered accuracy of "
                    f"{len(core['tasks'])} tasks; for comparison, {CORE_REFERENCE}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    env, notes = runtime.setup_env(args.device, args.amp, compile=False)
    try:
        for note in notes if env.master else []:
            print(f"note: {note}", file=sys.stderr)
        results = run(args, env)
        if env.master:
            print(table(results), flush=True)
            if results.get("not_scored"):
                print(f"note: not scored: {'; '.join(results['not_scored'].values())}", file=sys.stderr)
            if args.json:
                write_json(Path(args.json).expanduser(), results)
        runtime.leave_together(env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory with --batch_size {args.batch_size}; lower it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's status for Ctrl-C, without a traceback
    finally:
        runtime.cleanup_env(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
