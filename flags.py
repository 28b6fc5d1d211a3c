"""train_gpt2.py's flags: the parser (`--help` is the reference), each value checked as it is parsed, and the flags
checked against each other, so that a bad combination ends in one line before anything is downloaded or
written. What follows from them is resolved once, at start-up (startup.py).
"""
from __future__ import annotations

import argparse
import os
from fractions import Fraction
import sys
from pathlib import Path

import checkpoint
import common
import sources
from budget import HEAD_SIZE, WIDTH_PER_LAYER, depth_shape
from common import (ArgumentParser, UnusableGPU, UserError, dropout_rate, non_negative_float, non_negative_int,
                    open_fraction, pick_device, positive_float, positive_int)
from horizon import DEFAULT_WARMUP_STEPS, MUON_MOMENTUM_START, MUON_MOMENTUM_WARMUP, LossTerms
from model import ARCH_PRESETS, GPTConfig
from muon import ITERATIONS
from optim import OPTIMIZER_PRESETS, OPTIMIZER_SWITCHES, RECORD_WARMUP_STEPS
from plan import parse_duration


# The recipe that measured best (BENCHMARKS.md, "Recipes"): the modern block trained by Muon with a
# warmup-stable-decay schedule. Fine-tuning (--init_from) defaults to AdamW, which suits small updates.
DEFAULT_ARCH, DEFAULT_OPTIMIZER, FINE_TUNE_OPTIMIZER = "modern", "muon", "adamw"
# --chat alone: the default run's best checkpoint fine-tuned on SmolTalk (the conversations nanochat fine-tunes
# on), one pass, into a folder of its own so the base model stays. The rates are pretraining's own (Muon, --lr and
# --muon_lr's defaults) with no warmup and wsd's decay to 0 over the last half: they fine-tuned better than AdamW
# and than lower Muon rates (BENCHMARKS.md, "Chat fine-tuning"). Twice them did better still on the small model
# measured; the default stays at the rates the base model was trained at.
CHAT_DEFAULTS = {"init_from": "checkpoints/model_best_val.pt", "dataset": "HuggingFaceTB/smol-smoltalk", "subset": "",
                 "save_dir": "checkpoints/chat", "epochs": 1.0, "optimizer": DEFAULT_OPTIMIZER, "min_lr": 0.0,
                 "warmup_steps": 0}
SHAPE_FLAGS = ("block_size", "n_layer", "n_head", "n_embd")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones, whose meaning the help text already gives, and those of switches
    (off) and of flags given once per value (none)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False, []) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Train a GPT-2 (by default the modern block with Muon and a warmup-stable-decay "
                       "schedule), keeping the best validation checkpoint.", formatter_class=_HelpFormatter)
    sources.add_data_args(p, sample_size_help=f"documents to use (default {sources.DataSpec.sample_size:,}; with --time "
                       "sizing the model, about one pass over the tokens the budget buys)",
                       chat_help=". Alone, it fine-tunes checkpoints/model_best_val.pt on SmolTalk for one pass into "
                                 "checkpoints/chat/, with Muon at pretraining's --lr and --muon_lr, no warmup and a "
                                 "decay to 0; each of these is a flag that wins: "
                                 + ", ".join(f"--{name}" for name in CHAT_DEFAULTS))
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
                        "checkpoint or a transformers directory")
    m.add_argument("--arch", choices=sorted(ARCH_PRESETS), default=None, help=f"architecture preset (default {DEFAULT_ARCH})")
    m.add_argument("--arch_option", type=arch_option_flag, action="append", default=[], metavar="SWITCH=VALUE",
                   help="change one switch of the preset (a field of model.GPTConfig), e.g. mlp=relu2, "
                        "tie_embeddings=false, zero_init=true, logit_softcap=15, embed_norm=true; the speedrun's: "
                        "value_embeds=3, x0_mix=true, unet_skips=true, backout=true, smear=true, bigram_embed=5, "
                        "window_pattern=SSSL, short_window=512, document_mask=true, softcap_form=sigmoid")
    m.add_argument("--block_size", type=positive_int, default=None,
                   help=f"context length in tokens (default {shape.block_size}; with --init_from, at most the weights')")
    m.add_argument("--n_layer", type=positive_int, default=None, help=f"(default {shape.n_layer})")
    m.add_argument("--n_head", type=positive_int, default=None, help=f"(default {shape.n_head})")
    m.add_argument("--n_embd", type=positive_int, default=None, help=f"(default {shape.n_embd})")
    m.add_argument("--depth", type=positive_int, default=None,
                   help=f"a depth of the family --time chooses from: {WIDTH_PER_LAYER} x DEPTH wide, heads of "
                        f"{HEAD_SIZE} (12 is GPT-2 124M); with --time, the batch, rates and data sized for it")
    m.add_argument("--dropout", type=dropout_rate, default=0.0,
                   help="the share of activations dropped while training, in attention and on the residual path "
                        "(0: none, as for pretraining on plenty of data; 0.1-0.2 can help a small dataset)")


