"""Train GPT-2 on one GPU, several (torchrun), or the CPU, keeping the best-validation checkpoint.

    python train_gpt2.py                                      # GPT-2 124M's shape on FineWeb, the measured recipe
    python train_gpt2.py --plan --price_per_hour 3            # what a run will take and cost; nothing is written
    python train_gpt2.py --time 1h --sample_size 2000000      # the best model an hour buys, decay finished on time
    python train_gpt2.py --dataset ./my_texts --n_layer 6 --n_head 6 --n_embd 384 --max_steps 2000
    python train_gpt2.py ...the same flags... --resume        # after a stop, or a kill -9
    torchrun --standalone --nproc_per_node 8 train_gpt2.py --batch_size 512

The file reads in the order a run goes. The flags (`parse_args`: checked against each other, then never
changed). `start`: what the run trains with, resolved once into `Settings` (the shape from the flags,
--init_from's weights or latest.pt; the optimizer; grad_accum from the memory probe; the steps), and the
model, its optimizers and the data built. `train`: the loop, a few "once in a while" sections (the plan
and the time budget, a log line, HellaSwag, an evaluation, a save), each one call, then the step itself:
`update` runs the micro-batches forward and backward, clips, and updates (fused AdamW, and muon.py's Muon),
never waiting for the GPU. `--plan` is `start` without the download, then a few timed steps.
"""
from __future__ import annotations

import time

STARTED = time.monotonic()  # --time counts from here: importing torch, preparing data and compiling included

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import batches
import chat
import checkpoint
import data
import fineweb
from common import (EOT, ArgumentParser, CheckpointError, UnusableGPU, UserError, clean_temporaries, dropout_rate,
                    first_line, forgive_gone_readers, non_negative_float, non_negative_int, open_fraction, pick_device,
                    positive_float, positive_int, remove_own_temporaries)
from eval import validation_loss
from metrics import Metrics, print_header, run_header
from model import ARCH_PRESETS, GPT, GPTConfig, load_state, parameter_counts
from muon import Muon
from plan import (CHECKPOINT_BYTES_PER_PARAMETER, CHOOSING_MAX_S, CHOOSING_MIN_S, CHOOSING_SHARE, DEPTHS,
                  FORWARD_SHARE, HEAD_SIZE, OPTIMAL_TOKENS_PER_PARAMETER, RAM_SHARE, WIDTH_PER_LAYER, Budget,
                  Candidate, Costs, Outcome, Pace, Plan, Sizing, available_memory, budget_tokens, choose_depth,
                  cpu_advice, depth_shape, documents_for, estimated_data_tokens, parse_duration, peak_flops, scaling_params,
                  sized_batch, sized_lr, step_bytes, TOKENS_PER_DOCUMENT)
from shards import TokenShards
from runtime import (Env, all_ranks_agree, broadcast_from_rank0, broadcast_state_from_rank0, cleanup_env,
                     local_rank0_first, only_on_rank0, setup_env)

# The recipe that measured best here (BENCHMARKS.md, "Recipes"): the modern block trained by Muon with a
# warmup-stable-decay schedule. Fine-tuning (--init_from) defaults to AdamW, which suits small updates.
DEFAULT_ARCH, DEFAULT_OPTIMIZER, FINE_TUNE_OPTIMIZER = "modern", "muon", "adamw"
SHAPE_FLAGS = ("block_size", "n_layer", "n_head", "n_embd")
# With --time, the run's steps until a few have been timed and the budget can set them (replan).
UNPLANNED_STEPS = 2**62
# latest.pt is saved by the clock too, so that a kill -9 or the kernel's out-of-memory killer loses at most
# this much: first this long after training starts, then at this interval (as well as --checkpoint_interval).
FIRST_SAVE_S, SAVE_EVERY_S = 180.0, 600.0
# --plan times steps for at most this long, so that it answers within about a minute on any machine.
PLAN_TIMING_S = 40.0
# Muon's momentum warms up from this over the first steps (the FineWeb speedrun's 0.85 over 300).
MUON_MOMENTUM_START, MUON_MOMENTUM_WARMUP = 0.85, 300
# GPT-2 124M's warmup in llm.c (700 of its 19,073 steps). A default of a fixed count would take most of a
# short run: a 10-minute --time run of 836 steps spent 700 of them warming up, and ended 0.3 above a run of
# the next depth that warmed up over a tenth of its steps (BENCHMARKS.md, issue 26).
DEFAULT_WARMUP_STEPS = 700


# ----------------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones, whose meaning the help text already gives."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a GPT-2 (by default the modern block with Muon and a warmup-stable-decay "
                       "schedule), keeping the best validation checkpoint.", formatter_class=_HelpFormatter)
    data.add_data_args(p, sample_size_help=f"documents to use (default {data.DataSpec.sample_size:,}; with --time "
                       "sizing the model, about one pass over the tokens the budget buys)")
    add_model_flags(p)
    add_optimisation_flags(p)
    add_budget_flags(p)
    add_run_flags(p)
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    shape = GPTConfig()
    m = p.add_argument_group("model (defaults: GPT-2 124M; with --init_from, the weights' shape)")
    m.add_argument("--init_from", default="scratch", metavar="{scratch,gpt2,gpt2-medium,gpt2-large,gpt2-xl,PATH}",
                   help="start from random weights, OpenAI's GPT-2 (from the Hub), or the weights in PATH: our .pt "
                        "checkpoint or a transformers directory (default scratch)")
    m.add_argument("--arch", choices=sorted(ARCH_PRESETS), default=None, help=f"architecture preset (default {DEFAULT_ARCH})")
    m.add_argument("--arch_option", type=arch_option, action="append", default=[], metavar="SWITCH=VALUE",
                   help="change one switch of the preset (a field of model.GPTConfig), e.g. mlp=relu2, "
                        "tie_embeddings=false, zero_init=true, logit_softcap=15, embed_norm=true")
    m.add_argument("--block_size", type=positive_int, default=None,
                   help=f"context length in tokens (default {shape.block_size}; with --init_from, at most the weights')")
    m.add_argument("--n_layer", type=positive_int, default=None, help=f"(default {shape.n_layer})")
    m.add_argument("--n_head", type=positive_int, default=None, help=f"(default {shape.n_head})")
    m.add_argument("--n_embd", type=positive_int, default=None, help=f"(default {shape.n_embd})")
    m.add_argument("--depth", type=positive_int, default=None,
                   help=f"a depth of the family --time chooses from: {WIDTH_PER_LAYER} x DEPTH wide, heads of "
                        f"{HEAD_SIZE} (12 is GPT-2 124M); with --time, the batch, rates and data sized for it")
    m.add_argument("--dropout", type=dropout_rate, default=0.0)


def add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=positive_int, default=64,
                   help="sequences per optimizer step, over all GPUs and accumulation micro-steps")
    o.add_argument("--grad_accum", type=grad_accum, default="auto",
                   help="micro-steps per optimizer step (each GPU runs batch_size / (GPUs * grad_accum) sequences at "
                        "once); auto: the largest micro-batch that fits in GPU memory (1 on a CPU), kept on --resume")
    o.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="muon: Muon (--muon_lr) for the weight matrices inside the blocks, AdamW (--lr) for the "
                        f"embeddings, the head, norm gains and biases (default {DEFAULT_OPTIMIZER}; with --init_from, "
                        f"{FINE_TUNE_OPTIMIZER})")
    o.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW's peak learning rate")
    o.add_argument("--min_lr", type=non_negative_float, default=2e-4,
                   help="AdamW's learning rate at the end of the decay (Muon's decays in proportion)")
    o.add_argument("--muon_lr", type=positive_float, default=0.02, help="Muon's peak learning rate")
    o.add_argument("--muon_momentum", type=open_fraction, default=0.95,
                   help=f"Muon's momentum, reached from {MUON_MOMENTUM_START} over the first "
                        f"{MUON_MOMENTUM_WARMUP} steps")
    o.add_argument("--muon_weight_decay", type=non_negative_float, default=0.05,
                   help="Muon's decoupled weight decay (each step shrinks weights by muon_lr * this)")
    o.add_argument("--schedule", choices=["cosine", "wsd"], default="wsd",
                   help="after the warmup: cosine decay to --min_lr; or wsd, constant then a linear decay to "
                        "--min_lr over the last --cooldown_frac of the run (a run can be extended from its "
                        "constant phase)")
    o.add_argument("--cooldown_frac", type=open_fraction, default=0.5, help="wsd: the decaying share of the run")
    o.add_argument("--warmup_steps", type=non_negative_int, default=None,
                   help=f"steps of linear warmup (default: {DEFAULT_WARMUP_STEPS}, or a tenth of a shorter run)")
    o.add_argument("--max_steps", type=positive_int, default=None,
                   help="optimizer steps in the run (default: --epochs over the training split; on --resume, the "
                        "run's own plan)")
    o.add_argument("--reschedule", action="store_true",
                   help="on --resume with more --max_steps than planned: decay anew from the peak rate (by default "
                        "a run extended after its decay began keeps the rate where the decay left it)")
    o.add_argument("--epochs", type=positive_float, default=4.0,
                   help="passes over the training split when --max_steps is not given; up to about 4 repeats cost "
                        "little against fresh data (Muennighoff et al. 2023)")
    o.add_argument("--weight_decay", type=non_negative_float, default=0.1, help="AdamW's, on matrices only")
    o.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="max gradient norm (0: no clipping)")
    o.add_argument("--seed", type=int, default=1337)


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("budget")
    b.add_argument("--time", type=duration, default=None, metavar="DURATION",
                   help="train for this long (45m, 2h, 1h30m, or seconds), from process start, data preparation, the "
                        "last evaluation and save included; steps are planned from the measured pace, and wsd's "
                        "decay ends with the budget. With --max_steps, the shorter wins. On --resume it is this "
                        "process's own time, not the whole run's")
    b.add_argument("--price_per_hour", type=non_negative_float, default=None, metavar="DOLLARS",
                   help="what the whole machine costs an hour: the plan, the progress bar, metrics.jsonl and the "
                        "summary then show the cost")
    b.add_argument("--plan", action="store_true",
                   help="print the plan (parameters, tokens, steps, data, time and cost from a few steps timed on "
                        "random tokens) and stop: nothing is downloaded, trained or written")


