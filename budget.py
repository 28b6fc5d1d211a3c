"""--time: the model a budget buys, and the steps that fit in it.

Without shape flags, `size_for_budget` times the depth family on this machine (a few steps of each depth on
random tokens, smallest first) and takes the depth whose tokens in the budget come closest to compute-optimal,
with its batch, AdamW rates and documents (Sizing). During the run, Pace measures the seconds a step takes,
Costs what else the run does (evaluations, the last save), and Budget turns what is left of the time into the
run's last step, so the learning rate's decay ends with the budget.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from common import UserError
from memory import fitting_grad_accum, probes_memory
from model import GPTConfig, swiglu_width
from optim import OptimizerSettings
from plan import FORWARD_SHARE, TOKENS_PER_DOCUMENT, human_duration, short_float
from runtime import Env, broadcast_from_rank0
from sources import DataSpec, is_hub
from step import TIMED_STEPS, WARMUP_STEPS, build, eager, step_seconds

# The family --time chooses from: depth d is d layers of width 64 d in heads of 64, so depth 12 is GPT-2
# 124M's shape (nanochat sizes the same way, width 64 x depth, with heads of 128).
DEPTHS = (2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32)  # from 2: a one-layer model composes no attention
WIDTH_PER_LAYER, HEAD_SIZE = 64, 64
# Compute-optimal tokens per parameter as nanochat measured it (10.5, on its depth family on 8 x H100),
# counting as it counts: the matrices of the blocks and the output layer, neither the token table (which
# does no matmul) nor norms and biases. Chinchilla's 20 counted every parameter.
OPTIMAL_TOKENS_PER_PARAMETER = 10.5
# nanochat's batch rule: tokens a step grow with depth as depth^0.383 from a reference (here the flags'
# batch at depth 12, GPT-2's shape). AdamW's rates follow the square root of the batch (as Adam's should,
# Malladi et al. 2022) and, as nanochat's do, the inverse square root of the width from 768 (its
# scripts/base_train.py and gpt.py's setup_optimizer); Muon's stay (its update is orthogonalised and scaled
# to the matrix's shape: the speedrun keeps its rate).
BATCH_DEPTH_EXPONENT, REFERENCE_DEPTH = 0.383, 12
REFERENCE_WIDTH = WIDTH_PER_LAYER * REFERENCE_DEPTH  # 768
MIN_STEPS = 300  # a batch is cut so that a budget buys at least this many steps (warmup and decay need room)
# Choosing takes 5% of the budget, at least enough to time the smallest depth and at most a minute; a budget that
# leaves less than twice that after start-up times only the smallest depth, in about a second.
CHOOSING_SHARE, CHOOSING_MIN_S, CHOOSING_MAX_S, CHOOSING_QUICK_S = 0.05, 5.0, 60.0, 1.0


def depth_shape(depth: int) -> dict:
    return {"n_layer": depth, "n_embd": WIDTH_PER_LAYER * depth, "n_head": WIDTH_PER_LAYER * depth // HEAD_SIZE}


def scaling_params(config) -> int:
    """The parameters OPTIMAL_TOKENS_PER_PARAMETER counts: the blocks' matrices and the output layer (the
    tokenizer's rows of it; a tied head is the token table, counted once, as the head)."""
    c = config
    mlp = 3 * c.n_embd * swiglu_width(c.n_embd) if c.mlp == "swiglu" else 8 * c.n_embd ** 2
    return c.n_layer * (4 * c.n_embd ** 2 + mlp) + c.vocab_size * c.n_embd


@dataclass
class Candidate:
    """One depth of the family, as timed on this device."""
    depth: int
    params: int  # scaling_params
    batch: int  # sequences a step (sized_batch)
    tokens_per_s: float
    tokens: float = 0.0  # what the budget buys at that pace (budget_tokens)

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.params


def budget_tokens(tokens_per_s: float, seconds: float) -> float:
    """Tokens `seconds` of training buy at this pace (the data arrives behind the training, off the budget)."""
    return tokens_per_s * seconds


