"""The run plan: what a run will take and cost, and the summary that ends a run with the way home.

train_gpt2.py prints the plan as it learns more: what the flags and the model say (before any download),
the data's exact size (once it has all arrived), then time and cost from a few timed steps on this device.
With --time, the steps come from the measured pace (budget.py).
"""
from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from sources import local_files, source_names

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

# GPT-2 tokens per document, its <|endoftext|> included, for the estimate made before the download. FineWeb's
# sample-10BT: 14,868,862 documents in kjj0/fineweb10B-gpt2's 104 shards of at most 100 M tokens (about 690 each);
# FineWeb-Edu's: 9,672,101 documents in about 10 B tokens (about 1,030). Local text: about 4 bytes a token for
# English prose (markup and code are denser).
TOKENS_PER_DOCUMENT = {"HuggingFaceFW/fineweb": 690, "HuggingFaceFW/fineweb-edu": 1030}
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
    files = []
    for name in source_names(dataset):  # a mixture's parts, each of them local
        found = local_files(name)  # the files data.py reads: a directory's, a glob's
        if found is None:
            return None, "a Hub dataset whose documents' length is not known here"
        files += found
    size = sum(os.path.getsize(f) for f in files[:sample_size])
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
    """What a run will do; fields are None until known (steps with --time, seconds until steps are timed).
    The steps and the time are the Horizon's (horizon.py) to write."""
    params: int
    params_non_embedding: int
    tokens_per_step: int
    sample_size: int
    steps: int | None = None
    full_steps: float | None = None  # the steps' worth of full batches (fewer with a batch-size schedule)
    data_tokens: int | None = None  # the training split's
    val_tokens: int | None = None  # the validation split's (the last evaluation reads all of them)
    data_basis: str = ""  # how data_tokens was estimated; "" once it is the prepared split's exact count
    seconds: float | None = None  # the whole run's wall time, from process start
    step_seconds: float | None = None
    price_per_hour: float | None = None
    smallest: bool = False  # the smallest model --time chooses from (budget.DEPTHS[0])
    disk_bytes: int | None = None  # what the data takes on disk, where not its tokens' (whole downloaded shards)
    fine_tune: bool = False  # from trained weights (--init_from)
    steps_per_pass: int | None = None  # conversations: a pass's steps (their rows' padding is not data)
    device: str = "cpu"  # what the steps are timed on
    sizing: dict | None = None  # what --time chose, recorded with the plan in metrics.jsonl
    estimated_tokens: int | None = None  # data_tokens as estimated, once the prepared split's count replaced it

    @property
    def tokens(self) -> int | None:
        if self.steps is None:
            return None
        return round((self.steps if self.full_steps is None else self.full_steps) * self.tokens_per_step)

    @property
    def epochs(self) -> float | None:
        if self.steps is not None and self.steps_per_pass:
            return (self.steps if self.full_steps is None else self.full_steps) / self.steps_per_pass
        return None if self.tokens is None or not self.data_tokens else self.tokens / self.data_tokens

    @property
    def cost(self) -> float | None:
        return None if self.seconds is None or self.price_per_hour is None else self.seconds / 3600 * self.price_per_hour

    def row(self) -> dict:
        """The plan as metrics.jsonl records it."""
        return {"plan": {"seconds": self.seconds, "steps": self.steps, "tokens": self.tokens,
                         "data_tokens": self.data_tokens, "epochs": self.epochs, "cost": self.cost},
                **({"sizing": self.sizing} if self.sizing else {})}

    def data_arrived(self, tokens: int, steps_per_pass: int | None) -> None:
        """The training split is all there: its exact size replaces the estimate."""
        self.prepared(tokens)
        self.steps_per_pass = steps_per_pass

    def model_line(self) -> str:
        without = (f" ({self.params_non_embedding / 1e6:,.1f} M of them in matrix products, the rest lookup tables)"
                   if self.params_non_embedding != self.params else "")
        return f"plan: {self.params / 1e6:,.1f} M parameters{without}, {self.tokens_per_step:,} tokens a step"

    def prepared(self, tokens: int) -> None:
        """The training split's exact size, once it is all there (the estimate kept, to say which is which)."""
        if self.data_basis:
            self.estimated_tokens = self.data_tokens
        self.data_tokens, self.data_basis = tokens, ""

    def data_line(self) -> str:
        if self.data_tokens is None:
            return f"plan: data: size unknown until prepared ({self.data_basis})"
        size = f"{human_bytes(self.disk_bytes or self.data_tokens * SHARD_BYTES_PER_TOKEN)} of shards on disk"
        if not self.data_basis:
            estimated = f" (estimated before at about {self.estimated_tokens:,})" if self.estimated_tokens else ""
            return f"plan: data: {self.data_tokens:,} training tokens as prepared{estimated}, {size}"
        return f"plan: data: about {self.data_tokens:,} training tokens ({self.data_basis}), {size}"

    def steps_line(self) -> str:
        epochs = f" = {self.epochs:.2f} epochs" if self.epochs is not None else ""
        return f"plan: {self.steps:,} steps = {self.tokens:,} tokens{epochs}"

    def time_line(self) -> str:
        cost = f", ${self.cost:,.2f} at ${self.price_per_hour:,.2f} an hour" if self.cost is not None else ""
        return (f"plan: {self.step_seconds:.3f} s a step (timed on this {self.device}): the run takes about "
                f"{human_duration(self.seconds)}{cost}")

    def warnings(self) -> list[str]:
        """One line each, as --plan and the run say them (horizon.Horizon.length_lines): data seen too often, a
        model far from compute-optimal for its tokens (not for a fine-tune: a few small steps from trained weights,
        where pretraining's rules of thumb do not apply)."""
        return [] if self.fine_tune else self._pretraining_warnings()

    def _pretraining_warnings(self) -> list[str]:
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
        if self.smallest:  # no smaller model to suggest
            return ("this is the smallest model --time chooses from, so the budget is short for any of them: more "
                    "time, or a GPU, would learn more")
        return "a smaller model or a longer run would learn more from this compute"