def add_run_flags(p: argparse.ArgumentParser) -> None:
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
    r.add_argument("--hellaswag_interval", type=non_negative_int, default=0,
                   help="steps between HellaSwag scorings (eval.py's), logged as hellaswag_acc_norm (0: never)")
    r.add_argument("--hellaswag", metavar="FILE.jsonl", default=None,
                   help="HellaSwag items (default: the validation set, downloaded once into --data_cache)")
    r.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log the flags and metrics.jsonl's rows to this Weights & Biases project (pip install wandb)")


def grad_accum(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer, not {text!r}") from None


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a duration such as 45m, 2h, 1h30m or 5400 (seconds), "
                                         f"not {text!r}") from None


def arch_option(text: str) -> tuple[str, object]:
    """SWITCH=VALUE for --arch_option: a switch the presets set, its value cast to the field's type."""
    key, sep, value = text.partition("=")
    switches = ARCH_PRESETS[DEFAULT_ARCH]
    if not sep or key not in switches:
        raise argparse.ArgumentTypeError(f"must be SWITCH=VALUE with SWITCH one of {', '.join(switches)}, not {text!r}")
    kind = type(switches[key])
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{key} takes true or false, not {value!r}")
        return key, value.lower() == "true"
    try:
        return key, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} takes a {kind.__name__}, not {value!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked against each other too, so a bad combination ends here before anything is written.
    They are never changed afterwards: what follows from them is `start`'s Settings."""
    p = build_parser()
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.depth and any((args.n_layer, args.n_head, args.n_embd)):
        p.error("--depth names the whole shape: leave out --n_layer, --n_head and --n_embd")
    if args.depth and args.init_from != "scratch":
        p.error("--depth shapes a new model; with --init_from the shape is the weights'")
    if args.arch_option and args.init_from != "scratch":
        p.error("--arch_option shapes a new model; with --init_from the architecture is the weights'")
    try:
        GPTConfig.from_preset(args.arch or DEFAULT_ARCH, **dict(args.arch_option))
    except ValueError as e:
        p.error(f"--arch_option: {e}")
    if args.n_embd and args.n_head and args.n_embd % args.n_head:
        p.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.init_from == "scratch":
        try:
            model_config(args)  # GPTConfig checks the shape against the switches (rotary positions: an even head)
        except ValueError as e:
            p.error(str(e))
    if args.min_lr > args.lr:
        p.error(f"--min_lr {args.min_lr} is above --lr {args.lr}")
    accum = 1 if args.grad_accum == "auto" else args.grad_accum
    if args.batch_size % (world * accum):
        p.error(f"--batch_size {args.batch_size} is not divisible by GPUs × --grad_accum = "
                f"{world} × {accum} = {world * accum}")
    try:
        pick_device(args.device)
    except UnusableGPU as e:  # what is wrong and the fix, before anything is downloaded or written
        sys.exit(f"error: {e}")
    except UserError as e:
        p.error(str(e))
    return args


def default_optimizer(init_from: str) -> str:
    """DEFAULT_OPTIMIZER from scratch, FINE_TUNE_OPTIMIZER from weights."""
    return DEFAULT_OPTIMIZER if init_from == "scratch" else FINE_TUNE_OPTIMIZER


def model_config(args, shape: dict | None = None) -> GPTConfig:
    """The shape the flags (or `shape`, what --time chose) name for a model from scratch, GPTConfig's defaults
    (GPT-2 124M) where they are silent."""
    shape = shape or (depth_shape(args.depth) if args.depth else {})
    shape = {name: getattr(args, name) or getattr(GPTConfig, name) for name in SHAPE_FLAGS} | shape
    return GPTConfig.from_preset(args.arch or DEFAULT_ARCH, **dict(args.arch_option), **shape, dropout=args.dropout)


def sizes_the_model(args) -> bool:
    """--time with no shape flags chooses the model, its batch and its data (for --depth, only its batch and
    data); shape flags keep their meaning."""
    return bool(args.time) and args.init_from == "scratch" and not any((args.n_layer, args.n_head, args.n_embd))


def shown_flags(args) -> dict:
    """The flags as the run header prints them: as given, with a new model's default shape, preset and
    optimizer filled in (what the flags mean, not yet what --init_from's weights or latest.pt say)."""
    flags = vars(args) | {"optimizer": args.optimizer or default_optimizer(args.init_from)}
    if args.init_from == "scratch" and not sizes_the_model(args):  # else the budget chooses the shape
        config = model_config(args)
        flags |= {name: getattr(config, name) for name in SHAPE_FLAGS} | {"arch": args.arch or DEFAULT_ARCH}
    return flags


# ----------------------------------------------------------------------------------------------------
# What a run trains with: resolved once, at start-up


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer flags (defaults in build_parser), the optimizer itself resolved from --init_from."""
    optimizer: str
    lr: float
    weight_decay: float
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float

    @classmethod
    def from_args(cls, args, lr: float | None = None) -> "OptimizerSettings":
        """The flags' settings; `lr`, AdamW's rate where --time sized the batch."""
        fields = {f: getattr(args, f) for f in cls.__dataclass_fields__}
        return cls(**fields | {"optimizer": args.optimizer or default_optimizer(args.init_from), "lr": lr or args.lr})


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each step as a share of its peak (lr_scale), for a run of max_steps. Where the run's
    length is not known yet (its --epochs over data still arriving: None), a step's rate is known only where no
    length from `at_least` steps on would change it; elsewhere lr() is None and the run waits for the data."""
    kind: str
    warmup_steps: int | None  # the flag: fitting_warmup makes it fit the run
    max_steps: int | None
    cooldown_frac: float
    floor: float
    held: float | None = None  # a run extended after its decay began keeps this share (Settings.held_lr)
    at_least: int = 1  # with max_steps None: the run is at least this long

    def lr(self, step: int) -> float | None:
        if self.held is not None:
            return self.held
        length = self.max_steps or max(self.at_least, step + 1)
        if self.max_steps is None and not self._known(step, length):
            return None
        warmup = fitting_warmup(self.warmup_steps, length)
        return lr_scale(step, warmup, length, self.kind, self.cooldown_frac, self.floor)

    def _known(self, step: int, length: int) -> bool:
        """Whether every run length from `length` on gives this step the same rate: the warmup, and where the
        decay starts, only grow with the length, so it is when the warmup is the same at `length` as without
        end, and the step is in it, or (wsd) in the constant phase before the decay of a run of `length`."""
        warmup = fitting_warmup(self.warmup_steps, length)
        if warmup != fitting_warmup(self.warmup_steps, UNPLANNED_STEPS):
            return False
        return step < warmup or (self.kind == "wsd" and step < wsd_decay_start(warmup, length, self.cooldown_frac))


@dataclass(frozen=True)
class Settings:
    """What a run trains with: the flags as given, and what `start` derived from them, --init_from's weights,
    latest.pt, the data and the memory probe. The loop, --plan and the checkpoints all read this one object,
    and nothing changes it."""
    flags: argparse.Namespace
    config: GPTConfig  # the shape trained: the flags', what --time chose, --init_from's weights' or latest.pt's
    optimizer: OptimizerSettings
    batch_size: int  # sequences a step, over all processes and micro-steps: --batch_size, or what --time chose
    grad_accum: int  # micro-steps per optimizer step on each process
    world: int  # processes
    steps: int | None  # the run's optimizer steps; with --time at most this many (None: as the budget allows)
    eval_batches: int  # validation batches an evaluation reads: --eval_iters, at most one pass over the split
    data: data.DataSpec  # the data flags, --sample_size as --time sized it
    sizing: Sizing | None  # what --time chose, and why
    held_lr: float | None = None  # a resumed run made longer after its decay began: the rate's share, held

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world * self.grad_accum)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.config.block_size

    def schedule(self, max_steps: int | None, at_least: int = 1) -> Schedule:
        """The learning-rate schedule of a run of max_steps (None: not known yet, at least at_least)."""
        a = self.flags
        return Schedule(a.schedule, a.warmup_steps, max_steps, a.cooldown_frac, a.min_lr / a.lr, self.held_lr,
                        at_least)

    def to_dict(self) -> dict:
        """As checkpoints and metrics.jsonl record it (the flags are recorded beside it, as `args`)."""
        return {"config": self.config.to_dict(), "arch": self.config.arch, "optimizer": self.optimizer.optimizer,
                "lr": self.optimizer.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "world": self.world, "micro_batch": self.micro_batch, "steps": self.steps,
                "eval_batches": self.eval_batches, "data": dataclasses.asdict(self.data),
                "sizing": self.sizing.to_dict() if self.sizing else None}


