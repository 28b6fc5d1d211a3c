"""The run plan: what a run will take and cost, how many steps a time budget buys, and the summary that
ends a run with the way home.

train_gpt2.py prints the plan as it learns more: what the flags and the model say (before any download),
the data's exact size (once prepared), then time and cost from a few timed steps on this device. With
--time, the steps come from the measured pace and are re-planned as it changes (`Budget`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model import swiglu_width

# Dense bf16 peak TFLOP/s, by the exact name torch.cuda.get_device_name reports, from NVIDIA's
# datasheets (which print the sparse figure, twice these). A card not named here gets no MFU.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989,  # H100 SXM5
    "NVIDIA H100 PCIe": 756,
    "NVIDIA H100 NVL": 835,
    "NVIDIA H200": 989,  # H200 SXM
    "NVIDIA H200 NVL": 835,
    "NVIDIA GH200 480GB": 989,
    "NVIDIA GH200 144G HBM3e": 989,
    "NVIDIA A100-SXM4-80GB": 312,
    "NVIDIA A100-SXM4-40GB": 312,
    "NVIDIA A100 80GB PCIe": 312,
    "NVIDIA A100-PCIE-40GB": 312,
}
# No table of prices: they differ by provider and change month to month, and a stale one would
# mislead. The cost is shown when --price_per_hour gives the machine's price.

# GPT-2 tokens per document, for the estimate made before the download: the issue that asked for the
# plan measured 1,000 FineWeb documents at about 1 M tokens. Local text: about 4 bytes a token for
# English prose (3.1 measured on the Python documentation, whose markup and code are denser).
TOKENS_PER_DOCUMENT = {"HuggingFaceFW/fineweb": 1000}
BYTES_PER_TOKEN = 4.0
SHARD_BYTES_PER_TOKEN = 2  # uint16 tokens (data.py's shards)
REPEATS_WARNED = 4  # passes over the same data beyond which fresh data is worth more (Muennighoff et al. 2023)
# Compute-optimal tokens per parameter: Chinchilla's 20 counted every parameter, nanochat measured 10.5
# counting the matrices and the head; well outside this range a run buys less model than it could.
TOKENS_PER_PARAMETER = (10, 40)
FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of a training step (the backward, twice the forward)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a CPU or a card not in PEAK_BF16_TFLOPS."""
    if device.type != "cuda":
        return None
    tflops = PEAK_BF16_TFLOPS.get(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


# The spellings people type, largest unit first: "1h30m", "1h 30m", "4 min", "90 seconds".
_UNIT_SECONDS = {name: seconds for names, seconds in ((("h", "hr", "hrs", "hour", "hours"), 3600),
                                                     (("m", "min", "mins", "minute", "minutes"), 60),
                                                     (("s", "sec", "secs", "second", "seconds"), 1)) for name in names}
_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"(?:\s*{_NUMBER}\s*[a-z]+)+\s*")


def parse_duration(text: str) -> float:
    """Seconds in "45m", "2h", "1h30m", "1h 30m", "4 min", "90 seconds" (h, hr, hour(s); m, min(s), minute(s);
    s, sec(s), second(s); each unit once, largest first) or a bare number of seconds; ValueError otherwise."""
    text = text.strip().lower()
    if re.fullmatch(_NUMBER, text):
        seconds = float(text)
    elif _DURATION.fullmatch(text):
        seconds, last = 0.0, math.inf
        for number, unit in re.findall(rf"({_NUMBER})\s*([a-z]+)", text):
            if _UNIT_SECONDS.get(unit, last) >= last:  # unknown, repeated or out of order
                raise ValueError(text)
            last = _UNIT_SECONDS[unit]
            seconds += float(number) * last
    else:
        raise ValueError(text)
    if not 0 < seconds < float("inf"):
        raise ValueError(text)
    return seconds


def human_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def estimated_data_tokens(dataset: str, sample_size: int) -> tuple[int | None, str]:
    """The text's tokens before it is prepared, and how they were estimated: by documents for a Hub
    dataset whose average is known, by bytes for local files; (None, why) when nothing is known."""
    if dataset in TOKENS_PER_DOCUMENT:
        per_document = TOKENS_PER_DOCUMENT[dataset]
        return sample_size * per_document, f"{sample_size:,} documents of about {per_document:,} tokens"
    path = Path(dataset).expanduser()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
    if not files:
        return None, "a Hub dataset whose documents' length is not known here"
    size = sum(f.stat().st_size for f in files[:sample_size])
    return int(size / BYTES_PER_TOKEN), f"{human_bytes(size)} of text at about {BYTES_PER_TOKEN:g} bytes a token"


