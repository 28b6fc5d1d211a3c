"""This repository's checkpoints: what one holds, writing it in the background (the best and the latest),
reading it back (for --resume, --init_from, sample.py, eval.py and the exports), and choosing between our
.pt and a transformers directory or Hub name (hf.py's).

A checkpoint is a dict of plain values and tensors, never pickled objects, so that load_checkpoint reads
it with weights_only=True:
    model       the weights, named as the plain module names them (no torch.compile or DDP prefix)
    config      model.GPTConfig as a dict
    step, val_loss, best_val_loss, best_step, max_steps, tokens, init_from
                where the run was, its planned steps, the tokens trained, what it started from
    run         what start-up derived from the flags (startup.Settings.to_dict): the batch, grad_accum,
                the steps, the data flags, what --time chose
latest.pt holds besides what --resume needs:
    optimizer   each optimizer's state_dict, in optim.make_optimizers' order (AdamW, then Muon)
    scaler      GradScaler's state (fp16), or None
    args        the flags as given
A latest.pt written before `run` existed holds the derived grad_accum in `args`; saved_run reads either.
"""
from __future__ import annotations

import math
import os
import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import hf
from common import CheckpointError, SaveError, atomic_write, first_line, first_sentence
from model import GPT, GPTConfig
from weights import load_state, model_with_weights, strip_wrapper_prefixes

BEST, LATEST = "model_best_val.pt", "latest.pt"  # in --save_dir


# ----------------------------------------------------------------------------------------------------
# Writing


def checkpoint_state(model: GPT, **fields) -> dict:
    """{"model": weights, "config": shape, **fields}: what a checkpoint holds (tensors still the model's own).

    Fields are plain values and tensors (step, val_loss, optimizer state, ...), never pickled objects,
    so load_checkpoint reads the file with weights_only=True.
    """
    return {"model": strip_wrapper_prefixes(model.state_dict()), "config": model.config.to_dict(), **fields}


def save_checkpoint(path, model: GPT, **fields) -> None:
    """checkpoint_state written atomically (a kill leaves the previous file whole)."""
    write_checkpoint(path, checkpoint_state(model, **fields))


def write_checkpoint(path, state: dict) -> None:
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


class CheckpointWriter:
    """Writes checkpoints on a thread of their own, so training goes on while they are serialised and fsynced.

    save() costs the caller a copy of the state into CPU buffers reused from save to save (pinned, for a
    GPU's state); the file is written atomically, as save_checkpoint writes it. A save waits for
    the one before it; wait() before the process ends. A failed write is raised by the next save or wait.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}  # file name -> how long its last write took
        self.steps: dict[str, int | None] = {}  # file name -> the step its last whole write holds
        self._thread: threading.Thread | None = None
        self._error: tuple[Path, BaseException] | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}  # (file name, place in the state) -> CPU buffer

    def save(self, path, state: dict) -> None:
        self.wait()
        path = Path(path)
        copies: dict[tuple, torch.Tensor] = {}  # tensors sharing memory (a tied head) stay shared in the file
        snapshot = self._copy(state, (path.name,), copies)
        if any(t.is_pinned() for t in copies.values()):
            torch.cuda.synchronize()  # the copies into pinned memory were queued without waiting
        self._thread = threading.Thread(target=self._write, args=(path, snapshot), name=f"writing {path.name}")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            (path, error), self._error = self._error, None
            raise SaveError(path, error)

    def _write(self, path: Path, snapshot: dict) -> None:
        started = time.perf_counter()
        try:
            write_checkpoint(path, snapshot)
            self.seconds[path.name] = time.perf_counter() - started
            self.steps[path.name] = snapshot.get("step")
        except BaseException as e:  # raised in the training thread by the next save or wait
            self._error = (path, e)

    def _copy(self, x, where: tuple, copies: dict):
        if isinstance(x, dict):
            return {k: self._copy(v, where + (k,), copies) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self._copy(v, where + (i,), copies) for i, v in enumerate(x))
        if not isinstance(x, torch.Tensor):
            return x
        same = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
        if same not in copies:
            # Buffers are kept from save to save: fresh memory would cost a page fault every 4 KB, and
            # pinned memory (for a GPU's copies, which then need not wait) is slow to allocate.
            buffer = self._buffers.get(where)
            if buffer is None or buffer.shape != x.shape or buffer.dtype != x.dtype:
                buffer = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
                self._buffers[where] = buffer
            copies[same] = buffer.copy_(x.detach(), non_blocking=x.is_cuda)
        return copies[same]


# ----------------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint dict, loaded with weights_only=True so a file carrying pickled code never runs it.

    mmap maps the file's tensors instead of reading them into fresh memory (copy-on-write).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint (an interrupted copy?)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                                  f"({first_sentence(e)})") from None
        # weights_only refuses any global it does not know, before anything runs.
        raise CheckpointError(f"refused {path}: it holds pickled Python objects that could run code; "
                              "only plain checkpoints (tensors and Python values) are loaded") from None
    except Exception as e:  # torch.load reports a truncated or foreign file with many exception types
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, or another format: "
                              f"{type(e).__name__}: {first_sentence(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this repository "
                              "(it lacks 'model' and 'config')")
    return ckpt


def check_found(spec: str, flag: str) -> None:
    """A path that load_model would read (a .pt, a directory) but that is not there, refused in one line before
    the work that would come first; a Hub name is asked only when it is loaded."""
    path = Path(spec).expanduser()
    if not path.exists() and (path.suffix == ".pt" or os.sep in spec or spec.startswith((".", "~"))):
        raise CheckpointError(f"{flag} {spec}: no such file or directory (a .pt of this repository, a transformers "
                              "directory, or a Hub name such as gpt2)")


def load_model(spec: str) -> tuple[GPT, dict]:
    """A model from our .pt checkpoint, a save_pretrained directory, or a Hub name; plus what is known of it.

    The returned dict has `source` and `params`, and for our checkpoints `step` and `val_loss`.
    """
    path = Path(spec).expanduser()
    if path.is_file() or path.suffix == ".pt":
        # Mapped: sample.py converts the weights to bf16 or int8 at once, reading each byte once from
        # the page cache rather than first copying 500 MB (124M) into new memory (~0.3 s).
        ckpt = load_checkpoint(path, mmap=True)
        model = model_from_checkpoint(ckpt)
        info = {"source": str(path), "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss")}
    else:
        model, info = hf.from_pretrained(spec), {"source": spec}
    return model, info | {"params": model.num_params()}


def human_count(n: int) -> str:
    """12345678 -> "12M": a parameter or token count as people say it."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.0f}{unit}" if n >= 10 * size else f"{n / size:.1f}{unit}"
    return str(n)


