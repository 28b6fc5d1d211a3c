"""Train GPT-2 on one GPU, several (torchrun), or the CPU, keeping the best-validation checkpoint.

    python train_gpt2.py                                      # GPT-2 124M's shape on FineWeb, the measured recipe
    python train_gpt2.py --plan --price_per_hour 3            # what a run will take and cost; nothing is written
    python train_gpt2.py --time 1h                            # the model an hour buys, its decay ending on time
    python train_gpt2.py --dataset ./my_texts --n_layer 6 --n_head 6 --n_embd 384 --max_steps 2000
    python train_gpt2.py --resume                             # after a stop, or a kill -9: the run's own flags
    torchrun --standalone --nproc_per_node 8 train_gpt2.py --batch_size 512

This file holds the run: `main`, `--plan`, and `train`, the loop: the step, written out (the horizon's settings
for it, forward and backward over the micro-batches, clip, update), then a few once-in-a-while sections (a log
line, HellaSwag, an evaluation, a save), each one call. What the run trains with is resolved once before it
(startup.py, from the flags of flags.py); how long it runs and each step's rates are the horizon's (horizon.py);
the step's parts are step.py's, the optimizers optim.py's, the batches batches.py's.
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
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

import batches
import chat
import checkpoint
import data
from budget import CHECKPOINT_BYTES_PER_PARAMETER, cpu_advice
from common import (EOT, DataError, SaveError, UserError, clean_temporaries, first_line, forgive_gone_readers,
                    remove_own_temporaries)
from eval import validation_loss
from flags import parse_args, shown_flags
from hf import missing_in_transformers
from horizon import StepSettings
from metrics import Metrics, print_header, run_header, writing
from model import GPTConfig
from muon import Muon
from plan import Outcome, human_bytes, peak_flops
from runtime import Env, cleanup_env, leave_together, setup_env
from startup import Run, reply_room, start
from step import StatsReader, StepStats, accumulate_gradients, run_compiled, step_optimizers, step_seconds
from tokenizer import get_tokenizer

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
    out, signals = None, Signals(alone=env.world == 1)
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
    except SaveError as e:
        sys.exit(f"error: {e}; {out.room() if out else 'the save folder cannot be written'}")
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:  # a signal before training began (Signals); later, it stops the loop
        print(interrupted_early(), file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        sys.exit(out_of_memory(args, env, "GPU" if isinstance(e, torch.cuda.OutOfMemoryError) else "CPU"))
    except RuntimeError as e:
        if not cpu_out_of_memory(e):
            raise  # a bug: its traceback, and the process exits (no reader process is left to wait for)
        sys.exit(out_of_memory(args, env, "CPU"))
    finally:
        if out is not None:
            with contextlib.suppress(UserError):  # said already, or the error being said is the first
                out.close()  # a failed run's last checkpoints are on disk too
        cleanup_env(env)
        signals.restore()


def interrupted_early() -> str:
    """The line a Ctrl-C before the first step ends with: the way on."""
    underway = data.preparations_underway()
    if underway:
        return (f"interrupted while preparing the data: what is prepared in {underway[0]} is kept, and the same "
                "command continues from there")
    return "interrupted before training began (nothing of the run was written): the same command starts it again"


def print_plan(run: Run, env: Env, started: float, say) -> int:
    """--plan: start-up as the run does it, without the data, then a few steps timed on random tokens (unless
    --time just timed this model at this batch); the plan's steps, time and cost. Nothing is fetched or written."""
    settings, plan = run.settings, run.plan
    if settings.sizing and settings.sizing.timed_now and not env.compile:  # --time just timed this model at this batch
        seconds = settings.tokens_per_step / settings.sizing.chosen.tokens_per_s
    else:
        seconds = run_compiled(run.learner, env, say, lambda: step_seconds(
            run.learner, env, settings.micro_size, settings.grad_accum, settings.config.block_size, PLAN_TIMING_S))
    short = run.horizon.timed(seconds, time.monotonic())
    lines = [f"plan: micro-batches of {settings.micro_size} × {settings.config.block_size} tokens, "
             f"{settings.grad_accum} accumulation step(s) on each of {env.world} process(es)"]
    if run.horizon.steps is None:
        lines.append("plan: steps unknown until the data is prepared (give --max_steps or --time)")
        lines += plan.warnings()
    else:
        lines += [*run.horizon.length_lines(), plan.time_line()]
        lines += [] if settings.time else cpu_advice(env.device.type, plan.seconds, settings.config)
    say("\n".join(lines + short))
    return 0


