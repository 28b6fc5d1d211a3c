"""What a run trains with, resolved once at start-up from the flags: `start` returns a Run, whose Settings the loop,
--plan and the checkpoints read, and nothing changes them afterwards. Below start-up, nothing reads the flags.

In the order it is known, each said as it is: an earlier run's folder refused (or --resume's latest.pt read);
the data begun behind the training (data.py: the first step waits only for the validation split and the first
training shard); with --time, the model the budget buys (budget.py); the shape and starting weights (the flags,
--init_from's, or latest.pt's); the model and its optimizers; the micro-batch that fits (memory.py); the steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import batches
import chat
import checkpoint
import data
import fineweb
from budget import DEPTHS, FORWARD_SHARE, Request, Sizing, data_note, depth_shape, size_for_budget
from common import EOT, CheckpointError, UserError
from flags import default_optimizer, model_config, optimizer_switches, sizes_the_model
from memory import choose_grad_accum
from model import GPTConfig
from optim import OptimizerSettings, Schedule, fitting_warmup, warmup_note
from plan import TOKENS_PER_DOCUMENT, Plan, estimated_data_tokens
from runtime import Env, all_ranks_agree, broadcast_from_rank0, broadcast_state_from_rank0, local_rank0_first, \
    only_on_rank0
from shards import VAL_TOKENS, TokenShards
from step import Learner, build
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
    grad_accum: int  # micro-steps per optimizer step on each process
    world: int  # processes
    steps: int | None  # the run's steps; None: as --time's budget allows, or --epochs once the data is all there
    epochs: float
    time: float | None  # --time's budget in seconds
    eval_batches: int  # the batches of validation windows an evaluation reads (a sample spread over the split)
    every: Intervals
    data: data.DataSpec  # the data flags, --sample_size as --time sized it
    sizing: Sizing | None  # what --time chose, and why
    held_lr: float | None  # a resumed run made longer after its decay began: the rate's share, held
    seed: int
    save_dir: Path
    init_from: str
    num_workers: int
    price_per_hour: float | None
    sample_during_training: bool
    wandb: str | None  # a Weights & Biases project to log to

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world * self.grad_accum)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.config.block_size

    def schedule(self, max_steps: int | None, at_least: int = 1) -> Schedule:
        """The learning-rate schedule of a run of max_steps (None: not known yet, at least at_least)."""
        return self.optimizer.schedule_of(max_steps, self.held_lr, at_least)

    def to_dict(self) -> dict:
        """As checkpoints (their `run`) and metrics.jsonl record it; the flags are recorded beside it."""
        return {"config": self.config.to_dict(), "arch": self.config.arch, "optimizer": self.optimizer.kind,
                "lr": self.optimizer.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "world": self.world, "micro_batch": self.micro_batch, "steps": self.steps,
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

    def data_failed(self) -> BaseException | None:
        """What stopped the data arriving behind the training, if it did (on the machine's first process)."""
        return self.preparation.failed() if self.preparation is not None else None


def start(args, env: Env, say: Callable, started: float, dry_run: bool = False) -> Run:
    """Everything the run trains with, in the order it is known, each said as it is: the data (begun behind the
    training unless dry_run, for --plan), with --time the model the budget buys, the shape and starting weights,
    the model and its optimizers, the micro-batch that fits, the steps; on --resume, where it was."""
    if not dry_run:
        refuse_overwriting(args, env)
    resumed = read_resume(args, env, say) if args.resume else None
    early = None if dry_run or sizes_documents(args) else open_data(data.DataSpec.from_args(args), env, say)
    sizing = None
    if sizes_the_model(args):
        saved = checkpoint.saved_run(resumed).get("sizing") if resumed else None
        sizing = size_for_budget(budget_request(args), env, say, started, saved)
    config, init_state = starting_point(args, env, resumed, say, sizing)
    batch_size = sizing.batch if sizing else args.batch_size
    spec = data.DataSpec.from_args(args, sample_size=sizing.sample_size if sizing else None)
    plan = estimated_plan(config, args, batch_size, spec)
    plan.smallest = sizing is not None and sizing.depth == DEPTHS[0]
    plan.fine_tune = args.init_from != "scratch"
    say("\n".join([plan.model_line(), plan.data_line(), *fetched(spec)]))  # before any download
    train, val, preparation = early or ((None, None, None) if dry_run else open_data(spec, env, say))
    if train is not None and train.complete:
        plan.data_tokens, plan.data_basis = train.num_tokens, ""
        say("\n".join([plan.data_line(), *data_note(sizing, plan.data_tokens)]))
    optimizer = optimizer_settings(args, sizing)
    learner = build(config, env, optimizer, seed=args.seed, init_state=init_state)
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
    steps = steps_for_run(args, plan, source, resumed, config.block_size, batch_size)
    settings = Settings(config=config, optimizer=optimizer, batch_size=batch_size, grad_accum=grad_accum,
                        world=env.world, steps=steps, epochs=args.epochs, time=args.time,
                        eval_batches=evaluation_batches(args, plan, val, config.block_size, batch_size),
                        every=Intervals(args.eval_interval, args.log_interval, args.checkpoint_interval,
                                        args.hellaswag_interval),
                        data=spec, sizing=sizing, held_lr=held_rate(optimizer, args.reschedule, resumed, steps),
                        seed=args.seed, save_dir=Path(args.save_dir), init_from=args.init_from,
                        num_workers=args.num_workers, price_per_hour=args.price_per_hour,
                        sample_during_training=args.sample_during_training, wandb=args.wandb)
    plan.steps = settings.steps
    if not dry_run and not args.time and settings.steps is not None:
        say("\n".join([plan.steps_line(), *plan.warnings(), *warmup_note(args.warmup_steps, settings.steps)]))
    progress = resume_progress(resumed, learner, settings, args, say) if resumed else \
        checkpoint.Progress(max_steps=settings.steps)
    hellaswag = load_hellaswag(args, env, say) if args.hellaswag_interval and not dry_run else None
    exchanges = held_out_exchanges(val, config.block_size) if args.chat and val is not None else None
    return Run(settings, learner, progress, plan, source, val, hellaswag, vars(args), exchanges, preparation)


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
                             schedule=args.schedule, warmup_steps=args.warmup_steps, cooldown_frac=args.cooldown_frac,
                             **optimizer_switches(args))



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
    return sizes_the_model(args) and not args.sample_size and data.is_hub(args.dataset)