def choose_depth(candidates: list[Candidate]) -> Candidate:
    """The candidate whose tokens in the budget come closest to OPTIMAL_TOKENS_PER_PARAMETER, in ratio
    (twice too many tokens counts as far as half too few)."""
    return min(candidates, key=lambda c: abs(math.log(c.tokens_per_parameter / OPTIMAL_TOKENS_PER_PARAMETER)))


def sized_batch(depth: int, reference_batch: int, block_size: int, tokens: float | None, multiple: int) -> int:
    """Sequences a step at this depth: reference_batch (the flags', at REFERENCE_DEPTH) times
    (depth / REFERENCE_DEPTH)^BATCH_DEPTH_EXPONENT, at most what leaves MIN_STEPS steps in `tokens`,
    rounded down to a power of two and to a multiple of `multiple` (the processes), at least one each."""
    batch = reference_batch * (depth / REFERENCE_DEPTH) ** BATCH_DEPTH_EXPONENT
    if tokens is not None:
        batch = min(batch, tokens / MIN_STEPS / block_size)
    batch = 2 ** max(0, math.floor(math.log2(max(1.0, batch))))
    return max(multiple, batch - batch % multiple)


def sized_lr(lr: float, batch: int, reference_batch: int, width: int) -> float:
    """AdamW's rate for `batch` sequences of a model `width` wide, given `lr` for reference_batch at GPT-2's
    width: the square root of the batch, over the square root of the width."""
    return lr * math.sqrt(batch / reference_batch) * math.sqrt(REFERENCE_WIDTH / width)


def documents_for(dataset: str, tokens: float, val_split: float) -> int | None:
    """Documents of a Hub dataset whose length is known that hold about one pass over `tokens` for
    training, plus the validation split; None for local text (its files are what there is)."""
    per_document = TOKENS_PER_DOCUMENT.get(dataset)
    if per_document is None:
        return None
    return max(1, math.ceil(tokens / (1 - val_split) / per_document))


@dataclass
class Sizing:
    """What --time chose: a depth of the family, its batch and AdamW rates, the documents, and why (the
    candidates as timed, what the choice took)."""
    depth: int
    batch: int  # sequences a step
    lr: float  # AdamW's peak, and where its decay ends
    min_lr: float
    sample_size: int | None  # documents for one pass (None: local text, all of it)
    candidates: list[Candidate]
    seconds: float  # what timing the candidates took, out of the budget
    timed_now: bool = True  # timed by this process (False: a resumed run's choice, read back)

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.depth == self.depth)

    def lines(self, device: str, block_size: int, lr: float, muon_lr: float, reference_batch: int,
              hub: bool = False) -> list[str]:
        """What was chosen and why, in plain words: the paces timed, the depth chosen and the tokens it gets,
        the batch, the learning rates and the data (hub: a Hub dataset it could not size). reference_batch: the
        sequences `lr` is given for (at REFERENCE_WIDTH), which sized_lr scales from."""
        shape, c = depth_shape(self.depth), self.chosen
        timed = ", ".join(f"depth {k.depth} at {k.tokens_per_s:,.0f} tokens/s" for k in self.candidates)
        documents = f"{self.sample_size:,} documents (about one pass)" if self.sample_size else \
            f"--sample_size's {DataSpec.sample_size:,} documents (their length is not known here)" if hub else \
            "all of the local text"
        return [f"plan: --time chooses the model by timing its family on this {device} ({self.seconds:.1f} s): {timed}",
                f"plan: chosen: depth {self.depth} ({shape['n_layer']} layers, width {shape['n_embd']}, "
                f"{shape['n_head']} heads), {c.params / 1e6:,.1f} M parameters in its matrices and head; the budget "
                f"buys it {c.tokens:,.0f} tokens, {c.tokens_per_parameter:.2g} a parameter (about "
                f"{OPTIMAL_TOKENS_PER_PARAMETER:g} learns the most from the compute, as nanochat measured)",
                f"plan: batch: {self.batch} sequences of {block_size} tokens; learning rates: AdamW "
                f"{short_float(self.lr)} (--lr {lr:g} is for {reference_batch} sequences at width {REFERENCE_WIDTH}: "
                f"scaled to this batch and width), Muon {muon_lr:g}; data: {documents}"]

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "timed_now"}

    @classmethod
    def from_dict(cls, d: dict) -> "Sizing":
        return cls(**d | {"candidates": [Candidate(**c) for c in d["candidates"]], "timed_now": False})


