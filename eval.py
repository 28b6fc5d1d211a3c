"""Score a model: HellaSwag accuracy, and its loss on a training run's validation split.

    python eval.py --checkpoint ./checkpoints/model_best_val.pt         # HellaSwag validation, 10,042 items
    python eval.py --checkpoint gpt2 --dataset PATH --sample_size N     # ...and the val loss of that run's data
    python eval.py --checkpoint CKPT --hellaswag FILE.jsonl --device cpu --json OUT.json
    python eval.py --checkpoint CKPT --limit 500                        # the first 500 items: a quick look
    python eval.py --checkpoint CKPT --tasks val --dataset PATH --eval_tokens 1000000
    torchrun --standalone --nproc_per_node 8 eval.py --checkpoint CKPT  # items split over the GPUs

--checkpoint takes what sample.py takes: our .pt, a save_pretrained GPT-2 directory, or a Hub name, so
your model and OpenAI's can be scored on the same items and the same text.

HellaSwag: the validation file of the original release (jsonl: ctx, endings, label) is downloaded once
into --data_cache/hellaswag/; offline, download it elsewhere and pass --hellaswag FILE.jsonl. Scoring
as llm.c and build-nanogpt: the tokens of ctx, then of " " + ending; the cross-entropy of the ending's
tokens only; acc takes the ending with the lowest total loss, acc_norm the lowest mean loss.
Validation loss: give the data flags of a run (data.py's); its prepared cache is reused and the same
validation split scored, whole or its first --eval_tokens tokens, in windows of --block_size tokens.
It is also given in bits per byte (bpb), which compares with models that use another tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import runtime
from common import (EOT, ArgumentParser, UserError, arg_type, atomic_write, check_reachable, first_line,
                    pick_device, positive_int)
from model import GPT, describe, load_model, token_losses

# The original release's validation file (rowanz/hellaswag); the environment variable HELLASWAG_URL
# points elsewhere (a mirror, or in the tests an address that cannot answer).
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_ITEMS = 10_042  # items in that file: a shorter download is a truncated one
PROBE_SECONDS = 5.0  # an unreachable host fails in milliseconds or hangs; nobody should wait longer
READ_SECONDS = 60.0  # urllib's timeout for each read of the download
HEAD_TOKENS = 4096  # positions put through the output layer at once: 4096 x 50257 fp32 logits = 0.8 GB
TASKS = ("hellaswag", "val")
# With this scoring (llm.c, build-nanogpt); printed beside the result so it can be read at a glance.
REFERENCE = "OpenAI GPT-2 124M: acc_norm 0.2955 (acc 0.2859); GPT-3 125M: 0.337"


Autocast = Callable[[], ContextManager]  # returns the precision context of a forward pass (runtime.Env.autocast)


class EvalError(UserError):
    """A HellaSwag file or download the user can fix."""


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


def download(url: str, dest: Path) -> list[Item]:
    """The validation items from `url`, saved to `dest` once they are known whole and valid."""
    advice = "download it on a machine online and pass --hellaswag FILE.jsonl"
    try:
        check_reachable(url, PROBE_SECONDS)  # fails in seconds where urllib could hang much longer
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest) as tmp:  # an interrupted or bad download leaves no file behind
            with urllib.request.urlopen(url, timeout=READ_SECONDS) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            try:
                items = read_items(tmp)
            except EvalError as e:
                raise EvalError(f"the download from {url} is not HellaSwag ({e}); {advice}") from None
            if len(items) != HELLASWAG_ITEMS:
                raise EvalError(f"the download from {url} holds {len(items):,} items, not HellaSwag validation's "
                                f"{HELLASWAG_ITEMS:,} (cut short?); {advice}")
    except (OSError, http.client.HTTPException) as e:  # unreachable, refused, HTTP 404, cut mid-way
        raise EvalError(f"cannot download HellaSwag from {url} ({first_line(e)}); {advice}") from None
    return items


def hellaswag_items(path: str | None, cache_dir) -> list[Item]:
    """The items of --hellaswag FILE, or of the validation file, downloaded into cache_dir on first use."""
    if path is not None:
        return read_items(Path(path))
    cached = Path(cache_dir) / "hellaswag" / "hellaswag_val.jsonl"
    if cached.exists():
        return read_items(cached)
    return download(hellaswag_url(), cached)


# ----------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Encoded:
    """An item as tokens: four rows of context then ending, and where the endings start in them."""
    rows: tuple[tuple[int, ...], ...]
    start: int  # the index of every row's first ending token (the context's length)
    label: int


def encode_item(enc, item: Item, window: int) -> Encoded:
    """The tokens of ctx, then of " " + ending, cut to fit a model that sees `window` positions.

    A row of n tokens is fed as its first n-1 and scored on its last n-1, so it may hold window+1.
    The context is cut from the left, once for all four endings, so that they all follow the same text.
    An ending longer than the window on its own (never with GPT-2's 1024 positions, but possible with a
    small model) keeps one context token and is cut from the right: its first `window` tokens are scored.
    """
    ctx = enc.encode_ordinary(item.ctx)
    endings = [enc.encode_ordinary(" " + ending) for ending in item.endings]
    ctx = ctx[-max(1, window + 1 - max(map(len, endings))):]
    return Encoded(tuple(tuple(ctx + e)[:window + 1] for e in endings), len(ctx), item.label)


def collate(items: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y, both (4 * items, longest row - 1); y is -1 (not scored) outside the endings."""
    return collate_rows([(row, item.start) for item in items for row in item.rows])


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