def open_data(spec: data.DataSpec, env: Env, say: Callable) -> tuple[TokenShards, TokenShards,
                                                                     data.Preparation | None]:
    """The run's data, begun behind the training by each machine's first process (the others read what it
    writes), from where rank 0 decided it comes; once its validation split is complete: the training split as
    it arrives, the validation split, and the preparation (this process's, or None)."""
    r = only_on_rank0(env, lambda: data.route(spec))  # asks the Hub once, for every rank
    r = broadcast_from_rank0(env, lambda: r)
    if r.note:
        say(r.note)
    preparation = data.Preparation(r, spec, say=say if env.master else None) if env.local_rank == 0 else None
    failed = preparation.failed if preparation else None
    val = TokenShards(r.cache_dir, "val", failed=failed, arriving=True)
    val.wait()
    return TokenShards(r.cache_dir, "train", failed=failed, arriving=True), val, preparation


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


def steps_for_run(args, plan: Plan, source: batches.BatchSource | None, resumed: dict | None, block_size: int,
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


def evaluation_batches(args, plan: Plan, val: TokenShards | None, block_size: int, batch_size: int) -> int:
    """Validation batches an evaluation reads: --eval_iters, but at most one pass over the validation split
    (its size estimated from the training split's under --plan)."""
    if val is not None:
        tokens = val.num_tokens
    elif plan.data_tokens is not None:
        tokens = round(plan.data_tokens * args.val_split / (1 - args.val_split))
    else:
        return args.eval_iters
    return min(args.eval_iters, batches.batches_per_pass(tokens, block_size, batch_size))


def resume_progress(resumed: dict, learner: Learner, s: Settings, args, say: Callable) -> checkpoint.Progress:
    """latest.pt's weights and optimizer states put back; where the run was. Each setting that changed says
    so in a line (shape, optimizer and starting point are refused earlier: no continuation with them)."""
    progress = checkpoint.restore(resumed, learner.raw_model, learner.optimizers, learner.scaler, s.tokens_per_step)
    say("\n".join(resume_notes(resumed, s, args, progress)))
    say(f"resumed from {s.save_dir / checkpoint.LATEST} at step {progress.step} "
        f"(best validation loss {progress.best_val:.4f})")
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
    if progress.max_steps and s.steps and s.steps != progress.max_steps:
        held = f"; the learning rate stays at {s.optimizer.lr * s.held_lr:.2e}, where the decay left it " \
               "(--reschedule plans the decay anew)" if s.held_lr is not None else ""
        notes.append(f"note: --resume: {s.steps:,} steps, the run had planned {progress.max_steps:,}{held}")
    return notes


def held_rate(optimizer: OptimizerSettings, reschedule: bool, resumed: dict | None, steps: int | None) -> float | None:
    """On --resume with more steps than the run had planned, the share of the peak rate the decay had reached
    at the step resumed, if it had begun (the rate then stays there); None: the schedule as planned."""
    saved, step = (resumed.get("max_steps"), resumed.get("step", 0)) if resumed else (None, 0)
    if not saved or not steps or steps <= saved or reschedule:
        return None
    warmup = fitting_warmup(optimizer.warmup_steps, saved)
    scale = optimizer.schedule_of(saved).lr(step)
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


def estimated_plan(config: GPTConfig, args, batch_size: int, spec: data.DataSpec) -> Plan:
    """What can be known before any download: the model's size, the tokens of a step, and the data's size
    estimated from --sample_size (exact once it has all arrived)."""
    params, non_embedding = parameter_counts(config)
    estimate, basis = estimated_data_tokens(spec.dataset, spec.sample_size)
    plan = Plan(params, non_embedding, batch_size * config.block_size, spec.sample_size, steps=args.max_steps,
                price_per_hour=args.price_per_hour,
                data_tokens=None if estimate is None else round(estimate * (1 - args.val_split)),
                data_basis=f"{basis}, {1 - args.val_split:.0%} for training")
    if data.route(spec, probe=False).repo and estimate is not None:  # FineWeb's validation is a shard of its own
        plan.data_tokens = estimate
        plan.data_basis = f"{basis}; validation: the FineWeb speedrun's {VAL_TOKENS:,} tokens"
        plan.disk_bytes = (fineweb.shards_for(estimate) + 1) * fineweb.SHARD_BYTES
    return plan


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