class Budget:
    """--time: the steps that fit in what is left of it, at the measured costs, the evaluations due on the
    way and the last evaluation and save included."""

    MARGIN = 0.03  # of the time left, kept back for what the pace does not show (a slower step, the exit)
    FINAL_EVAL_SHARE = 0.1  # of the budget, the most the last evaluation may take (it then reads a sample)

    def __init__(self, seconds: float, started: float):
        self.seconds, self.deadline = seconds, started + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.deadline

    def steps(self, step: int, now: float, costs: "Costs") -> int:
        """The run's last step: `step` plus the most steps whose costs.seconds end before the deadline."""
        left = self.deadline - now
        usable = left - max(1.0, self.MARGIN * left)
        low, high = 0, 1  # costs.seconds grows with n: bracket it, then search
        while costs.seconds(step, high) <= usable:
            low, high = high, 2 * high
        while high - low > 1:
            n = (low + high) // 2
            low, high = (n, high) if costs.seconds(step, n) <= usable else (low, n)
        return step + low


def too_short(seconds: float, spent: float, step: float, after: float) -> str:
    """What a --time of `seconds` that cannot train one step is told: `spent` seconds of it go before the first step
    (start-up, choosing the model), and a step takes `step`, then `after` more (the last evaluation and save). It
    names the least budget that trains one, with the margin Budget keeps back."""
    least = math.ceil((spent + step + after) / (1 - Budget.MARGIN) + 1)
    return (f"--time {human_duration(seconds)} is too short here: start-up takes {spent:.0f} s before the first step, "
            f"and a step with the last evaluation and save about {step + after:.1f} s: give at least --time {least}s")


@dataclass
class Took:
    seconds: float | None = None


class Pace:
    """Seconds a full training step takes (a step of a batch-size schedule's smaller stages counts as its share of
    one: `done(work)`), without evaluation, saving and the first steps (compiling, warming the allocator): over
    step.TIMED_STEPS steps after step.WARMUP_STEPS, then the median of the last windows between log lines. Also the
    tokens/s of each such window, for the progress bar and metrics.jsonl. What runs beside the steps (leave_out) is
    left out of both."""

    WINDOWS = 5

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step, self.first_step = tokens_per_step, step  # tokens_per_step: a full step's
        self.step_seconds: float | None = None
        self.windows: list[float] = []
        self.excluded = 0.0  # seconds of evaluation and saving so far, which the timing leaves out
        self.work = 0.0  # full steps done so far
        self._timing: tuple[int, float, float, float] | None = None  # (step, clock, excluded, work) at its start
        self.began = time.monotonic()  # the first step's start, on the clock --time counts on
        self.restart(step)

    def rough(self) -> float | None:
        """Seconds a full step has taken so far, the first steps' warm-up included (an overestimate), until they are
        timed; None before the first."""
        if not self.work:
            return None
        return (time.monotonic() - self.began - self.excluded) / self.work

    def restart(self, step: int) -> None:
        self.t0, self.step0, self.excluded0, self.work0 = time.perf_counter(), step, self.excluded, self.work

    def done(self, work: float) -> None:
        """A step done, of `work` full steps."""
        self.work += work

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    @contextlib.contextmanager
    def leave_out(self):
        """Inside: work the pace leaves out (an evaluation, a save); yields its timing, `.seconds` once done."""
        took = Took()
        started = time.perf_counter()
        try:
            yield took
        finally:
            took.seconds = time.perf_counter() - started
            self.exclude(took.seconds)

    def timed(self, step: int, wait) -> bool:
        """True once, at the step where the timed steps end; wait() lets the device finish, at both ends."""
        if self.step_seconds is not None:
            return False
        if step == self.first_step + WARMUP_STEPS:
            wait()
            self._timing = (step, time.perf_counter(), self.excluded, self.work)
        elif self._timing is not None and step == self._timing[0] + TIMED_STEPS:
            wait()
            _, clock, excluded, work = self._timing
            self.step_seconds = (time.perf_counter() - clock - (self.excluded - excluded)) / (self.work - work)
            return True
        return False

    def lap(self, step: int) -> float:
        """Tokens/s since the last lap, and the next window begun; once timed, the window also updates the seconds a
        step."""
        seconds = time.perf_counter() - self.t0 - (self.excluded - self.excluded0)
        work = self.work - self.work0
        if work and self.step_seconds is not None and self.step0 >= self.first_step + WARMUP_STEPS:
            self.windows = (self.windows + [seconds / work])[-self.WINDOWS:]
            self.step_seconds = statistics.median(self.windows)
        self.restart(step)
        return work * self.tokens_per_step / max(seconds, 1e-9)