def fitting_warmup(warmup_steps: int | None, max_steps: int) -> int:
    """--warmup_steps, or 10% of a run too short for it; by default DEFAULT_WARMUP_STEPS or 10% of the run,
    whichever is fewer."""
    if warmup_steps is None:
        return min(DEFAULT_WARMUP_STEPS, max_steps // 10)
    return warmup_steps if warmup_steps < max_steps else max_steps // 10


def warmup_note(warmup_steps: int | None, max_steps: int) -> list[str]:
    if warmup_steps is None or warmup_steps < max_steps:
        return []
    return [f"note: --warmup_steps {warmup_steps} does not fit in a run of {max_steps} steps; warming up over "
            f"{fitting_warmup(warmup_steps, max_steps)} steps (10%) instead"]


@dataclass
class Progress:
    """Where the run is: saved in every checkpoint, put back by --resume."""
    step: int = 0
    val_loss: float | None = None
    best_val: float = math.inf
    best_step: int | None = None
    hellaswag: float | None = None  # the last acc_norm scored
    max_steps: int | None = None  # the schedule's end as planned so far (with --time, once timed)
    tokens: int = 0  # trained, whatever batch each step had

    def fields(self, init_from: str) -> dict:
        """As checkpoints record it (checkpoint.py's format)."""
        return {"step": self.step, "val_loss": self.val_loss, "best_val_loss": self.best_val,
                "best_step": self.best_step, "max_steps": self.max_steps, "tokens": self.tokens,
                "init_from": init_from}


@dataclass
class Run:
    """What `start` resolved and built: the settings, the model being trained, where the run is, its data."""
    settings: Settings
    learner: "Learner"
    progress: Progress
    plan: Plan
    batches: batches.BatchSource | None  # the training split's; None under --plan, which prepares no data
    val: TokenShards | None  # complete before the first step
    hellaswag: list | None  # eval.py's items, when the run scores HellaSwag
    data_failed: Callable[[], BaseException | None] = lambda: None  # what stopped the data arriving behind the run


def start(args, env: Env, say: Callable, started: float, dry_run: bool = False) -> Run:
    """Everything the run trains with, in the order it is known, each step said as it is: the starting point
    (the shape and weights; with --time, the depth the budget buys), the data (begun behind the training unless
    dry_run, for --plan: the first step needs only the validation split and the first training shard), the
    model and its optimizers, the micro-batch that fits, the steps; on --resume, where it was."""
    if not dry_run:
        refuse_overwriting(args, env)
    resumed = read_resume(args, env, say) if args.resume else None
    early = None if dry_run or sizes_documents(args) else open_data(data.DataSpec.from_args(args), env, say)
    sizing = size_for_budget(args, env, say, started, resumed) if sizes_the_model(args) else None
    config, init_state = starting_point(args, env, resumed, say, sizing)
    batch_size = sizing.batch if sizing else args.batch_size
    spec = data.DataSpec.from_args(args, sample_size=sizing.sample_size if sizing else None)
    plan = first_plan(config, args, batch_size, spec)
    plan.depth = sizing.depth if sizing else None
    say("\n".join([plan.model_line(), plan.data_line(), *fetched(spec)]))  # before any download
    train, val, failed = early or ((None, None, None) if dry_run else open_data(spec, env, say))
    if train is not None and train.complete:
        plan.data_tokens, plan.data_basis = train.num_tokens, ""
        say("\n".join([plan.data_line(), *data_note(sizing, plan.data_tokens)]))
    optimizer = OptimizerSettings.from_args(args, lr=sizing.lr if sizing else None)
    t = build(config, env, optimizer, seed=args.seed, init_state=init_state)
    grad_accum = choose_grad_accum(args, env, t, resumed, batch_size, config.block_size, say)
    source = None
    if train is not None:
        source = batches.BatchSource(train, config.block_size, batch_size, seed=args.seed, rank=env.rank,
                                     world_size=env.world, grad_accum=grad_accum)
        check_validation(val, config.block_size)
        if source.packed is not None:
            say(source.packed.note())
    steps = planned_steps(args, plan, source, resumed, config.block_size, batch_size)
    settings = Settings(args, config, optimizer, batch_size, grad_accum, env.world, steps,
                        eval_batches(args, plan, val, config.block_size, batch_size), spec, sizing,
                        held_lr(args, resumed, steps))
    plan.steps = settings.steps
    if not dry_run and not args.time and settings.steps is not None:
        say("\n".join([plan.steps_line(), *plan.warnings(), *warmup_note(args.warmup_steps, settings.steps)]))
    progress = restore(resumed, t, settings, say) if resumed else Progress(max_steps=settings.steps)
    hellaswag = load_hellaswag(args, env, say) if args.hellaswag_interval and not dry_run else None
    return Run(settings, t, progress, plan, source, val, hellaswag, failed or (lambda: None))


def sizes_documents(args) -> bool:
    """Whether --time chooses the documents (so the data is known only once the model is chosen)."""
    return sizes_the_model(args) and not args.sample_size and data.is_hub(args.dataset)


def open_data(spec: data.DataSpec, env: Env, say: Callable) -> tuple[TokenShards, TokenShards, Callable]:
    """The run's data, begun behind the training by each machine's first process (the others read what it
    writes), from where rank 0 decided it comes; once its validation split is complete: the training split as
    it arrives, the validation split, and what stopped the preparation (on this process)."""
    r = only_on_rank0(env, lambda: data.route(spec))  # asks the Hub once, for every rank
    r = broadcast_from_rank0(env, lambda: r)
    if r.note:
        say(r.note)
    preparation = data.Preparation(r, spec, say=say if env.master else None) if env.local_rank == 0 else None
    failed = preparation.failed if preparation else (lambda: None)
    val = TokenShards(r.cache_dir, "val", failed=failed, arriving=True)
    val.wait()
    return TokenShards(r.cache_dir, "train", failed=failed, arriving=True), val, failed


def size_for_budget(args, env: Env, say: Callable, started: float, resumed: dict | None) -> Sizing:
    """What --time buys: the family's depths timed here (timed_candidates), the one whose tokens in the budget
    come closest to compute-optimal chosen, with its batch, AdamW rates and documents. A resumed run keeps
    its own choice."""
    saved = checkpoint.saved_run(resumed).get("sizing") if resumed else None
    block = args.block_size or GPTConfig.block_size
    if saved:
        sizing = Sizing.from_dict(saved)
    else:
        began = time.monotonic()
        limit = began + min(max(CHOOSING_SHARE * args.time, CHOOSING_MIN_S), CHOOSING_MAX_S)
        # What the steps get of the budget: less the choosing, the margin kept back and the evaluations.
        seconds = (args.time - (limit - started)) * (1 - Budget.MARGIN) * \
            (1 - FORWARD_SHARE * args.eval_iters / args.eval_interval)
        candidates = timed_candidates(args, env, block, limit, seconds)
        chosen = choose_depth(candidates)
        scale = sized_lr(1.0, chosen.batch, args.batch_size, depth_shape(chosen.depth)["n_embd"])
        sizing = Sizing(chosen.depth, chosen.batch, args.lr * scale, args.min_lr * scale,
                        args.sample_size or documents_for(args.dataset, chosen.tokens, args.val_split),
                        candidates, time.monotonic() - began)
    say("\n".join(sizing.lines(env.device.type, block, args.lr, args.muon_lr, args.batch_size)
                  + (["plan: (the choice of the run in latest.pt, kept)"] if saved else [])))
    return sizing


def timed_candidates(args, env: Env, block: int, limit: float, seconds: float) -> list[Candidate]:
    """The family's depths in turn, smallest first, each timed at its batch, with the tokens `seconds` of
    training buy at its pace; until one falls below the compute-optimal tokens a parameter (deeper ones fall
    further), one does not fit in memory, or the time for choosing ends at `limit`. Every rank times every
    candidate (DDP's collectives in step), and rank 0's clock and pace decide."""
    candidates = []
    for depth in [args.depth] if args.depth else DEPTHS:
        if candidates and broadcast_from_rank0(env, lambda: time.monotonic() > limit):
            break
        candidate = timed_candidate(model_config(args, depth_shape(depth)), depth, env, args, block, limit,
                                    lambda pace: budget_tokens(pace, seconds))
        if candidate is None:
            break
        candidates.append(candidate)
        if candidate.tokens_per_parameter < OPTIMAL_TOKENS_PER_PARAMETER:
            break
    if not candidates:
        raise UserError(f"--time: even depth {DEPTHS[0]} does not fit in this {env.device.type}'s memory at "
                        f"context {block}: give a smaller --block_size, or the shape (--n_layer, --n_head, --n_embd)")
    return candidates


def timed_candidate(config: GPTConfig, depth: int, env: Env, args, block: int, limit: float,
                    tokens: Callable[[float], float]) -> Candidate | None:
    """One depth timed at its batch, and again at the smaller batch its tokens in the budget leave it
    (sized_batch keeps MIN_STEPS steps), the batch it would train at: for --time 1h on this project's CPU,
    depth 2 timed at 469 tokens/s over 32 x 1,024-token steps, then 1,059 over the 4 x 1,024 it was given,
    so the documents planned for one pass were 2.2 passes. None when it does not fit in memory."""
    def timed(batch: int, until: float) -> float | None:  # every rank times (DDP's collectives in step);
        pace = candidate_pace(config, env, args, batch, until)  # rank 0's pace decides
        return broadcast_from_rank0(env, lambda: pace)

    batch = sized_batch(depth, args.batch_size, block, None, env.world)
    pace = timed(batch, time.monotonic() + (limit - time.monotonic()) / 2)  # half: room to time the cut
    if pace is None:
        return None
    cut = sized_batch(depth, args.batch_size, block, tokens(pace), env.world)
    if cut < batch:
        batch, pace = cut, timed(cut, limit) or pace
    return Candidate(depth, scaling_params(config), batch, pace, tokens(pace))


def candidate_pace(config: GPTConfig, env: Env, args, batch: int, limit: float) -> float | None:
    """Tokens a second a step of `batch` sequences of this model trains at here (eager: compiling every
    candidate would take longer than choosing may), timed in what is left before `limit`; None when it does
    not fit in memory."""
    eager = dataclasses.replace(env, compile=False)
    try:
        t = build(config, eager, OptimizerSettings.from_args(args), seed=args.seed)
        accum = fitting_grad_accum(t, eager, batch, config.block_size) if probes_memory(env.device) else 1
        seconds = step_seconds(t, eager, batch // (env.world * accum), accum, config.block_size,
                               limit - time.monotonic())
    except (torch.cuda.OutOfMemoryError, UserError):
        return None
    finally:
        t = None
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return batch * config.block_size / seconds


def data_note(sizing: Sizing | None, tokens: int) -> list[str]:
    """The data prepared, checked against the tokens --time planned."""
    if sizing is None or tokens >= 0.9 * sizing.chosen.tokens:
        return []
    return [f"note: the data holds {tokens:,} training tokens, so the {sizing.chosen.tokens:,.0f} tokens --time "
            f"planned pass over it {sizing.chosen.tokens / tokens:.1f} times (the source has no more, or its "
            "documents are shorter than estimated); --sample_size gives more"]


def earlier_run(save_dir: str) -> list[str]:
    """What an earlier run left in --save_dir: its checkpoints and metrics, by name."""
    return [name for name in (checkpoint.LATEST, checkpoint.BEST, "metrics.jsonl") if (Path(save_dir) / name).exists()]


def refuse_overwriting(args, env: Env) -> None:
    """A new run writes over nothing an earlier one left in --save_dir (its checkpoints, its metrics); the one
    line names the way on, whatever a kill left there."""
    if args.resume:
        return
    left = broadcast_from_rank0(env, lambda: earlier_run(args.save_dir))
    if checkpoint.LATEST in left:
        raise CheckpointError(f"{args.save_dir} holds an earlier run: continue it with --resume, or choose another "
                              "--save_dir (nothing was overwritten)")
    if left:
        raise CheckpointError(f"{args.save_dir} holds an earlier run ({', '.join(left)}) that stopped before it "
                              "saved latest.pt: --resume starts it again from step 0 there, or choose another "
                              "--save_dir (nothing was overwritten)")


def read_resume(args, env: Env, say: Callable) -> dict | None:
    """latest.pt, read by rank 0 and shared with every rank (machines need not share a disk); None where the
    run stopped before it saved one (it starts again from step 0)."""
    left = broadcast_from_rank0(env, lambda: earlier_run(args.save_dir))
    if left and checkpoint.LATEST not in left:
        say(f"note: --resume: {args.save_dir} has no latest.pt (the run stopped before its first save): starting "
            "it again from step 0")
        return None
    optimizer = args.optimizer or default_optimizer(args.init_from)
    ckpt = only_on_rank0(env, lambda: checkpoint.read_latest(Path(args.save_dir), optimizer, args.init_from))
    return broadcast_state_from_rank0(env, ckpt)


def starting_point(args, env: Env, resumed: dict | None, say: Callable,
                   sizing: Sizing | None) -> tuple[GPTConfig, dict | None]:
    """The model's shape, and the weights it starts from (None: random): the flags' shape (or the depth --time
    chose), or the shape of --init_from's weights; a resumed run's checkpoint must have that same shape."""
    if args.init_from == "scratch":
        config, state = model_config(args, depth_shape(sizing.depth) if sizing else None), None
    elif resumed:  # the weights it started from are in the checkpoint now; the source is not read again
        config, state = fine_tune_config(GPTConfig.from_dict(resumed["config"]), args, args.init_from), None
    else:
        config, state = read_init_from(args, env, say)
    if args.chat:  # conversations: the turn tokens join the vocabulary, in rows the weights already have
        config = chat.with_turns(config)
    if resumed:
        diffs = config_differences(resumed["config"], config.to_dict())
        if diffs:
            raise CheckpointError(f"--resume: {Path(args.save_dir) / checkpoint.LATEST} was trained with another "
                                  "model shape; " + "; ".join(diffs))
    return config, state


def read_init_from(args, env: Env, say: Callable) -> tuple[GPTConfig, dict | None]:
    """--init_from's shape on every rank, its weights on rank 0 only: DDP gives them to the others."""
    def read():
        weights, state = checkpoint.read_weights(args.init_from, args.block_size)
        return fine_tune_config(weights, args, args.init_from), state

    config, state = only_on_rank0(env, read) or (None, None)
    config = GPTConfig.from_dict(broadcast_from_rank0(env, lambda: config.to_dict()))
    say(f"starting from the weights of {args.init_from}: {config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, context {config.block_size}, {config.arch or 'custom'} preset")
    return config, state


def config_differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, flags {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def check_validation(val: TokenShards, block_size: int) -> None:
    """The validation split, refused now (not at the first evaluation) if it cannot fill one window."""
    if batches.Windows(val, block_size).available() == 0:
        raise data.DataError(f"the validation split ({val.num_tokens:,} tokens) cannot fill one window of "
                             f"block_size+1 = {block_size + 1} tokens: use a larger --val_split, more documents "
                             "(--sample_size) or a smaller --block_size")


def planned_steps(args, plan: Plan, source: batches.BatchSource | None, resumed: dict | None, block_size: int,
                  batch_size: int) -> int | None:
    """--max_steps; else on --resume, the schedule the run had planned (kept); else --epochs over the training
    split, once it is all there; None until then, or with --time (the budget sets them once steps are timed)."""
    saved = resumed.get("max_steps") if resumed else None
    if args.max_steps:
        return args.max_steps
    if saved or args.time:
        return saved  # with --time, at most what the resumed run had planned; the budget may end it sooner
    if source is not None:
        return epoch_steps(args.epochs, source) if source.shards.complete else None
    if plan.data_tokens is None:
        return None  # --plan over a Hub dataset of unknown size
    return max(1, round(args.epochs * batches.batches_per_pass(plan.data_tokens, block_size, batch_size)))


def epoch_steps(epochs: float, source: batches.BatchSource, at_least: bool = False) -> int:
    """--epochs passes over the training split; at_least: over what of it is there now (a lower bound)."""
    return max(1, round(epochs * (source.steps_at_least() if at_least else source.steps_per_epoch)))


def eval_batches(args, plan: Plan, val: TokenShards | None, block_size: int, batch_size: int) -> int:
    """Validation batches an evaluation reads: --eval_iters, but at most one pass over the validation split
    (its size estimated from the training split's under --plan)."""
    if val is not None:
        tokens = val.num_tokens
    elif plan.data_tokens is not None:
        tokens = round(plan.data_tokens * args.val_split / (1 - args.val_split))
    else:
        return args.eval_iters
    return min(args.eval_iters, batches.batches_per_pass(tokens, block_size, batch_size))


def choose_grad_accum(args, env: Env, t: "Learner", resumed: dict | None, batch_size: int, block_size: int,
                      say: Callable) -> int:
    """--grad_accum as a number: as given; `auto` on --resume, the run's own choice; else, on a GPU, the
    fewest micro-steps whose micro-batch fits in its memory (probed); on a CPU, the fewest whose step's
    estimated memory fits in what is free (step_bytes). A CPU step that cannot fit is refused in one line."""
    saved = checkpoint.saved_run(resumed).get("grad_accum") if resumed else None
    accum = args.grad_accum if args.grad_accum != "auto" else saved if isinstance(saved, int) else None
    if accum is None and probes_memory(env.device):
        accum = run_compiled(t, env, say, lambda: fitting_grad_accum(t, env, batch_size, block_size))
        say(f"--grad_accum auto: micro-batches of {batch_size // (env.world * accum)} × {block_size} tokens "
            f"fit in {env.device.type} memory: {accum} accumulation step(s) of {env.world} process(es)")
    if env.device.type == "cpu":
        return fitting_in_ram(t.raw_model, batch_size // env.world, accum, env, say)
    return accum or 1


def fitting_in_ram(model: GPT, per_rank: int, accum: int | None, env: Env, say: Callable) -> int:
    """accum, or (None: auto) the fewest micro-steps whose step fits in RAM_SHARE of the memory free, by
    step_bytes' estimate; UserError before the run starts where the step cannot fit (rather than the kernel
    killing it an hour in)."""
    free, c = available_memory(), model.config
    if free is None:
        return accum or 1
    free //= env.world  # the processes of this machine share it
    need = lambda micro: step_bytes(c, micro, model.num_params(), env.amp_dtype is not None)
    gb = lambda n: f"{n / 1e9:,.1f} GB"
    fit = next((m for m in micro_batch_sizes(per_rank) if need(m) <= RAM_SHARE * free), None)  # the largest
    if accum is not None:
        micro = per_rank // accum
        if need(micro) > free:
            advice = f"--grad_accum {per_rank // fit} (micro-batches of {fit}) fits" if fit else "a smaller model"
            raise UserError(f"a step of micro-batches of {micro} × {c.block_size} tokens needs about {gb(need(micro))} "
                            f"of memory and {gb(free)} is free: {advice}, or lower --batch_size")
        return accum
    if fit is None:
        raise UserError(f"even one sequence of {c.block_size} tokens needs about {gb(need(1))} of memory and "
                        f"{gb(free)} is free: train a smaller model, or lower --block_size")
    if fit < per_rank:
        say(f"--grad_accum auto: micro-batches of {fit} × {c.block_size} tokens fit in cpu memory (about "
            f"{gb(need(fit))} of {gb(free)} free): {per_rank // fit} accumulation steps")
    return per_rank // fit


def restore(resumed: dict, t: "Learner", settings: Settings, say: Callable) -> Progress:
    """latest.pt's weights and optimizer states put back; where the run was. Each setting that changed says
    so in a line (shape, optimizer and starting point are refused earlier: no continuation with them)."""
    fields = checkpoint.restore(resumed, t.raw_model, t.optimizers, t.scaler)
    best_val = fields["best_val_loss"] if fields["best_val_loss"] is not None else math.inf
    tokens = fields["tokens"] if fields["tokens"] is not None else fields["step"] * settings.tokens_per_step
    progress = Progress(fields["step"], fields["val_loss"], best_val, fields["best_step"],
                        max_steps=fields["max_steps"], tokens=tokens)
    say("\n".join(resume_notes(resumed, settings, progress)))
    say(f"resumed from {Path(settings.flags.save_dir) / checkpoint.LATEST} at step {progress.step} "
        f"(best validation loss {progress.best_val:.4f})")
    return progress


def resume_notes(resumed: dict, s: Settings, progress: Progress) -> list[str]:
    """A line for each setting of the run latest.pt continues that is now another, old and new named."""
    saved_run, saved_args, a = checkpoint.saved_run(resumed), resumed.get("args", {}), s.flags
    now = {"batch_size": s.batch_size, "lr": s.optimizer.lr} | {
        k: getattr(a, k) for k in ("seed", "schedule", "warmup_steps", "cooldown_frac", "min_lr", "muon_lr",
                                   "weight_decay", "muon_weight_decay", "dropout")} | dataclasses.asdict(s.data)
    was = saved_args | saved_run.get("data", {}) | {k: saved_run[k] for k in ("batch_size", "lr") if k in saved_run}
    notes = [f"note: --resume: {k} {now[k]}, was {was[k]}: the run will not match an uninterrupted one"
             for k in now if k in was and was[k] != now[k] and k != "data_cache"]
    if progress.max_steps and s.steps and s.steps != progress.max_steps:
        held = f"; the learning rate stays at {s.optimizer.lr * s.held_lr:.2e}, where the decay left it " \
               "(--reschedule plans the decay anew)" if s.held_lr is not None else ""
        notes.append(f"note: --resume: {s.steps:,} steps, the run had planned {progress.max_steps:,}{held}")
    return notes


def held_lr(args, resumed: dict | None, steps: int | None) -> float | None:
    """On --resume with more steps than the run had planned, the share of the peak rate the decay had reached
    at the step resumed, if it had begun (the rate then stays there); None: the schedule as planned."""
    saved, step = (resumed.get("max_steps"), resumed.get("step", 0)) if resumed else (None, 0)
    if not saved or not steps or steps <= saved or args.reschedule:
        return None
    warmup = fitting_warmup(args.warmup_steps, saved)
    scale = lr_scale(step, warmup, saved, args.schedule, args.cooldown_frac, args.min_lr / args.lr)
    return scale if scale < 1.0 and step >= warmup else None


def load_hellaswag(args, env: Env, say: Callable) -> list | None:
    """eval.py's HellaSwag items, or None (with one warning) where they cannot be had: the run goes on."""
    from eval import hellaswag_items  # only runs that score HellaSwag pay for importing the scorer

    def fetch():
        try:
            return hellaswag_items(args.hellaswag, args.data_cache), None
        except UserError as e:
            return None, str(e)

    items, problem = local_rank0_first(env, fetch)
    if not all_ranks_agree(env, items is not None):
        say(f"warning: no HellaSwag scoring in this run ({problem or 'another rank could not read it'})")
        return None
    return items


def first_plan(config: GPTConfig, args, batch_size: int, spec: data.DataSpec) -> Plan:
    """What can be known before any download: the model's size, the tokens of a step, and the data's size
    estimated from --sample_size (exact once prepared)."""
    params, non_embedding = parameter_counts(config)
    estimate, basis = estimated_data_tokens(spec.dataset, spec.sample_size)
    held = 0.0 if data.route(spec, probe=False).repo else args.val_split  # FineWeb's validation is a shard of its own
    return Plan(params, non_embedding, batch_size * config.block_size, spec.sample_size, steps=args.max_steps,
                data_tokens=None if estimate is None else round(estimate * (1 - held)),
                data_basis=f"{basis}, {1 - held:.0%} for training", price_per_hour=args.price_per_hour)


def fetched(spec: data.DataSpec) -> list[str]:
    """What the run will download instead of tokenizing, if anything: FineWeb's shards (fineweb.py)."""
    repo = data.route(spec, probe=False).repo
    per_document = TOKENS_PER_DOCUMENT.get(spec.dataset, TOKENS_PER_DOCUMENT["HuggingFaceFW/fineweb"])
    return [f"plan: data: {fineweb.describe(repo, spec.sample_size, per_document)}"] if repo else []


def fine_tune_config(weights: GPTConfig, args, source: str) -> GPTConfig:
    """The shape of the weights `source` holds, with --dropout and a --block_size that crops their context;
    shape flags that contradict the weights end in one line naming both values."""
    problems = [f"--{name} {getattr(args, name)} but the weights have {getattr(weights, name)}"
                for name in ("n_layer", "n_head", "n_embd")
                if getattr(args, name) is not None and getattr(args, name) != getattr(weights, name)]
    if args.arch is not None and args.arch != weights.arch:
        problems.append(f"--arch {args.arch} but the weights are {weights.arch or 'a custom mix'}")
    if args.block_size is not None and args.block_size > weights.block_size:
        problems.append(f"--block_size {args.block_size} but the weights know {weights.block_size} positions "
                        "(a context can be cropped, not extended)")
    if problems:
        raise CheckpointError(f"--init_from {source}: " + "; ".join(problems))
    return dataclasses.replace(weights, block_size=args.block_size or weights.block_size, dropout=args.dropout)


# ----------------------------------------------------------------------------------------------------
# The model being trained and what updates it


@dataclass
class Learner:
    """The model being trained and what updates it; built by `build`, for train_gpt2.py and bench.py alike."""
    raw_model: GPT  # the plain module: its state_dict is what checkpoints hold
    model: torch.nn.Module  # what the steps run: raw_model compiled and/or wrapped in DDP
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None  # fp16 only
    compile_unproven: bool = False  # compiled, and not yet run: torch.compile may still fail (run_compiled)


def split_parameters(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """Every trainable parameter in exactly one group: `matrices`, the 2-D weights inside the blocks;
    `embeddings`, the token and position tables and an untied head (2-D, but a lookup or the output
    layer, which Muon is not made for); `vectors`, norm gains and biases."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    groups = {"matrices": [], "embeddings": [], "vectors": []}
    for p in model.parameters():  # each tied tensor once
        if p.requires_grad:
            kind = "vectors" if p.dim() < 2 else "matrices" if id(p) in in_blocks else "embeddings"
            groups[kind].append(p)
    return groups


def fused_blocks(model: GPT) -> dict[torch.nn.Parameter, int]:
    """The matrices that hold several side by side, and how many: c_attn's Q, K and V; SwiGLU's gate and up.
    Muon orthogonalises each block as a matrix of its own, as the FineWeb speedrun treats them."""
    blocks = {}
    for block in model.transformer.h:
        blocks[block.attn.c_attn.weight] = 3
        if block.mlp.kind == "swiglu":
            blocks[block.mlp.c_fc.weight] = 2
    return blocks


def make_optimizers(model: GPT, s: OptimizerSettings, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the block matrices and AdamW for the rest; weight decay on
    matrices only (GPT-3's recipe). Each group keeps its peak learning rate in group["peak_lr"]."""
    groups = split_parameters(model)
    decayed = groups["embeddings"] + ([] if s.optimizer == "muon" else groups["matrices"])
    # The fused kernel does the whole update in a few launches, and skips it on the device when found_inf is set.
    adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": s.weight_decay},
                               {"params": groups["vectors"], "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95),
                              eps=1e-8, fused=device.type in fused_adamw_devices())
    optimizers = [adamw]
    if s.optimizer == "muon":
        optimizers.append(Muon(groups["matrices"], lr=s.muon_lr, momentum=s.muon_momentum,
                               weight_decay=s.muon_weight_decay, blocks=fused_blocks(model)))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def fused_adamw_devices() -> list[str]:
    """Where this torch has fused AdamW: CUDA, and since 2.4 the CPU (MPS since 2.5)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return _get_fused_kernels_supported_devices()
    except ImportError:
        return ["cuda"]


def build(config: GPTConfig, env: Env, settings: OptimizerSettings, *, seed: int,
          init_state: dict | None = None) -> Learner:
    """The model (random weights, or init_state's), its optimizers and loss scaler, compiled and
    wrapped for DDP as the flags say; DDP hands rank 0's weights to every other rank."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    raw = GPT(config).to(env.device)
    if init_state is not None:
        load_state(raw, init_state)
    optimizers = make_optimizers(raw, settings, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if env.amp_dtype == torch.float16 else None
    return Learner(raw, wrap_for_ranks(torch.compile(raw) if env.compile else raw, env), optimizers, scaler,
                    compile_unproven=env.compile)


def wrap_for_ranks(model: torch.nn.Module, env: Env) -> torch.nn.Module:
    """DDP around the model when there are several ranks. Gradients as views of DDP's buckets: no copy
    into the buckets before the all-reduce, nor back out of them after."""
    if env.world == 1:
        return model
    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def run_compiled(t: Learner, env: Env, say: Callable, work):
    """work(); the first time with a compiled model, a failure of torch.compile (no C compiler, no Triton)
    leaves a one-line note and the same work done eagerly, for the rest of the run."""
    if not t.compile_unproven:
        return work()
    t.compile_unproven = False
    try:
        return work()
    except (torch.cuda.OutOfMemoryError, UserError):
        raise
    except Exception as e:  # inductor and dynamo raise many types; an error that is not theirs recurs below
        say(f"note: torch.compile failed ({type(e).__name__}: {first_line(e)}); training without it "
            "(--no-compile skips the attempt)")
        zero_grads(t, release=True)  # what the failed attempt left
        t.model = wrap_for_ranks(t.raw_model, env)
        return work()


def probes_memory(device: torch.device) -> bool:
    """Whether --grad_accum auto tries micro-batches against the device's memory (a GPU's); elsewhere it is 1."""
    return device.type == "cuda"


def micro_batch_sizes(per_rank: int) -> list[int]:
    """The micro-batches --grad_accum auto tries, largest first: per_rank, then about half each time, each
    dividing per_rank (24: 24, 12, 6, 3, 1)."""
    sizes = [per_rank]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if per_rank % d == 0))
    return sizes


def fitting_grad_accum(t: Learner, env: Env, batch_size: int, block_size: int) -> int:
    """--grad_accum auto: the fewest micro-steps whose micro-batch fits on every rank, trying batch_size / GPUs
    first and halving on out-of-memory. The global batch, and so the loss, stay the same."""
    per_rank = batch_size // env.world
    for micro in micro_batch_sizes(per_rank):
        if step_fits(t, env, micro, block_size):
            return per_rank // micro
    raise UserError(f"out of GPU memory even with micro-batches of 1 × {block_size} tokens: lower --block_size, "
                    "or train a smaller model")


def step_fits(t: Learner, env: Env, micro: int, block_size: int) -> bool:
    """Whether a training step on `micro` sequences fits in every rank's memory: the step's own forward and
    backward (accumulate_gradients, the graph training runs), then each optimizer's step skipped through
    found_inf, which allocates its state and changes nothing else.

    The ranks agree after each half, and neither half runs a collective (DDP's all-reduce is off, Muon
    shares no work), so a rank out of memory never leaves another waiting in a collective it will not
    join. A failed try leaves no gradient and no optimizer state: AdamW sets its state up lazily, one
    tensor at a time, and a partial state would break the next try."""
    x = torch.zeros((micro, block_size), dtype=torch.long, device=env.device)
    y = torch.zeros_like(x)  # its own tensor, as in training: model(x, x) compiles a graph guarded on `targets is idx`
    fits = all_ranks_agree(env, _fits(lambda: accumulate_gradients(t, [(x, y)], env=env, step=0, seed=0,
                                                                   all_reduce=False)))
    fits = fits and all_ranks_agree(env, _fits(lambda: skipped_optimizer_step(t, env)))
    zero_grads(t, release=True)
    if not fits:
        for optimizer in t.optimizers:
            optimizer.state.clear()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return fits


def _fits(work) -> bool:
    try:
        work()
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def skipped_optimizer_step(t: Learner, env: Env) -> None:
    """Each optimizer's step with found_inf set, on this rank alone (Muon not sharing its work)."""
    try:
        for optimizer in t.optimizers:
            optimizer.found_inf, optimizer.shared = torch.ones((), device=env.device), False
            optimizer.step()
    finally:
        for optimizer in t.optimizers:
            vars(optimizer).pop("found_inf", None)
            vars(optimizer).pop("shared", None)  # Muon's class default again


# ----------------------------------------------------------------------------------------------------
# One optimizer step (the loop, --plan and bench.py all run `update`)


def lr_scale(step: int, warmup: int, max_steps: int, schedule: str, cooldown_frac: float, floor: float) -> float:
    """The schedule, as the share of its peak rate every group runs at: a linear warmup to 1 over `warmup`
    steps, then a decay reaching `floor` (--min_lr / --lr) at the last step: a cosine over the rest of the
    run, or (wsd: warmup-stable-decay) 1 held until the last cooldown_frac of the run, then a straight line."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "wsd":
        decay_start = wsd_decay_start(warmup, max_steps, cooldown_frac)
        progress = max(0.0, (step - decay_start) / max(1, max_steps - 1 - decay_start))
        return 1 - min(1.0, progress) * (1 - floor)
    progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - floor)


def wsd_decay_start(warmup: int, max_steps: int, cooldown_frac: float) -> int:
    return max(warmup, max_steps - round(cooldown_frac * max_steps))


def muon_momentum_at(step: int, momentum: float) -> float:
    """Muon's momentum, warmed up from MUON_MOMENTUM_START over the first MUON_MOMENTUM_WARMUP steps."""
    start = min(MUON_MOMENTUM_START, momentum)
    return start + (momentum - start) * min(1.0, step / MUON_MOMENTUM_WARMUP)


def micro_seed(seed: int, step: int, micro_index: int) -> int:
    """The RNG seed of one micro-batch (dropout), a function of where it sits in the run.

    Nothing about random state needs saving for an exact resume, and one process with accumulation
    draws the same dropout masks as several ranks splitting the same batch.
    """
    return (seed * 1_000_003 + step) * 1_009 + micro_index


def update(t: Learner, micro_batches: list, *, env: Env, step: int, seed: int, grad_clip: float, lr_scale: float,
           muon_momentum: float, stop: bool = False) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches: forward and backward, clip, update.

    Returns [mean loss, gradient norm, stop asked] on the device, the same on every rank. The CPU does not
    wait for the GPU here: a non-finite loss or norm sets found_inf, with which every optimizer skips its
    update on the device, and the loop reads the figures one step later (StepFigures).
    """
    loss = accumulate_gradients(t, micro_batches, env=env, step=step, seed=seed)
    return step_optimizers(t, loss, env=env, grad_clip=grad_clip, lr_scale=lr_scale, muon_momentum=muon_momentum,
                           stop=stop)


def accumulate_gradients(t: Learner, micro_batches: list, *, env: Env, step: int, seed: int,
                         all_reduce: bool = True) -> torch.Tensor:
    """Forward and backward over the micro-batches, gradients summed into .grad; their mean loss, on the device.
    Under DDP the last micro-step all-reduces the gradients (none does, with all_reduce off)."""
    loss = torch.zeros((), device=env.device)
    for micro, (x, y) in enumerate(micro_batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        torch.manual_seed(micro_seed(seed, step, env.rank * len(micro_batches) + micro))
        # DDP all-reduces gradients only on the last micro-step; the earlier ones just accumulate.
        sync = all_reduce and micro == len(micro_batches) - 1
        with contextlib.nullcontext() if sync or not isinstance(t.model, DDP) else t.model.no_sync():
            with env.autocast():
                _, micro_loss = t.model(x, y)
            # Gradients of the micro-steps add up; dividing by their number makes the sum a mean.
            micro_loss = micro_loss / len(micro_batches)
            (t.scaler.scale(micro_loss) if t.scaler else micro_loss).backward()
        loss += micro_loss.detach()
    return loss


def step_optimizers(t: Learner, loss: torch.Tensor, *, env: Env, grad_clip: float, lr_scale: float,
                    muon_momentum: float, stop: bool = False) -> torch.Tensor:
    """Clip the accumulated gradients and update, skipping the update on the device when the loss or the
    norm is not finite; [loss, gradient norm, stop asked] on the device, averaged over the ranks."""
    for optimizer in t.optimizers if t.scaler else []:
        t.scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(t.raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    # torch.full fills on the device: a tensor built from a host value would be a synchronous copy.
    stats = torch.stack([loss, norm.float(), torch.full((), float(stop), device=env.device)])
    if env.world > 1:
        dist.all_reduce(stats)
        stats[:2] /= env.world  # the norm is the same on every rank: its mean is itself
    found_inf = (~stats[:2].isfinite().all()).float()
    if not t.scaler and not all(map(skips_on_device, t.optimizers)) and found_inf.item():  # a host sync, there only
        zero_grads(t)
        return stats
    for optimizer in t.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_scale
            if isinstance(optimizer, Muon):
                group["momentum"] = muon_momentum
        if t.scaler:
            t.scaler.step(optimizer)  # fp16: skips the update on the device when the gradients overflowed
        else:
            optimizer.found_inf = found_inf
            optimizer.step()
    zero_grads(t)
    if t.scaler:
        t.scaler.update()
    return stats


def zero_grads(t: Learner, release: bool = False) -> None:
    """Gradients to zero for the next step. Under DDP they are views of its all-reduce buckets
    (gradient_as_bucket_view) only while they are kept: set to None, each backward would allocate them
    anew and copy them into the buckets, an extra fp32 copy of them at peak memory. Alone, or to
    `release` their memory, they are set to None."""
    keep = isinstance(t.model, DDP) and not release
    for optimizer in t.optimizers:
        optimizer.zero_grad(set_to_none=not keep)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips its update on the device when found_inf is set (fused AdamW, our Muon)."""
    return isinstance(optimizer, Muon) or bool(optimizer.defaults.get("fused"))


class StepFigures:
    """A step's loss, gradient norm and whether a rank asked to stop, copied to the host without waiting
    for the GPU. read() waits for that step's work only: called once the loop has queued the next step,
    it stalls nothing."""

    def __init__(self, step: int, stats: torch.Tensor):
        self.step = step
        self.loss = self.grad_norm = None  # known once read
        self.stop = False
        self._host = stats.to("cpu", non_blocking=True)  # lands in pinned memory when it comes from CUDA
        self._done = None
        if stats.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    def read(self) -> "StepFigures":
        if self.loss is None:
            if self._done is not None:
                self._done.synchronize()
            self.loss, self.grad_norm, stop = self._host.tolist()
            self.stop = stop > 0
        return self


# ----------------------------------------------------------------------------------------------------
# The loop


class StopTraining(UserError):
    """Training cannot go on (a non-finite loss); the message says what the checkpoints on disk hold."""


class Figures:
    """Each step's figures (StepFigures), read one step after the step was queued, when it is done and
    reading stalls nothing, or at once when a section needs the newest; a non-finite step ends the run."""

    def __init__(self, t: Learner, save_dir: Path):
        self.fp16, self.save_dir = t.scaler is not None, save_dir
        self.pending: StepFigures | None = None  # the newest step, its figures not read yet
        self.last: StepFigures | None = None  # the newest step read (and found finite)
        self.stop = False  # a signal reached some rank

    def queued(self, step: int, stats: torch.Tensor) -> None:
        previous, self.pending = self.pending, StepFigures(step, stats)
        if previous is not None:
            self._accept(previous)

    def latest(self) -> StepFigures:
        """The newest step's figures, read now: before anything that needs them (a log line, a save)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._accept(pending)
        return self.last

    def _accept(self, f: StepFigures) -> None:
        f.read()
        self.stop |= f.stop
        # With fp16 loss scaling an infinite norm only means the scaler skipped the step and lowers its scale.
        if not math.isfinite(f.loss) or (not math.isfinite(f.grad_norm) and not self.fp16):
            raise StopTraining(f"the loss ({f.loss}) or gradient norm ({f.grad_norm}) is not finite at step "
                               f"{f.step}; stopped before its update. The checkpoints in {self.save_dir} are the "
                               "last good ones: resume with --resume and a lower --lr (or --grad_clip)")
        self.last = f


class SignalStop:
    """SIGINT, SIGTERM and SIGHUP set `received`, which the loop reads at each step: it saves latest.pt and
    stops. A second Ctrl-C quits at once, removing the files it was writing; more SIGTERMs and SIGHUPs change nothing (a dropped SSH
    connection can send the hang-up twice: to the shell's jobs, and to the terminal's process group).
    """

    def __init__(self):
        self.received: int | None = None
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # the second Ctrl-C: out at once
            left = remove_own_temporaries()
            print(f"\nquit at once: latest.pt not saved{'; removed ' + ', '.join(left) if left else ''}",
                  file=sys.stderr)
            os._exit(128 + signal.SIGINT)
        self.received = self.received or signum


@dataclass
class Output:
    """Where a run reports: lines (rank 0 prints them), metrics.jsonl and loss.png, the progress bar, and
    the checkpoints, written in the background."""
    env: Env
    save_dir: Path
    started: float  # the process's start, which --time counts from
    price_per_hour: float | None
    metrics: Metrics
    bar: tqdm
    writer: checkpoint.CheckpointWriter

    @classmethod
    def open(cls, run: Run, env: Env, started: float) -> "Output":
        a, step = run.settings.flags, run.progress.step
        save_dir = Path(a.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if env.master and clean_temporaries(save_dir):  # what a killed run was writing when it died
            tqdm.write(f"note: removed the unfinished files a killed run left in {save_dir}")
        metrics = Metrics(save_dir, step if a.resume else None, a.wandb, vars(a), enabled=env.master)
        bar = tqdm(total=run.settings.steps, initial=step, disable=not env.master, unit="step", dynamic_ncols=True)
        return cls(env, save_dir, started, a.price_per_hour, metrics, bar, checkpoint.CheckpointWriter())

    def say(self, text: str) -> None:
        if self.env.master:
            tqdm.write(text)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def cost(self) -> float | None:
        return None if self.price_per_hour is None else self.elapsed() / 3600 * self.price_per_hour

    def close(self) -> None:
        """The last checkpoints on disk, and metrics.jsonl's wandb mirror closed, before the process ends."""
        self.bar.close()
        try:
            self.writer.wait()
        finally:
            self.metrics.close()


def train(run: Run, env: Env, out: Output) -> int:
    """The loop, from run.progress.step to the last step: a few "once in a while" sections, each one call,
    then the step. Returns the exit status: 0, or 128 + the signal that stopped the run."""
    s, t, progress, a = run.settings, run.learner, run.progress, run.settings.flags
    # With --time, replan sets the steps once some are timed; with --epochs over data still arriving, they are
    # known once it is all there (the schedule says where it cannot do without them).
    schedule = s.schedule(s.steps or (UNPLANNED_STEPS if a.time else None))
    costs, budget = run_costs(run), Budget(a.time, out.started) if a.time else None
    out.metrics.log(event="start", step=progress.step, run=s.to_dict(),
                    **json.loads(json.dumps(run_header(env, vars(a)), default=str)))
    if schedule.max_steps is not None and progress.step >= schedule.max_steps:
        out.say(f"nothing to do: the run is at step {progress.step} of {schedule.max_steps}")
        return 0
    signals, figures, pace = SignalStop(), Figures(t, out.save_dir), Pace(progress.step, s.tokens_per_step)
    run.batches.on_wait = lambda held: out.bar.set_postfix_str(f"waiting for data ({held:,} training tokens so far)")
    reader = batches.micro_batches(run.batches, progress.step, num_workers=a.num_workers,
                                   pin_memory=env.device.type == "cuda")
    if progress.step == 0 and a.init_from != "scratch":  # where a fine-tune starts, logged as step 0
        validate(run, env, out, share=1.0)  # over the whole split, as its last; saved as the first best checkpoint
        if run.hellaswag is not None:
            score_hellaswag(run, env, out)
    t.model.train()
    next_save = time.monotonic() + FIRST_SAVE_S  # by the clock; rank 0 alone writes, so its clock alone counts
    while progress.step < (schedule.max_steps or UNPLANNED_STEPS):
        try:
            if schedule.lr(progress.step) is None:  # this step's rate depends on how long the data makes the run
                schedule = with_run_length(run, schedule, out, wait=True)
                if progress.step >= schedule.max_steps:
                    break
            micro_batches = [next(reader) for _ in range(s.grad_accum)]
        except data.DataError as e:  # the data stopped arriving, and this step needs more of it
            figures.latest()
            save_latest(run, out)
            return stopped(run, env, out, None, failure=e)
        lr = schedule.lr(progress.step)
        # The step, queued on the device; its figures are read a step later, so the CPU never waits for it.
        stop = signals.received is not None or run.data_failed() is not None
        stats = run_compiled(t, env, out.say, lambda: update(
            t, micro_batches, env=env, step=progress.step, seed=a.seed, grad_clip=a.grad_clip, lr_scale=lr,
            muon_momentum=muon_momentum_at(progress.step, a.muon_momentum), stop=stop))
        figures.queued(progress.step, stats)
        progress.step, progress.tokens = progress.step + 1, progress.tokens + s.tokens_per_step
        out.bar.update(1)
        step = progress.step

        # The plan's time and, with --time, the steps: once the first steps are timed, then at each log line.
        if pace.timed(step, figures.latest):
            if budget is not None and costs.evaluation is None:  # what an evaluation costs counts in the budget
                with pace.leave_out() as took:
                    validate(run, env, out)
                costs.evaluation = took.seconds
            schedule = replan(run, schedule, pace, costs, budget, out, announce=True)
        elif budget is not None and (step % a.log_interval == 0 or budget.passed()):
            schedule = replan(run, schedule, pace, costs, budget, out)
        if schedule.max_steps is None and step % a.log_interval == 0:
            schedule = with_run_length(run, schedule, out, wait=False)

        end, stop = step == schedule.max_steps, figures.stop
        log = step % a.log_interval == 0 or end
        hellaswag = run.hellaswag is not None and (step % a.hellaswag_interval == 0 or end)
        evaluate = step % a.eval_interval == 0 or end
        save = step % a.checkpoint_interval == 0 or end or stop or time.monotonic() >= next_save
        if not (log or hellaswag or evaluate or save):
            continue
        figures.latest()  # a log line, an evaluation or a checkpoint only ever follows a finite step
        if log:
            log_step(run, figures.last, pace.lap(step), schedule, out)
        if hellaswag:
            with pace.leave_out() as took:
                score_hellaswag(run, env, out)
            costs.hellaswag = took.seconds
        if evaluate:
            with pace.leave_out() as took:
                validate(run, env, out, share=costs.final_share() if end and costs.step else 1.0 if end else None)
                if a.sample_during_training:
                    print_sample(run, env, out)
            if not end:
                costs.evaluation = took.seconds
        if save:
            with pace.leave_out():
                save_latest(run, out)
            next_save = time.monotonic() + SAVE_EVERY_S
        pace.restart(step)  # the pace is the training's, without these
        if stop:
            return stopped(run, env, out, signals.received, failure=run.data_failed())
    out.writer.wait()  # the last checkpoints are on disk before the summary says so
    summarise(run, out, "done")
    return 0


def with_run_length(run: Run, schedule: Schedule, out: Output, wait: bool) -> Schedule:
    """The schedule of a run whose --epochs are over data still arriving: its length, once the data is all there
    (said with the data's exact size), else (wait) once enough of it is there for this step's rate, waiting for
    it with the progress bar saying so."""
    s, source, step = run.settings, run.batches, run.progress.step
    while True:
        source.shards.refresh()
        if source.shards.complete:
            steps = epoch_steps(s.flags.epochs, source)
            run.plan.steps, run.plan.data_tokens, run.plan.data_basis = steps, source.shards.num_tokens, ""
            run.progress.max_steps = steps
            out.bar.total = steps
            out.bar.refresh()
            out.say("\n".join([run.plan.data_line(), run.plan.steps_line(), *run.plan.warnings(),
                               *warmup_note(s.flags.warmup_steps, steps)]))
            return s.schedule(steps)
        schedule = s.schedule(None, epoch_steps(s.flags.epochs, source, at_least=True))
        if not wait or schedule.lr(step) is not None:
            return schedule
        if run.data_failed() is not None:
            source.shards.wait()  # raises it
        out.bar.set_postfix_str(f"waiting for data: the rate of step {step} depends on the run's length "
                                f"({source.shards.num_tokens:,} training tokens so far)")
        time.sleep(1.0)


def run_costs(run: Run) -> Costs:
    """What the plan counts with besides the steps, estimated until measured."""
    s, a = run.settings, run.settings.flags
    # HellaSwag's rows: its text at about 4 bytes a token, four endings after each context.
    scored = sum(len(i.ctx) * 4 + sum(map(len, i.endings)) for i in run.hellaswag or []) // 4
    windows = batches.Windows(run.val, s.config.block_size).available() if run.val is not None else 0
    return Costs(eval_batches=s.eval_batches, eval_interval=a.eval_interval,
                 hellaswag_interval=a.hellaswag_interval if run.hellaswag else 0, hellaswag_tokens=scored,
                 tokens_per_step=s.tokens_per_step, checkpoint_bytes=run.plan.params * CHECKPOINT_BYTES_PER_PARAMETER,
                 final_windows=max(1.0, windows / (s.eval_batches * s.batch_size)),
                 final_limit=Budget.FINAL_EVAL_SHARE * a.time if a.time else None)


def replan(run: Run, schedule: Schedule, pace: Pace, costs: Costs, budget: Budget | None, out: Output,
           announce: bool = False) -> Schedule:
    """The plan's time and cost from the measured pace; with --time, also the steps that fit in what is left
    of it (re-planned at every log line, so wsd's decay ends with the budget). Before the pace is known, a
    budget already spent ends the run at this step. The schedule of the steps planned."""
    step, plan = run.progress.step, run.plan
    costs.step, costs.write = pace.step_seconds, out.writer.seconds.get(checkpoint.LATEST, costs.write)
    if costs.step is None:
        return run.settings.schedule(step) if budget is not None and budget.passed() else schedule
    if budget is not None:
        steps = budget.steps(step, time.monotonic(), costs)
        steps = max(step, min(steps, run.settings.steps or steps))
        if steps != schedule.max_steps:
            schedule = run.settings.schedule(steps)
            out.bar.total = steps
            out.bar.refresh()
    plan.steps, plan.step_seconds = schedule.max_steps, costs.step
    run.progress.max_steps = schedule.max_steps
    plan.seconds = out.elapsed() + costs.seconds(step, schedule.max_steps - step)
    if announce:  # the steps and their warnings were said already, unless the budget has just set them
        a = run.settings.flags
        planned = [plan.steps_line(), *plan.warnings(), *warmup_note(a.warmup_steps, schedule.max_steps)] \
            if budget is not None else []
        out.say("\n".join([plan.time_line(out.env.device.type), *planned]))
        sizing = run.settings.sizing
        out.metrics.log(**plan.row(), **({"sizing": sizing.to_dict()} if sizing else {}))
    return schedule


def log_step(run: Run, f: StepFigures, tokens_per_s: float, schedule: Schedule, out: Output) -> None:
    """A row of metrics.jsonl, and the progress bar's figures."""
    peak = peak_flops(out.env.device)
    flops = run.learner.raw_model.flops_per_token(run.settings.config.block_size)
    mfu = tokens_per_s * flops / (peak * out.env.world) if peak else None
    lr, cost = run.settings.optimizer.lr * schedule.lr(f.step), out.cost()
    row = dict(step=run.progress.step, train_loss=f.loss, lr=lr, grad_norm=f.grad_norm, tokens_per_s=tokens_per_s,
               elapsed_s=out.elapsed())
    row |= {"mfu": mfu} if mfu is not None else {}
    row |= {"cost": cost} if cost is not None else {}
    out.metrics.log(**row)
    out.bar.set_postfix(loss=f"{f.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                        **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
                        **({"cost": f"${cost:,.2f}"} if cost is not None else {}))


def validate(run: Run, env: Env, out: Output, share: float | None = None) -> None:
    """eval.py's validation loss (and bits per byte), each rank scoring its share with the model being trained
    (compiled and DDP-wrapped as it is): over a fixed sample of windows spread over the whole split, eval_batches
    batches of them; or, at the run's end, `share` of all of them (1: the whole split); logged, and the weights
    saved as model_best_val.pt when it is the lowest yet."""
    s, progress = run.settings, run.progress
    windows = batches.Windows(run.val, s.config.block_size).available()
    sample = s.eval_batches * s.batch_size if share is None else None if share >= 1 else max(1, int(share * windows))
    result = validation_loss(run.learner.model, run.val, s.config.block_size, env.device, env.autocast, env.rank,
                             env.world, rows=s.micro_batch, sample=sample)
    progress.val_loss = result["loss"]
    improved = progress.val_loss < progress.best_val
    if improved:
        progress.best_val, progress.best_step = progress.val_loss, progress.step
    perplexity = math.exp(min(progress.val_loss, 50))
    whole = windows * s.config.block_size  # predictions in the whole split
    read = "all" if result["tokens"] >= whole else f"{result['tokens']:,} of the"
    out.say(f"step {progress.step}: validation loss {result['loss']:.4f} (perplexity {perplexity:.1f}, "
            f"{result['bpb']:.4f} bits per byte; {read} {whole:,} validation tokens)"
            f"{' - best so far, saved' if improved else ''}")
    out.metrics.log(step=progress.step, val_loss=progress.val_loss, val_ppl=perplexity, val_bpb=result["bpb"],
                    val_tokens=result["tokens"])
    out.metrics.plot()
    if improved and env.master:
        checkpoint.save_best(out.writer, out.save_dir, run.learner.raw_model, progress.fields(s.flags.init_from),
                             s.to_dict())


def score_hellaswag(run: Run, env: Env, out: Output) -> None:
    from eval import hellaswag_accuracy
    # The raw model: a compiled or DDP-wrapped one would recompile for, or synchronise, these shapes.
    result = hellaswag_accuracy(run.learner.raw_model, run.hellaswag, env.device, env.autocast, env.rank, env.world)
    run.progress.hellaswag = result["acc_norm"]
    out.say(f"step {run.progress.step}: HellaSwag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}, "
            f"{result['n']:,} items)")
    out.metrics.log(step=run.progress.step, hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"])
    out.metrics.plot()


def print_sample(run: Run, env: Env, out: Output) -> None:
    if not env.master:
        return
    g = torch.Generator(device=env.device).manual_seed(run.settings.flags.seed + run.progress.step)
    raw = run.learner.raw_model
    raw.eval()
    ids = list(raw.generate([EOT], 48, temperature=0.8, top_k=200, generator=g))
    raw.train()
    out.say(f"sample at step {run.progress.step}: {data.get_tokenizer().decode(ids)!r}")


def save_latest(run: Run, out: Output) -> None:
    """latest.pt, written by rank 0 in the background."""
    if out.env.master:
        t, s = run.learner, run.settings
        checkpoint.save_latest(out.writer, out.save_dir, t.raw_model, t.optimizers, t.scaler,
                               run.progress.fields(s.flags.init_from), vars(s.flags), s.to_dict())


def stopped(run: Run, env: Env, out: Output, signum: int | None, failure: BaseException | None = None) -> int:
    """After the loop saved latest.pt on a signal, or on a failure of the data arriving behind it (raised here as
    one line, once the summary is out): the exit status."""
    out.writer.wait()  # latest.pt, saved by the loop, is on disk before the process leaves
    if env.world > 1:
        dist.barrier()  # every rank leaves after rank 0 has saved
    out.bar.close()
    latest = out.save_dir / checkpoint.LATEST
    if signum is None and failure is not None:
        summarise(run, out, "failed")
        why = str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {first_line(failure)}"
        raise data.DataError(f"the data stopped arriving ({why}); {latest} is saved at step {run.progress.step}: "
                             "once that is fixed, continue with --resume")
    out.say(f"stopped by signal at step {run.progress.step}; {latest} saved, continue with --resume")
    summarise(run, out, "stopped")
    return 128 + (signum or signal.SIGTERM)


def summarise(run: Run, out: Output, how: str) -> None:
    """The summary a run ends with: what it reached, its time and cost, and the way home."""
    p, seconds = run.progress, out.elapsed()
    outcome = Outcome(steps=p.step, tokens=p.tokens, seconds=seconds,
                      best_val=p.best_val if p.best_step is not None else None, best_step=p.best_step,
                      checkpoint=out.save_dir / checkpoint.BEST, price_per_hour=out.price_per_hour,
                      hellaswag=p.hellaswag, planned_seconds=run.plan.seconds)
    out.bar.close()
    out.say("\n".join(outcome.lines()))
    out.metrics.log(event=how, step=p.step, seconds=seconds, cost=out.cost(), best_val_loss=outcome.best_val,
                    best_step=p.best_step)


# ----------------------------------------------------------------------------------------------------
# --plan, and main


def show_plan(args, env: Env, started: float) -> int:
    """--plan: `start` as the run does it, without preparing data, then a few steps timed on random tokens;
    the plan's steps, time and cost. Nothing is downloaded or written."""
    say = tqdm.write if env.master else (lambda text: None)
    run = start(args, env, say, started, dry_run=True)
    s, plan = run.settings, run.plan
    if s.sizing and not args.resume and not env.compile:  # --time just timed this model at this batch, eagerly
        plan.step_seconds = s.tokens_per_step / s.sizing.chosen.tokens_per_s
    else:
        plan.step_seconds = run_compiled(run.learner, env, say, lambda: step_seconds(
            run.learner, env, s.micro_batch, s.grad_accum, s.config.block_size, PLAN_TIMING_S))
    costs = dataclasses.replace(run_costs(run), step=plan.step_seconds, hellaswag_interval=0)
    if args.time:
        plan.steps = min(Budget(args.time, started).steps(0, time.monotonic(), costs), s.steps or UNPLANNED_STEPS)
    if plan.steps is not None:
        plan.seconds = time.monotonic() - started + costs.seconds(0, plan.steps)
    lines = [f"plan: micro-batches of {s.micro_batch} × {s.config.block_size} tokens, {s.grad_accum} accumulation "
             f"step(s) on each of {env.world} process(es)"]
    if plan.steps is None:
        lines.append("plan: steps unknown until the data is prepared (give --max_steps or --time)")
    else:
        lines += [plan.steps_line(), plan.time_line(env.device.type)]
        lines += [] if args.time else cpu_advice(env.device.type, plan.seconds)
        if run.batches is None:
            lines.append("plan: ...plus downloading and tokenizing the data, not yet done")
    say("\n".join(lines + plan.warnings()))
    return 0


def step_seconds(t: Learner, env: Env, micro: int, accum: int, block_size: int, limit: float) -> float:
    """Seconds a step takes, timed as time_random_steps times it where its steps fit in `limit` seconds.
    Where they do not (a CPU given a large model: the seed's 124M at 128 x 128 tokens took 84 s a step here,
    27 of them Muon's update, whatever the batch), the step is drawn from its parts (time_parts): the update,
    once a step, and forward and backward over one sequence and over as many as the time left allows,
    for what a micro-step costs whatever its size and what each sequence adds. On a GPU a step is timed whole:
    another shape would compile again."""
    if env.device.type == "cuda":
        return time_random_steps(t, env, micro, accum, block_size)
    started = time.perf_counter()
    backward, update = time_parts(t, env, 1, block_size)
    if backward + update < 1.0:  # quick: the first call's warm-up was in it, so again
        backward, update = time_parts(t, env, 1, block_size)
    left = limit - (time.perf_counter() - started)
    if (accum * micro * backward + update) * (Pace.WARMUP_STEPS + Pace.TIMED_STEPS) <= left:
        return time_random_steps(t, env, micro, accum, block_size)
    few = min(micro, int(left / 2 / backward))  # sequences whose forward and backward take half of what is left
    per_sequence = backward
    if few >= 2:
        per_sequence = max(0.0, (time_parts(t, env, few, block_size)[0] - backward) / (few - 1))
    return accum * (backward + per_sequence * (micro - 1)) + update


def time_parts(t: Learner, env: Env, micro: int, block_size: int) -> tuple[float, float]:
    """Seconds of a step's forward and backward over micro random sequences, and of its update (CPU: no wait)."""
    x = torch.randint(0, t.raw_model.config.vocab_size, (micro, block_size + 1), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    loss = accumulate_gradients(t, [(x[:, :-1].contiguous(), x[:, 1:].contiguous())], env=env, step=0, seed=0)
    middle = time.perf_counter()
    step_optimizers(t, loss, env=env, grad_clip=1.0, lr_scale=1.0, muon_momentum=0.95)
    return middle - started, time.perf_counter() - middle


def time_random_steps(t: Learner, env: Env, micro: int, accum: int, block_size: int, *,
                      steps: int = Pace.TIMED_STEPS, warmup: int = Pace.WARMUP_STEPS) -> float:
    """Seconds a step of `accum` micro-batches of micro x block_size random tokens takes: `update` as the loop
    runs it, the mean of `steps` after `warmup` (compiling and the allocator's warm-up). --plan and bench.py
    both time this."""
    x = torch.randint(0, t.raw_model.config.vocab_size, (micro, block_size + 1), device=env.device,
                      generator=torch.Generator(env.device).manual_seed(0))
    batches = [(x[:, :-1].contiguous(), x[:, 1:].contiguous())] * accum  # separate x and y, as the loop's
    run = lambda step: update(t, batches, env=env, step=step, seed=0, grad_clip=1.0, lr_scale=1.0, muon_momentum=0.95)
    for step in range(warmup):
        run(step).tolist()  # .tolist() waits for the device
    started = time.perf_counter()
    for step in range(steps):
        stats = run(warmup + step)
    stats.tolist()
    return (time.perf_counter() - started) / steps


def main(argv=None, started: float | None = None) -> int:
    """`python train_gpt2.py`: the run (or --plan), its errors as one line. `started`: when the process
    started (--time counts from it); by default, now."""
    started = time.monotonic() if started is None else started
    forgive_gone_readers()
    args = parse_args(argv)
    env, notes = setup_env(args.device, args.amp, args.compile)
    out = None
    try:
        if env.master:
            print_header(env, shown_flags(args), notes)
            if env.device.type == "cuda" and peak_flops(env.device) is None:
                tqdm.write(f"note: no bf16 peak is known for {torch.cuda.get_device_name(env.device)}, so no MFU "
                           "is shown")
        if args.plan:
            return show_plan(args, env, started)
        run = start(args, env, tqdm.write if env.master else (lambda text: None), started)
        out = Output.open(run, env, started)
        status = train(run, env, out)
        out.close()
        if env.world > 1:
            dist.barrier()  # ranks leave together: tearing the group down while rank 0 still writes aborts gloo
        return status
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before training starts (e.g. while sizing); later, signals stop cleanly
        print("interrupted before training began", file=sys.stderr)
        return 128 + signal.SIGINT
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        sys.exit(out_of_memory(args, env, "GPU" if isinstance(e, torch.cuda.OutOfMemoryError) else "CPU"))
    except RuntimeError as e:
        if not cpu_out_of_memory(e):
            raise  # a bug: its traceback, and the process exits (no reader process is left to wait for)
        sys.exit(out_of_memory(args, env, "CPU"))
    finally:
        if out is not None:
            out.close()  # a failed run's last checkpoints are on disk too
        cleanup_env(env)


def cpu_out_of_memory(error: RuntimeError) -> bool:
    """Whether a RuntimeError is the CPU allocator's out-of-memory (torch raises no type of its own for it)."""
    return "DefaultCPUAllocator: can't allocate memory" in str(error) or "not enough memory" in str(error)


def out_of_memory(args, env: Env, where: str) -> str:
    """The one line an out-of-memory ends with, on a GPU or a CPU: what to lower."""
    accum = args.grad_accum if args.grad_accum != "auto" else 1
    micro = args.batch_size // (env.world * accum)
    block = args.block_size or GPTConfig.block_size
    return (f"error: out of {where} memory with micro-batches of {micro} × {block} tokens: lower --batch_size, "
            f"or raise --grad_accum (now {accum}) to keep {args.batch_size} sequences per step in smaller "
            "micro-batches")


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