def describe(model: GPT, info: dict, device: torch.device, dtype: torch.dtype) -> str:
    """The one line sample.py and eval.py print at start: what load_model gave, how far it was trained, where it runs."""
    step, val = info.get("step"), info.get("val_loss")
    trained = f"step {'?' if step is None else step}, val loss {'?' if val is None else f'{val:.4f}'}"
    return (f"{human_count(info['params'])} parameters, {model.config.arch or 'custom'} preset, "
            f"{trained} ({info['source']}) on {device.type} in {str(dtype).removeprefix('torch.')}")


def model_from_checkpoint(ckpt: dict) -> GPT:
    return model_with_weights(GPTConfig.from_dict(ckpt["config"]), strip_wrapper_prefixes(ckpt["model"]))


# ----------------------------------------------------------------------------------------------------
# A training run's checkpoints


@dataclass
class Progress:
    """Where a run is: saved in every checkpoint of it (these fields), put back by --resume."""
    step: int = 0
    val_loss: float | None = None
    best_val: float = math.inf
    best_step: int | None = None
    hellaswag: float | None = None  # the last acc_norm scored
    tokens: int = 0  # trained, whatever batch each step had
    micro_steps: int = 0  # micro-batches each rank has read: where the data goes on (batches.BatchSource)
    target: tuple[int, float] | None = None  # (step, seconds from launch) where --target_loss was reached
    final_pending: bool = False  # the steps all done, the last evaluation not (a stop came first): --resume does it

    def advance(self, micro_steps: int, tokens: int) -> int:
        """A step done, of micro_steps micro-batches a rank and `tokens` tokens in all; the steps done now."""
        self.step, self.micro_steps, self.tokens = self.step + 1, self.micro_steps + micro_steps, self.tokens + tokens
        return self.step

    def fields(self, init_from: str, max_steps: int | None) -> dict:
        """As a checkpoint holds them, with the run's length as planned so far (horizon.Horizon.steps)."""
        return {"step": self.step, "val_loss": self.val_loss, "best_val_loss": self.best_val,
                "best_step": self.best_step, "max_steps": max_steps, "tokens": self.tokens,
                "micro_steps": self.micro_steps, "final_pending": self.final_pending, "init_from": init_from}


def save_best(writer: CheckpointWriter, save_dir: Path, model: GPT, progress: Progress, max_steps: int | None,
              init_from: str, run: dict) -> None:
    """model_best_val.pt: the weights, where the run was and what it started from, and what it trained with
    (`run`: eval.py finds the run's data in it)."""
    writer.save(save_dir / BEST, checkpoint_state(model, **progress.fields(init_from, max_steps), run=run))