WRITE_BYTES_PER_S = 300e6  # an assumed disk for the last save, until one is timed


CHECKPOINT_BYTES_PER_PARAMETER = 16  # fp32 weights, AdamW's two moments or Muon's momentum, and room


@dataclass
class Costs:
    """Seconds the plan counts with besides the steps: an evaluation, a HellaSwag scoring and the last save,
    each estimated from the step until it has been measured."""
    eval_batches: int  # of batch_size sequences each
    eval_interval: int
    hellaswag_interval: int  # 0: none
    hellaswag_tokens: int
    tokens_per_step: int
    checkpoint_bytes: int
    final_windows: float = 1.0  # the last evaluation reads all of validation: this many times an evaluation's windows
    final_limit: float | None = None  # seconds the last evaluation may take (FINAL_EVAL_SHARE of --time)
    step: float | None = None
    evaluation: float | None = None
    hellaswag: float | None = None
    write: float | None = None
    # The full steps of n steps after `step` in a run of step + n steps (a batch-size schedule's steps count their
    # share of one): horizon.Shape.work.
    work: Callable[[int, int], float] = lambda step, n: n

    def evaluation_s(self) -> float:
        return self.evaluation if self.evaluation is not None else self.eval_batches * self.step * FORWARD_SHARE

    def final_evaluation_s(self) -> float:
        whole = self.final_windows * self.evaluation_s()
        return whole if self.final_limit is None else min(whole, self.final_limit)

    def final_share(self) -> float:
        """The share of the validation split the last evaluation reads (1: all of it)."""
        return min(1.0, self.final_evaluation_s() / (self.final_windows * self.evaluation_s()))

    def hellaswag_s(self) -> float:
        if not self.hellaswag_interval:
            return 0.0
        if self.hellaswag is not None:
            return self.hellaswag
        return self.hellaswag_tokens / self.tokens_per_step * self.step * FORWARD_SHARE

    def seconds(self, step: int, n: int) -> float:
        """Seconds of what is left after step `step` (itself done, its evaluation not yet) and n more steps:
        the steps, the evaluations and scorings due at `step` and on the way, and what follows the last
        step (its evaluation and scoring, and the wait for the last save)."""
        # Evaluations fall on multiples of the interval in [step, step + n - 1] (step 0 has none); the one
        # at the last step is counted with what follows it.
        due = lambda interval: (step + n - 1) // interval - (max(step, 1) - 1) // interval if interval and n else 0
        write = self.write if self.write is not None else self.checkpoint_bytes / WRITE_BYTES_PER_S
        return (self.work(step, n) * self.step + due(self.eval_interval) * self.evaluation_s()
                + due(self.hellaswag_interval) * self.hellaswag_s() + self.final_evaluation_s() + self.hellaswag_s()
                + write)


