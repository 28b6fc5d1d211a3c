"""Where a run executes: the device, its precision and compile choice, and torchrun's processes.

train_gpt2.py, eval.py and bench.py set up their run here, so one GPU, several, or the CPU behave alike.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import UserError, cpu_has_fast_bf16, cuda_has_bf16, pick_device


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    compile: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_env(device_name: str, amp: bool | None, compile: bool | None) -> tuple[Env, list[str]]:
    """The device, process group, precision and compile choice, with a note for each fallback taken."""
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        # Generous timeout: rank 0 may be downloading and tokenizing the data while the others wait.
        # device_id binds NCCL to this process's GPU (LOCAL_RANK) rather than one guessed from the rank.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=device if device.type == "cuda" else None)
    env = Env(device=device, rank=rank, local_rank=local_rank, world=world)
    env.amp_dtype, amp_note = choose_amp(amp, device.type)
    env.compile, compile_note = choose_compile(compile, device.type)
    return env, [note for note in (amp_note, compile_note) if note]


def choose_amp(requested: bool | None, kind: str) -> tuple[torch.dtype | None, str | None]:
    if kind == "cuda":
        if requested is False:
            return None, None
        if cuda_has_bf16():
            return torch.bfloat16, None
        return torch.float16, "--amp: this GPU lacks bf16, so fp16 with loss scaling"
    if kind == "cpu" and requested:
        if cpu_has_fast_bf16():
            return torch.bfloat16, "--amp on the CPU: bf16 autocast"
        # Without native bf16, torch emulates it: many times slower than fp32 (BENCHMARKS.md, "Memory").
        return None, "--amp: this CPU has no native bf16 (AVX-512 bf16 or AMX), where bf16 is far slower: fp32"
    if requested:
        return None, f"--amp: not used on {kind}; training in fp32"
    return None, None


def choose_compile(requested: bool | None, kind: str) -> tuple[bool, str | None]:
    if kind == "cuda":
        from torch.utils._triton import has_triton
        if requested is not False and not has_triton():
            return False, "torch.compile: off, Triton is not installed (pip install triton)"
        return requested is not False, None
    if requested is None:
        return False, f"torch.compile: off on {kind} (its start-up cost outweighs the gain there; --compile forces it)"
    return requested, None


def leave_together(env: Env) -> None:
    """On a run's normal end, every rank waits for the others before the group is torn down: tearing it down
    while another rank still works (rank 0 writing its files) aborts gloo ("terminate called")."""
    if env.world > 1 and dist.is_initialized():
        dist.barrier()


def cleanup_env(env: Env):
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_rank0(env: Env, make):
    """What `make()` returns on rank 0, on every rank: one decision for all (machines need not share a disk)."""
    box = [make() if env.master else None]
    if env.world > 1:
        dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


def only_on_rank0(env: Env, read):
    """read() on rank 0 only (None elsewhere); a UserError it raises is raised on every rank, so no rank
    is left waiting for one that failed."""
    result, problem = None, None
    if env.master:
        try:
            result = read()
        except UserError as e:
            problem = e
    problem = broadcast_from_rank0(env, lambda: problem)
    if problem is not None:
        raise problem
    return result


def all_ranks_agree(env: Env, ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank."""
    if env.world == 1:
        return ok
    flag = torch.tensor(float(ok), device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def local_rank0_first(env: Env, fetch):
    """fetch() on each machine's first process, then on its others, which find what it downloaded or
    prepared (one tokenizer per machine, not one per GPU, and no two writing the same cache)."""
    if env.local_rank == 0:
        result = fetch()
    if env.world > 1:
        dist.barrier()
    if env.local_rank != 0:
        result = fetch()
    return result


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor sat in a checkpoint rank 0 shares: its index in the order they are broadcast."""
    index: int
    shape: tuple
    dtype: torch.dtype


def broadcast_state_from_rank0(env: Env, state):
    """A checkpoint dict that only rank 0 can read, on every rank (tensors on the broadcast's device).

    The plain values travel pickled, in one broadcast; the tensors one by one (with NCCL, on the GPU).
    """
    if env.world == 1:
        return state
    tensors = []

    def to_slots(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return _TensorSlot(len(tensors) - 1, tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return {k: to_slots(v) for k, v in x.items()}
        return type(x)(map(to_slots, x)) if isinstance(x, (list, tuple)) else x

    skeleton = broadcast_from_rank0(env, lambda: to_slots(state))
    where = env.device if env.device.type == "cuda" else torch.device("cpu")

    def fill(x):
        if isinstance(x, _TensorSlot):
            t = tensors[x.index].to(where) if env.master else torch.empty(x.shape, dtype=x.dtype, device=where)
            dist.broadcast(t, src=0)
            return t
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return type(x)(map(fill, x)) if isinstance(x, (list, tuple)) else x

    return fill(skeleton)