def scored_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of the target at each position where y is not -1, in row-major order (N,).

    The network runs once over all positions; the output layer only over the scored ones (a HellaSwag
    context is not scored, and its logits would be most of the work), HEAD_TOKENS at a time. The loss
    is the training loss's, position by position (model.token_losses: fp32, the padding ids left out).
    """
    scored = y != -1  # (B, T)
    hidden = model.hidden_states(x)[scored]  # (N, C), the scored positions of all rows
    c = model.config
    return torch.cat([token_losses(model.lm_head(h), t, c.logit_softcap, c.vocab_size)
                      for h, t in zip(hidden.split(HEAD_TOKENS), y[scored].split(HEAD_TOKENS))])


def row_losses(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the summed cross-entropy of its targets y (-1: not scored), and how many there are."""
    scored = y != -1
    losses = scored_losses(model, x, y)
    sums = torch.zeros(len(y), device=y.device).index_add_(0, scored.nonzero()[:, 0], losses)
    return sums, scored.sum(1)


def ending_losses(model: GPT, items: list[Encoded], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Total and mean loss of each ending, both (items, 4), from one pass over all their rows."""
    x, y = collate(items)
    total, count = row_losses(model, x.to(device), y.to(device))
    return total.view(-1, 4), (total / count).view(-1, 4)


def count_correct(total: torch.Tensor, mean: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[right by lowest total loss (acc), right by lowest mean loss (acc_norm), items] as a tensor."""
    return torch.stack([(total.argmin(1) == labels).sum(), (mean.argmin(1) == labels).sum(),
                        torch.tensor(len(labels), device=labels.device)])


@torch.no_grad()
def hellaswag_accuracy(model: GPT, items: list[Item], device, autocast: Autocast = contextlib.nullcontext,
                       rank: int = 0, world: int = 1, *, batch_size: int = 32, progress: bool = False) -> dict:
    """{"acc", "acc_norm", "n"} over `items`; rank r scores items[r::world] and the counts are summed.

    Made to be called between training steps too, on the raw (uncompiled) model, by every rank: the
    model's train/eval mode is restored. batch_size is rows per forward pass (4 per item).
    """
    if not items:
        raise ValueError("no HellaSwag items to score")
    enc = data.get_tokenizer()
    mine = [encode_item(enc, item, model.config.block_size) for item in items[rank::world]]
    # Rows of like length share a pass, so less of it is padding; the longest first, so a batch_size
    # too large for memory fails at once rather than at the end.
    mine.sort(key=lambda e: max(map(len, e.rows)), reverse=True)
    per_pass, counts = max(1, batch_size // 4), torch.zeros(3, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    # The bar counts all ranks' items, assuming they keep pace with rank 0 (their shares are alike).
    bar = tqdm(total=len(items), unit="item", desc="hellaswag", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(mine), per_pass):
            chunk = mine[i:i + per_pass]
            with autocast():
                total, mean = ending_losses(model, chunk, device)
            counts += count_correct(total, mean, torch.tensor([e.label for e in chunk], device=device))
            bar.update(min(len(chunk) * world, bar.total - bar.n))
    finally:
        model.train(was_training)
        bar.close()
    if world > 1:
        dist.all_reduce(counts)
    right, right_norm, n = counts.tolist()
    return {"acc": right / n, "acc_norm": right_norm / n, "n": n}


def token_bytes(enc) -> torch.Tensor:
    """The UTF-8 length of each token of the vocabulary (n_vocab,); 0 for <|endoftext|>, which stands for no text."""
    lengths = [len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)]
    lengths[EOT] = 0
    return torch.tensor(lengths)


@torch.no_grad()
def validation_loss(model: GPT, shards: data.TokenShards, window: int, device,
                    autocast: Autocast = contextlib.nullcontext, rank: int = 0, world: int = 1, *,
                    batch_size: int = 32, max_tokens: int | None = None, progress: bool = False) -> dict:
    """{"loss", "tokens", "bpb"}: the mean cross-entropy over the split's windows of window+1 tokens, all of
    them or the first ceil(max_tokens / window); the tail shorter than a window is left out.

    bpb, bits per byte: the summed loss over (ln 2 x the UTF-8 bytes of the scored tokens), which does not
    depend on the tokenizer. As nanochat counts it, the text only: a target <|endoftext|> has no bytes,
    and its loss is left out of the sum too. The windows are those train_gpt2.py's validation reads, in the
    same order (BatchSource.eval_batch).
    """
    source = data.BatchSource(shards, window, batch_size * world, seed=0, rank=rank, world_size=world,
                              shuffle=False)
    n = source.windows_per_epoch if max_tokens is None else min(source.windows_per_epoch, -(-max_tokens // window))
    passes = -(-n // (batch_size * world))
    lengths = token_bytes(data.get_tokenizer()).to(device)
    was_training = model.training
    model.eval()
    # [loss, tokens, loss of the text tokens, their bytes] in float64: exact counts however many tokens
    # (fp32 is not past 2**24), and a sum of losses that does not drift.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for k in tqdm(range(passes), unit="pass", desc="val loss", disable=not progress, dynamic_ncols=True):
        x, y = source.eval_batch(k)
        first = k * batch_size * world + rank * batch_size
        y[torch.arange(first, first + batch_size) >= n] = -1  # windows past the n-th (wrapped around): not scored
        x, y = x.to(device), y.to(device)
        with autocast():
            losses = scored_losses(model, x, y)
        nbytes = lengths[y[y != -1]]  # (N,), in the order of the losses
        sums[0] += losses.sum()
        sums[1] += len(losses)
        sums[2] += losses[nbytes > 0].sum()
        sums[3] += nbytes.sum()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, tokens, text_loss, nbytes = sums.tolist()
    return {"loss": loss_sum / tokens, "tokens": int(tokens),
            "bpb": text_loss / (math.log(2) * nbytes) if nbytes else float("nan")}


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
                   help="hellaswag, val or both (default: hellaswag, and val too when --dataset is given)")
    p.add_argument("--hellaswag", metavar="FILE.jsonl", default=None,
                   help="HellaSwag items in the original release's jsonl (default: download the validation set)")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N items")
    p.add_argument("--eval_tokens", type=positive_int, default=None,
                   help="val: score the first N tokens of the split (default: all of it)")
    p.add_argument("--block_size", type=positive_int, default=None,
                   help="val: tokens per window (default: the model's; give the run's to compare with another model)")
    p.add_argument("--batch_size", type=positive_int, default=32,
                   help="sequences per forward pass (HellaSwag: 4 per item) (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only; on a CPU, fast only with AVX-512 bf16 or AMX)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results to this JSON file")
    data.add_data_args(p)  # val: the data flags of the run, so its prepared cache is found again
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with args.tasks resolved to a list; contradictions end here, before any work."""
    p = build_parser()
    # Preset to None, --dataset stays None unless given: that tells "the data of my run" from data.py's default.
    args = p.parse_args(argv, namespace=argparse.Namespace(dataset=None))
    named_data, args.dataset = args.dataset is not None, args.dataset or p.get_default("dataset")
    args.tasks = args.tasks or ["hellaswag", *(["val"] if named_data else [])]
    if "hellaswag" not in args.tasks and (args.hellaswag or args.limit):
        p.error("--hellaswag and --limit belong to the hellaswag task, which --tasks leaves out")
    if "val" not in args.tasks and (args.eval_tokens or args.block_size):
        p.error("--eval_tokens and --block_size belong to the val task: add --tasks hellaswag,val and the data flags")
    if args.hellaswag and not Path(args.hellaswag).expanduser().is_file():
        p.error(f"--hellaswag {args.hellaswag}: no such file")
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
    """The tasks asked for; the data is read (or fails) before the model, which takes longer, is loaded."""
    items = shards = None
    if "hellaswag" in args.tasks:
        items = runtime.local_rank0_first(env, lambda: hellaswag_items(args.hellaswag, args.data_cache))[:args.limit]
    if "val" in args.tasks:
        cache = runtime.local_rank0_first(env, lambda: data.prepare(data.DataSpec.from_args(args), progress=env.master))
        shards = data.TokenShards(cache, "val")
    model, info = load_model(args.checkpoint)
    model.to(env.device).eval()
    window = args.block_size or model.config.block_size
    if window > model.config.block_size:
        raise EvalError(f"--block_size {window} is longer than the model's window of {model.config.block_size}")
    if env.master:
        tqdm.write(describe(model, info, env.device, env.amp_dtype or torch.float32), file=sys.stderr)
    results = {"checkpoint": args.checkpoint}
    common = dict(device=env.device, autocast=env.autocast, rank=env.rank, world=env.world,
                  batch_size=args.batch_size, progress=env.master)
    if items is not None:
        results["hellaswag"] = hellaswag_accuracy(model, items, **common)
    if shards is not None:
        results["val"] = validation_loss(model, shards, window, max_tokens=args.eval_tokens, **common)
    return results


def table(results: dict) -> str:
    """The results as a few aligned lines for the terminal."""
    lines = [f"{'task':<10} {'metric':<9} {'value':>7}  "]
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines += [f"{'hellaswag':<10} {'acc':<9} {h['acc']:>7.4f}  {h['n']:,} items",
                  f"{'hellaswag':<10} {'acc_norm':<9} {h['acc_norm']:>7.4f}  for comparison, {REFERENCE}"]
    if "val" in results:
        v = results["val"]
        lines += [f"{'val':<10} {'loss':<9} {v['loss']:>7.4f}  {v['tokens']:,} tokens, "
                  f"perplexity {math.exp(min(v['loss'], 50)):.1f}",
                  f"{'val':<10} {'bpb':<9} {v['bpb']:>7.4f}  bits per byte of text, whatever the tokenizer"]
    return "\n".join(line.rstrip() for line in lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    env, notes = runtime.setup_env(args.device, args.amp, compile=False)
    try:
        for note in notes if env.master else []:
            print(f"note: {note}", file=sys.stderr)
        results = run(args, env)
        if env.master:
            print(table(results), flush=True)
            if args.json:
                with atomic_write(Path(args.json).expanduser()) as tmp:
                    tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
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