def recorded_data(spec: str) -> dict | None:
    """The data flags the run that wrote this .pt trained on (its `run`'s data), or None (another kind of
    checkpoint, or one from before they were recorded)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        return None
    return (load_checkpoint(path, mmap=True).get("run") or {}).get("data")


def save_latest(writer: CheckpointWriter, save_dir: Path, model: GPT, optimizers: list, scaler, progress: Progress,
                max_steps: int | None, init_from: str, flags: dict, run: dict) -> None:
    """latest.pt: model_best_val.pt's fields and everything --resume needs. The data position and every
    random draw follow from (seed, step) (step.micro_seed), so no generator state is saved."""
    writer.save(save_dir / LATEST, checkpoint_state(
        model, **progress.fields(init_from, max_steps), optimizer=[optimizer.state_dict() for optimizer in optimizers],
        scaler=scaler.state_dict() if scaler is not None else None, args=flags, run=run))


def read_latest(save_dir: Path, optimizer: str, init_from: str) -> dict:
    """latest.pt for --resume, refused in one line where it cannot continue this run."""
    path = save_dir / LATEST
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (start without --resume, or point --save_dir "
                              "at the run to continue)")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        best, kept = save_dir / BEST, best_so_far(save_dir)
        weights = f"{best} holds the best weights (step {kept[0]}) for sample.py, or to start a run in another " \
                  "--save_dir with --init_from; or " if kept else ""
        raise CheckpointError(f"--resume: {e}, so the run cannot continue from it: {weights}delete {path} and "
                              "--resume starts the run again from step 0") from None
    if "optimizer" not in ckpt:
        raise CheckpointError(f"--resume: {path} holds a model but not the optimizer state a resume needs")
    started_from = ckpt.get("init_from", "scratch")
    if started_from != init_from:
        raise CheckpointError(f"--resume: {path} started from --init_from {started_from}, not {init_from}; "
                              "resume it with the flags it started with")
    trained_with = saved_run(ckpt).get("optimizer", "adamw")  # checkpoints from before Muon trained with AdamW
    if trained_with != optimizer:
        raise CheckpointError(f"--resume: {path} was trained with --optimizer {trained_with}, not {optimizer}; "
                              "resume it with the optimizer it started with")
    return ckpt


def best_so_far(save_dir: Path) -> tuple[int, float] | None:
    """(step, validation loss) of the run's model_best_val.pt, where it is a readable checkpoint of this repository."""
    try:
        ckpt = load_checkpoint(save_dir / BEST, mmap=True)
    except CheckpointError:
        return None
    step, val = ckpt.get("step"), ckpt.get("val_loss")
    return (step, val) if isinstance(step, int) and isinstance(val, float) else None


def saved_flags(save_dir: Path) -> dict | None:
    """The flags the run in save_dir was given, as its latest.pt recorded them; None where there is no latest.pt
    that can be read (--resume says why)."""
    try:
        return load_checkpoint(save_dir / LATEST, mmap=True).get("args")
    except CheckpointError:
        return None


def saved_run(ckpt: dict) -> dict:
    """What start-up derived for the run latest.pt continues (startup.Settings.to_dict); for a checkpoint of
    before `run` existed, the part its `args` held (they were the derived values then)."""
    if "run" in ckpt:
        return ckpt["run"]
    args = ckpt.get("args", {})
    return {k: args[k] for k in ("grad_accum", "optimizer") if isinstance(args.get(k), (int, str))}


def restore(ckpt: dict, model: GPT, optimizers: list, scaler, tokens_per_step: int, grad_accum: int) -> Progress:
    """latest.pt's weights and optimizer states put back; where the run was (a checkpoint that does not count
    its tokens or micro-batches trained at tokens_per_step and grad_accum every step)."""
    load_state(model, ckpt["model"])
    states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]  # one AdamW
    for optimizer, state in zip(optimizers, states, strict=True):
        try:
            optimizer.load_state_dict(state)
        except ValueError as e:  # its groups differ: another --adamw_groups, or parameters another architecture has
            raise CheckpointError(f"--resume: latest.pt's {type(optimizer).__name__} state does not fit this run's "
                                  f"({first_line(e)}); resume with the flags the run started with") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    best, tokens = ckpt.get("best_val_loss"), ckpt.get("tokens")
    return Progress(ckpt["step"], ckpt.get("val_loss"), math.inf if best is None else best, ckpt.get("best_step"),
                    tokens=ckpt["step"] * tokens_per_step if tokens is None else tokens,
                    micro_steps=ckpt.get("micro_steps", ckpt["step"] * grad_accum),
                    final_pending=ckpt.get("final_pending", False))


def read_weights(spec: str, block_size: int | None) -> tuple[GPTConfig, dict]:
    """--init_from's model: its configuration and weights, the context cropped to block_size if given (the
    learned position table keeps its first rows, as nanoGPT's crop_block_size; everything else as is)."""
    model, _ = load_model(spec)
    state = model.state_dict()
    wpe = "transformer.wpe.weight"
    if block_size is not None and wpe in state:
        state[wpe] = state[wpe][:block_size]
    return model.config, state