def short_float(x: float) -> str:
    """Two significant figures, a small number in scientific notation without padding: 6.1e-4."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.1e}") if x and abs(x) < 1e-2 else f"{x:.2g}"


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} bytes"


@dataclass
class Plan:
    """What a run will do; fields are None until known (steps with --time, seconds until steps are timed)."""
    params: int
    params_non_embedding: int
    tokens_per_step: int
    sample_size: int
    steps: int | None = None
    data_tokens: int | None = None  # the training split's
    data_basis: str = ""  # how data_tokens was estimated; "" once it is the prepared split's exact count
    seconds: float | None = None  # the whole run's wall time, from process start
    step_seconds: float | None = None
    price_per_hour: float | None = None
    depth: int | None = None  # the family's depth --time chose (DEPTHS); None for a shape the flags give

    @property
    def tokens(self) -> int | None:
        return None if self.steps is None else self.steps * self.tokens_per_step

    @property
    def epochs(self) -> float | None:
        return None if self.tokens is None or not self.data_tokens else self.tokens / self.data_tokens

    @property
    def cost(self) -> float | None:
        return None if self.seconds is None or self.price_per_hour is None else self.seconds / 3600 * self.price_per_hour

    def row(self) -> dict:
        """The plan as metrics.jsonl records it."""
        return {"plan": {"seconds": self.seconds, "steps": self.steps, "tokens": self.tokens,
                         "data_tokens": self.data_tokens, "epochs": self.epochs, "cost": self.cost}}

    def model_line(self) -> str:
        without = (f" ({self.params_non_embedding / 1e6:,.1f} M without the position table)"
                   if self.params_non_embedding != self.params else "")
        return f"plan: {self.params / 1e6:,.1f} M parameters{without}, {self.tokens_per_step:,} tokens a step"

    def data_line(self) -> str:
        if self.data_tokens is None:
            return f"plan: data: size unknown until prepared ({self.data_basis})"
        size = f"{human_bytes(self.data_tokens * SHARD_BYTES_PER_TOKEN)} of shards on disk"
        if not self.data_basis:
            return f"plan: data: {self.data_tokens:,} training tokens, {size}"
        return f"plan: data: about {self.data_tokens:,} training tokens ({self.data_basis}), {size}"

    def steps_line(self) -> str:
        epochs = f" = {self.epochs:.2f} epochs" if self.epochs is not None else ""
        return f"plan: {self.steps:,} steps = {self.tokens:,} tokens{epochs}"

    def time_line(self, device: str) -> str:
        cost = f", ${self.cost:,.2f} at ${self.price_per_hour:,.2f} an hour" if self.cost is not None else ""
        return (f"plan: {self.step_seconds:.3f} s a step (timed on this {device}): the run takes about "
                f"{human_duration(self.seconds)}{cost}")

    def warnings(self) -> list[str]:
        """One line each: data seen too often, a model far from compute-optimal for its tokens."""
        out = []
        if self.epochs is not None and self.epochs > REPEATS_WARNED:
            fresh = math.ceil(self.sample_size * self.epochs)
            out.append(f"warning: the run sees its data {self.epochs:.1f} times; --sample_size {fresh:,} gives "
                       "fresh data for the whole run")
        if self.tokens is not None:
            ratio = self.tokens / self.params_non_embedding
            low, high = TOKENS_PER_PARAMETER
            if not low <= ratio <= high:
                out.append(f"warning: {ratio:.2g} tokens a parameter, far from the compute-optimal {low}-{high} "
                           f"(Chinchilla, nanochat): {self._ratio_advice(ratio < low)}")
        return out

    def _ratio_advice(self, too_few_tokens: bool) -> str:
        if not too_few_tokens:
            return "a larger model or a shorter run would learn more from this compute"
        if self.depth == DEPTHS[0]:  # no smaller model to suggest
            return (f"depth {self.depth} is the smallest of the family --time chooses from, so the budget is short "
                    "for any of them: more time, or a GPU, would learn more")
        return "a smaller model or a longer run would learn more from this compute"


LONG_CPU_RUN_S = 3600  # a CPU run planned longer than this is told how to get somewhere sooner
CPU_ADVICE_BUDGET, CPU_ADVICE_DEPTH = "10m", 4  # what it is told: a budget, or a smaller shape of the family


def cpu_advice(device: str, seconds: float | None) -> list[str]:
    """The line(s) that tell a run whose shape the flags give what to do when it would take a CPU more than
    LONG_CPU_RUN_S: let --time choose the model, or give a smaller shape; nothing on a GPU or for a short run."""
    if device != "cpu" or seconds is None or seconds <= LONG_CPU_RUN_S:
        return []
    shape = depth_shape(CPU_ADVICE_DEPTH)
    return [f"warning: {human_duration(seconds)} is long for a CPU: --time {CPU_ADVICE_BUDGET} without the shape "
            "flags lets the budget choose a model that learns in that time, or a smaller shape such as "
            f"--n_layer {shape['n_layer']} --n_head {shape['n_head']} --n_embd {shape['n_embd']} trains faster; "
            "or run it on a GPU"]


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
        low, high = 0, max(1, int(usable / costs.step) + 1)  # costs.seconds grows with n: search it
        while low < high:
            n = (low + high + 1) // 2
            low, high = (n, high) if costs.seconds(step, n) <= usable else (low, n - 1)
        return step + low


# ----------------------------------------------------------------------------------------------------
# The model a time budget buys (--time without shape flags)

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
# Choosing takes 5% of the budget, at least enough to time the smallest depth and at most a minute.
CHOOSING_SHARE, CHOOSING_MIN_S, CHOOSING_MAX_S = 0.05, 5.0, 60.0


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

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.depth == self.depth)

    def lines(self, device: str, block_size: int, lr: float, muon_lr: float, reference_batch: int) -> list[str]:
        """What was chosen and why, in plain words: the paces timed, the depth chosen and the tokens it gets,
        the batch, the learning rates and the data. reference_batch: the sequences `lr` is given for (at
        REFERENCE_WIDTH), which sized_lr scales from."""
        shape, c = depth_shape(self.depth), self.chosen
        timed = ", ".join(f"depth {k.depth} at {k.tokens_per_s:,.0f} tokens/s" for k in self.candidates)
        documents = f"{self.sample_size:,} documents (about one pass)" if self.sample_size else "all of the local text"
        return [f"plan: --time chooses the model by timing its family on this {device} ({self.seconds:.1f} s): {timed}",
                f"plan: chosen: depth {self.depth} ({shape['n_layer']} layers, width {shape['n_embd']}, "
                f"{shape['n_head']} heads), {c.params / 1e6:,.1f} M parameters in its matrices and head; the budget "
                f"buys it {c.tokens:,.0f} tokens, {c.tokens_per_parameter:.2g} a parameter (about "
                f"{OPTIMAL_TOKENS_PER_PARAMETER:g} learns the most from the compute, as nanochat measured)",
                f"plan: batch: {self.batch} sequences of {block_size} tokens; learning rates: AdamW "
                f"{short_float(self.lr)} (--lr {lr:g} is for {reference_batch} sequences at width {REFERENCE_WIDTH}: "
                f"scaled to this batch and width), Muon {muon_lr:g}; data: {documents}"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sizing":
        return cls(**d | {"candidates": [Candidate(**c) for c in d["candidates"]]})


# ----------------------------------------------------------------------------------------------------
# What a step holds in a CPU's memory

RAM_SHARE = 0.8  # of the memory free, what --grad_accum auto lets a CPU step take (the rest: the data, the OS)


def step_bytes(c, micro: int, params: int, amp: bool) -> int:
    """Bytes a training step of `micro` sequences holds at its peak on a CPU (eager): what autograd keeps of
    each block (Korthikanti et al. 2022, "Reducing Activation Recomputation": 34 C + 5 heads T bytes a token
    a layer in 16-bit, twice that in fp32), the logits and their gradient, and 16 bytes a parameter (weights,
    gradients, two moments). For the seed's command (124M, 128 x 128 tokens, fp32) 21.9 GB: a CPU run of it
    here held 22-23.7 GB before the kernel killed it."""
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


# ----------------------------------------------------------------------------------------------------
# The way home


def copy_home_commands(checkpoint: Path) -> list[str]:
    """The two commands to run on the laptop: scp from this machine (its SSH address when this is an SSH
    session, placeholders otherwise), then sample.py."""
    user, host, port = os.environ.get("USER") or "USER", "HOST", None
    connection = os.environ.get("SSH_CONNECTION", "").split()  # client_ip client_port server_ip server_port
    if len(connection) == 4:
        host = f"[{connection[2]}]" if ":" in connection[2] else connection[2]
        port = connection[3] if connection[3] != "22" else None
    source = f"{user}@{host}:{shlex.quote(str(checkpoint.resolve()))}"
    scp = f"scp {'-P ' + port + ' ' if port else ''}{source} ./checkpoints/"
    return [scp, "python sample.py --interactive --stream --checkpoint ./checkpoints/model_best_val.pt --cpu "
                 "--max_tokens 50"]


# Addresses a machine has behind NAT or in a container (RFC 1918, carrier-grade NAT, IPv6 unique local).
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")


def ssh_address_is_private() -> bool:
    """Whether the address this SSH session arrived at is one of PRIVATE_NETWORKS."""
    import ipaddress
    connection = os.environ.get("SSH_CONNECTION", "").split()
    try:
        address = ipaddress.ip_address(connection[2]) if len(connection) == 4 else None
    except ValueError:
        return False
    return address is not None and any(address in ipaddress.ip_network(n) for n in PRIVATE_NETWORKS
                                       if ipaddress.ip_network(n).version == address.version)


@dataclass
class Outcome:
    """How a run ended, for its summary."""
    steps: int
    tokens: int
    seconds: float
    best_val: float | None
    best_step: int | None
    checkpoint: Path
    price_per_hour: float | None = None
    hellaswag: float | None = None
    planned_seconds: float | None = None

    def lines(self) -> list[str]:
        cost = f", ${self.seconds / 3600 * self.price_per_hour:,.2f}" if self.price_per_hour is not None else ""
        planned = f" (planned {human_duration(self.planned_seconds)})" if self.planned_seconds else ""
        best = (f"best validation loss {self.best_val:.4f} at step {self.best_step:,}" if self.best_val is not None
                else "no validation yet")
        hellaswag = f", HellaSwag acc_norm {self.hellaswag:.4f}" if self.hellaswag is not None else ""
        lines = [f"summary: {self.steps:,} steps, {self.tokens:,} tokens in {human_duration(self.seconds)}{planned}"
                 f"{cost}; {best}{hellaswag}"]
        if self.checkpoint.exists():
            lines += [f"best model: {self.checkpoint.resolve()}", "to talk to it on your laptop:"]
            lines += [f"  {command}" for command in copy_home_commands(self.checkpoint)]
            if ssh_address_is_private():
                lines.append("  (that address is this machine's own, private one, as SSH sees it behind NAT or "
                             "in a container: from your laptop, use the address you connect to)")
        return lines


# ----------------------------------------------------------------------------------------------------
# What the plan counts with: the pace of training, and the seconds of what else a run does


@dataclass
class Took:
    seconds: float | None = None


class Pace:
    """Seconds a training step takes, without evaluation, saving and the first steps (compiling, warming
    the allocator): over TIMED_STEPS steps after WARMUP_STEPS, then the median of the last windows between
    log lines. Also the tokens/s of each such window, for the progress bar and metrics.jsonl."""

    WARMUP_STEPS, TIMED_STEPS, WINDOWS = 2, 5, 5

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step, self.first_step = tokens_per_step, step
        self.step_seconds: float | None = None
        self.windows: list[float] = []
        self.excluded = 0.0  # seconds of evaluation and saving so far, which the timing leaves out
        self._timing: tuple[int, float, float] | None = None  # (step, clock, excluded) where the timing began
        self.restart(step)

    def restart(self, step: int) -> None:
        self.t0, self.step0 = time.perf_counter(), step

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
        if step == self.first_step + self.WARMUP_STEPS:
            wait()
            self._timing = (step, time.perf_counter(), self.excluded)
        elif self._timing is not None and step == self._timing[0] + self.TIMED_STEPS:
            wait()
            _, clock, excluded = self._timing
            self.step_seconds = (time.perf_counter() - clock - (self.excluded - excluded)) / self.TIMED_STEPS
            return True
        return False

    def lap(self, step: int) -> float:
        """Tokens/s since the last restart; once timed, the window also updates the seconds a step."""
        seconds, steps = time.perf_counter() - self.t0, step - self.step0
        if steps and self.step_seconds is not None and self.step0 >= self.first_step + self.WARMUP_STEPS:
            self.windows = (self.windows + [seconds / steps])[-self.WINDOWS:]
            self.step_seconds = statistics.median(self.windows)
        return steps * self.tokens_per_step / max(seconds, 1e-9)


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
        return (n * self.step + due(self.eval_interval) * self.evaluation_s()
                + due(self.hellaswag_interval) * self.hellaswag_s() + self.final_evaluation_s() + self.hellaswag_s()
                + write)