# ----------------------------------------------------------------------------------------------------
# The way home


def copy_home_commands(checkpoint: Path, chat: bool = False, gguf: bool = True) -> list[str]:
    """The commands to run on the laptop: scp from this machine (its SSH address when this is an SSH session,
    placeholders otherwise), then sample.py; a chat model goes to a folder of its own (beside the base model, not
    over it), talked to with --chat, and exported for llama.cpp and Ollama (or, for a model llama.cpp cannot
    run, for transformers)."""
    user, host, port = os.environ.get("USER") or "USER", "HOST", None
    connection = os.environ.get("SSH_CONNECTION", "").split()  # client_ip client_port server_ip server_port
    if len(connection) == 4:
        host = f"[{connection[2]}]" if ":" in connection[2] else connection[2]
        port = connection[3] if connection[3] != "22" else None
    source = f"{user}@{host}:{shlex.quote(str(checkpoint.resolve()))}"
    folder = "./checkpoints/chat/" if chat else "./checkpoints/"
    scp = f"scp {'-P ' + port + ' ' if port else ''}{source} {folder}"
    if not chat:
        return [scp, "python sample.py --interactive --stream --checkpoint ./checkpoints/model_best_val.pt --cpu "
                     "--max_tokens 50"]
    home = f"{folder}model_best_val.pt"
    talk = [f"mkdir -p {folder} && {scp}", f"python sample.py --chat --checkpoint {home} --cpu"]
    if not gguf:
        return talk + [f"python export_hf.py {home} exported-chat/"]
    return talk + [f"python export_gguf.py {home} exported-chat/model.gguf",
                   "ollama create mychat -f exported-chat/Modelfile && ollama run mychat"]


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
    chat: bool = False  # fine-tuned on conversations: talked to with sample.py --chat
    target_loss: float | None = None  # --target_loss
    target: tuple[int, float] | None = None  # (step, seconds from launch) where it was reached
    gguf: bool = True  # llama.cpp runs the model (export_gguf.py writes it)

    def lines(self) -> list[str]:
        cost = f", ${self.seconds / 3600 * self.price_per_hour:,.2f}" if self.price_per_hour is not None else ""
        planned = f" (planned {human_duration(self.planned_seconds)})" if self.planned_seconds else ""
        earlier = " (of an earlier attempt)" if self.best_step is not None and self.best_step > self.steps else ""
        best = (f"best validation loss {self.best_val:.4f} at step {self.best_step:,}{earlier}"
                if self.best_val is not None else "no validation yet")
        hellaswag = f", HellaSwag acc_norm {self.hellaswag:.4f}" if self.hellaswag is not None else ""
        lines = [f"summary: {self.steps:,} steps, {self.tokens:,} tokens in {human_duration(self.seconds)}{planned}"
                 f"{cost}; {best}{hellaswag}"]
        if self.target_loss is not None:
            lines.append(self._target_line())
        if self.checkpoint.exists():
            lines += [f"best model: {self.checkpoint.resolve()}", "to talk to it on your laptop:"]
            lines += [f"  {command}" for command in copy_home_commands(self.checkpoint, self.chat, self.gguf)]
            if ssh_address_is_private():
                lines.append("  (that address is this machine's own, private one, as SSH sees it behind NAT or "
                             "in a container: from your laptop, use the address you connect to)")
        return lines

    def _target_line(self) -> str:
        if self.target is None:
            return f"summary: --target_loss {self.target_loss} not reached"
        step, seconds = self.target
        cost = f", ${seconds / 3600 * self.price_per_hour:,.2f}" if self.price_per_hour is not None else ""
        return (f"summary: --target_loss {self.target_loss} reached at step {step:,}, {human_duration(seconds)} from "
                f"launch{cost}")