# ----------------------------------------------------------------------------------------------------
# The loop


class Interrupted(KeyboardInterrupt):
    """A signal where nothing is half done: before training began, or while the loop waits for data."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
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
        # What the last latest.pt saved is (Output.last_latest, once the run's folder is open), said when a second
        # Ctrl-C leaves this stop's unsaved.
        self.latest: Callable[[], str] = lambda: "no latest.pt of this run is saved yet"
        self.raising = True  # until training begins
        self._before = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # the second Ctrl-C: out at once
            left = remove_own_temporaries()
            print(f"\nquit at once, without saving latest.pt{' (removed ' + ', '.join(left) + ')' if left else ''}: "
                  f"{self.latest()}", file=sys.stderr)
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
    params: int  # the model's, for the room its checkpoints take
    started: float  # the process's start, which --time counts from
    price_per_hour: float | None
    metrics: Metrics
    bar: tqdm
    writer: checkpoint.CheckpointWriter
    closed_with_it: list = dataclasses.field(default_factory=list)  # what runs on threads: stopped with the run

    @classmethod
    def open(cls, run: Run, env: Env, started: float) -> Output:
        settings, step = run.settings, run.progress.step
        with writing(settings.save_dir):
            settings.save_dir.mkdir(parents=True, exist_ok=True)
        if env.master and clean_temporaries(settings.save_dir):  # what a killed run was writing when it died
            tqdm.write(f"note: removed the unfinished files a killed run left in {settings.save_dir}")
        # A resumed run's rows past its step are dropped (a new run's folder holds no metrics.jsonl).
        metrics = Metrics(settings.save_dir, step, settings.wandb, run.flags, enabled=env.master)
        bar = tqdm(total=run.horizon.steps, initial=step, disable=not env.master, unit="step", dynamic_ncols=True)
        out = cls(env, settings.save_dir, run.plan.params, started, settings.price_per_hour, metrics, bar,
                  checkpoint.CheckpointWriter())
        run.horizon.log = metrics.log  # the plan's rows, as the horizon learns them
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

    def advance(self, steps: int | None) -> None:
        """The progress bar one step on, its total the run's length as the horizon knows it now."""
        if self.bar.total != steps:
            self.bar.total = steps
            self.bar.refresh()
        self.bar.update(1)

    def waiting(self, why: str) -> None:
        """What the run waits for, on the progress bar."""
        self.bar.set_postfix_str(why)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def room(self) -> str:
        """What a run whose folder failed needs there, and the way on (what was saved stays)."""
        latest, best = self.params * CHECKPOINT_BYTES_PER_PARAMETER, self.params * 4  # fp32 weights alone
        return (f"{self.save_dir} must be a folder with about {human_bytes(2 * (latest + best))} free for this run "
                f"(latest.pt about {human_bytes(latest)} and {checkpoint.BEST} {human_bytes(best)}, each written "
                f"beside the one it replaces); what was saved there stays, and then {self.last_latest()}")

    def last_latest(self) -> str:
        """Where --resume would continue from now: the last latest.pt written whole, or step 0."""
        latest = self.save_dir / checkpoint.LATEST
        if not latest.is_file():
            return f"{latest} is not there, so --resume starts the run again from step 0"
        step = self.writer.steps.get(checkpoint.LATEST)
        return f"{latest}{'' if step is None else f' of step {step}'} is still there, and --resume continues from it"

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