@dataclass(frozen=True)
class Request:
    """What --time is asked to size, from the flags (startup.py builds it)."""
    seconds: float  # the budget, from process start
    block_size: int
    depth: int | None  # --depth: that depth only
    reference_batch: int  # --batch_size: the batch at REFERENCE_DEPTH
    lr: float  # AdamW's, for reference_batch at REFERENCE_WIDTH
    min_lr: float
    sample_size: int | None  # --sample_size, if given
    dataset: str
    val_split: float
    eval_share: float  # evaluations' seconds per training second: FORWARD_SHARE × eval_iters / eval_interval
    seed: int
    config: Callable[[int], GPTConfig]  # depth -> the model the flags make of it
    optimizer: OptimizerSettings


def size_for_budget(r: Request, env: Env, say: Callable, started: float, saved: dict | None) -> Sizing:
    """What --time buys: the family's depths timed here (timed_candidates), the one whose tokens in the budget
    come closest to compute-optimal chosen, with its batch, AdamW rates and documents. A resumed run keeps
    its own choice (`saved`)."""
    if saved:
        sizing = Sizing.from_dict(saved)
    else:
        began = time.monotonic()
        choosing = min(max(CHOOSING_SHARE * r.seconds, CHOOSING_MIN_S), CHOOSING_MAX_S)
        if r.seconds - (began - started) < 2 * choosing:  # a short budget: the smallest depth it is
            choosing = CHOOSING_QUICK_S
        limit = began + choosing
        # What the steps get of the budget: less the choosing, the margin kept back and the evaluations.
        seconds = (r.seconds - (limit - started)) * (1 - Budget.MARGIN) * (1 - r.eval_share)
        candidates = timed_candidates(r, env, limit, seconds)
        smallest = candidates[0]
        step = smallest.batch * r.block_size / smallest.tokens_per_s
        if smallest.tokens < smallest.batch * r.block_size:  # not one step: start-up and choosing took it all
            raise UserError(too_short(r.seconds, time.monotonic() - started, step, after=2 * step))
        chosen = choose_depth(candidates)
        scale = sized_lr(1.0, chosen.batch, r.reference_batch, depth_shape(chosen.depth)["n_embd"])
        sizing = Sizing(chosen.depth, chosen.batch, r.lr * scale, r.min_lr * scale,
                        r.sample_size or documents_for(r.dataset, chosen.tokens, r.val_split),
                        candidates, time.monotonic() - began)
    say("\n".join(sizing.lines(env.device.type, r.block_size, r.lr, r.optimizer.muon_lr, r.reference_batch,
                                hub=is_hub(r.dataset))
                  + (["plan: (the choice of the run in latest.pt, kept)"] if saved else [])))
    return sizing


def timed_candidates(r: Request, env: Env, limit: float, seconds: float) -> list[Candidate]:
    """The family's depths in turn, smallest first, each timed at its batch, with the tokens `seconds` of
    training buy at its pace; until one falls below the compute-optimal tokens a parameter (deeper ones fall
    further), one does not fit in memory, or the time for choosing ends at `limit`. Every rank times every
    candidate (DDP's collectives in step), and rank 0's clock and pace decide."""
    candidates, took = [], 0.0
    for depth in [r.depth] if r.depth else DEPTHS:
        # A deeper model takes at least as long to time as the last one did: not begun unless that fits.
        if candidates and broadcast_from_rank0(env, lambda: time.monotonic() + took > limit):
            break
        began = time.monotonic()
        candidate = timed_candidate(r, depth, env, limit, lambda pace: budget_tokens(pace, seconds))
        took = time.monotonic() - began
        if candidate is None:
            break
        candidates.append(candidate)
        if candidate.tokens_per_parameter < OPTIMAL_TOKENS_PER_PARAMETER:
            break
    if not candidates:
        raise UserError(f"--time: even depth {DEPTHS[0]} does not fit in this {env.device.type}'s memory at "
                        f"context {r.block_size}: give a smaller --block_size, or the shape (--n_layer, --n_head, "
                        "--n_embd)")
    return candidates


