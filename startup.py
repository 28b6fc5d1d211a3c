"""What a run trains with, resolved once at start-up from the flags: `start` returns a Run, whose Settings the loop,
--plan and the checkpoints read, and nothing changes them afterwards. Below start-up, nothing reads the flags.

In the order it is known, each said as it is: an earlier run's folder refused (or --resume's latest.pt read);
the data begun behind the training (data.py: the first step waits only for the validation split and the first
training shard); with --time, the model the budget buys (budget.py); the shape and starting weights (the flags,
--init_from's, or latest.pt's); the model and its optimizers; the micro-batch that fits (memory.py); the steps.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import batches
import chat
import checkpoint
import common
import data
import fineweb
import sources
from budget import (CHECKPOINT_BYTES_PER_PARAMETER, DEPTHS, FORWARD_SHARE, Budget, Costs, Request, Sizing,
                    data_note, depth_shape, size_for_budget)
from common import EOT, CheckpointError, UserError
from flags import default_optimizer, loss_terms, model_config, optimizer_switches, sizes_the_model, warmup_steps
from horizon import DataLength, Horizon, LearningRate, LossTerms, Shape, Stages, held_share
from memory import choose_grad_accum
from model import GPT, GPTConfig
from optim import OptimizerSettings
from plan import TOKENS_PER_DOCUMENT, Plan, estimated_data_tokens
from runtime import Env, all_ranks_agree, broadcast_from_rank0, broadcast_state_from_rank0, local_rank0_first, \
    only_on_rank0
from shards import VAL_TOKENS, TokenShards
from step import Learner, build
from tokenizer import get_tokenizer, prefix_tokens
from weights import parameter_counts


# With --chat, each evaluation also scores the model's greedy replies to this many held-out conversations, each
# reply at most this many tokens: enough to see whether replies end their turn, a few seconds on a GPU.
CHAT_REPLIES, CHAT_REPLY_TOKENS = 16, 64

@dataclass(frozen=True)
class Intervals:
    """Steps between the loop's once-in-a-while sections (--*_interval)."""
    eval: int
    log: int
    checkpoint: int
    hellaswag: int  # 0: never


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What a run trains with: the flags, and what start-up derived from them, --init_from's weights, latest.pt,
    the data and the memory probe. The loop, --plan and the checkpoints all read this one object, and nothing
    changes it."""
    config: GPTConfig  # the shape trained: the flags', what --time chose, --init_from's weights' or latest.pt's
    optimizer: OptimizerSettings  # the optimizer and its schedule (AdamW's rate as --time scaled it)
    batch_size: int  # sequences a step, over all processes and micro-steps: --batch_size, or what --time chose
    grad_accum: int  # micro-steps per optimizer step on each process (a full step's, under --batch_stages)
    world: int  # processes
    steps: int | None  # the run's steps; None: as --time's budget allows, or --epochs once the data is all there
    epochs: float
    time: float | None  # --time's budget in seconds
    eval_batches: int  # the batches of validation windows an evaluation reads (a sample spread over the split)
    every: Intervals
    data: sources.DataSpec  # the data flags, --sample_size as --time sized it
    sizing: Sizing | None  # what --time chose, and why
    held_lr: float | None  # a resumed run made longer after its decay began: the rate's share, held
    seed: int
    save_dir: Path
    init_from: str
    num_workers: int
    price_per_hour: float | None
    target_loss: float | None  # --target_loss: the run ends once validation reaches it
    sample_during_training: bool
    wandb: str | None  # a Weights & Biases project to log to

    @property
    def micro_size(self) -> int:
        return self.batch_size // (self.world * self.grad_accum)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.config.block_size

    def to_dict(self) -> dict:
        """As checkpoints (their `run`) and metrics.jsonl record it; the flags are recorded beside it."""
        return {"config": self.config.to_dict(), "arch": self.config.arch, "optimizer": self.optimizer.kind,
                "lr": self.optimizer.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "world": self.world, "micro_batch": self.micro_size, "steps": self.steps,
                "eval_batches": self.eval_batches, "data": dataclasses.asdict(self.data),
                "sizing": self.sizing.to_dict() if self.sizing else None}


@dataclass
class Run:
    """What `start` resolved and built: the settings, the model being trained, where the run is, its data."""
    settings: Settings
    learner: Learner
    progress: checkpoint.Progress
    plan: Plan
    batches: batches.BatchSource | None  # the training split's; None under --plan, which prepares no data
    val: TokenShards | None  # complete before the first step
    hellaswag: list | None  # eval.py's items, when the run scores HellaSwag
    flags: dict  # as given, recorded with the run (its header, metrics.jsonl, latest.pt), never read to decide
    exchanges: list[chat.Exchange] | None = None  # with --chat: held-out exchanges whose replies evaluations score
    preparation: data.Preparation | None = None  # the data arriving behind the training, prepared here
    horizon: Horizon | None = None  # the run's length and each step's rates

    def data_failed(self) -> BaseException | None:
        """What stopped the data arriving behind the training, if it did (on the machine's first process)."""
        return self.preparation.failed() if self.preparation is not None else None


def start(args, env: Env, say: Callable, started: float, dry_run: bool = False) -> Run:
    """Everything the run trains with, in the order it is known, each said as it is: the data (begun behind the
    training unless dry_run, for --plan), with --time the model the budget buys, the shape and starting weights,
    the model and its optimizers, the micro-batch that fits, the steps; on --resume, where it was."""
    source = check_flags(args, env)
    resumed, kept = read_resume(args, env, say) if args.resume else (None, None)
    spec, route, early = sources.DataSpec.from_args(args), None, None
    if not dry_run and not sizes_documents(args):  # the data begins now, behind --time's sizing
        route = route_once(spec, source, env, probe=True)
        early = open_data(route, spec, env, say)
    sizing = None
    if sizes_the_model(args):
        saved = checkpoint.saved_run(resumed).get("sizing") if resumed else None
        sizing = size_for_budget(budget_request(args), env, say, started, saved)
    config, init_state = starting_point(args, env, resumed, say, sizing)
    if args.window_stages != (1.0,) and not config.window_pattern:
        raise UserError("--window_stages: this model has no attention windows (--arch speedrun has them, or "
                        "--arch_option window_pattern=SSSL); leave the flag out")
    batch_size = sizing.batch if sizing else args.batch_size
    if sizing and sizing.sample_size:  # --time chose the documents
        spec = sources.DataSpec.from_args(args, sample_size=sizing.sample_size)
    route = route or route_once(spec, source, env, probe=not dry_run)
    plan = estimated_plan(config, args, batch_size, spec, route)
    plan.device, plan.sizing = env.device.type, sizing.to_dict() if sizing else None
    plan.smallest = sizing is not None and sizing.depth == DEPTHS[0]
    plan.fine_tune = args.init_from != "scratch"
    split = data.validation_note(spec, route)
    say("\n".join([plan.model_line(), plan.data_line(), *fetched(spec, route), *filter(None, [split])]))
    train, val, preparation = early or ((None, None, None) if dry_run else open_data(route, spec, env, say))
    if train is not None and train.complete:
        plan.prepared(train.num_tokens)
        say("\n".join([plan.data_line(), *data_note(sizing, plan.data_tokens)]))
    elif dry_run and plan.data_tokens is not None and data_note(sizing, plan.data_tokens):  # as the run will say it
        say("\n".join(data_note(sizing, plan.data_tokens)))
    optimizer = optimizer_settings(args, sizing)
    learner = build(config, env, optimizer, seed=args.seed, init_state=init_state)
    terms = loss_terms(args)
    add_loss_terms(learner.raw_model, terms)
    saved_accum = checkpoint.saved_run(resumed).get("grad_accum") if resumed else None
    given = args.grad_accum if args.grad_accum != "auto" else saved_accum if isinstance(saved_accum, int) else None
    grad_accum = choose_grad_accum(given, learner, env, batch_size, config.block_size, say)
    source = None
    if train is not None:
        source = batches.BatchSource(train, config.block_size, batch_size, seed=args.seed, rank=env.rank,
                                     world_size=env.world, grad_accum=grad_accum)
        check_validation(val, config.block_size)
        if source.packed is not None:
            say(source.packed.note())
            plan.steps_per_pass = source.steps_per_epoch if train.complete else None
    shape = Shape(grad_accum, config.block_size, Stages(check_batch_stages(args.batch_stages, grad_accum)),
                  Stages(args.context_stages), Stages(args.window_stages))
    steps = steps_for_run(args, plan, source, resumed, shape)
    settings = Settings(config=config, optimizer=optimizer, batch_size=batch_size, grad_accum=grad_accum,
                        world=env.world, steps=steps, epochs=args.epochs, time=args.time,
                        eval_batches=evaluation_batches(args, plan, val, config.block_size, batch_size),
                        every=Intervals(args.eval_interval, args.log_interval, args.checkpoint_interval,
                                        args.hellaswag_interval),
                        data=spec, sizing=sizing, held_lr=held_rate(optimizer, args.reschedule, resumed, steps),
                        seed=args.seed, save_dir=Path(args.save_dir), init_from=args.init_from,
                        num_workers=args.num_workers, price_per_hour=args.price_per_hour, target_loss=args.target_loss,
                        sample_during_training=args.sample_during_training, wandb=args.wandb)
    progress = resume_progress(resumed, learner, settings, args, say) if resumed else \
        checkpoint.Progress(**(dict(best_step=kept[0], best_val=kept[1]) if kept else {}))
    hellaswag = load_hellaswag(args, env, say) if args.hellaswag_interval and not dry_run else None
    horizon = Horizon(rate=LearningRate.of(optimizer), muon_momentum=optimizer.muon_momentum, held=settings.held_lr,
                      given=settings.steps, plan=plan, costs=run_costs(settings, plan, val, hellaswag, shape),
                      step=progress.step, tokens_per_step=settings.tokens_per_step, started=started, shape=shape,
                      budget_s=args.time, data=DataLength(source, args.epochs, shape) if source is not None else None,
                      terms=terms, say=say)
    if not dry_run and not args.time and horizon.steps is not None:
        say("\n".join(horizon.length_lines()))
    exchanges = held_out_exchanges(val, config.block_size) if args.chat and val is not None else None
    return Run(settings, learner, progress, plan, source, val, hellaswag, vars(args), exchanges, preparation,
               horizon)


def add_loss_terms(model: GPT, terms: LossTerms) -> None:
    """The model's training loss with the extra terms the run trains with (their weights by step: the Horizon)."""
    if terms.ahead or terms.prefix:
        prefix = prefix_tokens(get_tokenizer(), model.config.padded_vocab_size) if terms.prefix else None
        model.set_loss_terms(len(terms.ahead), torch.from_numpy(prefix) if prefix is not None else None)


def run_costs(s: Settings, plan: Plan, val: TokenShards | None, hellaswag: list | None, shape: Shape) -> Costs:
    """What the plan counts with besides the steps, estimated until measured; a step's work as the shape's
    batch schedule gives it."""
    # HellaSwag's rows: its text at about 4 bytes a token, four endings after each context.
    scored = sum(len(i.ctx) * 4 + sum(map(len, i.endings)) for i in hellaswag or []) // 4
    windows = batches.Windows(val, s.config.block_size).available() if val is not None else \
        (plan.val_tokens or 0) // (s.config.block_size + 1)  # --plan: the split's size as estimated
    return Costs(eval_batches=s.eval_batches, eval_interval=s.every.eval,
                 hellaswag_interval=s.every.hellaswag if hellaswag else 0, hellaswag_tokens=scored,
                 tokens_per_step=s.tokens_per_step, checkpoint_bytes=plan.params * CHECKPOINT_BYTES_PER_PARAMETER,
                 final_windows=max(1.0, windows / (s.eval_batches * s.batch_size)),
                 final_limit=Budget.FINAL_EVAL_SHARE * s.time if s.time else None, work=shape.work)


def held_out_exchanges(val: TokenShards, context: int) -> list[chat.Exchange]:
    """The last exchanges of CHAT_REPLIES conversations spread over the validation split, for the greedy replies
    an evaluation scores (chat.score_replies)."""
    starts = val.positions(EOT)
    ends = np.append(starts[1:], val.num_tokens)
    order = np.argsort(np.arange(len(starts)) % max(1, len(starts) // CHAT_REPLIES), kind="stable")  # spread first
    conversations = (val.read(int(starts[i]), int(ends[i] - starts[i])) for i in order)
    return chat.held_out(conversations, context, reply_room(context), CHAT_REPLIES)


def reply_room(context: int) -> int:
    """Tokens a held-out reply may take before it counts as not ending its turn."""
    return min(CHAT_REPLY_TOKENS, context // 4)


def optimizer_settings(args, sizing: Sizing | None) -> OptimizerSettings:
    """The optimizer flags, the optimizer's kind from --init_from where --optimizer is not given, and AdamW's
    rates as --time scaled them to its batch and width."""
    return OptimizerSettings(kind=args.optimizer or default_optimizer(args.init_from),
                             lr=sizing.lr if sizing else args.lr, min_lr=sizing.min_lr if sizing else args.min_lr,
                             weight_decay=args.weight_decay, muon_lr=args.muon_lr, muon_momentum=args.muon_momentum,
                             muon_weight_decay=args.muon_weight_decay, grad_clip=args.grad_clip,
                             lr_schedule=args.schedule, warmup_steps=warmup_steps(args),
                             cooldown_frac=args.cooldown_frac, **optimizer_switches(args))


def budget_request(args) -> Request:
    """What --time is asked to size, from the flags."""
    return Request(seconds=args.time, block_size=args.block_size or GPTConfig.block_size, depth=args.depth,
                   reference_batch=args.batch_size, lr=args.lr, min_lr=args.min_lr, sample_size=args.sample_size,
                   dataset=args.dataset, val_split=args.val_split,
                   eval_share=FORWARD_SHARE * args.eval_iters / args.eval_interval, seed=args.seed,
                   config=lambda depth: model_config(args, depth_shape(depth)),
                   optimizer=optimizer_settings(args, None))


def sizes_documents(args) -> bool:
    """Whether --time chooses the documents (so the data is known only once the model is chosen)."""
    return sizes_the_model(args) and not args.sample_size and sources.is_hub(args.dataset)


def route_once(spec: sources.DataSpec, source: sources.Source | None, env: Env, probe: bool) -> data.Route:
    """Where the run's data comes from, decided once by rank 0 (probe: asking the Hub, which --plan does not) from
    the source check_flags resolved, and the same for every rank."""
    route = only_on_rank0(env, lambda: data.route_of(spec, probe=probe, source=source))
    return broadcast_from_rank0(env, lambda: route)


def open_data(route: data.Route, spec: sources.DataSpec, env: Env,
              say: Callable) -> tuple[TokenShards, TokenShards, data.Preparation | None]:
    """The run's data, begun behind the training by each machine's first process (the others read what it
    writes) along `route`; once its validation split is complete: the training split as it arrives, the
    validation split, and the preparation (this process's, or None)."""
    if route.note:
        say(route.note)
    preparation = data.Preparation(route, spec, say=say if env.master else None) if env.local_rank == 0 else None
    failed = preparation.failed if preparation else None
    val = TokenShards(route.cache_dir, "val", failed=failed, arriving=True)
    val.wait()
    return TokenShards(route.cache_dir, "train", failed=failed, arriving=True), val, preparation


def check_flags(args, env: Env) -> sources.Source | None:
    """What the flags name, checked before any data work, --plan and the run alike, so that the first problem
    is the one named: the local data, the starting weights and the save folder; then (without --resume) an
    earlier run in that folder, which only a run that can start would overwrite. The data's source, resolved
    (on rank 0; None on the others)."""
    spec = sources.DataSpec.from_args(args)
    resuming = args.resume and (Path(args.save_dir) / checkpoint.LATEST).is_file()  # the weights are in latest.pt
    source, _, _ = only_on_rank0(env, lambda: (
        sources.checked_source(spec),
        None if resuming or args.init_from == "scratch" else checkpoint.check_found(args.init_from, "--init_from"),
        check_save_dir(Path(args.save_dir)))) or (None, None, None)
    if args.resume and not all_ranks_agree(env, vars(args) == broadcast_from_rank0(env, lambda: vars(args))):
        raise UserError("--resume: the processes read different flags (latest.pt is not on every machine): give "
                        "the run's flags on the command line")
    if not args.resume:
        refuse_overwriting(args, env)
    return source


def check_save_dir(folder: Path) -> None:
    """--save_dir, a folder that is there or can be made, and written in (nothing is made or written here)."""
    there = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not there.is_dir():
        named = "is a file" if there == folder else f"is under {there}, a file"
        raise UserError(f"--save_dir {folder} {named}, not a folder: choose another --save_dir")
    if not os.access(there, os.W_OK | os.X_OK):
        raise UserError(f"--save_dir {folder}: {there} cannot be written in (permission denied or a read-only "
                        "disk): choose another --save_dir")


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


def read_resume(args, env: Env, say: Callable) -> tuple[dict | None, tuple[int, float] | None]:
    """latest.pt, read by rank 0 and shared with every rank (machines need not share a disk); or where the run
    stopped before it saved one (it starts again from step 0), None and the (step, loss) of the best model it
    saved, if it did: that one stays until the run validates lower."""
    left = broadcast_from_rank0(env, lambda: earlier_run(args.save_dir))
    if left and checkpoint.LATEST not in left:
        kept = broadcast_from_rank0(env, lambda: checkpoint.best_so_far(Path(args.save_dir)))
        stays = f"; its {checkpoint.BEST} (step {kept[0]}, validation loss {kept[1]:.4f}) stays until this run " \
                "validates lower" if kept else ""
        first = "it saved one" if kept else "its first save"
        say(f"note: --resume: {args.save_dir} has no latest.pt (the run stopped before {first}): starting it again "
            f"from step 0{stays}")
        return None, kept
    optimizer = args.optimizer or default_optimizer(args.init_from)
    ckpt = only_on_rank0(env, lambda: checkpoint.read_latest(Path(args.save_dir), optimizer, args.init_from))
    return broadcast_state_from_rank0(env, ckpt), None


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


def check_batch_stages(shares: tuple[float, ...], grad_accum: int) -> tuple[float, ...]:
    """--batch_stages, each share a whole number of the step's micro-batches (so that one process with
    accumulation trains what several processes train), or one line saying what to give."""
    for share in shares:
        micro = grad_accum * share
        if round(micro) < 1 or abs(micro - round(micro)) > 1e-6:
            raise UserError(f"--batch_stages: a share of {share:g} of {grad_accum} micro-batches a step is not a whole "
                            "number of them: give a --grad_accum that each share of it is whole (--batch_size "
                            "divisible by it times the processes)")
    return shares


def check_validation(val: TokenShards, block_size: int) -> None:
    """The validation split, refused now (not at the first evaluation) if it cannot fill one window or holds a
    token id past the vocabulary."""
    val.check()
    if batches.Windows(val, block_size).available() == 0:
        raise common.DataError(f"the validation split ({val.num_tokens:,} tokens) cannot fill one window of "
                             f"block_size+1 = {block_size + 1} tokens: use a larger --val_split, more documents "
                             "(--sample_size) or a smaller --block_size")


def steps_for_run(args, plan: Plan, source: batches.BatchSource | None, resumed: dict | None,
                  shape: Shape) -> int | None:
    """--max_steps; else on --resume, the schedule the run had planned (kept); else --epochs over the training
    split, once it is all there; None until then, or with --time (the budget sets them once steps are timed)."""
    saved = resumed.get("max_steps") if resumed else None
    if args.max_steps:
        return args.max_steps
    if saved or args.time:
        return saved  # with --time, at most what the resumed run had planned; the budget may end it sooner
    if source is not None:
        return DataLength(source, args.epochs, shape).steps()
    if plan.data_tokens is None:
        return None  # --plan over a Hub dataset of unknown size
    per_pass = batches.batches_per_pass(plan.data_tokens, shape.block_size, plan.tokens_per_step // shape.block_size)
    return shape.steps_for(max(1, round(args.epochs * per_pass)))


def evaluation_batches(args, plan: Plan, val: TokenShards | None, block_size: int, batch_size: int) -> int:
    """Validation batches an evaluation reads: --eval_iters, but at most one pass over the validation split
    (its size estimated from the training split's under --plan)."""
    tokens = val.num_tokens if val is not None else plan.val_tokens
    if tokens is None:
        return args.eval_iters
    return min(args.eval_iters, batches.batches_per_pass(tokens, block_size, batch_size))


def resume_progress(resumed: dict, learner: Learner, s: Settings, args, say: Callable) -> checkpoint.Progress:
    """latest.pt's weights and optimizer states put back; where the run was. Each setting that changed says
    so in a line (shape, optimizer and starting point are refused earlier: no continuation with them)."""
    progress = checkpoint.restore(resumed, learner.raw_model, learner.optimizers, learner.scaler, s.tokens_per_step,
                                  s.grad_accum)
    say("\n".join(resume_notes(resumed, s, args, progress)))
    best = f"best validation loss {progress.best_val:.4f}" if progress.best_step is not None else "no validation yet"
    say(f"resumed from {s.save_dir / checkpoint.LATEST} at step {progress.step} ({best})")
    return progress


def resume_notes(resumed: dict, s: Settings, a, progress: checkpoint.Progress) -> list[str]:
    """A line for each setting of the run latest.pt continues that is now another, old and new named."""
    saved_run, saved_args = checkpoint.saved_run(resumed), resumed.get("args", {})
    now = {"batch_size": s.batch_size, "lr": s.optimizer.lr} | {
        k: getattr(a, k) for k in ("seed", "schedule", "warmup_steps", "cooldown_frac", "min_lr", "muon_lr",
                                   "weight_decay", "muon_weight_decay", "dropout")} | dataclasses.asdict(s.data)
    was = saved_args | saved_run.get("data", {}) | {k: saved_run[k] for k in ("batch_size", "lr") if k in saved_run}
    notes = [f"note: --resume: {k} {now[k]}, was {was[k]}: the run will not match an uninterrupted one"
             for k in now if k in was and was[k] != now[k] and k != "data_cache"]
    planned = resumed.get("max_steps")
    if planned and s.steps and s.steps != planned:
        held = f"; the learning rate stays at {s.optimizer.lr * s.held_lr:.2e}, where the decay left it " \
               "(--reschedule plans the decay anew)" if s.held_lr is not None else ""
        notes.append(f"note: --resume: {s.steps:,} steps, the run had planned {planned:,}{held}")
    return notes


def held_rate(optimizer: OptimizerSettings, reschedule: bool, resumed: dict | None, steps: int | None) -> float | None:
    """On --resume with more steps than the run had planned, the share of the peak rate the decay had reached
    at the step resumed, if it had begun (the rate then stays there); None: the schedule as planned."""
    if not resumed:
        return None
    return held_share(LearningRate.of(optimizer), resumed.get("max_steps"), resumed.get("step", 0), steps,
                      reschedule)


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


def estimated_plan(config: GPTConfig, args, batch_size: int, spec: sources.DataSpec, route: data.Route) -> Plan:
    """What can be known before any download: the model's size, the tokens of a step, and the data's size
    estimated from --sample_size (exact once it has all arrived)."""
    params, non_embedding = parameter_counts(config)
    estimate, basis = estimated_data_tokens(spec.dataset, spec.sample_size)
    plan = Plan(params, non_embedding, batch_size * config.block_size, spec.sample_size,
                price_per_hour=args.price_per_hour,
                data_tokens=None if estimate is None else round(estimate * (1 - args.val_split)),
                val_tokens=None if estimate is None else min(VAL_TOKENS, round(estimate * args.val_split)),
                data_basis=f"{basis}, {1 - args.val_split:.0%} for training")
    if route.repo and estimate is not None:  # FineWeb's validation is a shard of its own
        plan.data_tokens, plan.val_tokens = estimate, VAL_TOKENS
        plan.data_basis = f"{basis}; validation: the FineWeb speedrun's {VAL_TOKENS:,} tokens"
        plan.disk_bytes = fineweb.disk_bytes(estimate)
    return plan


def fetched(spec: sources.DataSpec, route: data.Route) -> list[str]:
    """What the run will download instead of tokenizing, if anything: FineWeb's shards (fineweb.py)."""
    repo = route.repo
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
