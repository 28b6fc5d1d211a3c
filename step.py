"""One optimizer step: the Learner (the model being trained and what updates it), forward and backward over the
micro-batches, clip, update; its figures read a step later, so the CPU never waits for the GPU; and steps timed on
random tokens (for --plan, --time's sizing and bench.py).

A step in the loop (train_gpt2.py) is: set each group's rate, accumulate_gradients, step_optimizers, then
StatsReader.queued. A non-finite loss or gradient norm makes every optimizer skip its update on the device
(found_inf: fused AdamW and muon.py's Muon read it there), and the reader stops the run when it reads that step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, first_line
from model import GPT, GPTConfig
from muon import Muon
from optim import OptimizerSettings, make_optimizers
from runtime import Env
from weights import load_state

# Steps a pace is timed over, after warming up (compiling, the allocator): --plan, --time's sizing, bench.py.
WARMUP_STEPS, TIMED_STEPS = 2, 5


@dataclass
class Learner:
    """The model being trained and what updates it; built by `build`, for train_gpt2.py and bench.py alike."""
    raw_model: GPT  # the plain module: its state_dict is what checkpoints hold
    model: torch.nn.Module  # what the steps run: raw_model compiled and/or wrapped in DDP
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None  # fp16 only
    compile_unproven: bool = False  # compiled, and not yet run: torch.compile may still fail (run_compiled)


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


def run_compiled(learner: Learner, env: Env, say: Callable, work):
    """work(); the first time with a compiled model, a failure of torch.compile (no C compiler, no Triton)
    leaves a one-line note and the same work done eagerly, for the rest of the run."""
    if not learner.compile_unproven:
        return work()
    learner.compile_unproven = False
    try:
        return work()
    except (torch.cuda.OutOfMemoryError, UserError):
        raise
    except Exception as e:  # inductor and dynamo raise many types; an error that is not theirs recurs below
        say(f"note: torch.compile failed ({type(e).__name__}: {first_line(e)}); training without it "
            "(--no-compile skips the attempt)")
        zero_grads(learner, release=True)  # what the failed attempt left
        learner.model = wrap_for_ranks(learner.raw_model, env)
        return work()


def micro_seed(seed: int, step: int, micro_index: int) -> int:
    """The RNG seed of one micro-batch (dropout), a function of where it sits in the run.

    Nothing about random state needs saving for an exact resume, and one process with accumulation
    draws the same dropout masks as several ranks splitting the same batch.
    """
    return (seed * 1_000_003 + step) * 1_009 + micro_index


def train_step(learner: Learner, micro_batches: list, env: Env, *, step: int, seed: int, grad_clip: float,
               stop: bool = False) -> torch.Tensor:
    """One optimizer step at the rates the groups hold: accumulate_gradients, then step_optimizers."""
    loss = accumulate_gradients(learner, micro_batches, env, step=step, seed=seed)
    return step_optimizers(learner, loss, env, grad_clip=grad_clip, stop=stop)


def accumulate_gradients(learner: Learner, micro_batches: list, env: Env, *, step: int, seed: int,
                         all_reduce: bool = True) -> torch.Tensor:
    """Forward and backward over the micro-batches, gradients summed into .grad; their mean loss, on the device.
    Under DDP the last micro-step all-reduces the gradients (none does, with all_reduce off)."""
    loss = torch.zeros((), device=env.device)
    for micro, (x, y) in enumerate(micro_batches):
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        # The step's unit micro*W + rank (batches.BatchSource): one rank with accumulation draws what several draw.
        torch.manual_seed(micro_seed(seed, step, micro * env.world + env.rank))
        # DDP all-reduces gradients only on the last micro-step; the earlier ones just accumulate.
        sync = all_reduce and micro == len(micro_batches) - 1
        with contextlib.nullcontext() if sync or not isinstance(learner.model, DDP) else learner.model.no_sync():
            with env.autocast():
                _, micro_loss = learner.model(x, y)
            # Gradients of the micro-steps add up; dividing by their number makes the sum a mean.
            micro_loss = micro_loss / len(micro_batches)
            (learner.scaler.scale(micro_loss) if learner.scaler else micro_loss).backward()
        loss += micro_loss.detach()
    return loss


def step_optimizers(learner: Learner, loss: torch.Tensor, env: Env, *, grad_clip: float,
                    stop: bool = False) -> torch.Tensor:
    """Clip the accumulated gradients and update, skipping the update on the device when the loss or the
    norm is not finite; [loss, gradient norm, stop asked] on the device, averaged over the ranks."""
    for optimizer in learner.optimizers if learner.scaler else []:
        learner.scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(learner.raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    # torch.full fills on the device: a tensor built from a host value would be a synchronous copy.
    stats = torch.stack([loss, norm.float(), torch.full((), float(stop), device=env.device)])
    if env.world > 1:
        dist.all_reduce(stats)
        stats[:2] /= env.world  # the norm is the same on every rank: its mean is itself
    found_inf = (~stats[:2].isfinite().all()).float()
    if not learner.scaler and not all(map(skips_on_device, learner.optimizers)) and found_inf.item():
        zero_grads(learner)  # a host sync, only where an optimizer cannot skip on the device
        return stats
    for optimizer in learner.optimizers:
        if learner.scaler:
            learner.scaler.step(optimizer)  # fp16: skips the update on the device when the gradients overflowed
        else:
            update(optimizer, found_inf)
    zero_grads(learner)
    if learner.scaler:
        learner.scaler.update()
    return stats


def update(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor, alone: bool = False) -> None:
    """optimizer.step(), its update skipped on the device where found_inf is 1: PyTorch's own protocol for fused
    optimizers, which GradScaler.step follows (the tensor set on the optimizer for the step, removed after) and
    muon.Muon takes too. `alone`: Muon does its whole update on this rank, with no collective (a step some
    ranks may not reach: memory.py's probe)."""
    optimizer.found_inf = found_inf
    if alone and isinstance(optimizer, Muon):
        optimizer.shared = False
    try:
        optimizer.step()
    finally:
        vars(optimizer).pop("found_inf", None)
        vars(optimizer).pop("shared", None)  # Muon's class default again


def zero_grads(learner: Learner, release: bool = False) -> None:
    """Gradients to zero for the next step. Under DDP they are views of its all-reduce buckets
    (gradient_as_bucket_view) only while they are kept: set to None, each backward would allocate them
    anew and copy them into the buckets, an extra fp32 copy of them at peak memory. Alone, or to
    `release` their memory, they are set to None."""
    keep = isinstance(learner.model, DDP) and not release
    for optimizer in learner.optimizers:
        optimizer.zero_grad(set_to_none=not keep)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips its update on the device when found_inf is set (fused AdamW, our Muon)."""
    return isinstance(optimizer, Muon) or bool(optimizer.defaults.get("fused"))


# ----------------------------------------------------------------------------------------------------
# A step's figures, read a step later


class NonFiniteStep(UserError):
    """Training cannot go on (a non-finite loss); the message says what the checkpoints on disk hold."""


class StepStats:
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

    def read(self) -> StepStats:
        if self.loss is None:
            if self._done is not None:
                self._done.synchronize()
            self.loss, self.grad_norm, stop = self._host.tolist()
            self.stop = stop > 0
        return self


class StatsReader:
    """Each step's StepStats, read one step after the step was queued, when it is done and reading stalls
    nothing, or at once when a section needs the newest; a non-finite step ends the run (NonFiniteStep)."""

    def __init__(self, fp16: bool, save_dir):
        self.fp16, self.save_dir = fp16, save_dir
        self.pending: StepStats | None = None  # the newest step, not read yet
        self.last: StepStats | None = None  # the newest step read (and found finite)
        self.stop = False  # a signal reached some rank

    def queued(self, step: int, stats: torch.Tensor) -> None:
        previous, self.pending = self.pending, StepStats(step, stats)
        if previous is not None:
            self._accept(previous)

    def latest(self) -> StepStats:
        """The newest step's figures, read now: before anything that needs them (a log line, a save)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._accept(pending)
        return self.last

    def _accept(self, f: StepStats) -> None:
        f.read()
        self.stop |= f.stop
        # With fp16 loss scaling an infinite norm only means the scaler skipped the step and lowers its scale.
        if not math.isfinite(f.loss) or (not math.isfinite(f.grad_norm) and not self.fp16):
            raise NonFiniteStep(f"the loss ({f.loss}) or gradient norm ({f.grad_norm}) is not finite at step "
                               f"{f.step}; stopped before its update. The checkpoints in {self.save_dir} are the "
                               "last good ones: resume with --resume and a lower --lr (or --grad_clip)")
        self.last = f


# ----------------------------------------------------------------------------------------------------
# Steps timed on random tokens


def step_seconds(learner: Learner, env: Env, micro: int, accum: int, block_size: int, limit: float) -> float:
    """Seconds a step takes, timed as time_random_steps times it where its steps fit in `limit` seconds.
    Where they do not (a CPU given a large model: the seed's 124M at 128 x 128 tokens takes over a minute a
    step on 2 cores, most of it Muon's update whatever the batch), the step is drawn from its parts
    (time_parts): the update, once a step, and forward and backward over one sequence and over as many as
    the time left allows, for what a micro-step costs whatever its size and what each sequence adds. On a GPU
    a step is timed whole: another shape would compile again."""
    if env.device.type == "cuda":
        return time_random_steps(learner, env, micro, accum, block_size)
    started = time.perf_counter()
    backward, update = time_parts(learner, env, 1, block_size)
    if backward + update < 1.0:  # quick: the first call's warm-up was in it, so again
        backward, update = time_parts(learner, env, 1, block_size)
    left = limit - (time.perf_counter() - started)
    if (accum * micro * backward + update) * (WARMUP_STEPS + TIMED_STEPS) <= left:
        return time_random_steps(learner, env, micro, accum, block_size)
    few = min(micro, int(left / 2 / backward))  # sequences whose forward and backward take half of what is left
    per_sequence = backward
    if few >= 2:
        per_sequence = max(0.0, (time_parts(learner, env, few, block_size)[0] - backward) / (few - 1))
    return accum * (backward + per_sequence * (micro - 1)) + update


def random_batch(config: GPTConfig, micro: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, config.vocab_size, (micro, block_size + 1), device=device,
                      generator=torch.Generator(device).manual_seed(0))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()  # separate x and y, as the loop's


def time_parts(learner: Learner, env: Env, micro: int, block_size: int) -> tuple[float, float]:
    """Seconds of a step's forward and backward over micro random sequences, and of its update (CPU: no wait)."""
    batch = random_batch(learner.raw_model.config, micro, block_size, "cpu")
    started = time.perf_counter()
    loss = accumulate_gradients(learner, [batch], env, step=0, seed=0)
    middle = time.perf_counter()
    step_optimizers(learner, loss, env, grad_clip=1.0)
    return middle - started, time.perf_counter() - middle


def time_random_steps(learner: Learner, env: Env, micro: int, accum: int, block_size: int, *,
                      steps: int = TIMED_STEPS, warmup: int = WARMUP_STEPS) -> float:
    """Seconds a step of `accum` micro-batches of micro x block_size random tokens takes: train_step as the
    loop runs it, the mean of `steps` after `warmup` (compiling and the allocator's warm-up). --plan and
    bench.py both time this."""
    batches = [random_batch(learner.raw_model.config, micro, block_size, env.device)] * accum
    run = lambda step: train_step(learner, batches, env, step=step, seed=0, grad_clip=1.0)
    for step in range(warmup):
        run(step).tolist()  # .tolist() waits for the device
    started = time.perf_counter()
    for step in range(steps):
        stats = run(warmup + step)
    stats.tolist()
    return (time.perf_counter() - started) / steps


def eager(env: Env) -> Env:
    """The same place to run, without torch.compile (timing many shapes, where compiling each costs more)."""
    return dataclasses.replace(env, compile=False)
