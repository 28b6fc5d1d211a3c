"""Train GPT-2 on one GPU, several (torchrun), or the CPU, keeping the best-validation checkpoint.

    python train_gpt2.py                                      # GPT-2 124M's shape on FineWeb, the measured recipe
    python train_gpt2.py --plan --price_per_hour 3            # what a run will take and cost; nothing is written
    python train_gpt2.py --time 1h                            # the model an hour buys, its decay ending on time
    python train_gpt2.py --dataset ./my_texts --n_layer 6 --n_head 6 --n_embd 384 --max_steps 2000
    python train_gpt2.py ...the same flags... --resume        # after a stop, or a kill -9
    torchrun --standalone --nproc_per_node 8 train_gpt2.py --batch_size 512

This file holds the run: `main`, `--plan`, and `train`, the loop: a few once-in-a-while sections (the plan and
the time budget, a log line, HellaSwag, an evaluation, a save), each one call, then the step, written out: the
rates, forward and backward over the micro-batches, clip, update. What the run trains with is resolved once
before it (startup.py, from the flags of flags.py); the step's parts are step.py's, the optimizers and the
schedule optim.py's, the batches batches.py's.
"""
from __future__ import annotations

import time

STARTED = time.monotonic()  # --time counts from here: importing torch, preparing data and compiling included

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import batches
import chat
import checkpoint
import data
from budget import CHECKPOINT_BYTES_PER_PARAMETER, Budget, Costs, Pace, cpu_advice
from common import EOT, UserError, clean_temporaries, first_line, forgive_gone_readers, remove_own_temporaries
from eval import validation_loss
from flags import parse_args, shown_flags
from metrics import Metrics, print_header, run_header
from model import GPTConfig
from muon import Muon
from optim import UNPLANNED_STEPS, Schedule, muon_momentum_at, warmup_note
from plan import Outcome, peak_flops
from runtime import Env, cleanup_env, leave_together, setup_env
from startup import Run, epoch_steps, reply_room, start
from step import StatsReader, StepStats, run_compiled, step_seconds, train_step

# latest.pt is saved by the clock too, so that a kill -9 or the kernel's out-of-memory killer loses at most
# this much: first this long after training starts, then at this interval (as well as --checkpoint_interval).
FIRST_SAVE_S, SAVE_EVERY_S = 180.0, 600.0
# --plan times steps for at most this long, so that it answers within about a minute on any machine.
PLAN_TIMING_S = 40.0