def train(run: Run, env: Env, out: Output, signals: Signals) -> int:
    """The loop, from run.progress.step to the horizon's last step: the step, then a few "once in a while"
    sections, each one call. Returns the exit status: 0, or 128 + the signal that stopped the run."""
    settings, learner, progress, horizon = run.settings, run.learner, run.progress, run.horizon
    every = settings.every
    out.metrics.log(event="start", step=progress.step, run=settings.to_dict(),
                    **json.loads(json.dumps(run_header(env, run.flags), default=str)))
    if not horizon.running(progress.step):
        return nothing_left(run, env, out, signals)
    stats, reader = begin(run, env, out, signals)
    next_save = time.monotonic() + FIRST_SAVE_S  # by the clock; rank 0 alone writes, so its clock alone counts
    while horizon.running(progress.step):
        try:
            with signals.waiting():
                now = horizon.before(progress.step, out.waiting, run.data_failed)
                if now is None:  # the data, all arrived, makes the run end before this step
                    break
                micro_batches = [batches.at_context(next(reader), now.context) for _ in range(now.accum)]
        except (DataError, Interrupted) as e:  # the data stopped arriving, or a signal came while waiting for it
            stats.latest()
            save_latest(run, out)
            return leave_early(run, env, out, getattr(e, "signum", None), failure=None if signals.asked() else e)

        # The step, at the horizon's settings for it: forward and backward over the micro-batches, clip, update;
        # queued on the device, its figures read a step later (StatsReader), so the CPU never waits for the GPU.
        set_step(learner, now)
        loss = run_compiled(learner, env, out.say, lambda: accumulate_gradients(
            learner, micro_batches, env, step=progress.step, seed=settings.seed))
        wants_stop = signals.asked() or run.data_failed() is not None  # told every rank by the step
        stats.queued(progress.step,
                     step_optimizers(learner, loss, env, grad_clip=settings.optimizer.grad_clip, stop=wants_stop))
        step = progress.advance(now.accum, round(settings.tokens_per_step * now.work(settings.grad_accum)))
        horizon.after(step, logged=step % every.log == 0, wait=stats.latest,
                      evaluate=lambda: validate(run, env, out, signals.asked),
                      write_s=out.writer.seconds.get(checkpoint.LATEST))
        out.advance(horizon.steps)

        # Once in a while: a log line, HellaSwag, an evaluation, a save (each aside, off the pace's clock).
        end, stop = horizon.last(step), stats.stop  # stop: some rank wants it (its step's figures say so)
        log = step % every.log == 0 or end
        hellaswag = run.hellaswag is not None and (step % every.hellaswag == 0 or end) and not stop
        evaluate = (step % every.eval == 0 or end) and not stop
        save = step % every.checkpoint == 0 or end or stop or time.monotonic() >= next_save
        if not (log or hellaswag or evaluate or save):
            continue
        stats.latest()  # a log line, an evaluation or a checkpoint only ever follows a finite step
        if log:
            log_step(run, stats.last, horizon.tokens_per_s(step), out)
        if hellaswag:
            with horizon.aside("hellaswag"):
                score_hellaswag(run, env, out)
        evaluated = None
        if evaluate:
            with horizon.aside(None if end else "evaluation"):  # the last one reads more than the others
                evaluated = evaluation(run, env, out, signals.asked, last=end)
            end = horizon.last(step)  # --target_loss, reached, ends the run here
        progress.final_pending = end and evaluated is None  # a stop before it, or during it: --resume does it
        stop = stop or (evaluate and evaluated is None)
        if save or end or stop:
            with horizon.aside():
                save_latest(run, out)
            next_save = time.monotonic() + SAVE_EVERY_S
        if stop:
            return leave_early(run, env, out, signals.received, failure=run.data_failed())
    out.writer.wait()  # the last checkpoints are on disk before the summary says so
    summarise(run, out, "done")
    return 0


