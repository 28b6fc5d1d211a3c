"""Train GPT-2 on one GPU, several (torchrun), or the CPU, keeping the best-validation checkpoint.

    python train_gpt2.py --dataset PATH_OR_HUB_NAME ...
    torchrun --standalone --nproc_per_node 8 train_gpt2.py ...
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import ARCH_PRESETS, GPT, CheckpointError, GPTConfig, load_checkpoint, load_state, strip_compile_prefix

# Dense bf16 peak of each card, TFLOP/s, from the vendors' datasheets (SXM parts), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "GH200": 989, "A100": 312}


# ----------------------------------------------------------------------------------------------------
# Command line


positive_int = data.positive_int
non_negative_int = data.arg_type(int, lambda v: v >= 0, "0 or more")
positive_float = data.arg_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
non_negative_float = data.arg_type(float, lambda v: v >= 0 and math.isfinite(v), "0 or more")
dropout_rate = data.arg_type(float, lambda v: 0 <= v < 1, "in [0, 1)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones, whose meaning the help text already gives."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train GPT-2 with a warmup + cosine schedule, keeping the best "
                                "validation checkpoint.", formatter_class=_HelpFormatter)
    data.add_data_args(p)
    m = p.add_argument_group("model (defaults: GPT-2 124M)")
    m.add_argument("--arch", choices=sorted(ARCH_PRESETS), default="gpt2", help="architecture preset")
    m.add_argument("--block_size", type=positive_int, default=1024, help="context length in tokens")
    m.add_argument("--n_layer", type=positive_int, default=12)
    m.add_argument("--n_head", type=positive_int, default=12)
    m.add_argument("--n_embd", type=positive_int, default=768)
    m.add_argument("--dropout", type=dropout_rate, default=0.0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=positive_int, default=64,
                   help="sequences per optimizer step, over all GPUs and accumulation micro-steps")
    o.add_argument("--grad_accum", type=positive_int, default=1,
                   help="micro-steps per optimizer step (each GPU runs batch_size / (GPUs * grad_accum) sequences at once)")
    o.add_argument("--lr", type=positive_float, default=6e-4, help="peak learning rate")
    o.add_argument("--min_lr", type=non_negative_float, default=6e-5, help="learning rate at the end of the cosine")
    o.add_argument("--warmup_steps", type=non_negative_int, default=700)
    o.add_argument("--max_steps", type=positive_int, default=None,
                   help="optimizer steps in the run (default: --epochs over the training split)")
    o.add_argument("--epochs", type=positive_float, default=4.0,
                   help="passes over the training split when --max_steps is not given; up to about 4 repeats cost "
                        "little against fresh data (Muennighoff et al. 2023)")
    o.add_argument("--weight_decay", type=non_negative_float, default=0.1)
    o.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="max gradient norm (0: no clipping)")
    o.add_argument("--seed", type=int, default=1337)
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (bf16 autocast; fp16 with loss scaling on GPUs without bf16); default on CUDA")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; default on CUDA")
    r.add_argument("--num_workers", type=non_negative_int, default=2,
                   help="processes that read and pin batches ahead of the GPU (0: the training process itself)")
    r.add_argument("--eval_interval", type=positive_int, default=250, help="steps between validation runs")
    r.add_argument("--eval_iters", type=positive_int, default=20,
                   help="validation batches per evaluation (at most one pass over the validation split)")
    r.add_argument("--log_interval", type=positive_int, default=10, help="steps between metrics lines")
    r.add_argument("--checkpoint_interval", type=positive_int, default=1000, help="steps between latest.pt saves")
    r.add_argument("--save_dir", default="checkpoints", help="where checkpoints, metrics.jsonl and loss.png go")
    r.add_argument("--resume", action="store_true", help="continue the run in --save_dir/latest.pt")
    r.add_argument("--sample_during_training", action="store_true", help="print a short sample at each evaluation")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, checked against each other too, so a bad combination ends here before anything is written."""
    p = build_parser()
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.n_embd % args.n_head:
        p.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.arch == "modern" and (args.n_embd // args.n_head) % 2:
        p.error(f"--arch modern needs an even head size for rotary embeddings, not {args.n_embd // args.n_head}")
    if args.min_lr > args.lr:
        p.error(f"--min_lr {args.min_lr} is above --lr {args.lr}")
    if args.batch_size % (world * args.grad_accum):
        p.error(f"--batch_size {args.batch_size} is not divisible by GPUs × --grad_accum = "
                f"{world} × {args.grad_accum} = {world * args.grad_accum}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to PyTorch (check nvidia-smi, or that torch is a CUDA build)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps: Apple's MPS backend is not available here")
    return args


def model_config(args) -> GPTConfig:
    return GPTConfig.from_preset(args.arch, block_size=args.block_size, n_layer=args.n_layer,
                                 n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)


# ----------------------------------------------------------------------------------------------------
# Devices, precision and processes


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    compile: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_env(args) -> tuple[Env, list[str]]:
    """The device, process group, precision and compile choice, with a note for each fallback taken."""
    notes = []
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if kind == "cuda" else kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        # Generous timeout: rank 0 may be downloading and tokenizing the data while the others wait.
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    env = Env(device=device, rank=rank, local_rank=local_rank, world=world)
    env.amp_dtype, note = choose_amp(args.amp, kind)
    notes += [note] if note else []
    env.compile, note = choose_compile(args.compile, kind)
    notes += [note] if note else []
    return env, notes


def choose_amp(requested: bool | None, kind: str) -> tuple[torch.dtype | None, str | None]:
    if kind == "cuda":
        if requested is False:
            return None, None
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, None
        return torch.float16, "--amp: this GPU lacks bf16, so fp16 with loss scaling"
    if kind == "cpu" and requested:
        return torch.bfloat16, "--amp on the CPU: bf16 autocast (fast only on CPUs with AVX-512 bf16 or AMX)"
    if requested:
        return None, f"--amp: not used on {kind}; training in fp32"
    return None, None


def choose_compile(requested: bool | None, kind: str) -> tuple[bool, str | None]:
    if kind == "cuda":
        from torch.utils._triton import has_triton
        if requested is not False and not has_triton():
            return False, "torch.compile: off, Triton is not installed (pip install triton)"
        return requested is not False, None
    if requested is None:
        return False, f"torch.compile: off on {kind} (its start-up cost outweighs the gain there; --compile forces it)"
    return requested, None


def cleanup_env(env: Env):
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Schedule and optimizer


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay reaching min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def make_optimizer(model: GPT, args, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and norm gains are not decayed (GPT-3's recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel does the whole update in a few launches (CUDA and, since torch 2.4, the CPU).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def micro_seed(seed: int, step: int, micro_index: int) -> int:
    """The RNG seed of one micro-batch (dropout), a function of where it sits in the run.

    Nothing about random state needs saving for an exact resume, and one process with accumulation
    draws the same dropout masks as several ranks splitting the same batch.
    """
    return (seed * 1_000_003 + step) * 1_009 + micro_index


# ----------------------------------------------------------------------------------------------------
# One optimizer step (bench.py times exactly this function)


def train_step(model, optimizer, batches, *, env: Env, step: int, seed: int, grad_accum: int,
               grad_clip: float, scaler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over grad_accum micro-batches, then clip; returns (mean loss, grad norm).

    The optimizer step itself is left to the caller, which first checks that both are finite.
    """
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(grad_accum):
        x, y = next(batches)
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        torch.manual_seed(micro_seed(seed, step, env.rank * grad_accum + micro))
        # DDP all-reduces gradients only on the last micro-step; the earlier ones just accumulate.
        last = micro == grad_accum - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with env.autocast():
                _, loss = model(x, y)
            # Gradients of the micro-steps add up; dividing by their number makes the sum a mean.
            loss = loss / grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    return loss_sum, norm


# ----------------------------------------------------------------------------------------------------
# What the run reports and writes


@functools.lru_cache(maxsize=1)  # asked for the header printed and the one logged: run git once
def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("+uncommitted" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header(args, env: Env) -> dict:
    """Everything needed to trace a figure back to what produced it (llm.c and modded-nanogpt log the same)."""
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else env.device.type
    return {"git": git_revision(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device_name, "world_size": env.world,
            "amp": str(env.amp_dtype).replace("torch.", "") if env.amp_dtype else "fp32",
            "compile": env.compile, "args": vars(args)}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Longest name first, so GH200 is not read as H200.
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


class Metrics:
    """metrics.jsonl (one JSON object a line) and loss.png in the save directory, written by rank 0."""

    def __init__(self, save_dir: Path, resume_step: int | None):
        self.path = save_dir / "metrics.jsonl"
        self.plot_path = save_dir / "loss.png"
        self.rows = []
        if resume_step is not None and self.path.exists():
            # Keep the curve continuous: drop what the interrupted run logged past the resumed step.
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines())
                         if r.get("step", 0) <= resume_step]
        with data.atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, **row):
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return  # the picture is optional; metrics.jsonl has the numbers
        fig, ax = plt.subplots(figsize=(8, 5))
        for key, label in (("train_loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in self.rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        with data.atomic_write(self.plot_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict):
    """torch.save through a temporary file, so a kill leaves the previous checkpoint whole."""
    with data.atomic_write(path) as tmp:
        torch.save(state, tmp)


def config_differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, flags {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def load_resume_state(save_dir: Path, config: GPTConfig) -> dict:
    path = save_dir / "latest.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (start without --resume, or point --save_dir "
                              "at the run to continue)")
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise CheckpointError(f"--resume: {path} holds a model but not the optimizer state a resume needs")
    diffs = config_differences(ckpt["config"], config.to_dict())
    if diffs:
        raise CheckpointError(f"--resume: {path} was trained with another model shape; " + "; ".join(diffs))
    return ckpt


class PendingStats:
    """One step's [loss, gradient norm, stop flag], copied to the host without waiting for the GPU."""

    def __init__(self, step: int, stats: torch.Tensor):
        self.step = step
        self.host = stats.to("cpu", non_blocking=True)  # lands in pinned memory when it comes from CUDA
        self.event = None
        if stats.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def values(self) -> tuple[float, float, bool]:
        if self.event is not None:
            self.event.synchronize()  # waits for this step's work only, not for what was queued after it
        loss, norm, stop = self.host.tolist()
        return loss, norm, stop > 0


class StopTraining(Exception):
    """Training cannot go on (a non-finite loss); the message says what the checkpoints on disk hold."""


# ----------------------------------------------------------------------------------------------------
# The run


def on_signal_stop_after_step() -> dict:
    """SIGINT, SIGTERM and SIGHUP set a flag the loop reads at each step boundary; a second one quits at once.

    SIGHUP is what a dropped SSH connection sends: the run saves latest.pt rather than dying mid-step.
    """
    state = {"signal": None}

    def handler(signum, frame):
        state["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)
    return state


class Trainer:
    def __init__(self, args, env: Env):
        self.args, self.env = args, env
        self.save_dir = Path(args.save_dir)
        self.config = model_config(args)
        self.say = tqdm.write if env.master else (lambda *a, **k: None)
        if not args.resume and (self.save_dir / "latest.pt").exists():
            raise CheckpointError(f"{self.save_dir / 'latest.pt'} is from an earlier run: continue it with --resume, "
                                  "or choose another --save_dir (nothing was overwritten)")
        self.cache_dir = self._prepare_data()
        world, accum = env.world, args.grad_accum
        self.train = data.BatchSource(data.TokenShards(self.cache_dir, "train"), args.block_size, args.batch_size,
                                      seed=args.seed, rank=env.rank, world_size=world, grad_accum=accum)
        self.val = data.BatchSource(data.TokenShards(self.cache_dir, "val"), args.block_size, args.batch_size,
                                    seed=args.seed, rank=env.rank, world_size=world, grad_accum=accum, shuffle=False)
        self.max_steps, self.warmup = self._plan()
        self._build_model()
        self.step, self.best_val, self.val_loss = 0, float("inf"), None
        if args.resume:
            self._resume()
        self.save_dir.mkdir(parents=True, exist_ok=True)
        if env.master:
            data.clean_temporaries(self.save_dir)  # what a killed run was writing when it died
        self.metrics = Metrics(self.save_dir, self.step if args.resume else None) if env.master else None

    def _prepare_data(self) -> Path:
        # One process per machine tokenizes; the others wait, then find the finished cache.
        if self.env.local_rank == 0:
            cache = data.prepare(self.args, progress=self.env.master)
        if self.env.world > 1:
            dist.barrier()
        if self.env.local_rank != 0:
            cache = data.prepare(self.args, progress=False)
        return cache

    def _plan(self) -> tuple[int, int]:
        a = self.args
        tokens_per_step = a.batch_size * a.block_size
        max_steps = a.max_steps or max(1, round(a.epochs * self.train.steps_per_epoch))
        warmup = a.warmup_steps
        if warmup >= max_steps:
            warmup = max_steps // 10
            self.say(f"note: --warmup_steps {a.warmup_steps} does not fit in a run of {max_steps} steps; "
                     f"warming up over {warmup} steps (10%) instead")
        self.say(f"plan: {self.train.shards.num_tokens:,} training tokens, {self.val.shards.num_tokens:,} validation "
                 f"tokens; {tokens_per_step:,} tokens per step ({a.batch_size} × {a.block_size}, micro-batches of "
                 f"{a.batch_size // (self.env.world * a.grad_accum)} on each of {self.env.world} process(es), "
                 f"{a.grad_accum} accumulation step(s)); {max_steps:,} steps = "
                 f"{max_steps / self.train.steps_per_epoch:.2f} epochs = {max_steps * tokens_per_step:,} tokens; "
                 f"warmup {warmup} steps")
        return max_steps, warmup

    def _build_model(self):
        torch.manual_seed(self.args.seed)  # the same initial weights on every rank
        self.raw_model = GPT(self.config).to(self.env.device)
        self.optimizer = make_optimizer(self.raw_model, self.args, self.env.device)
        fp16 = self.env.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.env.device.type) if fp16 else None
        model = torch.compile(self.raw_model) if self.env.compile else self.raw_model
        if self.env.world > 1:
            model = DDP(model, device_ids=[self.env.local_rank] if self.env.device.type == "cuda" else None)
        self.model = model
        self.flops_per_token = self.raw_model.flops_per_token(self.args.block_size)
        self.peak = peak_flops(self.env.device)

    def _resume(self):
        ckpt = load_resume_state(self.save_dir, self.config)
        load_state(self.raw_model, strip_compile_prefix(ckpt["model"]))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.val_loss = ckpt["step"], ckpt.get("val_loss")
        self.best_val = ckpt.get("best_val_loss", float("inf"))
        saved_args = ckpt.get("args", {})
        changed = [k for k in ("batch_size", "seed", "dataset", "subset", "sample_size", "val_split", "lr")
                   if k in saved_args and saved_args[k] != getattr(self.args, k)]
        if changed:
            self.say(f"note: resuming with changed {', '.join(changed)}: the run will not match an uninterrupted one")
        self.say(f"resumed from {self.save_dir / 'latest.pt'} at step {self.step} "
                 f"(best validation loss {self.best_val:.4f})")

    def checkpoint(self, name: str, full: bool):
        if not self.env.master:
            return
        state = {"model": self.raw_model.state_dict(), "config": self.config.to_dict(), "step": self.step,
                 "val_loss": self.val_loss, "best_val_loss": self.best_val,
                 "tokens": self.step * self.args.batch_size * self.args.block_size}
        if full:
            state |= {"optimizer": self.optimizer.state_dict(),
                      "scaler": self.scaler.state_dict() if self.scaler else None,
                      "schedule": {"warmup_steps": self.warmup, "max_steps": self.max_steps},
                      # The data position and every random draw follow from (seed, step): see micro_seed.
                      "data": {"step": self.step, "cache": str(self.cache_dir)},
                      "rng": {"seed": self.args.seed, "rule": "micro_seed(seed, step, micro-batch)"},
                      "args": vars(self.args)}
        save_checkpoint(self.save_dir / name, state)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, averaged over all ranks."""
        self.model.eval()
        a = self.args
        # Cover the validation split at most once: more batches would only repeat windows.
        iters = min(a.eval_iters, max(1, self.val.windows_per_epoch // a.batch_size))
        total = torch.zeros((), device=self.env.device)
        for k in range(iters):
            x, y = self.val.eval_batch(k)
            for xs, ys in zip(x.chunk(a.grad_accum), y.chunk(a.grad_accum)):  # micro-batches fit in memory
                with self.env.autocast():
                    _, loss = self.model(xs.to(self.env.device), ys.to(self.env.device))
                total += loss.float() / (iters * a.grad_accum)
        if self.env.world > 1:
            dist.all_reduce(total)
            total /= self.env.world
        self.model.train()
        return total.item()

    def print_sample(self):
        tok = data.get_tokenizer()
        g = torch.Generator(device=self.env.device).manual_seed(self.args.seed + self.step)
        self.raw_model.eval()
        ids = list(self.raw_model.generate([data.EOT], 48, temperature=0.8, top_k=200, generator=g))
        self.raw_model.train()
        self.say(f"sample at step {self.step}: {tok.decode(ids)!r}")

    def after_eval(self):
        self.val_loss = self.evaluate()
        improved = self.val_loss < self.best_val
        self.best_val = min(self.best_val, self.val_loss)
        if self.env.master:
            self.say(f"step {self.step}: validation loss {self.val_loss:.4f} (perplexity "
                     f"{math.exp(min(self.val_loss, 50)):.1f}){' - best so far, saved' if improved else ''}")
            self.metrics.log(step=self.step, val_loss=self.val_loss, val_ppl=math.exp(min(self.val_loss, 50)))
            self.metrics.plot()
        if improved:
            self.checkpoint("model_best_val.pt", full=False)
        self.checkpoint("latest.pt", full=True)
        if self.args.sample_during_training and self.env.master:
            self.print_sample()

    def step_stats(self, loss, norm, stop: bool) -> torch.Tensor:
        """[loss, gradient norm, stop flag] on the device, agreed over all ranks in one all-reduce."""
        # torch.full fills on the device: a tensor built from a host value would be a synchronous copy.
        stats = torch.stack([loss.float(), norm.float(), torch.full((), float(stop), device=loss.device)])
        if self.env.world > 1:
            dist.all_reduce(stats)
            stats[:2] /= self.env.world  # the norm is the same on every rank: its mean is itself
        return stats

    def check(self, pending: "PendingStats") -> tuple[float, float, bool]:
        loss, norm, stop = pending.values()
        if not math.isfinite(loss) or (not math.isfinite(norm) and self.scaler is None):
            raise StopTraining(f"the loss ({loss}) or gradient norm ({norm}) is not finite at step {pending.step}; "
                               f"stopped before its update. The checkpoints in {self.save_dir} are the last good "
                               "ones: resume with --resume and a lower --lr (or --grad_clip)")
        return loss, norm, stop

    def optimizer_step(self, lr: float, stats: torch.Tensor) -> "PendingStats":
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pending = PendingStats(self.step, stats)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when fp16 gradients overflowed
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            # Fused AdamW skips its whole update on the device when found_inf is 1 (GradScaler's mechanism),
            # so a non-finite step changes nothing and the CPU need not wait for the GPU to know it.
            self.optimizer.found_inf = (~stats[:2].isfinite().all()).float()
            self.optimizer.step()
        else:
            self.check(pending)  # other optimizers: wait for the figures before updating
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return pending

    def run(self):
        a, env = self.args, self.env
        if env.master:
            self.metrics.log(event="start", step=self.step, **json.loads(json.dumps(run_header(a, env), default=str)))
        if self.step >= self.max_steps:
            self.say(f"nothing to do: the run is at step {self.step} of {self.max_steps}")
            return
        signals = on_signal_stop_after_step()
        batches = data.micro_batches(self.train, self.step, self.max_steps - self.step, num_workers=a.num_workers,
                                     pin_memory=env.device.type == "cuda")
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not env.master, unit="step", dynamic_ncols=True)
        self.model.train()
        window = (time.perf_counter(), self.step)
        pending, stop = None, False
        while self.step < self.max_steps:
            lr = lr_at(self.step, a.lr, a.min_lr, self.warmup, self.max_steps)
            loss, norm = train_step(self.model, self.optimizer, batches, env=env, step=self.step, seed=a.seed,
                                    grad_accum=a.grad_accum, grad_clip=a.grad_clip, scaler=self.scaler)
            if pending is not None:  # the previous step's figures: done by now, so reading them stalls nothing
                stop |= self.check(pending)[2]
            pending = self.optimizer_step(lr, self.step_stats(loss, norm, signals["signal"] is not None))
            self.step += 1
            bar.update(1)
            log, evaluate = self.step % a.log_interval == 0, self.step % a.eval_interval == 0
            end, save = self.step == self.max_steps, self.step % a.checkpoint_interval == 0
            if log or evaluate or end or save or stop:
                loss_v, norm_v, flag = self.check(pending)  # checkpoints and logs only follow checked steps
                pending, stop = None, stop or flag
                window = self.log_step(bar, loss_v, norm_v, lr, *window) if log or end else window
                if evaluate or end:
                    self.after_eval()
                elif save or stop:
                    self.checkpoint("latest.pt", full=True)
                if evaluate or save:
                    window = (time.perf_counter(), self.step)  # tokens/s counts training time only
            if stop:
                if env.world > 1:
                    dist.barrier()  # every rank leaves after rank 0 has saved
                bar.close()
                self.say(f"stopped by signal at step {self.step}; {self.save_dir / 'latest.pt'} saved, "
                         "continue with --resume")
                raise SystemExit(128 + (signals["signal"] or signal.SIGTERM))
        bar.close()
        self.say(f"done: {self.step} steps, best validation loss {self.best_val:.4f}; "
                 f"best model in {self.save_dir / 'model_best_val.pt'}")

    def log_step(self, bar, loss: float, norm: float, lr: float, t0: float, step0: int) -> tuple[float, int]:
        """Logs the step just checked, with the speed over the steps since (t0, step0)."""
        now = time.perf_counter()
        tokens_per_s = (self.step - step0) * self.args.batch_size * self.args.block_size / (now - t0)
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.env.world) if self.peak else None
        row = dict(step=self.step, train_loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_s,
                   elapsed_s=bar.format_dict["elapsed"])
        if mfu is not None:
            row["mfu"] = mfu
        if self.env.master:
            self.metrics.log(**row)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
        return now, self.step


def main(argv=None):
    args = parse_args(argv)
    env, notes = setup_env(args)
    try:
        if env.master:
            header = run_header(args, env)
            tqdm.write(f"train_gpt2.py at git {header['git']}, torch {header['torch']} (CUDA {header['cuda']}), "
                       f"device {header['device']} × {env.world}, {header['amp']}, compile {env.compile}")
            tqdm.write("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
            for note in notes:
                tqdm.write(f"note: {note}")
        Trainer(args, env).run()
        if env.world > 1:
            dist.barrier()  # ranks leave together: tearing the group down while rank 0 still writes aborts gloo
    except (data.DataError, CheckpointError, StopTraining) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before training starts (e.g. while preparing data); later, signals stop cleanly
        sys.exit("interrupted")
    except torch.cuda.OutOfMemoryError:
        micro = args.batch_size // (env.world * args.grad_accum)
        sys.exit(f"error: out of GPU memory with micro-batches of {micro} × {args.block_size} tokens: lower "
                 f"--batch_size, or raise --grad_accum (now {args.grad_accum}) to keep {args.batch_size} sequences "
                 "per step in smaller micro-batches")
    finally:
        cleanup_env(env)


if __name__ == "__main__":
    main()
