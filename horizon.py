"""The run's length, and everything that changes with the step: the Horizon is their one owner.

A run's length comes from --max_steps (or what a resumed run had planned); from --epochs over data still arriving,
known once it has all arrived; or from --time: the steps that fit in what is left of the budget at the measured
pace, planned again at every log line so that the decay ends on time. Every schedule is a function of the step
and that length, known before the step (`at`): the learning rate's share of each group's peak and Muon's
momentum, and beside them each schedule a recipe adds (batch size, context, attention window, the loss's extra
terms).

The loop asks `before(step)` for the step's settings and tells `after(step)` that it is done; evaluations,
scorings and saves run `aside`, off the pace's clock, their cost counted in the budget. The plan, the progress
bar, the metrics and the checkpoints read `steps`, which nothing else writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

from budget import Budget, Costs, Pace, too_short
from plan import Plan

UNPLANNED_STEPS = 2**62  # the length the rates assume with --time until a few steps are timed
# Muon's momentum warms up from this over the first steps (the FineWeb speedrun's 0.85 over 300).
MUON_MOMENTUM_START, MUON_MOMENTUM_WARMUP = 0.85, 300
# GPT-2 124M's warmup in llm.c (700 of its 19,073 steps), or a tenth of a shorter run: a fixed count would take
# most of a short one. For AdamW alone; the record's optimizer warms up no rate (optim.RECORD_WARMUP_STEPS).
DEFAULT_WARMUP_STEPS = 700
DATA_POLL_S = 1.0  # how often a step whose rate waits on the data's size looks again


# ----------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step and the run's length


@dataclass(frozen=True)
class StepSettings:
    """What one step trains with, known before it."""
    lr: float  # the share of each group's peak rate
    muon_momentum: float
    accum: int  # micro-batches each rank takes (the batch-size schedule's share of --grad_accum's)
    context: int  # positions each sequence holds (the context schedule's share of --block_size)
    window: int  # positions a long-window layer sees (the window schedule's share of the context)
    loss_weights: tuple[float, ...] = ()  # the training loss's extra terms' (LossTerms)

    def work(self, grad_accum: int) -> float:
        """The step's share of a full one (of grad_accum micro-batches)."""
        return self.accum / grad_accum


