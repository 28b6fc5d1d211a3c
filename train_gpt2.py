"""Train GPT-2 on one GPU, several (torchrun), or the CPU, keeping the best-validation checkpoint.

    python train_gpt2.py                                      # GPT-2 124M's shape on FineWeb, the measured recipe
    python train_gpt2.py --plan --price_per_hour 3            # what a run will take and cost; nothing is written
    python train_gpt2.py --time 1h --sample_size 2000000      # the best model an hour buys, decay finished on time
    python train_gpt2.py --dataset ./my_texts --n_layer 6 --n_head 6 --n_embd 384 --max_steps 2000
    python train_gpt2.py ...the same flags... --resume        # after a stop, or a kill -9
    torchrun --standalone --nproc_per_node 8 train_gpt2.py --batch_size 512

One optimizer step, in the order it runs: `Trainer.run` takes the step's micro-batches (data.micro_batches);
`update` runs them forward and backward, clips, and updates (fused AdamW, and Muon from muon.py, at the
schedule's share of their peak rates), all without waiting for the GPU; the loop then reads the step
before's figures (StepFigures) and `Trainer.after_step` does what the step calls for (log, evaluate,
save, stop).
"""
from __future__ import annotations

import time

STARTED = time.monotonic()  # --time counts from here: importing torch, preparing data and compiling included

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from common import (EOT, ArgumentParser, UnusableGPU, UserError, clean_temporaries, dropout_rate, first_line,
                    non_negative_float, non_negative_int, open_fraction, pick_device, positive_float, positive_int)
from eval import validation_loss
from metrics import Metrics, print_header, run_header
from model import (ARCH_PRESETS, GPT, CheckpointError, CheckpointWriter, GPTConfig, checkpoint_state,
                   load_checkpoint, load_model, load_state, parameter_counts)
from muon import Muon
from plan import (CHECKPOINT_BYTES_PER_PARAMETER, Budget, Costs, Outcome, Pace, Plan, estimated_data_tokens,
                  parse_duration, peak_flops)
from runtime import (Env, all_ranks_agree, broadcast_from_rank0, broadcast_state_from_rank0, cleanup_env,
                     local_rank0_first, only_on_rank0, setup_env)

# The recipe that measured best here (BENCHMARKS.md, "Recipes"): the modern block trained by Muon with a
# warmup-stable-decay schedule. Fine-tuning (--init_from) defaults to AdamW, which suits small updates.
DEFAULT_ARCH, DEFAULT_OPTIMIZER, FINE_TUNE_OPTIMIZER = "modern", "muon", "adamw"
SHAPE_FLAGS = ("block_size", "n_layer", "n_head", "n_embd")

# With --time, the run's steps until a few have been timed and the budget can set them (Trainer.replan).
UNPLANNED_STEPS = 2**62
# Muon's momentum warms up from this over the first steps (the FineWeb speedrun's 0.85 over 300).
MUON_MOMENTUM_START, MUON_MOMENTUM_WARMUP = 0.85, 300



# ----------------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones, whose meaning the help text already gives."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a GPT-2 (by default the modern block with Muon and a warmup-stable-decay "
                       "schedule), keeping the best validation checkpoint.", formatter_class=_HelpFormatter)
    data.add_data_args(p)
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
    o.add_argument("--warmup_steps", type=non_negative_int, default=700)
    o.add_argument("--max_steps", type=positive_int, default=None,
                   help="optimizer steps in the run (default: --epochs over the training split)")
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
    """Flags, checked against each other too, so a bad combination ends here before anything is written."""
    p = build_parser()
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    args.optimizer = args.optimizer or default_optimizer(args.init_from)
    if args.init_from == "scratch":  # otherwise the shape comes from the weights (Trainer._starting_point)
        args.arch = args.arch or DEFAULT_ARCH
        for name in SHAPE_FLAGS:
            setattr(args, name, getattr(args, name) or getattr(GPTConfig, name))
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


def model_config(args) -> GPTConfig:
    return GPTConfig.from_preset(args.arch, **dict(args.arch_option), block_size=args.block_size,
                                 n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)


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


def crop_context(state: dict, block_size: int) -> dict:
    """Weights for a shorter context: the learned position table keeps its first block_size rows
    (nanoGPT's crop_block_size); everything else is unchanged."""
    wpe = "transformer.wpe.weight"
    return state | ({wpe: state[wpe][:block_size]} if wpe in state else {})