# ----------------------------------------------------------------------------------------------------
# The loop's sections


def nothing_left(run: Run, env: Env, out: Output, signals: Signals) -> int:
    """A run resumed where its steps are all done: its last evaluation, if a stop came before it; else nothing."""
    if run.progress.final_pending:
        return last_evaluation(run, env, out, signals)
    out.say(f"nothing to do: the run is at step {run.progress.step} of {run.horizon.steps}")
    return 0


def begin(run: Run, env: Env, out: Output, signals: Signals):
    """What the loop starts with: the reader of each step's figures and the micro-batches read ahead (and, for
    a fine-tune, its starting evaluation). From here on a signal stops the run after a save."""
    settings, progress = run.settings, run.progress
    stats, signals.latest = StatsReader(run.learner.scaler is not None, settings.save_dir), out.last_latest
    run.batches.on_wait = lambda got: out.waiting(f"waiting for data ({got:,} training tokens so far)")
    reader = out.closing(batches.micro_batches(run.batches, progress.micro_steps, num_workers=settings.num_workers,
                                               pin_memory=env.device.type == "cuda"))
    if progress.step == 0 and settings.init_from != "scratch":  # where a fine-tune starts, logged as step 0
        validate(run, env, out, share=1.0)  # over the whole split, as its last; saved as the first best checkpoint
        if run.hellaswag is not None:
            score_hellaswag(run, env, out)
    run.learner.model.train()
    signals.raising = False  # training begins: from now on a signal stops the run after a save
    return stats, reader


def set_step(learner, now: StepSettings) -> None:
    """Each group at its peak rate times the step's share; Muon at the step's momentum; the attention windows
    and the loss's extra terms, where the model has them, at the step's (in place: no recompilation)."""
    for optimizer in learner.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * now.lr
            if isinstance(optimizer, Muon):
                group["momentum"] = now.muon_momentum
    if learner.raw_model.config.window_pattern:
        learner.raw_model.set_long_window(now.window)
    if now.loss_weights:
        learner.raw_model.set_loss_weights(now.loss_weights)


def last_evaluation(run: Run, env: Env, out: Output, signals: Signals) -> int:
    """The last evaluation of a run stopped before or during it (its steps all done), then the run's end."""
    signals.raising = False
    if validate(run, env, out, signals.asked, share=1.0) is None:
        return leave_early(run, env, out, signals.received)  # latest.pt already holds this step, still pending
    if run.hellaswag is not None:
        score_hellaswag(run, env, out)
    run.progress.final_pending = False
    save_latest(run, out)
    out.writer.wait()
    summarise(run, out, "done")
    return 0


def log_step(run: Run, f: StepStats, tokens_per_s: float, out: Output) -> None:
    """A row of metrics.jsonl, and the progress bar's figures."""
    peak = peak_flops(out.env.device)
    flops = run.learner.raw_model.flops_per_token(run.settings.config.block_size)
    mfu = tokens_per_s * flops / (peak * out.env.world) if peak else None
    lr, cost = run.settings.optimizer.lr * run.horizon.at(f.step).lr, out.cost()
    row = dict(step=run.progress.step, train_loss=f.loss, lr=lr, grad_norm=f.grad_norm, tokens_per_s=tokens_per_s,
               elapsed_s=out.elapsed())
    row |= {"mfu": mfu} if mfu is not None else {}
    row |= {"cost": cost} if cost is not None else {}
    out.metrics.log(**row)
    out.bar.set_postfix(loss=f"{f.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                        **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
                        **({"cost": f"${cost:,.2f}"} if cost is not None else {}))