@dataclass(frozen=True)
class Stages:
    """A setting's share of its full value over equal parts of the run: (1/3, 2/3, 1) gives it a third of its
    value for the first third of the steps, two thirds for the next, all of it for the last (the FineWeb speedrun's
    batch size, modded-nanogpt's TRAINING_STAGES)."""
    shares: tuple[float, ...] = (1.0,)

    def at(self, step: int, length: int) -> float:
        return self.shares[self.stage(step, length)]

    def stage(self, step: int, length: int) -> int:
        return min(len(self.shares) - 1, step * len(self.shares) // max(1, length))

    def known(self, step: int, at_least: int) -> bool:
        """Whether every run of at_least steps or more gives this step the same share: a longer run only moves
        the stages later, so it is when the step is in the first stage of a run of at_least steps."""
        return self.stage(step, at_least) == 0


@dataclass(frozen=True)
class Shape:
    """What a full step holds, and how the schedules shrink it: micro-batches of `micro` sequences, grad_accum of
    them on each rank, block_size positions each."""
    grad_accum: int
    block_size: int
    batch: Stages = Stages()  # shares of grad_accum: the batch size
    context: Stages = Stages()  # shares of block_size, each 1/k for a whole k dividing it
    window: Stages = Stages()  # shares of the step's context: the long attention window (models with windows)

    def accum(self, step: int, length: int) -> int:
        return round(self.grad_accum * self.batch.at(step, length))  # whole: startup.check_batch_stages

    def context_at(self, step: int, length: int) -> int:
        return self.block_size // round(1 / self.context.at(step, length))

    def window_at(self, step: int, length: int) -> int:
        return max(1, round(self.context_at(step, length) * self.window.at(step, length)))

    def steps_for(self, full_steps: int) -> int:
        """The fewest steps a run takes to do full_steps full steps' worth of batches (as many, without a
        batch-size schedule)."""
        least = min(round(self.grad_accum * share) for share in self.batch.shares)
        low, high = full_steps, -(-full_steps * self.grad_accum // least) + len(self.batch.shares)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if self.work(0, mid) >= full_steps else (mid + 1, high)
        return low

    def work(self, start: int, n: int) -> float:
        """Full steps' worth of steps [start, start + n) of a run of start + n steps: each stage's steps there (the
        steps k with k * S // length == i are those from ceil(i * length / S) on), times its share of a batch."""
        length, parts = start + n, len(self.batch.shares)
        full_accum = 0
        for i, share in enumerate(self.batch.shares):
            first, end = -(-i * length // parts), -(-(i + 1) * length // parts)
            full_accum += max(0, end - max(first, start)) * round(self.grad_accum * share)
        return full_accum / self.grad_accum


@dataclass(frozen=True)
class LossTerms:
    """The training loss's extra terms over the run (model.set_loss_terms; the FineWeb speedrun's TRAINING_STAGES):
    `ahead` weighs the tokens 2, 3, ... positions ahead, `prefix` the next token's prefix token. With k tokens
    ahead the run falls into k + 1 equal parts, and the token j + 1 ahead counts in the first k + 1 - j of them (the
    record's 0.5, 0.25: the third token ahead for the first third, the second for two thirds); the prefix counts
    for the first two thirds. The record fades each weight out linearly over its last part; here each stops at its
    part's end, like every stage schedule, so that a step's weights are known once it is in the first part of a run
    at least so long (--epochs over data still arriving), and the next token alone trains the last part."""
    ahead: tuple[float, ...] = ()
    prefix: float = 0.0

    @property
    def schedules(self) -> tuple[Stages, ...]:
        k = len(self.ahead)
        ahead = tuple(Stages(tuple(w if part < k - j else 0.0 for part in range(k + 1)))
                      for j, w in enumerate(self.ahead))
        return ahead + ((Stages((self.prefix, self.prefix, 0.0)),) if self.prefix else ())

    def at(self, step: int, length: int) -> tuple[float, ...]:
        return tuple(schedule.at(step, length) for schedule in self.schedules)

    def known(self, step: int, at_least: int) -> bool:
        return all(schedule.known(step, at_least) for schedule in self.schedules)


@dataclass(frozen=True)
class LearningRate:
    """The learning rate's shape: a linear warmup to the peak, then a decay to `floor` × the peak at the last
    step: a cosine over the rest of the run, or (wsd: warmup-stable-decay) the peak held until the last
    cooldown_frac of the run, then a straight line."""
    kind: str  # "wsd" or "cosine"
    warmup_steps: int | None  # the flag (None: the default); fitting_warmup fits it to the run
    cooldown_frac: float
    floor: float  # --min_lr / --lr

    @classmethod
    def of(cls, optimizer) -> LearningRate:
        """The shape optim.OptimizerSettings asks for."""
        return cls(optimizer.lr_schedule, optimizer.warmup_steps, optimizer.cooldown_frac,
                   optimizer.min_lr / optimizer.lr)

    def share(self, step: int, length: int) -> float:
        return lr_scale(step, fitting_warmup(self.warmup_steps, length), length, self.kind, self.cooldown_frac,
                        self.floor)

    def known(self, step: int, at_least: int) -> bool:
        """Whether every run of at_least steps or more gives this step the same share: the warmup, and where the
        decay starts, only grow with the length, so it is when the warmup is the same at `at_least` as without
        end and the step is in it, or (wsd) in the constant phase before the decay of a run of `at_least`."""
        warmup = fitting_warmup(self.warmup_steps, at_least)
        if warmup != fitting_warmup(self.warmup_steps, UNPLANNED_STEPS):
            return False
        return step < warmup or (self.kind == "wsd" and step < wsd_decay_start(warmup, at_least, self.cooldown_frac))


def lr_scale(step: int, warmup: int, max_steps: int, schedule: str, cooldown_frac: float, floor: float) -> float:
    """The share of its peak rate every group runs at, at `step` of a run of max_steps (see LearningRate)."""
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


def muon_momentum_at(step: int, momentum: float) -> float:
    """Muon's momentum, warmed up from MUON_MOMENTUM_START over the first MUON_MOMENTUM_WARMUP steps."""
    start = min(MUON_MOMENTUM_START, momentum)
    return start + (momentum - start) * min(1.0, step / MUON_MOMENTUM_WARMUP)


def held_share(rate: LearningRate, planned: int | None, step: int, steps: int | None, reschedule: bool) -> float | None:
    """On --resume with more steps than the run had planned: the share of the peak rate its decay had reached at
    the step resumed, if the decay had begun (the rate then stays there; --reschedule decays anew instead)."""
    if not planned or not steps or steps <= planned or reschedule:
        return None
    share = rate.share(step, planned)
    return share if share < 1.0 and step >= fitting_warmup(rate.warmup_steps, planned) else None


# ----------------------------------------------------------------------------------------------------
# The run's length


class DataLength:
    """--epochs over the training split (batches.BatchSource), which may still be arriving: the run's steps once
    all of it is there, and until then the steps it has at least."""

    def __init__(self, source, epochs: float, shape: Shape):
        self.source, self.epochs, self.shape = source, epochs, shape
        self.shards = source.shards

    def steps(self) -> int | None:
        """The run's steps, if the split is all there (None: not yet)."""
        self.shards.refresh()
        if not self.shards.complete:
            return None
        return self.shape.steps_for(max(1, round(self.epochs * self.source.steps_per_epoch)))

    def at_least(self) -> int:
        """The steps over what of the split is there now: a lower bound."""
        return self.shape.steps_for(max(1, round(self.epochs * self.source.steps_at_least())))

    def steps_per_pass(self) -> int | None:
        """A pass's steps where the rows are packed conversations (their padding is not data), else None."""
        return self.source.steps_per_epoch if self.source.packed is not None else None


class Horizon:
    """How many steps the run has (`steps`: None until known), and what each step trains with.

    `say` and `log` report what it learns (the steps once known, the plan's time and cost once steps are timed)
    as plan lines and metrics.jsonl rows; `plan` is the run's Plan, whose steps and time it is the one to write.
    """

    def __init__(self, *, rate: LearningRate, muon_momentum: float, held: float | None, given: int | None,
                 plan: Plan, costs: Costs, step: int, tokens_per_step: int, started: float, shape: Shape,
                 budget_s: float | None = None, data: DataLength | None = None, terms: LossTerms = LossTerms(),
                 say: Callable[[str], None] = lambda text: None, log: Callable[..., None] = lambda **row: None):
        self.rate, self.muon_momentum, self.held, self.shape, self.terms = rate, muon_momentum, held, shape, terms
        self.given = given  # --max_steps, a resumed run's plan, or --epochs over data all there; with --time the most
        self.plan, self.costs, self.started, self.data = plan, costs, started, data
        self.budget = Budget(budget_s, started) if budget_s else None
        self.pace = Pace(step, tokens_per_step)
        self.say, self.log = say, log
        self.steps: int | None = None
        self._current: StepSettings | None = None  # the step under way's settings (before's)
        self._set_length(given)

    # --- what the loop asks

    def running(self, step: int) -> bool:
        """Whether `step` is one of the run's (while the length is unknown, every step is)."""
        return self.steps is None or step < self.steps

    def last(self, step: int) -> bool:
        """Whether `step` steps done is the whole run."""
        return step == self.steps

    def at(self, step: int) -> StepSettings | None:
        """The step's settings; None where they depend on a length not known yet (--epochs over data still
        arriving, whose size would change this step's rate or batch)."""
        length = self._length_for(step)
        if length is None:
            return None
        accum = self.shape.accum(step, length)
        # A smaller batch takes a smaller rate, by the square root of its share (the speedrun's lr_mul per stage:
        # (16/8)**0.6 and (24/8)**0.5; Malladi et al. 2022 for Adam).
        lr = (self.held if self.held is not None else self.rate.share(step, length)) * \
            math.sqrt(accum / self.shape.grad_accum)
        return StepSettings(lr, muon_momentum_at(step, self.muon_momentum), accum, self.shape.context_at(step, length),
                            self.shape.window_at(step, length), self.terms.at(step, length))

    def _length_for(self, step: int) -> int | None:
        """The length the step's settings are those of: the run's; until it is known, one as long as it may be
        (--time before the pace is timed), or (--epochs over data still arriving) any it may be, where all of them
        give the step the same settings, else None."""
        if self.steps is not None:
            return self.steps
        if self.budget is not None or self.data is None:  # until timed: as if without end (the warmup, the peak)
            return UNPLANNED_STEPS
        at_least = max(self.data.at_least(), step + 1)
        known = all(schedule.known(step, at_least)
                    for schedule in (self.rate, self.shape.batch, self.shape.context, self.shape.window, self.terms))
        return at_least if known else None


    def before(self, step: int, on_wait: Callable[[str], None], failed: Callable[[], BaseException | None]
               ) -> StepSettings | None:
        """The step's settings, once they are known: where its rate depends on how long the data makes the run,
        waiting for more of the data (`on_wait` says so; `failed()` raises what stopped it). None: the data
        turned out to end the run before this step."""
        while (settings := self.at(step)) is None:
            self._data_arrived(step)
            if not self.running(step):
                return None
            if self.steps is None:
                if failed() is not None:
                    self.data.shards.wait()  # raises what stopped the data, as one line
                on_wait(f"waiting for data: the rate of step {step} depends on the run's length "
                        f"({self.data.shards.num_tokens:,} training tokens so far)")
                time.sleep(DATA_POLL_S)
        self._current = settings
        return settings

    def after(self, step: int, *, logged: bool, wait: Callable[[], object], evaluate: Callable[[], None],
              write_s: float | None) -> None:
        """Step `step` is done (counting from 1). Times the pace over the first steps (wait() lets the device
        finish), then plans: the plan's time and cost, and with --time the steps that fit in what is left (an
        evaluation run first with evaluate(), so that its cost counts), again at each log line (`logged`); with
        --epochs over data still arriving, the length once it has all arrived. write_s: the last save's seconds."""
        self.costs.write = write_s if write_s is not None else self.costs.write
        self.pace.done(self._current.work(self.shape.grad_accum))
        if self.pace.timed(step, wait):
            if self.budget is not None and self.costs.evaluation is None:
                with self.aside("evaluation"):
                    evaluate()
            self._replan(step, announce=True)
        elif self.budget is not None and (logged or self.budget.passed() or self.costs.step is None):
            self._replan(step)
        if self.steps is None and self.budget is None and logged:
            self._data_arrived(step)

    @contextlib.contextmanager
    def aside(self, kind: str | None = None):
        """Work beside the steps (an evaluation, a scoring, a save): off the pace's clock, and its seconds the
        cost of `kind` ("evaluation", "hellaswag") that the plan counts from now on."""
        with self.pace.leave_out() as took:
            yield
        if kind is not None:
            setattr(self.costs, kind, took.seconds)

    def tokens_per_s(self, step: int) -> float:
        """Tokens a second since the last log line, leaving out what ran aside (and, once timed, the pace)."""
        return self.pace.lap(step)

    def final_share(self) -> float:
        """The share of the validation split the last evaluation reads: all of it, unless --time's budget says
        less (Budget.FINAL_EVAL_SHARE), once the pace is known."""
        return self.costs.final_share() if self.costs.step else 1.0

    def length_lines(self) -> list[str]:
        """The plan's lines about the steps: their number and tokens, and every warning and note about them."""
        return [self.plan.steps_line(), *self.plan.warnings(), *warmup_note(self.rate.warmup_steps, self.steps)]

    def end_at(self, step: int) -> None:
        """The run ends after `step` (--target_loss reached)."""
        self._set_length(step)

    def timed(self, step_seconds: float, now: float) -> list[str]:
        """--plan: the pace timed before the run (random tokens), and the plan as the run will make it; the warning
        the run will give, if any (a budget too short for one step)."""
        self.costs.step, short = step_seconds, []
        if self.budget is not None:
            steps = min(self.budget.steps(0, now, self.costs), self.given or UNPLANNED_STEPS)
            if steps == 0:  # the run trains one step, and says so (_before_the_pace)
                steps = 1
                why = too_short(self.budget.seconds, now - self.started, step_seconds, self.costs.seconds(0, 0))
                short = [f"warning: {why}; this run would end at its first step"]
            self._set_length(steps)
        if self.steps is not None:
            self.plan.step_seconds = step_seconds
            self.plan.seconds = now - self.started + self.costs.seconds(0, self.steps)
        return short

    # --- what it decides

    def _set_length(self, steps: int | None) -> None:
        """The one place the run's length changes (and with it the full steps' worth the plan's tokens count)."""
        self.steps = self.plan.steps = steps
        self.plan.full_steps = None if steps is None else self.shape.work(0, steps)

    def _replan(self, step: int, announce: bool = False) -> None:
        """The plan's time and cost from the measured pace; with --time, the steps that fit in what is left of
        it. Before the pace is known, a budget already spent ends the run at this step."""
        self.costs.step = self.pace.step_seconds
        if self.costs.step is None:
            self._before_the_pace(step)
            return
        if self.budget is not None:
            steps = self.budget.steps(step, time.monotonic(), self.costs)
            self._set_length(max(step, min(steps, self.given or steps)))
        if self.steps is None:  # --epochs over data still arriving: the time is known with the length
            return
        self._time(step)
        if announce:  # the steps and their warnings were said already, unless the budget has just set them
            self.say("\n".join([self.plan.time_line(), *(self.length_lines() if self.budget else [])]))
            self.log(**self.plan.row())

    def _before_the_pace(self, step: int) -> None:
        """With --time, before a step is timed: the run ends at this step where another would not fit at the pace of
        the steps so far (slower than the timed one will be: the first steps warm up). A budget that this process's
        first step and what follows the last overran is told so, with the least that fits (as --plan tells it)."""
        rough = self.pace.rough()
        if self.budget is None or rough is None:
            return
        now, so_far = time.monotonic(), dataclasses.replace(self.costs, step=rough)
        if self.budget.steps(step, now, so_far) > step:
            return
        after = so_far.seconds(step, 0)
        if step == self.pace.first_step + 1 and now + after > self.budget.deadline:  # as --plan says it
            self.say(f"warning: {too_short(self.budget.seconds, self.pace.began - self.started, rough, after)}; "
                     "this run ends at its first step")
        self._set_length(step)

    def _time(self, step: int) -> None:
        """The plan's time and cost: what has run so far, and what is left of it at the measured costs."""
        self.plan.step_seconds = self.costs.step
        self.plan.seconds = time.monotonic() - self.started + self.costs.seconds(step, self.steps - step)

    def _data_arrived(self, step: int) -> None:
        """With --epochs over data still arriving: the length, said with the data's exact size (and the time,
        once the pace is known), once it is all there."""
        steps = self.data.steps()
        if steps is None:
            return
        self._set_length(steps)
        self.plan.data_arrived(self.data.shards.num_tokens, self.data.steps_per_pass())
        timed = []
        if self.costs.step is not None:
            self._time(step)
            timed = [self.plan.time_line()]
            self.log(**self.plan.row())
        self.say("\n".join([self.plan.data_line(), *self.length_lines(), *timed]))