def add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=positive_int, default=64,
                   help="sequences per optimizer step, over all GPUs and accumulation micro-steps")
    o.add_argument("--grad_accum", type=grad_accum_flag, default="auto",
                   help="micro-steps per optimizer step (each GPU runs batch_size / (GPUs * grad_accum) sequences at "
                        "once); auto: the largest micro-batch that fits, probed on a GPU and estimated from the free "
                        "memory on a CPU; kept on --resume")
    o.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="muon: Muon (--muon_lr) for the weight matrices inside the blocks, AdamW (--lr) for the "
                        f"embeddings, the head, norm gains and biases (default {DEFAULT_OPTIMIZER}; with --init_from, "
                        f"{FINE_TUNE_OPTIMIZER}, but with --chat {CHAT_DEFAULTS['optimizer']})")
    o.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW's peak learning rate")
    o.add_argument("--min_lr", type=non_negative_float, default=2e-4,
                   help="AdamW's learning rate at the end of the decay (Muon's decays in proportion)")
    o.add_argument("--muon_lr", type=positive_float, default=0.02, help="Muon's peak learning rate")
    o.add_argument("--muon_momentum", type=open_fraction, default=0.95,
                   help=f"Muon's momentum, reached from {MUON_MOMENTUM_START} over the first "
                        f"{MUON_MOMENTUM_WARMUP} steps")
    o.add_argument("--muon_weight_decay", type=non_negative_float, default=0.05,
                   help="Muon's decoupled weight decay (each step shrinks weights by muon_lr * this)")
    o.add_argument("--muon_iteration", choices=sorted(ITERATIONS), default=None,
                   help="Muon's orthogonalisation: Newton-Schulz with Keller Jordan's coefficients, or Polar Express's "
                        "(default: polar_express with --arch speedrun, else newton_schulz)")
    o.add_argument("--normuon", action=argparse.BooleanOptionalAction, default=None,
                   help="NorMuon: each row of Muon's update divided by its running root mean square, the update's norm "
                        "kept (default: on with --arch speedrun)")
    o.add_argument("--cautious_weight_decay", action=argparse.BooleanOptionalAction, default=None,
                   help="Muon's weight decay only where its update already shrinks the weight (default: on with "
                        "--arch speedrun)")
    o.add_argument("--adamw_groups", choices=["one", "speedrun"], default=None,
                   help="one: every AdamW parameter at --lr with betas (0.9, 0.95); speedrun: the FineWeb speedrun's "
                        "rates (multiples of --lr) and betas by kind of parameter, optim.SPEEDRUN_ADAMW (default: "
                        "speedrun with --arch speedrun, else one)")
    o.add_argument("--schedule", choices=["cosine", "wsd"], default="wsd",
                   help="after the warmup: cosine decay to --min_lr; or wsd, constant then a linear decay to "
                        "--min_lr over the last --cooldown_frac of the run (a run can be extended from its "
                        "constant phase)")
    o.add_argument("--cooldown_frac", type=open_fraction, default=0.5, help="wsd: the decaying share of the run")
    o.add_argument("--batch_stages", type=stages_flag, default=(1.0,), metavar="SHARES",
                   help="the batch as shares of --batch_size over equal parts of the run, e.g. 1/3,2/3,1 (the FineWeb "
                        "speedrun's): each share a whole number of --grad_accum's micro-batches; a smaller batch "
                        "runs at its share's square root of the rates")
    o.add_argument("--context_stages", type=stages_flag, default=(1.0,), metavar="SHARES",
                   help="the context as shares of --block_size over equal parts of the run, each 1/k for a k that "
                        "divides it, e.g. 1/2,1,1: a shorter context reads the same tokens in more, shorter sequences")
    o.add_argument("--window_stages", type=stages_flag, default=(1.0,), metavar="SHARES",
                   help="the long attention window as shares of the step's context over equal parts of the run, e.g. "
                        "1/4,1/2,1 (the speedrun's window warmup), for a model with windows (--arch speedrun); short "
                        "windows are half of it, or --arch_option short_window")
    # Off by default: at the CPU proxy they cost validation loss (BENCHMARKS.md, "The field's recipe").
    o.add_argument("--mtp_weights", type=weights_flag, default=None, metavar="W2,W3,...",
                   help="multi-token prediction: the training loss also scores the logits against the token 2, 3, ... "
                        "positions ahead at these weights, the furthest for the first of the run's equal parts, the "
                        "next for two, ... (the speedrun's 0.5,0.25: thirds); 0 for none (default: none)")
    o.add_argument("--prefix_weight", type=non_negative_float, default=None,
                   help="prefix-token prediction: the training loss also scores the logits against the next token's "
                        "longest proper prefix that is a token, at this weight, for the first two thirds of the run "
                        "(the speedrun's 0.25; default: none)")
    o.add_argument("--warmup_steps", type=non_negative_int, default=None,
                   help=f"steps of linear warmup (default: {RECORD_WARMUP_STEPS} with Muon and the modern or speedrun "
                        f"preset, as the speedrun; else {DEFAULT_WARMUP_STEPS}, or a tenth of a shorter run)")
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
    o.add_argument("--seed", type=int, default=1337,
                   help="seeds the weights, the data's order and every random draw: the same flags give the same run")


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("budget")
    b.add_argument("--time", type=duration_flag, default=None, metavar="DURATION",
                   help="train for this long (45m, 2h, 1h30m, or seconds), from process start, data preparation, the "
                        "last evaluation and save included; steps are planned from the measured pace, and wsd's "
                        "decay ends with the budget. With --max_steps, the shorter wins. On --resume it is this "
                        "process's own time, not the whole run's")
    b.add_argument("--target_loss", type=positive_float, default=None, metavar="LOSS",
                   help="stop once the validation loss over the whole validation split is at most this; the summary "
                        "says the steps, time and cost it took (the FineWeb speedrun's target is 3.28 on the "
                        "validation tokens a FineWeb run here measures)")
    b.add_argument("--price_per_hour", type=non_negative_float, default=None, metavar="DOLLARS",
                   help="what the whole machine costs an hour: the plan, the progress bar, metrics.jsonl and the "
                        "summary then show the cost")
    b.add_argument("--plan", action="store_true",
                   help="print the plan (parameters, tokens, steps, data, time and cost from a few steps timed on "
                        "random tokens) and stop: nothing is downloaded, trained or written")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto",
                   help="auto: an NVIDIA GPU, else Apple's MPS, else the CPU (beside an NVIDIA GPU this torch cannot "
                        "use, it stops and names the fix)")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (bf16 autocast; fp16 with loss scaling on GPUs without bf16); default on CUDA")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; default on CUDA")
    r.add_argument("--num_workers", type=non_negative_int, default=2,
                   help="threads that read batches ahead of the model (0: the training thread itself)")
    r.add_argument("--eval_interval", type=positive_int, default=250, help="steps between validation runs")
    r.add_argument("--eval_iters", type=positive_int, default=20,
                   help="validation batches per evaluation (at most one pass over the validation split)")
    r.add_argument("--log_interval", type=positive_int, default=10, help="steps between metrics lines")
    r.add_argument("--checkpoint_interval", type=positive_int, default=1000, help="steps between latest.pt saves")
    r.add_argument("--save_dir", default="checkpoints", help="where checkpoints, metrics.jsonl and loss.png go")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --save_dir/latest.pt with its own flags (a flag given that differs wins, "
                        "and is named)")
    r.add_argument("--sample_during_training", action="store_true", help="print a short sample at each evaluation")
    r.add_argument("--hellaswag_interval", type=non_negative_int, default=0,
                   help="steps between HellaSwag scorings (eval.py's), logged as hellaswag_acc_norm (0: never)")
    r.add_argument("--hellaswag", metavar="FILE.jsonl", default=None,
                   help="HellaSwag items (default: the validation set, downloaded once into --data_cache)")
    r.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log the flags and metrics.jsonl's rows to this Weights & Biases project (pip install wandb)")


