"""The micro-batch that fits: on a GPU, the fewest accumulation steps whose micro-batch a real step fits in (probed,
halving on out-of-memory); on a CPU, the fewest whose estimated memory fits in what is free, container limits
included (a step that cannot fit is refused in one line before the run, not killed by the kernel an hour in).
The global batch, and so the loss, stay the same whatever the micro-batch.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch

from common import UserError
from model import GPT
from runtime import Env, all_ranks_agree
from step import Learner, accumulate_gradients, run_compiled, update, zero_grads


RAM_SHARE = 0.8  # of the memory free, what --grad_accum auto lets a CPU step take (the rest: the data, the OS)


def step_bytes(c, micro: int, params: int, amp: bool) -> int:
    """Bytes a training step of `micro` sequences holds at its peak on a CPU (eager): what autograd keeps of
    each block (Korthikanti et al. 2022, "Reducing Activation Recomputation": 34 C + 5 heads T bytes a token
    a layer in 16-bit, twice that in fp32), the logits and their gradient, and 16 bytes a parameter (weights,
    gradients, two moments)."""
    tokens, width = micro * c.block_size, 2 if amp else 4
    blocks = tokens * c.n_layer * (34 * c.n_embd + 5 * c.n_head * c.block_size) * width // 2
    logits = 2 * tokens * c.padded_vocab_size * width
    return blocks + logits + 16 * params


def available_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still take (Linux), the least of what limits it, or None where nothing says:
    - the machine's MemAvailable (proc/meminfo);
    - what the memory cgroup of a container or a systemd unit leaves, at each level from the process's own
      (proc/self/cgroup names it) up to the root: cgroup v2's memory.max less memory.current, v1's
      memory/memory.limit_in_bytes less memory.usage_in_bytes, the page cache the kernel reclaims under the
      limit (inactive_file in memory.stat) counted free, as `docker stats` counts it;
    - RLIMIT_AS, which `ulimit -v` sets, less this process's virtual size (proc/self/statm)."""
    room = [kb * 1024 for kb in [_kernel_number(proc / "meminfo", "MemAvailable:")] if kb is not None]
    room += _cgroup_room(proc / "self" / "cgroup", cgroups)
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource  # Unix only
        limit, pages = resource.getrlimit(resource.RLIMIT_AS)[0], _kernel_number(proc / "self" / "statm")
        if limit != resource.RLIM_INFINITY and pages is not None:
            room.append(limit - pages * os.sysconf("SC_PAGE_SIZE"))
    return max(0, min(room)) if room else None


def _cgroup_room(membership: Path, cgroups: Path) -> list[int]:
    """Limit less usage of each memory cgroup above this process, as available_memory counts them."""
    try:
        lines = membership.read_text(encoding="ascii").splitlines()
    except OSError:
        return []
    room = []
    for parts in (line.split(":", 2) for line in lines):  # "0::/PATH" (v2), "4:memory:/PATH" (v1)
        if len(parts) != 3:
            continue
        if parts[1] == "":
            root, limit, usage, cache = cgroups, "memory.max", "memory.current", "inactive_file"
        elif "memory" in parts[1].split(","):
            root, limit, usage, cache = (cgroups / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                         "total_inactive_file")
        else:
            continue
        # From the process's own group up, since a parent's limit binds it too. In a container, PATH may name a
        # group of the host that is not mounted there: its levels are then missing, and the root is the container's.
        level = root / parts[2].strip("/")
        while True:
            cap, used = _kernel_number(level / limit), _kernel_number(level / usage)
            if cap is not None and used is not None:
                room.append(cap - used + (_kernel_number(level / "memory.stat", cache + " ") or 0))
            if level == root or root not in level.parents:
                break
            level = level.parent
    return room