# ----------------------------------------------------------------------------------------------------
# The model being trained and what updates it


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer flags (defaults in build_parser)."""
    optimizer: str
    lr: float
    weight_decay: float
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float

    @classmethod
    def from_args(cls, args) -> "OptimizerSettings":
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})


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


@dataclass
class Training:
    """The model being trained and what updates it; built by `build`, for train_gpt2.py and bench.py alike."""
    raw_model: GPT  # the plain module: its state_dict is what checkpoints hold
    model: torch.nn.Module  # what the steps run: raw_model compiled and/or wrapped in DDP
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None  # fp16 only

    def without_compile(self, env: Env) -> "Training":
        """The same weights and optimizers, run eagerly (after torch.compile failed)."""
        return dataclasses.replace(self, model=wrap_for_ranks(self.raw_model, env))


def build(config: GPTConfig, env: Env, settings: OptimizerSettings, *, seed: int,
          init_state: dict | None = None) -> Training:
    """The model (random weights, or init_state's), its optimizers and loss scaler, compiled and
    wrapped for DDP as the flags say; DDP hands rank 0's weights to every other rank."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    raw = GPT(config).to(env.device)
    if init_state is not None:
        load_state(raw, init_state)
    optimizers = make_optimizers(raw, settings, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if env.amp_dtype == torch.float16 else None
    return Training(raw, wrap_for_ranks(torch.compile(raw) if env.compile else raw, env), optimizers, scaler)


def wrap_for_ranks(model: torch.nn.Module, env: Env) -> torch.nn.Module:
    """DDP around the model when there are several ranks. Gradients as views of DDP's buckets: no copy
    into the buckets before the all-reduce, nor back out of them after."""
    if env.world == 1:
        return model
    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


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


def fitting_grad_accum(t: Training, env: Env, batch_size: int, block_size: int) -> int:
    """--grad_accum auto: the fewest micro-steps whose micro-batch fits on every rank, trying batch_size / GPUs
    first and halving on out-of-memory. The global batch, and so the loss, stay the same."""
    per_rank = batch_size // env.world
    for micro in micro_batch_sizes(per_rank):
        if step_fits(t, env, micro, block_size):
            return per_rank // micro
    raise UserError(f"out of GPU memory even with micro-batches of 1 × {block_size} tokens: lower --block_size, "
                    "or train a smaller model")


def step_fits(t: Training, env: Env, micro: int, block_size: int) -> bool:
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


def skipped_optimizer_step(t: Training, env: Env) -> None:
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
# One optimizer step (bench.py times exactly `update`)


def lr_scale(step: int, warmup: int, max_steps: int, schedule: str, cooldown_frac: float, floor: float) -> float:
    """The schedule, as the share of its peak rate every group runs at: a linear warmup to 1 over `warmup`
    steps, then a decay reaching `floor` (--min_lr / --lr) at the last step: a cosine over the rest of the
    run, or (wsd: warmup-stable-decay) 1 held until the last cooldown_frac of the run, then a straight line."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "wsd":
        decay_start = max(warmup, max_steps - round(cooldown_frac * max_steps))
        progress = max(0.0, (step - decay_start) / max(1, max_steps - 1 - decay_start))
        return 1 - min(1.0, progress) * (1 - floor)
    progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - floor)


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


def update(t: Training, micro_batches: list, *, env: Env, step: int, seed: int, grad_clip: float, lr_scale: float,
           muon_momentum: float, stop: bool = False) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches: forward and backward, clip, update.

    Returns [mean loss, gradient norm, stop asked] on the device, the same on every rank. The CPU does not
    wait for the GPU here: a non-finite loss or norm sets found_inf, with which every optimizer skips its
    update on the device, and the loop reads the figures one step later (StepFigures).
    """
    loss = accumulate_gradients(t, micro_batches, env=env, step=step, seed=seed)
    return step_optimizers(t, loss, env=env, grad_clip=grad_clip, lr_scale=lr_scale, muon_momentum=muon_momentum,
                           stop=stop)


def accumulate_gradients(t: Training, micro_batches: list, *, env: Env, step: int, seed: int,
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


def step_optimizers(t: Training, loss: torch.Tensor, *, env: Env, grad_clip: float, lr_scale: float,
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


def zero_grads(t: Training, release: bool = False) -> None:
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
# Checkpoints


def config_differences(saved: dict, wanted: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, flags {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]


def load_resume_state(save_dir: Path, optimizer: str, init_from: str) -> dict:
    path = save_dir / "latest.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path} (start without --resume, or point --save_dir "
                              "at the run to continue)")
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise CheckpointError(f"--resume: {path} holds a model but not the optimizer state a resume needs")
    started_from = ckpt.get("init_from", "scratch")
    if started_from != init_from:
        raise CheckpointError(f"--resume: {path} started from --init_from {started_from}, not {init_from}; "
                              "resume it with the flags it started with")
    trained_with = ckpt.get("args", {}).get("optimizer", "adamw")
    if trained_with != optimizer:
        raise CheckpointError(f"--resume: {path} was trained with --optimizer {trained_with}, not {optimizer}; "
                              "resume it with the optimizer it started with")
    return ckpt


class StopTraining(UserError):
    """Training cannot go on (a non-finite loss); the message says what the checkpoints on disk hold."""


# ----------------------------------------------------------------------------------------------------
# The run


class SignalStop:
    """SIGINT, SIGTERM and SIGHUP set `received`, which the loop reads at each step; a second one quits at once.

    SIGHUP is what a dropped SSH connection sends: the run saves latest.pt rather than dying mid-step.
    """

    def __init__(self):
        self.received: int | None = None
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)


@dataclass
class Due:
    """What a finished step calls for."""
    log: bool = False
    evaluate: bool = False
    hellaswag: bool = False
    save: bool = False
    stop: bool = False

    def __bool__(self) -> bool:
        return self.log or self.evaluate or self.hellaswag or self.save or self.stop


def first_plan(config: GPTConfig, args) -> Plan:
    """What can be known before any download: the model's size, the tokens of a step, and the data's size
    estimated from --sample_size (exact once prepared)."""
    params, non_embedding = parameter_counts(config)
    estimate, basis = estimated_data_tokens(args.dataset, args.sample_size)
    return Plan(params, non_embedding, args.batch_size * args.block_size, args.sample_size, steps=args.max_steps,
                data_tokens=None if estimate is None else round(estimate * (1 - args.val_split)),
                data_basis=f"{basis}, {1 - args.val_split:.0%} for training", price_per_hour=args.price_per_hour)


class Trainer:
    def __init__(self, args, env: Env):
        self.args, self.env = args, env
        self.save_dir = Path(args.save_dir)
        self.say = tqdm.write if env.master else (lambda *a, **k: None)
        self._refuse_overwriting()
        resumed = self._read_resume_state() if args.resume else None
        self.config, init_state = self._starting_point(resumed)
        for name in SHAPE_FLAGS:  # the flags as logged and saved say the shape actually trained
            setattr(args, name, getattr(self.config, name))
        args.arch = args.arch or self.config.arch
        self.plan = first_plan(self.config, args)
        self.say("\n".join([self.plan.model_line(), self.plan.data_line()]))  # before any download
        self.cache_dir = self._prepare_data()
        self.training = build(self.config, env, OptimizerSettings.from_args(args), seed=args.seed,
                              init_state=init_state)
        self.compile_unproven = env.compile  # the first compiled step may fail (no C compiler, no Triton)
        args.grad_accum = self._grad_accum(resumed)  # as logged and saved: --resume reuses it
        self.train = self._batches()
        self.val = self._validation_split()
        self.budget = Budget(args.time, STARTED) if args.time else None
        self.max_steps, self.warmup = self._steps()
        self.flops_per_token = self.training.raw_model.flops_per_token(args.block_size)
        self.peak = peak_flops(env.device)
        self.step, self.best_val, self.best_step, self.val_loss = 0, float("inf"), None, None
        if resumed:
            self._resume(resumed)
        self.pending: StepFigures | None = None  # the newest step, its figures not read yet
        self.last: StepFigures | None = None  # the newest step whose figures were read (and found finite)
        self.stop_asked = False  # a signal reached some rank
        self.hellaswag = self._load_hellaswag() if args.hellaswag_interval else None
        self.hellaswag_acc_norm = None
        self.costs = self._costs()
        self.save_dir.mkdir(parents=True, exist_ok=True)
        if env.master:
            clean_temporaries(self.save_dir)  # what a killed run was writing when it died
        self.metrics = Metrics(self.save_dir, self.step if args.resume else None, args.wandb,
                               vars(args)) if env.master else None
        self.writer = CheckpointWriter()

    def run(self) -> int:
        """Trains to max_steps; returns the exit status: 0, or 128 + the signal that stopped the run."""
        a, env = self.args, self.env
        if env.master:
            self.metrics.log(event="start", step=self.step, **json.loads(json.dumps(run_header(env, vars(a)), default=str)))
        if self.step >= self.max_steps:
            self.say(f"nothing to do: the run is at step {self.step} of {self.max_steps}")
            return 0
        signals = SignalStop()
        batches = data.micro_batches(self.train, self.step, None, num_workers=a.num_workers,
                                     pin_memory=env.device.type == "cuda")
        planned = self.budget is None or self.max_steps < UNPLANNED_STEPS  # with --time, known once timed
        bar = tqdm(total=self.max_steps if planned else None, initial=self.step, disable=not env.master, unit="step",
                   dynamic_ncols=True)
        pace = Pace(self.step, a.batch_size * a.block_size)
        if self.step == 0 and a.init_from != "scratch":  # where a fine-tune starts, logged as step 0
            self.validate()  # and saved as the first best checkpoint
            if self.hellaswag is not None:
                self.score_hellaswag()
        self.training.model.train()
        while self.step < self.max_steps:
            stats = self.optimizer_step([next(batches) for _ in range(a.grad_accum)], signals.received is not None)
            previous, self.pending = self.pending, StepFigures(self.step, stats)
            self.step += 1
            bar.update(1)
            if previous is not None:
                self.accept(previous)  # the step before this one: done by now, so reading it stalls nothing
            if pace.timed(self.step, self.latest_figures):  # the first steps after warming up, timed
                if self.budget is not None and self.costs.evaluation is None:
                    self.measure_evaluation(pace)  # what each one costs counts in the budget
                self.replan(pace, bar, announce=True)
            elif self.budget is not None and (self.step % a.log_interval == 0 or self.budget.passed()):
                self.replan(pace, bar)
            due = self.due()
            if due:
                self.after_step(due, pace, bar)
            if due.stop:
                return self.stopped(bar, signals.received)
        bar.close()
        self.writer.wait()  # the last checkpoints are on disk before the process ends
        self.summarise("done")
        return 0

    def optimizer_step(self, micro_batches: list, stop: bool) -> torch.Tensor:
        """`update` at this step's learning rate and momentum."""
        a = self.args
        step = functools.partial(update, micro_batches=micro_batches, env=self.env, step=self.step, seed=a.seed,
                                 grad_clip=a.grad_clip, lr_scale=self.lr_scale_at(self.step),
                                 muon_momentum=muon_momentum_at(self.step, a.muon_momentum), stop=stop)
        return self.run_compiled(step)

    def run_compiled(self, work):
        """work(self.training); the first time with a compiled model, a failure of torch.compile (no C
        compiler, no Triton) leaves a one-line note and the same work done eagerly, for the rest of the run."""
        if not self.compile_unproven:
            return work(self.training)
        self.compile_unproven = False
        try:
            return work(self.training)
        except (torch.cuda.OutOfMemoryError, UserError):
            raise
        except Exception as e:  # inductor and dynamo raise many types; an error that is not theirs recurs below
            self.say(f"note: torch.compile failed ({type(e).__name__}: {first_line(e)}); training without it "
                     "(--no-compile skips the attempt)")
            zero_grads(self.training, release=True)  # what the failed attempt left
            self.training = self.training.without_compile(self.env)
            return work(self.training)

    def lr_scale_at(self, step: int) -> float:
        a = self.args
        return lr_scale(step, self.warmup, self.max_steps, a.schedule, a.cooldown_frac, a.min_lr / a.lr)

    def accept(self, figures: StepFigures) -> None:
        """Reads a finished step's figures; a non-finite step (whose update was skipped) ends the run."""
        loss, norm = figures.read().loss, figures.grad_norm
        self.stop_asked |= figures.stop
        # With fp16 loss scaling an infinite norm only means the scaler skipped the step and lowers its scale.
        if not math.isfinite(loss) or (not math.isfinite(norm) and self.training.scaler is None):
            raise StopTraining(f"the loss ({loss}) or gradient norm ({norm}) is not finite at step {figures.step}; "
                               f"stopped before its update. The checkpoints in {self.save_dir} are the last good "
                               "ones: resume with --resume and a lower --lr (or --grad_clip)")
        self.last = figures

    def latest_figures(self) -> StepFigures:
        """The newest step's figures, read now: before anything that needs them (a log line, a save)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.accept(pending)
        return self.last

    def due(self) -> Due:
        """What the step just finished calls for, from the flags' intervals and a stop asked for."""
        a, s, end = self.args, self.step, self.step == self.max_steps
        hellaswag = self.hellaswag is not None and (s % a.hellaswag_interval == 0 or end)
        return Due(log=s % a.log_interval == 0 or end, evaluate=s % a.eval_interval == 0 or end,
                   hellaswag=hellaswag, save=s % a.checkpoint_interval == 0 or end, stop=self.stop_asked)

    def after_step(self, due: Due, pace: "Pace", bar) -> None:
        """Log, score, evaluate and save as `due` says; the step's figures are read (and checked) first, so
        a checkpoint or a log line only ever follows a finite step."""
        figures = self.latest_figures()
        if due.log:
            self.log_step(figures, pace.lap(self.step), bar)
        started = time.perf_counter()
        if due.hellaswag:
            self.score_hellaswag()
        if due.evaluate:
            self.validate()
            if self.args.sample_during_training and self.env.master:
                self.print_sample()
        if due.save or due.stop:
            self.save_latest()
        pace.exclude(time.perf_counter() - started)  # the pace is the training's, without these
        if due.log or due.evaluate or due.hellaswag or due.save:
            pace.restart(self.step)

    def measure_evaluation(self, pace: Pace) -> None:
        """An evaluation now (logged, and the best weights so far saved), timed with its plot and save."""
        self.latest_figures()
        started = time.perf_counter()
        self.validate()
        pace.exclude(time.perf_counter() - started)
        pace.restart(self.step)

    def replan(self, pace: Pace, bar, announce: bool = False) -> None:
        """The plan's time and cost from the measured pace; with --time, also the steps that fit in what is
        left of it (re-planned at every log line, so wsd's decay ends with the budget). Before the pace is
        known, a budget already spent ends the run at this step."""
        a, c = self.args, self.costs
        c.step = pace.step_seconds
        c.write = self.writer.seconds.get("latest.pt", c.write)
        if c.step is None:
            if self.budget is not None and self.budget.passed():
                self.max_steps = self.step
            return
        if self.budget is not None:
            steps = self.budget.steps(self.step, time.monotonic(), c)
            steps = max(self.step, min(steps, a.max_steps or steps))
            if steps != self.max_steps:
                self.max_steps, bar.total = steps, steps
                bar.refresh()
                self.warmup = self._fitting_warmup(quiet=not announce)
        self.plan.steps, self.plan.step_seconds = self.max_steps, c.step
        self.plan.seconds = time.monotonic() - STARTED + c.seconds(self.step, self.max_steps - self.step)
        if announce:  # the steps and their warnings were said already, unless the budget has just set them
            planned = [self.plan.steps_line(), *self.plan.warnings()] if self.budget is not None else []
            self.say("\n".join([self.plan.time_line(self.env.device.type), *planned]))
            if self.env.master:
                self.metrics.log(**self.plan.row())

    def stopped(self, bar, signum: int | None) -> int:
        self.writer.wait()  # latest.pt, saved by after_step, is on disk before the process leaves
        if self.env.world > 1:
            dist.barrier()  # every rank leaves after rank 0 has saved
        bar.close()
        self.say(f"stopped by signal at step {self.step}; {self.save_dir / 'latest.pt'} saved, continue with --resume")
        self.summarise("stopped")
        return 128 + (signum or signal.SIGTERM)

    def summarise(self, how: str) -> None:
        """The summary a run ends with: what it reached, its time and cost, and the way home."""
        if not self.env.master:
            return
        seconds = time.monotonic() - STARTED
        outcome = Outcome(steps=self.step, tokens=self.step * self.args.batch_size * self.args.block_size,
                          seconds=seconds, best_val=self.best_val if self.best_step is not None else None,
                          best_step=self.best_step, checkpoint=self.save_dir / "model_best_val.pt",
                          price_per_hour=self.args.price_per_hour, hellaswag=self.hellaswag_acc_norm,
                          planned_seconds=self.plan.seconds)
        self.say("\n".join(outcome.lines()))
        self.metrics.log(event=how, step=self.step, seconds=seconds, cost=self.cost_so_far(),
                         best_val_loss=outcome.best_val, best_step=self.best_step)
        self.metrics.close()

    def cost_so_far(self) -> float | None:
        price = self.args.price_per_hour
        return None if price is None else (time.monotonic() - STARTED) / 3600 * price

    def log_step(self, f: StepFigures, tokens_per_s: float, bar) -> None:
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.env.world) if self.peak else None
        lr, cost = self.args.lr * self.lr_scale_at(f.step), self.cost_so_far()
        row = dict(step=self.step, train_loss=f.loss, lr=lr, grad_norm=f.grad_norm, tokens_per_s=tokens_per_s,
                   elapsed_s=time.monotonic() - STARTED)
        row |= {"mfu": mfu} if mfu is not None else {}
        row |= {"cost": cost} if cost is not None else {}
        if self.env.master:
            self.metrics.log(**row)
            bar.set_postfix(loss=f"{f.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
                            **({"cost": f"${cost:,.2f}"} if cost is not None else {}))

    # ------------------------------------------------------------------------------------------------
    # Evaluation, samples and checkpoints

    def evaluate(self) -> dict:
        """eval.py's validation loss (and bits per byte) over the split's first eval_iters batches, each rank
        scoring its share with the model being trained (compiled and DDP-wrapped as it is)."""
        a, env = self.args, self.env
        return validation_loss(self.training.model, self.val, a.block_size, env.device, env.autocast, env.rank,
                               env.world, batch_size=a.batch_size // (env.world * a.grad_accum),
                               max_tokens=self.eval_iters() * a.batch_size * a.block_size)

    def validate(self) -> None:
        """The validation loss, logged; the weights saved as model_best_val.pt when it is the lowest yet."""
        started = time.perf_counter()
        result = self.evaluate()
        self.val_loss = result["loss"]
        improved = self.val_loss < self.best_val
        if improved:
            self.best_val, self.best_step = self.val_loss, self.step
        if self.env.master:
            self.say(f"step {self.step}: validation loss {self.val_loss:.4f} (perplexity "
                     f"{math.exp(min(self.val_loss, 50)):.1f}, {result['bpb']:.4f} bits per byte)"
                     f"{' - best so far, saved' if improved else ''}")
            self.metrics.log(step=self.step, val_loss=self.val_loss, val_ppl=math.exp(min(self.val_loss, 50)),
                             val_bpb=result["bpb"])
            self.metrics.plot()
        if improved:
            self.save("model_best_val.pt", full=False)
        self.costs.evaluation = time.perf_counter() - started  # with the plot and the save's stall

    def score_hellaswag(self):
        from eval import hellaswag_accuracy
        # The raw model: a compiled or DDP-wrapped one would recompile for, or synchronise, these shapes.
        started = time.perf_counter()
        result = hellaswag_accuracy(self.training.raw_model, self.hellaswag, self.env.device, self.env.autocast,
                                    self.env.rank, self.env.world)
        self.costs.hellaswag = time.perf_counter() - started
        self.hellaswag_acc_norm = result["acc_norm"]
        if self.env.master:
            self.say(f"step {self.step}: HellaSwag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}, "
                     f"{result['n']:,} items)")
            self.metrics.log(step=self.step, hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"])
            self.metrics.plot()

    def print_sample(self):
        tok = data.get_tokenizer()
        g = torch.Generator(device=self.env.device).manual_seed(self.args.seed + self.step)
        raw = self.training.raw_model
        raw.eval()
        ids = list(raw.generate([EOT], 48, temperature=0.8, top_k=200, generator=g))
        raw.train()
        self.say(f"sample at step {self.step}: {tok.decode(ids)!r}")

    def save_latest(self) -> None:
        self.save("latest.pt", full=True)

    def save(self, name: str, full: bool) -> None:
        """The weights (and with `full`, everything --resume needs), written by rank 0 in the background."""
        if not self.env.master:
            return
        fields = {"step": self.step, "val_loss": self.val_loss, "best_val_loss": self.best_val,
                  "init_from": self.args.init_from}
        if full:  # the data position and every random draw follow from (seed, step): see micro_seed
            t = self.training
            fields |= {"optimizer": [optimizer.state_dict() for optimizer in t.optimizers],
                       "scaler": t.scaler.state_dict() if t.scaler else None, "args": vars(self.args)}
        self.writer.save(self.save_dir / name, checkpoint_state(self.training.raw_model, **fields))

    # ------------------------------------------------------------------------------------------------
    # Setting up: data, the starting point, resuming, HellaSwag

    def _refuse_overwriting(self):
        latest = self.save_dir / "latest.pt"
        earlier = broadcast_from_rank0(self.env, lambda: not self.args.resume and latest.exists())
        if earlier:
            raise CheckpointError(f"{latest} is from an earlier run: continue it with --resume, "
                                  "or choose another --save_dir (nothing was overwritten)")

    def _prepare_data(self) -> Path:
        spec = data.DataSpec.from_args(self.args)
        cache = local_rank0_first(self.env, lambda: data.prepare(spec, progress=self.env.master))
        self.plan.data_tokens, self.plan.data_basis = data.TokenShards(cache, "train").num_tokens, ""
        self.say(self.plan.data_line())
        return cache

    def _grad_accum(self, resumed: dict | None) -> int:
        """--grad_accum as a number: as given; `auto` on --resume, the run's own choice; else, on a GPU, the
        fewest micro-steps whose micro-batch fits in its memory (1 elsewhere)."""
        a, env = self.args, self.env
        if a.grad_accum != "auto":
            return a.grad_accum
        saved = (resumed or {}).get("args", {}).get("grad_accum")
        if isinstance(saved, int):
            return saved
        if not probes_memory(env.device):
            return 1
        accum = self.run_compiled(lambda t: fitting_grad_accum(t, env, a.batch_size, a.block_size))
        self.say(f"--grad_accum auto: micro-batches of {a.batch_size // (env.world * accum)} × {a.block_size} tokens "
                 f"fit in {env.device.type} memory: {accum} accumulation step(s) of {env.world} process(es)")
        return accum

    def _validation_split(self) -> data.TokenShards:
        """The validation split, refused now (not at the first evaluation) if it cannot fill one window."""
        shards = data.TokenShards(self.cache_dir, "val")
        data.BatchSource(shards, self.args.block_size, self.args.batch_size, seed=self.args.seed, shuffle=False)
        return shards

    def _batches(self) -> data.BatchSource:
        a, env = self.args, self.env
        return data.BatchSource(data.TokenShards(self.cache_dir, "train"), a.block_size, a.batch_size, seed=a.seed,
                                rank=env.rank, world_size=env.world, grad_accum=a.grad_accum)

    def _steps(self) -> tuple[int, int]:
        """The run's steps and warmup: --max_steps, or --epochs over the training split; with --time, until
        a few steps are timed, --max_steps or as many as could be wanted (replan sets them)."""
        a = self.args
        if self.budget is not None:
            self.max_steps = a.max_steps or UNPLANNED_STEPS
            return self.max_steps, a.warmup_steps
        self.max_steps = a.max_steps or max(1, round(a.epochs * self.train.steps_per_epoch))
        self.plan.steps = self.max_steps
        self.say("\n".join([self.plan.steps_line(), *self.plan.warnings()]))
        return self.max_steps, self._fitting_warmup()

    def _costs(self) -> Costs:
        a = self.args
        # HellaSwag's rows: its text at about 4 bytes a token, four endings after each context.
        scored = sum(len(i.ctx) * 4 + sum(map(len, i.endings)) for i in self.hellaswag or []) // 4
        return Costs(eval_batches=self.eval_iters(), eval_interval=a.eval_interval,
                     hellaswag_interval=a.hellaswag_interval if self.hellaswag else 0, hellaswag_tokens=scored,
                     tokens_per_step=a.batch_size * a.block_size,
                     checkpoint_bytes=self.plan.params * CHECKPOINT_BYTES_PER_PARAMETER)

    def eval_iters(self) -> int:
        """Validation batches an evaluation reads: --eval_iters, but at most one pass over the split."""
        return min(self.args.eval_iters, data.batches_per_pass(self.val.num_tokens, self.args.block_size,
                                                               self.args.batch_size))

    def _fitting_warmup(self, quiet: bool = False) -> int:
        a = self.args
        if a.warmup_steps < self.max_steps:
            return a.warmup_steps
        warmup = self.max_steps // 10
        if not quiet:
            self.say(f"note: --warmup_steps {a.warmup_steps} does not fit in a run of {self.max_steps} steps; "
                     f"warming up over {warmup} steps (10%) instead")
        return warmup

    def _read_resume_state(self) -> dict:
        """latest.pt, read by rank 0 and shared with every rank (machines need not share a disk)."""
        ckpt = only_on_rank0(self.env, lambda: load_resume_state(self.save_dir, self.args.optimizer, self.args.init_from))
        return broadcast_state_from_rank0(self.env, ckpt)

    def _starting_point(self, resumed: dict | None) -> tuple[GPTConfig, dict | None]:
        """The model's shape, and the weights it starts from (None: random): the flags' shape, or the
        shape of --init_from's weights; a resumed run's checkpoint must have that same shape."""
        a = self.args
        if a.init_from == "scratch":
            config, state = model_config(a), None
        elif resumed:  # the weights it started from are in the checkpoint now; the source is not read again
            config, state = fine_tune_config(GPTConfig.from_dict(resumed["config"]), a, a.init_from), None
        else:
            config, state = self._read_init_from()
        if resumed:
            diffs = config_differences(resumed["config"], config.to_dict())
            if diffs:
                raise CheckpointError(f"--resume: {self.save_dir / 'latest.pt'} was trained with another model "
                                      "shape; " + "; ".join(diffs))
        return config, state

    def _read_init_from(self) -> tuple[GPTConfig, dict | None]:
        """--init_from's shape on every rank, its weights on rank 0 only: DDP gives them to the others."""
        def read():
            model, _ = load_model(self.args.init_from)
            config = fine_tune_config(model.config, self.args, self.args.init_from)
            return config, crop_context(model.state_dict(), config.block_size)

        config, state = only_on_rank0(self.env, read) or (None, None)
        config = GPTConfig.from_dict(broadcast_from_rank0(self.env, lambda: config.to_dict()))
        self.say(f"starting from the weights of {self.args.init_from}: {config.n_layer} layers, {config.n_head} heads, "
                 f"width {config.n_embd}, context {config.block_size}, {config.arch or 'custom'} preset")
        return config, state

    def _resume(self, ckpt: dict):
        t = self.training
        load_state(t.raw_model, ckpt["model"])
        states = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]  # one AdamW
        for optimizer, state in zip(t.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        if t.scaler is not None and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.val_loss = ckpt["step"], ckpt.get("val_loss")
        self.best_val = ckpt.get("best_val_loss", float("inf"))
        saved_args = ckpt.get("args", {})
        changed = [k for k in ("batch_size", "seed", "dataset", "subset", "sample_size", "val_split", "lr")
                   if k in saved_args and saved_args[k] != getattr(self.args, k)]
        if changed:
            self.say(f"note: resuming with changed {', '.join(changed)}: the run will not match an uninterrupted one")
        self.say(f"resumed from {self.save_dir / 'latest.pt'} at step {self.step} "
                 f"(best validation loss {self.best_val:.4f})")

    def _load_hellaswag(self) -> list | None:
        """eval.py's HellaSwag items, or None (with one warning) where they cannot be had: the run goes on."""
        from eval import hellaswag_items  # only runs that score HellaSwag pay for importing the scorer

        def fetch():
            try:
                return hellaswag_items(self.args.hellaswag, self.args.data_cache), None
            except UserError as e:
                return None, str(e)

        items, problem = local_rank0_first(self.env, fetch)
        if not all_ranks_agree(self.env, items is not None):
            self.say(f"warning: no HellaSwag scoring in this run ({problem or 'another rank could not read it'})")
            return None
        return items


def show_plan(args, env: Env) -> int:
    """--plan: the plan, its time and cost from a few steps timed on random tokens; nothing downloaded or written."""
    config = model_config(args) if args.init_from == "scratch" else \
        fine_tune_config(load_model(args.init_from)[0].config, args, args.init_from)
    plan = first_plan(config, args)
    cache = data.prepared(data.DataSpec.from_args(args))
    if cache is not None:
        plan.data_tokens, plan.data_basis = data.TokenShards(cache, "train").num_tokens, ""
    print("\n".join([plan.model_line(), plan.data_line()]), flush=True)  # then a few steps are timed
    t = build(config, env, OptimizerSettings.from_args(args), seed=args.seed)
    accum = args.grad_accum if args.grad_accum != "auto" else (
        fitting_grad_accum(t, env, args.batch_size, args.block_size) if probes_memory(env.device) else 1)
    plan.step_seconds = time_random_steps(t, env, args.batch_size // (env.world * accum), accum, args.block_size)
    costs = Costs(eval_batches=args.eval_iters, eval_interval=args.eval_interval, hellaswag_interval=0,
                  hellaswag_tokens=0, tokens_per_step=plan.tokens_per_step,
                  checkpoint_bytes=plan.params * CHECKPOINT_BYTES_PER_PARAMETER, step=plan.step_seconds)
    if args.time:
        budgeted = Budget(args.time, STARTED).steps(0, time.monotonic(), costs)
        plan.steps = min(budgeted, args.max_steps or UNPLANNED_STEPS)
    elif args.max_steps is None and plan.data_tokens is not None:
        plan.steps = max(1, round(args.epochs * data.batches_per_pass(plan.data_tokens, args.block_size,
                                                                      args.batch_size)))
    if plan.steps is not None:
        plan.seconds = time.monotonic() - STARTED + costs.seconds(0, plan.steps)
    lines = [f"plan: micro-batches of {args.batch_size // (env.world * accum)} × {args.block_size} tokens, "
             f"{accum} accumulation step(s) on each of {env.world} process(es)"]
    if plan.steps is None:
        lines.append("plan: steps unknown until the data is prepared (give --max_steps or --time)")
    else:
        lines += [plan.steps_line(), plan.time_line(env.device.type)]
        lines += [] if cache is not None else ["plan: ...plus downloading and tokenizing the data, not yet done"]
    print("\n".join(lines + plan.warnings()), flush=True)
    return 0


def time_random_steps(t: Training, env: Env, micro: int, accum: int, block_size: int) -> float:
    """Seconds a step takes on random tokens, timed over Pace.TIMED_STEPS steps after Pace.WARMUP_STEPS."""
    x = torch.randint(0, t.raw_model.config.vocab_size, (micro, block_size + 1), device=env.device,
                      generator=torch.Generator(env.device).manual_seed(0))
    batches = [(x[:, :-1], x[:, 1:])] * accum
    run = lambda step: update(t, batches, env=env, step=step, seed=0, grad_clip=1.0, lr_scale=1.0, muon_momentum=0.95)
    for step in range(Pace.WARMUP_STEPS):
        run(step).tolist()  # .tolist() waits for the device
    started = time.perf_counter()
    for step in range(Pace.TIMED_STEPS):
        stats = run(Pace.WARMUP_STEPS + step)
    stats.tolist()
    return (time.perf_counter() - started) / Pace.TIMED_STEPS


def main(argv=None) -> int:
    args = parse_args(argv)
    env, notes = setup_env(args.device, args.amp, args.compile)
    try:
        if env.master:
            print_header(env, vars(args), notes)
            if env.device.type == "cuda" and peak_flops(env.device) is None:
                tqdm.write(f"note: no bf16 peak is known for {torch.cuda.get_device_name(env.device)}, so no MFU "
                           "is shown")
        if args.plan:
            return show_plan(args, env)
        status = Trainer(args, env).run()
        if env.world > 1:
            dist.barrier()  # ranks leave together: tearing the group down while rank 0 still writes aborts gloo
        return status
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before training starts (e.g. while preparing data); later, signals stop cleanly
        sys.exit("interrupted")
    except torch.cuda.OutOfMemoryError:
        accum = args.grad_accum if args.grad_accum != "auto" else 1
        micro = args.batch_size // (env.world * accum)
        sys.exit(f"error: out of GPU memory with micro-batches of {micro} × {args.block_size} tokens: lower "
                 f"--batch_size, or raise --grad_accum (now {accum}) to keep {args.batch_size} sequences "
                 "per step in smaller micro-batches")
    finally:
        cleanup_env(env)


if __name__ == "__main__":
    sys.exit(main())
