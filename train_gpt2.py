"""Train GPT-2 on one GPU, several (torchrun), or the CPU, keeping the best-validation checkpoint.

    python train_gpt2.py --dataset PATH_OR_HUB_NAME ...
    torchrun --standalone --nproc_per_node 8 train_gpt2.py ...

One optimizer step, in the order it runs: `Trainer.run` takes the step's micro-batches (data.micro_batches);
`update` runs them forward and backward, clips, and updates (fused AdamW, and Muon from muon.py, at the
schedule's share of their peak rates), all without waiting for the GPU; the loop then reads the step
before's figures (StepFigures) and `Trainer.after_step` does what the step calls for (log, evaluate,
save, stop).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from common import (EOT, ArgumentParser, UserError, atomic_write, clean_temporaries, dropout_rate, first_line,
                    non_negative_float, non_negative_int, open_fraction, pick_device, positive_float, positive_int)
from model import (ARCH_PRESETS, GPT, CheckpointError, CheckpointWriter, GPTConfig, checkpoint_state,
                   load_checkpoint, load_model, load_state)
from muon import Muon
from runtime import (Env, all_ranks_agree, broadcast_from_rank0, broadcast_state_from_rank0, cleanup_env,
                     local_rank0_first, only_on_rank0, setup_env)

# The recipe that measured best here (BENCHMARKS.md, "Recipes"): the modern block trained by Muon with a
# warmup-stable-decay schedule. Fine-tuning (--init_from) defaults to AdamW, which suits small updates.
DEFAULT_ARCH, DEFAULT_OPTIMIZER, FINE_TUNE_OPTIMIZER = "modern", "muon", "adamw"
SHAPE_FLAGS = ("block_size", "n_layer", "n_head", "n_embd")

# Muon's momentum warms up from this over the first steps (the FineWeb speedrun's 0.85 over 300).
MUON_MOMENTUM_START, MUON_MOMENTUM_WARMUP = 0.85, 300

# Dense bf16 peak TFLOP/s, by the exact name torch.cuda.get_device_name reports, from NVIDIA's
# datasheets (which print the sparse figure, twice these). A card not named here gets no MFU.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989,  # H100 SXM5
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989,  # H200 SXM
    "NVIDIA H200 NVL": 835,
    "NVIDIA GH200 480GB": 989,
    "NVIDIA GH200 144G HBM3e": 989,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-SXM4-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A100-PCIE-40GB": 312,
}


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
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=positive_int, default=64,
                   help="sequences per optimizer step, over all GPUs and accumulation micro-steps")
    o.add_argument("--grad_accum", type=positive_int, default=1,
                   help="micro-steps per optimizer step (each GPU runs batch_size / (GPUs * grad_accum) sequences at once)")
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
    return p


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
    if args.batch_size % (world * args.grad_accum):
        p.error(f"--batch_size {args.batch_size} is not divisible by GPUs × --grad_accum = "
                f"{world} × {args.grad_accum} = {world * args.grad_accum}")
    try:
        pick_device(args.device)
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
        if block.mlp.swiglu:
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
    loss = torch.zeros((), device=env.device)
    for micro, (x, y) in enumerate(micro_batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        torch.manual_seed(micro_seed(seed, step, env.rank * len(micro_batches) + micro))
        # DDP all-reduces gradients only on the last micro-step; the earlier ones just accumulate.
        last = micro == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not isinstance(t.model, DDP) else t.model.no_sync():
            with env.autocast():
                _, micro_loss = t.model(x, y)
            # Gradients of the micro-steps add up; dividing by their number makes the sum a mean.
            micro_loss = micro_loss / len(micro_batches)
            (t.scaler.scale(micro_loss) if t.scaler else micro_loss).backward()
        loss += micro_loss.detach()
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
        for optimizer in t.optimizers:
            optimizer.zero_grad(set_to_none=True)
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
        optimizer.zero_grad(set_to_none=True)
    if t.scaler:
        t.scaler.update()
    return stats


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


def run_header(env: Env, flags: dict) -> dict:
    """Everything needed to trace a figure back to what produced it (llm.c and modded-nanogpt log the same)."""
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else env.device.type
    return {"git": git_revision(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device_name, "world_size": env.world,
            "amp": str(env.amp_dtype).replace("torch.", "") if env.amp_dtype else "fp32",
            "compile": env.compile, "args": flags}


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a CPU or a card not in PEAK_BF16_TFLOPS."""
    if device.type != "cuda":
        return None
    tflops = PEAK_BF16_TFLOPS.get(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


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
        with atomic_write(self.path) as tmp:
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
        hellaswag = [(r["step"], r["hellaswag_acc_norm"]) for r in self.rows if "hellaswag_acc_norm" in r]
        fig, axes = plt.subplots(1, 2 if hellaswag else 1, figsize=(14 if hellaswag else 8, 5), squeeze=False)
        ax = axes[0][0]
        for key, label in (("train_loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in self.rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set(xlabel="step", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
        if hellaswag:
            right = axes[0][1]
            right.plot(*zip(*hellaswag), marker="o", color="tab:green")
            right.set(xlabel="step", ylabel="HellaSwag acc_norm", title="HellaSwag (random guessing: 0.25)")
            right.grid(alpha=0.3)
        with atomic_write(self.plot_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


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
        self.cache_dir = self._prepare_data()
        world, accum = env.world, args.grad_accum
        self.train = data.BatchSource(data.TokenShards(self.cache_dir, "train"), args.block_size, args.batch_size,
                                      seed=args.seed, rank=env.rank, world_size=world, grad_accum=accum)
        self.val = data.BatchSource(data.TokenShards(self.cache_dir, "val"), args.block_size, args.batch_size,
                                    seed=args.seed, rank=env.rank, world_size=world, grad_accum=accum, shuffle=False)
        self.max_steps, self.warmup = self._plan()
        self.training = build(self.config, env, OptimizerSettings.from_args(args), seed=args.seed,
                              init_state=init_state)
        self.compile_unproven = env.compile  # the first compiled step may fail (no C compiler, no Triton)
        self.flops_per_token = self.training.raw_model.flops_per_token(args.block_size)
        self.peak = peak_flops(env.device)
        self.step, self.best_val, self.val_loss = 0, float("inf"), None
        if resumed:
            self._resume(resumed)
        self.pending: StepFigures | None = None  # the newest step, its figures not read yet
        self.last: StepFigures | None = None  # the newest step whose figures were read (and found finite)
        self.stop_asked = False  # a signal reached some rank
        self.hellaswag = self._load_hellaswag() if args.hellaswag_interval else None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        if env.master:
            clean_temporaries(self.save_dir)  # what a killed run was writing when it died
        self.metrics = Metrics(self.save_dir, self.step if args.resume else None) if env.master else None
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
        batches = data.micro_batches(self.train, self.step, self.max_steps - self.step, num_workers=a.num_workers,
                                     pin_memory=env.device.type == "cuda")
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not env.master, unit="step", dynamic_ncols=True)
        speed = Speed(self.step, a.batch_size * a.block_size)
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
            due = self.due()
            if due:
                self.after_step(due, speed, bar)
            if due.stop:
                return self.stopped(bar, signals.received)
        bar.close()
        self.writer.wait()  # the last checkpoints are on disk before the process ends
        self.say(f"done: {self.step} steps, best validation loss {self.best_val:.4f}; "
                 f"best model in {self.save_dir / 'model_best_val.pt'}")
        return 0

    def optimizer_step(self, micro_batches: list, stop: bool) -> torch.Tensor:
        """`update` at this step's learning rate and momentum; the first compiled step falls back to eager
        when torch.compile fails."""
        a = self.args
        step = functools.partial(update, micro_batches=micro_batches, env=self.env, step=self.step, seed=a.seed,
                                 grad_clip=a.grad_clip, lr_scale=self.lr_scale_at(self.step),
                                 muon_momentum=muon_momentum_at(self.step, a.muon_momentum), stop=stop)
        if not self.compile_unproven:
            return step(self.training)
        self.compile_unproven = False
        try:
            return step(self.training)
        except (torch.cuda.OutOfMemoryError, UserError):
            raise
        except Exception as e:  # inductor and dynamo raise many types; an error that is not theirs recurs below
            self.say(f"note: torch.compile failed ({type(e).__name__}: {first_line(e)}); training without it "
                     "(--no-compile skips the attempt)")
            for optimizer in self.training.optimizers:
                optimizer.zero_grad(set_to_none=True)  # what the failed attempt left
            self.training = self.training.without_compile(self.env)
            return step(self.training)

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

    def after_step(self, due: Due, speed: "Speed", bar) -> None:
        """Log, score, evaluate and save as `due` says; the step's figures are read (and checked) first, so
        a checkpoint or a log line only ever follows a finite step."""
        figures = self.latest_figures()
        if due.log:
            self.log_step(figures, speed.tokens_per_s(self.step), bar)
        if due.hellaswag:
            self.score_hellaswag()
        if due.evaluate:
            self.validate()
            if self.args.sample_during_training and self.env.master:
                self.print_sample()
        if due.save or due.stop:
            self.save_latest()
        if due.log or due.evaluate or due.hellaswag or due.save:
            speed.restart(self.step)  # tokens/s counts training time only, not evaluation or saving

    def stopped(self, bar, signum: int | None) -> int:
        self.writer.wait()  # latest.pt, saved by after_step, is on disk before the process leaves
        if self.env.world > 1:
            dist.barrier()  # every rank leaves after rank 0 has saved
        bar.close()
        self.say(f"stopped by signal at step {self.step}; {self.save_dir / 'latest.pt'} saved, continue with --resume")
        return 128 + (signum or signal.SIGTERM)

    def log_step(self, f: StepFigures, tokens_per_s: float, bar) -> None:
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.env.world) if self.peak else None
        lr = self.args.lr * self.lr_scale_at(f.step)
        row = dict(step=self.step, train_loss=f.loss, lr=lr, grad_norm=f.grad_norm, tokens_per_s=tokens_per_s,
                   elapsed_s=bar.format_dict["elapsed"])
        if mfu is not None:
            row["mfu"] = mfu
        if self.env.master:
            self.metrics.log(**row)
            bar.set_postfix(loss=f"{f.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))

    # ------------------------------------------------------------------------------------------------
    # Evaluation, samples and checkpoints

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, averaged over all ranks."""
        model, a = self.training.model, self.args
        model.eval()
        # Cover the validation split at most once: more batches would only repeat windows.
        iters = min(a.eval_iters, max(1, self.val.windows_per_epoch // a.batch_size))
        total = torch.zeros((), device=self.env.device)
        for k in range(iters):
            x, y = self.val.eval_batch(k)
            for xs, ys in zip(x.chunk(a.grad_accum), y.chunk(a.grad_accum)):  # micro-batches fit in memory
                with self.env.autocast():
                    _, loss = model(xs.to(self.env.device), ys.to(self.env.device))
                total += loss.float() / (iters * a.grad_accum)
        if self.env.world > 1:
            dist.all_reduce(total)
            total /= self.env.world
        model.train()
        return total.item()

    def validate(self) -> None:
        """The validation loss, logged; the weights saved as model_best_val.pt when it is the lowest yet."""
        self.val_loss = self.evaluate()
        improved = self.val_loss < self.best_val
        self.best_val = min(self.best_val, self.val_loss)
        if self.env.master:
            self.say(f"step {self.step}: validation loss {self.val_loss:.4f} (perplexity "
                     f"{math.exp(min(self.val_loss, 50)):.1f}){' - best so far, saved' if improved else ''}")
            self.metrics.log(step=self.step, val_loss=self.val_loss, val_ppl=math.exp(min(self.val_loss, 50)))
            self.metrics.plot()
        if improved:
            self.save("model_best_val.pt", full=False)

    def score_hellaswag(self):
        from eval import hellaswag_accuracy
        # The raw model: a compiled or DDP-wrapped one would recompile for, or synchronise, these shapes.
        result = hellaswag_accuracy(self.training.raw_model, self.hellaswag, self.env.device, self.env.autocast,
                                    self.env.rank, self.env.world)
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
        return local_rank0_first(self.env, lambda: data.prepare(spec, progress=self.env.master))

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


class Speed:
    """Training tokens per second over the steps since the last restart."""

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart(step)

    def restart(self, step: int):
        self.t0, self.step0 = time.perf_counter(), step

    def tokens_per_s(self, step: int) -> float:
        return (step - self.step0) * self.tokens_per_step / max(time.perf_counter() - self.t0, 1e-9)


def print_header(env: Env, args, notes: list[str]):
    header = run_header(env, vars(args))
    tqdm.write(f"train_gpt2.py at git {header['git']}, torch {header['torch']} (CUDA {header['cuda']}), "
               f"device {header['device']} × {env.world}, {header['amp']}, compile {env.compile}")
    tqdm.write("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    for note in notes:
        tqdm.write(f"note: {note}")
    if env.device.type == "cuda" and peak_flops(env.device) is None:
        tqdm.write(f"note: no bf16 peak is known for {header['device']}, so no MFU is shown")


def main(argv=None) -> int:
    args = parse_args(argv)
    env, notes = setup_env(args.device, args.amp, args.compile)
    try:
        if env.master:
            print_header(env, args, notes)
        status = Trainer(args, env).run()
        if env.world > 1:
            dist.barrier()  # ranks leave together: tearing the group down while rank 0 still writes aborts gloo
        return status
    except UserError as e:
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
    sys.exit(main())