def _kernel_number(path: Path, key: str | None = None) -> int | None:
    """The first number in a kernel file, or on its line that starts with `key`; None where the file or the
    line is missing, or it says "max" (no limit)."""
    try:
        text = path.read_text(encoding="ascii")
        if key is not None:
            text = next(line[len(key):] for line in text.splitlines() if line.startswith(key))
        return int(text.split()[0])
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def choose_grad_accum(given: int | None, learner: Learner, env: Env, batch_size: int, block_size: int,
                      say: Callable) -> int:
    """Micro-steps per optimizer step: `given` (a number of --grad_accum, or a resumed run's own choice); else, on
    a GPU, the fewest whose micro-batch fits in its memory (probed); on a CPU, the fewest whose step's estimated
    memory fits in what is free (step_bytes). A CPU step that cannot fit is refused in one line."""
    accum = given
    if accum is None and probes_memory(env.device):
        accum = run_compiled(learner, env, say, lambda: fitting_grad_accum(learner, env, batch_size, block_size))
        say(f"--grad_accum auto: micro-batches of {batch_size // (env.world * accum)} × {block_size} tokens "
            f"fit in {env.device.type} memory: {accum} accumulation step(s) of {env.world} process(es)")
    if env.device.type == "cpu":
        return fitting_in_ram(learner.raw_model, batch_size // env.world, accum, env, say)
    return accum or 1


def fitting_in_ram(model: GPT, per_rank: int, accum: int | None, env: Env, say: Callable) -> int:
    """accum, or (None: auto) the fewest micro-steps whose step fits in RAM_SHARE of the memory free, by
    step_bytes' estimate; UserError before the run starts where the step cannot fit (rather than the kernel
    killing it an hour in)."""
    free, c = available_memory(), model.config
    if free is None:
        return accum or 1
    free //= env.world  # the processes of this machine share it
    need = lambda micro: step_bytes(c, micro, model.num_params(), env.amp_dtype is not None)
    gb = lambda n: f"{n / 1e9:,.1f} GB"
    fit = next((m for m in micro_batch_sizes(per_rank) if need(m) <= RAM_SHARE * free), None)  # the largest
    if accum is not None:
        micro = per_rank // accum
        if need(micro) > free:
            advice = f"--grad_accum {per_rank // fit} (micro-batches of {fit}) fits" if fit else "a smaller model"
            raise UserError(f"a step of micro-batches of {micro} × {c.block_size} tokens needs about {gb(need(micro))} "
                            f"of memory and {gb(free)} is free: {advice}, or lower --batch_size")
        return accum
    if fit is None:
        raise UserError(f"even one sequence of {c.block_size} tokens needs about {gb(need(1))} of memory and "
                        f"{gb(free)} is free: train a smaller model, or lower --block_size")
    if fit < per_rank:
        say(f"--grad_accum auto: micro-batches of {fit} × {c.block_size} tokens fit in cpu memory (about "
            f"{gb(need(fit))} of {gb(free)} free): {per_rank // fit} accumulation steps")
    return per_rank // fit


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


def fitting_grad_accum(learner: Learner, env: Env, batch_size: int, block_size: int) -> int:
    """--grad_accum auto: the fewest micro-steps whose micro-batch fits on every rank, trying batch_size / GPUs
    first and halving on out-of-memory. The global batch, and so the loss, stay the same."""
    per_rank = batch_size // env.world
    for micro in micro_batch_sizes(per_rank):
        if step_fits(learner, env, micro, block_size):
            return per_rank // micro
    raise UserError(f"out of GPU memory even with micro-batches of 1 × {block_size} tokens: lower --block_size, "
                    "or train a smaller model")


def step_fits(learner: Learner, env: Env, micro: int, block_size: int) -> bool:
    """Whether a training step on `micro` sequences fits in every rank's memory: the step's own forward and
    backward (accumulate_gradients, the graph training runs), then each optimizer's step skipped through
    found_inf, which allocates its state and changes nothing else.

    The ranks agree after each half, and neither half runs a collective (DDP's all-reduce is off, Muon
    shares no work), so a rank out of memory never leaves another waiting in a collective it will not
    join. A failed try leaves no gradient and no optimizer state: AdamW sets its state up lazily, one
    tensor at a time, and a partial state would break the next try."""
    x = torch.zeros((micro, block_size), dtype=torch.long, device=env.device)
    y = torch.zeros_like(x)  # its own tensor, as in training: model(x, x) compiles a graph guarded on `targets is idx`
    fits = all_ranks_agree(env, _fits(lambda: accumulate_gradients(learner, [(x, y)], env, step=0, seed=0,
                                                                   all_reduce=False)))
    fits = fits and all_ranks_agree(env, _fits(lambda: skipped_optimizer_step(learner, env)))
    zero_grads(learner, release=True)
    if not fits:
        for optimizer in learner.optimizers:
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


def skipped_optimizer_step(learner: Learner, env: Env) -> None:
    """Each optimizer's step with found_inf set, on this rank alone (Muon not sharing its work)."""
    for optimizer in learner.optimizers:
        update(optimizer, torch.ones((), device=env.device), alone=True)