def validate(run: Run, env: Env, out: Output, stop=None, share: float | None = None) -> dict | None:
    """eval.py's validation loss (and bits per byte), each rank scoring its share with the model being trained
    (compiled and DDP-wrapped as it is): over a fixed sample of windows spread over the whole split, eval_batches
    batches of them; or, at the run's end, `share` of all of them (1: the whole split); logged, and the weights
    saved as model_best_val.pt when it is the lowest yet. Its result (loss, bpb, tokens read, and `whole`, the
    tokens of the whole split), or None, with nothing logged, where stop() came true before its end."""
    settings, progress = run.settings, run.progress
    windows = batches.Windows(run.val, settings.config.block_size).available()
    sample = settings.eval_batches * settings.batch_size if share is None else \
        None if share >= 1 else max(1, int(share * windows))
    result = validation_loss(run.learner.model, run.val, settings.config.block_size, env.device, env.autocast,
                             env.rank, env.world, rows=settings.micro_size, sample=sample, stop=stop)
    if result is None:
        return None
    progress.val_loss = result["loss"]
    improved = progress.val_loss < progress.best_val
    if improved:
        progress.best_val, progress.best_step = progress.val_loss, progress.step
    perplexity = math.exp(min(progress.val_loss, 50))
    whole = windows * settings.config.block_size  # predictions in the whole split
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
        checkpoint.save_best(out.writer, out.save_dir, run.learner.raw_model, progress, run.horizon.steps,
                             settings.init_from, settings.to_dict())
    return result | {"whole": whole}


def evaluation(run: Run, env: Env, out: Output, stop, last: bool) -> dict | None:
    """An evaluation (the last one: all of validation, or the share --time's budget leaves it), --target_loss's
    check, and a sample if asked for; validate's result, or None where stop() came true first."""
    evaluated = validate(run, env, out, stop, share=run.horizon.final_share() if last else None)
    if evaluated and run.settings.target_loss and run.progress.target is None:
        reached_target(run, env, out, stop, evaluated)
    if evaluated and run.settings.sample_during_training:
        print_sample(run, env, out)
    return evaluated


def reached_target(run: Run, env: Env, out: Output, stop, evaluated: dict) -> bool:
    """--target_loss: whether the evaluation just made reached it, over the whole validation split (a sample's
    figure that reaches it is checked over all of it); if so the run ends at this step, and the summary says where
    and when."""
    progress, target = run.progress, run.settings.target_loss
    if progress.val_loss > target:
        return False
    if evaluated["tokens"] < evaluated["whole"]:
        if validate(run, env, out, stop, share=1.0) is None or progress.val_loss > target:
            return False
    progress.target = (progress.step, out.elapsed())
    run.horizon.end_at(progress.step)
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
    out.say(f"sample at step {run.progress.step}: {get_tokenizer().decode(ids)!r}")


def save_latest(run: Run, out: Output) -> None:
    """latest.pt, written by rank 0 in the background."""
    if out.env.master:
        learner, settings = run.learner, run.settings
        checkpoint.save_latest(out.writer, out.save_dir, learner.raw_model, learner.optimizers, learner.scaler,
                               run.progress, run.horizon.steps, settings.init_from, run.flags, settings.to_dict())


def leave_early(run: Run, env: Env, out: Output, signum: int | None, failure: BaseException | None = None) -> int:
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
        raise DataError(f"stopped for its data ({why}); {latest} is saved at step {run.progress.step}: once "
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
                      hellaswag=p.hellaswag, planned_seconds=run.plan.seconds, chat=run.settings.data.chat,
                      target_loss=run.settings.target_loss, target=p.target,
                      gguf=not missing_in_transformers(run.settings.config))
    out.bar.close()
    out.say("\n".join(outcome.lines()))
    out.metrics.log(event=how, step=p.step, seconds=seconds, cost=out.cost(), best_val_loss=outcome.best_val,
                    best_step=p.best_step, **({"target_step": p.target[0], "target_seconds": p.target[1]}
                                              if p.target else {}),
                    **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
                       if out.env.device.type == "cuda" else {}))


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