def main(argv=None, started: float | None = None) -> int:
    """`python train_gpt2.py`: the run (or --plan), its errors as one line. `started`: when the process
    started (--time counts from it); by default, now."""
    started = time.monotonic() if started is None else started
    forgive_gone_readers()
    args = parse_args(argv)
    env, notes = setup_env(args.device, args.amp, args.compile)
    out, signals = None, SignalStop(alone=env.world == 1)
    try:
        if env.master:
            print_header(env, shown_flags(args), notes)
            if env.device.type == "cuda" and peak_flops(env.device) is None:
                tqdm.write(f"note: no bf16 peak is known for {torch.cuda.get_device_name(env.device)}, so no MFU "
                           "is shown")
        say = tqdm.write if env.master else (lambda text: None)
        if args.plan:
            return print_plan(start(args, env, say, started, dry_run=True), env, started, say)
        run = start(args, env, say, started)
        out = Output.open(run, env, started)
        status = train(run, env, out, signals)
        out.close()
        leave_together(env)
        return status
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # a signal before training began (SignalStop); later, it stops the loop
        print("interrupted before training began", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
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
        signals.restore()


def print_plan(run: Run, env: Env, started: float, say) -> int:
    """--plan: start-up as the run does it, without the data, then a few steps timed on random tokens (unless
    --time just timed this model at this batch); the plan's steps, time and cost. Nothing is fetched or written."""
    s, plan = run.settings, run.plan
    if s.sizing and s.sizing.timed_now and not env.compile:  # --time just timed this model at this batch
        plan.step_seconds = s.tokens_per_step / s.sizing.chosen.tokens_per_s
    else:
        plan.step_seconds = run_compiled(run.learner, env, say, lambda: step_seconds(
            run.learner, env, s.micro_batch, s.grad_accum, s.config.block_size, PLAN_TIMING_S))
    costs = dataclasses.replace(run_costs(run), step=plan.step_seconds, hellaswag_interval=0)
    if s.time:
        plan.steps = min(Budget(s.time, started).steps(0, time.monotonic(), costs), s.steps or UNPLANNED_STEPS)
    if plan.steps is not None:
        plan.seconds = time.monotonic() - started + costs.seconds(0, plan.steps)
    lines = [f"plan: micro-batches of {s.micro_batch} × {s.config.block_size} tokens, {s.grad_accum} accumulation "
             f"step(s) on each of {env.world} process(es)"]
    if plan.steps is None:
        lines.append("plan: steps unknown until the data is prepared (give --max_steps or --time)")
    else:
        lines += [plan.steps_line(), plan.time_line(env.device.type)]
        lines += [] if s.time else cpu_advice(env.device.type, plan.seconds)
    say("\n".join(lines + plan.warnings()))
    return 0


# ----------------------------------------------------------------------------------------------------
# The loop


class Interrupted(KeyboardInterrupt):
    """A signal where nothing is half done: before training began, or while the loop waits for data."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop:
    """SIGINT, SIGTERM and SIGHUP. Before training begins one raises Interrupted at once. While it trains, one sets
    `received`, which the loop reads at each step and an evaluation before each batch: it saves latest.pt and
    stops. A process `alone` (not one of torchrun's ranks, which must agree on the step they stop at) also stops
    its downloads at once, and a signal while its loop waits for data (a slow link, a failing Hub) raises
    Interrupted there. A second Ctrl-C quits at once, removing the files it was writing; more SIGTERMs and SIGHUPs
    change nothing (a dropped SSH connection can send the hang-up twice: to the shell's jobs, and to the
    terminal's process group).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, alone: bool):
        self.alone = alone
        self.received: int | None = None
        self.raising = True  # until training begins
        self._before = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # the second Ctrl-C: out at once
            left = remove_own_temporaries()
            print(f"\nquit at once: latest.pt not saved{'; removed ' + ', '.join(left) if left else ''}",
                  file=sys.stderr)
            os._exit(128 + signal.SIGINT)
        self.received = self.received or signum
        if self.raising or self.alone:
            data.Preparation.stop_all()  # the run is leaving: no download begins after the signal
        if self.raising:
            self.raising = False  # once: a second signal (a dropped SSH connection hangs up twice) changes nothing
            raise Interrupted(signum)

    def asked(self) -> bool:
        return self.received is not None

    @contextlib.contextmanager
    def waiting(self):
        """Inside, for a process alone: the loop only waits for data, which a signal ends at once (Interrupted)."""
        if not self.alone:
            yield
            return
        if self.received is not None:
            raise Interrupted(self.received)
        self.raising = True
        try:
            yield
        finally:
            self.raising = False

    def restore(self) -> None:
        """The handlers as they were (a process running several runs, as the tests do)."""
        for s, handler in self._before.items():
            signal.signal(s, handler)


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
    closed_with_it: list = dataclasses.field(default_factory=list)  # what runs on threads: stopped with the run

    @classmethod
    def open(cls, run: Run, env: Env, started: float) -> Output:
        s, step = run.settings, run.progress.step
        s.save_dir.mkdir(parents=True, exist_ok=True)
        if env.master and clean_temporaries(s.save_dir):  # what a killed run was writing when it died
            tqdm.write(f"note: removed the unfinished files a killed run left in {s.save_dir}")
        # A resumed run's rows past its step are dropped (a new run's folder holds no metrics.jsonl).
        metrics = Metrics(s.save_dir, step, s.wandb, run.flags, enabled=env.master)
        bar = tqdm(total=s.steps, initial=step, disable=not env.master, unit="step", dynamic_ncols=True)
        out = cls(env, s.save_dir, started, s.price_per_hour, metrics, bar, checkpoint.CheckpointWriter())
        if run.preparation is not None:
            out.closing(run.preparation)
        return out

    def closing(self, thing):
        """thing, whose close() stops its threads, closed with the output: a thread still inside torch or a C++
        library when the process exits can abort it ("terminate called without an active exception")."""
        self.closed_with_it.append(thing)
        return thing

    def say(self, text: str) -> None:
        if self.env.master:
            tqdm.write(text)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def cost(self) -> float | None:
        return None if self.price_per_hour is None else self.elapsed() / 3600 * self.price_per_hour

    def close(self) -> None:
        """The last checkpoints on disk, metrics.jsonl's wandb mirror closed and the threads stopped, before the
        process ends."""
        self.bar.close()
        try:
            self.writer.wait()
        finally:
            self.metrics.close()
            while self.closed_with_it:
                self.closed_with_it.pop().close()


def train(run: Run, env: Env, out: Output, signals: SignalStop) -> int:
    """The loop, from run.progress.step to the last step: a few "once in a while" sections, each one call,
    then the step. Returns the exit status: 0, or 128 + the signal that stopped the run."""
    s, learner, progress, every = run.settings, run.learner, run.progress, run.settings.every
    # With --time, `paced` sets the steps once some are timed; with --epochs over data still arriving, they are
    # known once it is all there (the schedule says where it cannot do without them).
    schedule = s.schedule(s.steps or (UNPLANNED_STEPS if s.time else None))
    costs, budget = run_costs(run), Budget(s.time, out.started) if s.time else None
    out.metrics.log(event="start", step=progress.step, run=s.to_dict(),
                    **json.loads(json.dumps(run_header(env, run.flags), default=str)))
    if schedule.max_steps is not None and progress.step >= schedule.max_steps:
        if progress.final_pending:  # stopped during its last evaluation
            return last_evaluation(run, env, out, signals)
        out.say(f"nothing to do: the run is at step {progress.step} of {schedule.max_steps}")
        return 0
    stats, pace = StatsReader(learner.scaler is not None, s.save_dir), Pace(progress.step, s.tokens_per_step)
    run.batches.on_wait = lambda held: out.bar.set_postfix_str(f"waiting for data ({held:,} training tokens so far)")
    reader = out.closing(batches.micro_batches(run.batches, progress.step, num_workers=s.num_workers,
                                               pin_memory=env.device.type == "cuda"))
    if progress.step == 0 and s.init_from != "scratch":  # where a fine-tune starts, logged as step 0
        validate(run, env, out, share=1.0)  # over the whole split, as its last; saved as the first best checkpoint
        if run.hellaswag is not None:
            score_hellaswag(run, env, out)
    learner.model.train()
    signals.raising = False  # training begins: from now on a signal stops the run after a save
    next_save = time.monotonic() + FIRST_SAVE_S  # by the clock; rank 0 alone writes, so its clock alone counts
    while progress.step < (schedule.max_steps or UNPLANNED_STEPS):
        try:
            with signals.waiting():
                if schedule.lr(progress.step) is None:  # this step's rate depends on how long the data makes the run
                    schedule = with_run_length(run, schedule, out, wait=True)
                    if progress.step >= schedule.max_steps:
                        break
                micro_batches = [next(reader) for _ in range(s.grad_accum)]
        except (data.DataError, Interrupted) as e:  # the data stopped arriving, or a signal came while waiting for it
            stats.latest()
            save_latest(run, out)
            return stopped(run, env, out, getattr(e, "signum", None), failure=None if signals.asked() else e)

        # The step. Its rates: each group's peak times the schedule's share, and Muon's momentum warmup.
        lr = schedule.lr(progress.step)
        for optimizer in learner.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr
                if isinstance(optimizer, Muon):
                    group["momentum"] = muon_momentum_at(progress.step, s.optimizer.muon_momentum)
        # Forward and backward over the micro-batches, clip, update: queued on the device, its figures read a
        # step later (StatsReader), so the CPU never waits for the GPU.
        stop = signals.asked() or run.data_failed() is not None
        step_stats = run_compiled(learner, env, out.say, lambda: train_step(
            learner, micro_batches, env, step=progress.step, seed=s.seed, grad_clip=s.optimizer.grad_clip, stop=stop))
        stats.queued(progress.step, step_stats)
        progress.step, progress.tokens = progress.step + 1, progress.tokens + s.tokens_per_step
        out.bar.update(1)
        step = progress.step

        # The plan's time and, with --time, the steps: once the first steps are timed, then at each log line.
        if pace.timed(step, stats.latest):
            if budget is not None and costs.evaluation is None:  # what an evaluation costs counts in the budget
                with pace.leave_out() as took:
                    if validate(run, env, out, signals.asked):
                        costs.evaluation = took.seconds
            schedule = paced(run, schedule, pace, costs, budget, out, announce=True)
        elif budget is not None and (step % every.log == 0 or budget.passed()):
            schedule = paced(run, schedule, pace, costs, budget, out)
        if schedule.max_steps is None and step % every.log == 0:
            schedule = with_run_length(run, schedule, out, wait=False)

        end, stop = step == schedule.max_steps, stats.stop
        log = step % every.log == 0 or end
        hellaswag = run.hellaswag is not None and (step % every.hellaswag == 0 or end) and not stop
        evaluate = (step % every.eval == 0 or end) and not stop
        save = step % every.checkpoint == 0 or end or stop or time.monotonic() >= next_save
        if not (log or hellaswag or evaluate or save):
            continue
        stats.latest()  # a log line, an evaluation or a checkpoint only ever follows a finite step
        if log:
            log_step(run, stats.last, pace.lap(step), schedule, out)
        if hellaswag:
            with pace.leave_out() as took:
                score_hellaswag(run, env, out)
            costs.hellaswag = took.seconds
        evaluated = False
        if evaluate:
            with pace.leave_out() as took:
                evaluated = validate(run, env, out, signals.asked,
                                     share=costs.final_share() if end and costs.step else 1.0 if end else None)
                if s.sample_during_training and evaluated:
                    print_sample(run, env, out)
            if not end and evaluated:
                costs.evaluation = took.seconds
        progress.final_pending = end and not evaluated  # a stop before it, or during it: --resume does it
        stop = stop or (evaluate and not evaluated)
        if save or stop:
            with pace.leave_out():
                save_latest(run, out)
            next_save = time.monotonic() + SAVE_EVERY_S
        pace.restart(step)  # the pace is the training's, without these
        if stop:
            return stopped(run, env, out, signals.received, failure=run.data_failed())
    out.writer.wait()  # the last checkpoints are on disk before the summary says so
    summarise(run, out, "done")
    return 0


# ----------------------------------------------------------------------------------------------------
# The loop's sections


def with_run_length(run: Run, schedule: Schedule, out: Output, wait: bool) -> Schedule:
    """The schedule of a run whose --epochs are over data still arriving: its length, once the data is all there
    (said with the data's exact size), else (wait) once enough of it is there for this step's rate, waiting for
    it with the progress bar saying so."""
    s, source, step = run.settings, run.batches, run.progress.step
    while True:
        source.shards.refresh()
        if source.shards.complete:
            steps = epoch_steps(s.epochs, source)
            run.plan.steps, run.plan.data_tokens, run.plan.data_basis = steps, source.shards.num_tokens, ""
            run.plan.steps_per_pass = source.steps_per_epoch if source.packed is not None else None
            run.progress.max_steps = steps
            out.bar.total = steps
            out.bar.refresh()
            out.say("\n".join([run.plan.data_line(), run.plan.steps_line(), *run.plan.warnings(),
                               *warmup_note(s.optimizer.warmup_steps, steps)]))
            return s.schedule(steps)
        schedule = s.schedule(None, epoch_steps(s.epochs, source, at_least=True))
        if not wait or schedule.lr(step) is not None:
            return schedule
        if run.data_failed() is not None:
            source.shards.wait()  # raises it
        out.bar.set_postfix_str(f"waiting for data: the rate of step {step} depends on the run's length "
                                f"({source.shards.num_tokens:,} training tokens so far)")
        time.sleep(1.0)


def last_evaluation(run: Run, env: Env, out: Output, signals: SignalStop) -> int:
    """The last evaluation of a run stopped before or during it (its steps all done), then the run's end."""
    signals.raising = False
    if not validate(run, env, out, signals.asked, share=1.0):
        return stopped(run, env, out, signals.received)  # latest.pt already holds this step, still pending
    if run.hellaswag is not None:
        score_hellaswag(run, env, out)
    run.progress.final_pending = False
    save_latest(run, out)
    out.writer.wait()
    summarise(run, out, "done")
    return 0


def run_costs(run: Run) -> Costs:
    """What the plan counts with besides the steps, estimated until measured."""
    s = run.settings
    # HellaSwag's rows: its text at about 4 bytes a token, four endings after each context.
    scored = sum(len(i.ctx) * 4 + sum(map(len, i.endings)) for i in run.hellaswag or []) // 4
    windows = batches.Windows(run.val, s.config.block_size).available() if run.val is not None else \
        (run.plan.val_tokens or 0) // (s.config.block_size + 1)  # --plan: the split's size as estimated
    return Costs(eval_batches=s.eval_batches, eval_interval=s.every.eval,
                 hellaswag_interval=s.every.hellaswag if run.hellaswag else 0, hellaswag_tokens=scored,
                 tokens_per_step=s.tokens_per_step, checkpoint_bytes=run.plan.params * CHECKPOINT_BYTES_PER_PARAMETER,
                 final_windows=max(1.0, windows / (s.eval_batches * s.batch_size)),
                 final_limit=Budget.FINAL_EVAL_SHARE * s.time if s.time else None)


def paced(run: Run, schedule: Schedule, pace: Pace, costs: Costs, budget: Budget | None, out: Output,
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
        warmup = run.settings.optimizer.warmup_steps
        planned = [plan.steps_line(), *plan.warnings(), *warmup_note(warmup, schedule.max_steps)] \
            if budget is not None else []
        out.say("\n".join([plan.time_line(out.env.device.type), *planned]))
        sizing = run.settings.sizing
        out.metrics.log(**plan.row(), **({"sizing": sizing.to_dict()} if sizing else {}))
    return schedule


def log_step(run: Run, f: StepStats, tokens_per_s: float, schedule: Schedule, out: Output) -> None:
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


def validate(run: Run, env: Env, out: Output, stop=None, share: float | None = None) -> bool:
    """eval.py's validation loss (and bits per byte), each rank scoring its share with the model being trained
    (compiled and DDP-wrapped as it is): over a fixed sample of windows spread over the whole split, eval_batches
    batches of them; or, at the run's end, `share` of all of them (1: the whole split); logged, and the weights
    saved as model_best_val.pt when it is the lowest yet. False, with nothing logged, where stop() came true
    before its end."""
    s, progress = run.settings, run.progress
    windows = batches.Windows(run.val, s.config.block_size).available()
    sample = s.eval_batches * s.batch_size if share is None else None if share >= 1 else max(1, int(share * windows))
    result = validation_loss(run.learner.model, run.val, s.config.block_size, env.device, env.autocast, env.rank,
                             env.world, rows=s.micro_batch, sample=sample, stop=stop)
    if result is None:
        return False
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
    if run.exchanges and env.master:
        score_replies(run, out)
    out.metrics.plot()
    if improved and env.master:
        checkpoint.save_best(out.writer, out.save_dir, run.learner.raw_model, progress, s.init_from, s.to_dict())
    return True


def score_replies(run: Run, out: Output) -> None:
    """With --chat: the share of greedy replies to held-out conversations that end their turn, and of the short
    ones, whose answer can be checked, the share said exactly."""
    scores = chat.score_replies(run.learner.raw_model, run.exchanges, reply_room(run.settings.config.block_size))
    right = f", {scores['right']:.0%} of the {scores['checkable']} short ones word for word" \
        if scores["checkable"] else ""
    out.say(f"step {run.progress.step}: replies to {scores['replies']} held-out conversations: {scores['ended']:.0%} "
            f"end their turn{right}")
    out.metrics.log(step=run.progress.step, chat_ended=scores["ended"], chat_right=scores["right"])


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
    g = torch.Generator(device=env.device).manual_seed(run.settings.seed + run.progress.step)
    raw = run.learner.raw_model
    raw.eval()
    ids = list(raw.generate([EOT], 48, temperature=0.8, top_k=200, generator=g))
    raw.train()
    out.say(f"sample at step {run.progress.step}: {data.get_tokenizer().decode(ids)!r}")


def save_latest(run: Run, out: Output) -> None:
    """latest.pt, written by rank 0 in the background."""
    if out.env.master:
        learner, s = run.learner, run.settings
        checkpoint.save_latest(out.writer, out.save_dir, learner.raw_model, learner.optimizers, learner.scaler,
                               run.progress, s.init_from, run.flags, s.to_dict())


def stopped(run: Run, env: Env, out: Output, signum: int | None, failure: BaseException | None = None) -> int:
    """After the loop saved latest.pt on a signal, or on a failure of its data (a download that failed, a corrupt
    shard: raised here as one line, once the summary is out): the exit status."""
    out.writer.wait()  # latest.pt, saved by the loop, is on disk before the process leaves
    if env.world > 1:
        dist.barrier()  # every rank leaves after rank 0 has saved
    out.bar.close()
    latest = out.save_dir / checkpoint.LATEST
    if signum is None and failure is not None:
        summarise(run, out, "failed")
        why = str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {first_line(failure)}"
        raise data.DataError(f"stopped for its data ({why}); {latest} is saved at step {run.progress.step}: once "
                             "that is fixed, continue with --resume")
    pending = " (its last evaluation does)" if run.progress.final_pending else ""
    out.say(f"stopped by signal at step {run.progress.step}; {latest} saved, continue with --resume{pending}")
    summarise(run, out, "stopped")
    return 128 + (signum or signal.SIGTERM)


def summarise(run: Run, out: Output, how: str) -> None:
    """The summary a run ends with: what it reached, its time and cost, and the way home."""
    p, seconds = run.progress, out.elapsed()
    outcome = Outcome(steps=p.step, tokens=p.tokens, seconds=seconds,
                      best_val=p.best_val if p.best_step is not None else None, best_step=p.best_step,
                      checkpoint=out.save_dir / checkpoint.BEST, price_per_hour=out.price_per_hour,
                      hellaswag=p.hellaswag, planned_seconds=run.plan.seconds, chat=run.settings.data.chat)
    out.bar.close()
    out.say("\n".join(outcome.lines()))
    out.metrics.log(event=how, step=p.step, seconds=seconds, cost=out.cost(), best_val_loss=outcome.best_val,
                    best_step=p.best_step)


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