def timed_candidate(r: Request, depth: int, env: Env, limit: float,
                    tokens: Callable[[float], float]) -> Candidate | None:
    """One depth timed at its batch, and again at the smaller batch its tokens in the budget leave it
    (sized_batch keeps MIN_STEPS steps), the batch it would train at: a small model's pace depends on its
    batch, and the documents planned for one pass would otherwise be several. None when it does not fit."""
    config = r.config(depth)

    def timed(batch: int, until: float) -> float | None:  # every rank times (DDP's collectives in step);
        pace = candidate_pace(config, env, r, batch, until)  # rank 0's pace decides
        return broadcast_from_rank0(env, lambda: pace)

    # A budget that leaves no training time is cut to the least batch whatever the pace: timed at that alone.
    batch = sized_batch(depth, r.reference_batch, r.block_size, None if tokens(1.0) > 0 else 0.0, env.world)
    pace = timed(batch, time.monotonic() + (limit - time.monotonic()) / 2)  # half: room to time the cut
    if pace is None:
        return None
    cut = sized_batch(depth, r.reference_batch, r.block_size, tokens(pace), env.world)
    if cut < batch:
        batch, pace = cut, timed(cut, limit) or pace
    return Candidate(depth, scaling_params(config), batch, pace, tokens(pace))


def candidate_pace(config: GPTConfig, env: Env, r: Request, batch: int, limit: float) -> float | None:
    """Tokens a second a step of `batch` sequences of this model trains at here (eager: compiling every
    candidate would take longer than choosing may), timed in what is left before `limit`; None when it does
    not fit in memory."""
    env = eager(env)
    learner = None
    try:
        learner = build(config, env, r.optimizer, seed=r.seed)
        accum = fitting_grad_accum(learner, env, batch, config.block_size) if probes_memory(env.device) else 1
        seconds = step_seconds(learner, env, batch // (env.world * accum), accum, config.block_size,
                               limit - time.monotonic())
    except (torch.cuda.OutOfMemoryError, UserError):
        return None
    finally:
        learner = None
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


LONG_CPU_RUN_S = 3600  # a CPU run planned longer than this is told how to get somewhere sooner
CPU_ADVICE_BUDGET, CPU_ADVICE_DEPTH = "10m", 4  # what it is told: a budget, or a smaller shape of the family


def cpu_advice(device: str, seconds: float | None, config: GPTConfig) -> list[str]:
    """The line(s) that tell a run of `config`, a shape the flags give, what to do when it would take a CPU more
    than LONG_CPU_RUN_S: let --time choose the model, or take a smaller shape (if the family has one); nothing on
    a GPU or for a short run."""
    if device != "cpu" or seconds is None or seconds <= LONG_CPU_RUN_S:
        return []
    shape = smaller_shape(config)
    smaller = "" if shape is None else (f", or a smaller shape such as --n_layer {shape['n_layer']} --n_head "
                                        f"{shape['n_head']} --n_embd {shape['n_embd']} trains faster")
    return [f"warning: {human_duration(seconds)} is long for a CPU: --time {CPU_ADVICE_BUDGET} without the shape "
            f"flags lets the budget choose a model that learns in that time{smaller}; or run it on a GPU"]


def smaller_shape(config: GPTConfig) -> dict | None:
    """A shape of the family to suggest instead of `config`: the largest depth up to CPU_ADVICE_DEPTH with fewer
    parameters; None when none has (the model is that small already)."""
    size = scaling_params(config)
    smaller = [d for d in DEPTHS if d <= CPU_ADVICE_DEPTH
               and scaling_params(dataclasses.replace(config, **depth_shape(d))) < size]
    return depth_shape(max(smaller)) if smaller else None