def grad_accum_flag(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer, not {text!r}") from None


def duration_flag(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a duration such as 45m, 2h, 1h30m or 5400 (seconds), "
                                         f"not {text!r}") from None


def weights_flag(text: str) -> tuple[float, ...]:
    """W2,W3,... for --mtp_weights: non-negative weights by commas; 0 alone for none."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes weights such as 0.5,0.25, not {text!r}") from None
    if not all(weight >= 0 for weight in weights):
        raise argparse.ArgumentTypeError(f"each weight must be 0 or more, not {text!r}")
    return () if weights == (0.0,) else weights


def stages_flag(text: str) -> tuple[float, ...]:
    """SHARES for --batch_stages, --context_stages and --window_stages: fractions (1/3) or decimals, each in
    (0, 1], by commas."""
    try:
        shares = tuple(float(Fraction(part.strip())) for part in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"takes shares such as 1/3,2/3,1, not {text!r}") from None
    if not all(0 < share <= 1 for share in shares):
        raise argparse.ArgumentTypeError(f"each share must be in (0, 1], not {text!r}")
    return shares


def arch_option_flag(text: str) -> tuple[str, object]:
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
    """The flags, checked against each other too, so a bad combination ends here before anything is written;
    with --chat, the flags not given take CHAT_DEFAULTS. They are never changed afterwards: what follows from
    them is `start`'s Settings."""
    p = build_parser()
    args = p.parse_args(argv)
    resumed = args.resume and apply_resumed_flags(argv, args)
    if args.chat and not resumed:
        apply_chat_defaults(p, argv, args)
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
    block = args.block_size or GPTConfig.block_size
    for share in args.context_stages:
        if abs(1 / share - round(1 / share)) > 1e-6 or block % round(1 / share):
            p.error(f"--context_stages: each share must be 1/k for a k that divides --block_size {block}, "
                    f"not {share:g}")
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


def apply_resumed_flags(argv, args: argparse.Namespace) -> bool:
    """--resume continues the run in --save_dir with its own flags: each flag the command line does not give takes
    the value latest.pt recorded (one given that differs is named at start-up). False where there is no latest.pt
    to read (start-up says what that means)."""
    saved = checkpoint.saved_flags(Path(args.save_dir))
    if saved is None:
        return False
    kept = given_flags(build_parser(), argv, vars(args)) | {"resume", "save_dir", "plan"}
    for name, value in saved.items():
        if name in vars(args) and name not in kept:
            setattr(args, name, value)
    return True


def apply_chat_defaults(p: argparse.ArgumentParser, argv, args: argparse.Namespace) -> None:
    """--chat alone fine-tunes the best checkpoint of the default run on SmolTalk, one pass, into a folder of its
    own: each of CHAT_DEFAULTS that the command line does not give; --init_from's checkpoint must be there."""
    given = given_flags(build_parser(), argv, CHAT_DEFAULTS)
    for name, value in CHAT_DEFAULTS.items():
        if name not in given:
            setattr(args, name, value)
    if "init_from" not in given and not Path(args.init_from).is_file():
        p.error(f"--chat fine-tunes a trained model, and {args.init_from} is not there: train one first "
                "(python train_gpt2.py), or give --init_from (a .pt of this repository, a transformers directory "
                "or gpt2)")


def given_flags(p: argparse.ArgumentParser, argv, names) -> set[str]:
    """Which of `names` (dests) the command line gives, however it spells them: parsed once more with their
    defaults unset."""
    unset = object()
    p.set_defaults(**{name: unset for name in names})
    parsed = p.parse_args(argv)
    return {name for name in names if getattr(parsed, name) is not unset}


def default_optimizer(init_from: str) -> str:
    """DEFAULT_OPTIMIZER from scratch, FINE_TUNE_OPTIMIZER from weights."""
    return DEFAULT_OPTIMIZER if init_from == "scratch" else FINE_TUNE_OPTIMIZER


def optimizer_switches(args) -> dict:
    """The speedrun's optimizer switches as the flags give them, else as the architecture preset trains with Muon
    (optim.OPTIMIZER_PRESETS: the modern and speedrun presets turn them on); with AdamW alone, off."""
    preset = OPTIMIZER_SWITCHES | (OPTIMIZER_PRESETS.get(args.arch or DEFAULT_ARCH, {}) if with_muon(args) else {})
    return {name: preset[name] if getattr(args, name) is None else getattr(args, name) for name in OPTIMIZER_SWITCHES}


def warmup_steps(args) -> int | None:
    """--warmup_steps; where it is not given, none for the speedrun's optimizer (Muon with a preset that trains with
    it: the record and nanochat warm up Muon's momentum, not the rates), else None: DEFAULT_WARMUP_STEPS or a tenth
    of a shorter run (GPT-2's AdamW)."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return RECORD_WARMUP_STEPS if with_muon(args) and (args.arch or DEFAULT_ARCH) in OPTIMIZER_PRESETS else None


def with_muon(args) -> bool:
    """Whether the run trains its matrices with Muon (--optimizer, else the default for --init_from)."""
    return (args.optimizer or default_optimizer(args.init_from)) == "muon"


def loss_terms(args) -> LossTerms:
    """The training loss's extra terms the flags ask for, none where they are not given (a resumed run's weights
    come back from JSON as a list)."""
    return LossTerms(tuple(args.mtp_weights or ()), args.prefix_weight or 0.0)


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
    flags = vars(args) | {"optimizer": args.optimizer or default_optimizer(args.init_from)} | optimizer_switches(args)
    if args.init_from == "scratch" and not sizes_the_model(args):  # else the budget chooses the shape
        config = model_config(args)
        flags |= {name: getattr(config, name) for name in SHAPE_FLAGS} | {"arch": args.arch or DEFAULT_ARCH}
    if not reads_the_hub(args.dataset):  # --subset names a Hub dataset's configuration
        del flags["subset"]
    return flags


def reads_the_hub(dataset: str) -> bool:
    """Whether --dataset names a Hub dataset (or a mixture with one), or a path that is not there (start-up then
    says so)."""
    try:
        return sources.is_hub(dataset)
    except common.DataError:
        return True
