"""Decoding fast on a CPU: the weights laid out as the CPU's kernels read them fastest (bf16 packed for
oneDNN, int8, int4), and a probe that finds which layout is fastest on this CPU (sample.py's --dtype auto).

Decoding one token reads every weight once, so it is bound by memory, or by the arithmetic that turns
fewer bytes back into numbers. Which layout wins depends on the CPU, not on one feature flag
(BENCHMARKS.md, "Decoding": on one AVX2-only CPU bf16 beat int8, on another int4 did). So it is measured,
once per CPU, torch, instruction-set limit and thread count, and kept beside the tokenizer's cache.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cpu_has_fast_bf16, write_json
from model import GPT

# int4's kernel and its packing came in torch 2.6 (pytorch PR 139611); requirements.txt allows 2.4.
INT4 = getattr(torch, "int4", None)  # the label of the int4 layout; torch before 2.5 has no such dtype
HAS_INT4 = INT4 is not None and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
# Most precise first: all four kept fp32's next token on >= 97% of held-out text of a trained model
# (BENCHMARKS.md), so speed decides, and a near tie goes to the more precise one.
LAYOUTS = (torch.float32, torch.bfloat16, torch.int8) + ((INT4,) if HAS_INT4 else ())
# Inputs sharing an int4 scale and offset: with int4 in the output layer too, 32 kept fp32's next token on 97.3%
# of held-out text, 128 on 96.6% (a trained 6-layer model, emulating AVX2).
INT4_GROUP = 32
# What the probe multiplies, each matrix once a pass as decoding does: a sixth of GPT-2 124M, two of its twelve
# blocks (attention in, attention out, MLP in, MLP out) and a sixth of its output layer's rows. Its shapes,
# because the int8 kernel's speed per weight varies with them (emulating AVX2, 0.09 ns on one 16384 x 1024
# matrix, 0.15-0.22 on these); 20.6 M weights, so fp32's 82 MB are past laptops' last-level caches (8-36 MB).
# The other layouts take these shapes in turn until they have read the same 82 MB (_probe_linears).
PROBE_SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072)) * 2 + ((8384, 768),)
# The fastest of three calls: the first also pays for thread start-up and kernel choice. With every layout
# streaming 82 MB, 12 of 12 probes on a quiet machine here were steady, and took 0.12 s (3 calls) or 0.2 s (5).
PROBE_CALLS = 3
# A layout within 5% of the fastest counts as tied, and the more precise one is taken. Emulating AVX2 on a
# quiet machine here, 12 probes put int8/int4 at 1.21-1.36 while decoding ran int4 1.26x faster than int8
# (before every layout streamed the same bytes, 1.06-1.53: at a 10% tie one probe in eight took int8).
# Every layout kept >= 97% agreement with fp32 (BENCHMARKS.md).
PROBE_TIE = 1.05
# A probe counts only if each layout's two fastest calls agree within 25%: on a busy machine a call can wait
# milliseconds for a descheduled thread, and a probe taken so would mislead every later start.
PROBE_STEADY = 1.25
PROBE_FILE = "cpu_probe.json"
# Rows packed at a time into int4 planes: a multiple of the 64 rows aten's int4 packing lays out together (packed
# apart in blocks of 16 or 32 rows, they differ from the whole packed at once; in 64, 128 or 256, they do not).
PLANE_ROWS = 256
# Rows of a matrix quantized as one task (a multiple of PLANE_ROWS and of the int4 packing's 64): GPT-2's output
# layer, a third of its weights, then spreads over every core instead of holding one while the others wait.
QUANTIZE_ROWS = 4096
QUANTIZE_BLOCK = 2**18  # weights quantized at a time: 1 MB of fp32, so its temporaries stay in the L2 cache
# Variables that limit the instruction sets torch's kernels use (BENCHMARKS.md emulates an AVX2 laptop with
# them): a probe taken under other limits says nothing about these.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                 "FBGEMM_ENABLE_INSTRUCTIONS")


# ----------------------------------------------------------------------------------------------------
# Layouts


class PackedLinear(nn.Module):
    """A bf16 Linear whose weight is kept in oneDNN's blocked layout, packed once instead of at every call.

    What torch.compile's CPU freezing pass does to bf16 linears (mkldnn._reorder_linear_weight, then
    mkldnn._linear_pointwise), without compiling: one thread reads the weights about 1.8x faster than
    F.linear on a plain bf16 weight (16 against 8.5 GB/s here), so a 124M token costs 23 ms, not 33.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().bfloat16(), 1))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class Int8Linear(nn.Module):
    """A Linear holding int8 weights, one scale per output row: half of bf16's bytes to read per token.

    Written here rather than taken from torchao: torchao 0.18's int8 linears, run eagerly, turn the whole
    weight back into the activation dtype at every call (they count on torch.compile to fuse that away),
    which makes them slower than bf16 (BENCHMARKS.md). aten's _weight_int8pack_mm (the
    kernel gpt-fast uses, and torch.compile's CPU lowering of int8 weight-only linears) reads the int8
    weight as it multiplies. It takes fp32 activations too, but on x86 only its bf16 path is vectorized
    (aten/src/ATen/native/cpu/int8mm_kernel.cpp: AVX-512 and AVX2 code for bf16, a scalar loop for fp32).
    So activations are bf16 (Arm's NEON kernel takes either).

    The output layer's int8 weights are multiplied faster as two int4 planes where aten's kernels use
    AVX-512 (int8_planes_group): `group` is then the planes' group and `weight`, `scale` are to_planes's.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group: int = 0):
        """weight: int8 (out, in) with its scale (out,), as quantize_rows gives them; or with group, to_planes's."""
        super().__init__()
        self.group = group
        self.register_buffer("weight", weight)  # int8 or packed uint8 buffers stay so under model.to(dtype)
        self.register_buffer("scale", scale)  # floating: follows model.to(dtype), as the kernels want
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))
        if self.group:  # high plane times x plus low plane times x: one call over [x, x]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([x2, x2], 1), self.weight, self.group,
                                                           self.scale)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
        y = y.view(*x.shape[:-1], y.size(-1))
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """A Linear holding int4 weights in groups of INT4_GROUP inputs, each group with a scale and an offset:
    a quarter of bf16's bytes (plus 4 bytes of scale and offset a group).

    aten's _weight_int4pack_mm_for_cpu (torchao's Int4CPULayout, gpt-fast's int4 on CPUs) has AVX2,
    AVX-512 and NEON kernels that multiply across outputs, one input at a time; emulating AVX2 here it
    decoded GPT-2 124M 1.3x faster than int8 (BENCHMARKS.md).
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None):
        """packed, scales_and_zeros: as quantize_groups gives them."""
        super().__init__()
        self.register_buffer("weight", packed)  # uint8 (out, in / 2): stays so under model.to(dtype)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / group, out, 2), follows model.to(dtype)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.size(-1)), self.weight, INT4_GROUP,
                                                       self.scales_and_zeros)
        y = y.view(*x.shape[:-1], y.size(-1))
        return y if self.bias is None else y + self.bias


def _replace_linears(model: GPT, make) -> GPT:
    """Every nn.Linear, the output head included, swapped for make(linear). The head is a third of
    GPT-2 124M's weights, so it counts; the token embedding keeps its own tensor for lookups (one row
    a token), so the two are no longer tied."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    return model.eval()


def pack_bf16(model: GPT) -> GPT:
    """The model in bf16 with every Linear a PackedLinear (CPUs whose oneDNN has fast bf16 only)."""
    return _replace_linears(model.to(torch.bfloat16), lambda linear: PackedLinear(linear.weight, linear.bias))


def quantize_int8(model: GPT) -> GPT:
    """The model with every Linear an Int8Linear (the output layer as int8_planes_group says), run in bf16.

    Weights are quantized from what the model holds (fp32 from a checkpoint), not from a bf16 copy.
    """
    return _quantize(model, lambda m: False)


def quantize_int4(model: GPT) -> GPT:
    """The model with its blocks' Linears Int4Linear and its head Int8Linear, run in bf16.

    The head stays int8: int4 there too kept fp32's next token on 97.3% of held-out text, against 98.2%
    (a trained 6-layer model, BENCHMARKS.md). A Linear whose shape the kernel cannot take (outputs not a
    multiple of 16, inputs not of INT4_GROUP) stays int8 as well.
    """
    return _quantize(model, lambda m: m is not model.lm_head and m.out_features % 16 == 0
                     and m.in_features % INT4_GROUP == 0)


def _quantize(model: GPT, int4) -> GPT:
    """Every Linear quantized, Int4Linear where int4(linear) says so and Int8Linear elsewhere, in pieces of
    QUANTIZE_ROWS rows, the largest first, on _one_thread_each's threads; then the rest of the model in bf16,
    the kernels' activations."""
    def layout(m: nn.Linear) -> tuple[bool, int]:  # int4?, and for int8 the planes' group (0: the int8 kernel)
        is_int4 = int4(m)
        return is_int4, 0 if is_int4 else int8_planes_group(m.weight.shape, output_layer=m is model.lm_head)

    def quantize(piece: tuple[nn.Linear, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (is_int4, group), rows = layouts[piece[0]], piece[1]
        if is_int4:
            return quantize_groups(rows)
        return to_planes(*quantize_rows(rows), group) if group else quantize_rows(rows)

    linears = sorted((m for m in model.modules() if isinstance(m, nn.Linear)), key=lambda m: -m.weight.numel())
    layouts = {m: layout(m) for m in linears}
    pieces = [(m, rows) for m in linears for rows in m.weight.detach().split(QUANTIZE_ROWS)]
    parts = {m: [] for m in linears}
    for (m, _), part in zip(pieces, _one_thread_each(quantize, pieces)):
        parts[m].append(part)

    def whole(m: nn.Linear) -> nn.Module:
        (is_int4, group), weights, scales = layouts[m], *zip(*parts[m])
        # The int4 kernel's scales are (groups, out, 2), int8's (out,): joined along the outputs either way.
        weight, scale = torch.cat(weights), torch.cat(scales, dim=1 if is_int4 or group else 0)
        return Int4Linear(weight, scale, _bias(m)) if is_int4 else Int8Linear(weight, scale, _bias(m), group)

    return _replace_linears(model, whole).to(torch.bfloat16)


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of INT4_GROUP inputs (each group's range cut in 16 steps), packed for
    _weight_int4pack_mm_for_cpu, which computes (q - 8) * scale + zero."""
    w = weight.detach().float()
    groups = w.view(w.size(0), -1, INT4_GROUP)
    low = groups.amin(-1, keepdim=True)  # amin and amax: 4x faster than aminmax over 32 (torch 2.14)
    scale = groups.amax(-1, keepdim=True).sub_(low).div_(15).clamp_(min=1e-8)
    q = (groups - low).div_(scale).round_().clamp_(0, 15).to(torch.int32).view(w.shape)
    scales_and_zeros = torch.cat([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros


def _bias(m: nn.Linear) -> torch.Tensor | None:
    return None if m.bias is None else m.bias.detach().clone()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row (its largest |weight| becomes 127), a block of rows at a time:
    each block's fp32 temporaries stay in the cache rather than making fresh 100 MB ones."""
    w = weight.detach().float()
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(len(w))
    step = max(1, QUANTIZE_BLOCK // w.size(1))
    for i in range(0, len(w), step):
        block = w[i:i + step]
        block_scale = torch.linalg.vector_norm(block, float("inf"), dim=1).clamp_(min=1e-8).div_(127)
        scale[i:i + step] = block_scale
        q[i:i + step] = torch.div(block, block_scale[:, None]).round_()
    return q, scale


def int8_planes_group(shape: torch.Size, output_layer: bool) -> int:
    """The group size for multiplying int8 weights of this (out, in) shape as two int4 planes, or 0 for
    aten's int8 kernel.

    Each int8 weight q is 16 * hi + lo, hi in -8..7 and lo in 0..15, so W x = 16 (Hi x) + (Lo x): aten's
    int4 kernel computes both in one call over [x, x], the same products as the int8 kernel's, from the same
    bytes. The planes are faster than the int8 kernel with AVX-512 and slower with AVX2 only (BENCHMARKS.md),
    so only where aten's kernels use AVX-512; Arm keeps its NEON int8 kernel. Only for the output layer,
    which generate() multiplies by the last position alone: the blocks' Linears also take whole prompts,
    where the planes' double arithmetic is slower.
    The kernel wants outputs in multiples of 16 and groups of 32 to 256 inputs that keep to one plane; the
    largest group was fastest.
    """
    if not output_layer or not HAS_INT4 or torch.backends.cpu.get_cpu_capability() != "AVX512" or shape[0] % 16:
        return 0
    return next((g for g in (256, 128, 64, 32) if shape[1] % g == 0), 0)


def to_planes(q: torch.Tensor, scale: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights q (out, in) with their scale (out,) as the int4 kernel's packed [Hi | Lo] (out, 2 in) and
    its scales and offsets: (hi_q - 8) * 16 scale + 0 is 16 hi scale, (lo - 8) * scale + 8 scale is lo scale.
    Packed PLANE_ROWS rows at a time, so the int32 the packing wants stays small."""
    packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.cat([(rows >> 4) + 8, rows & 15], dim=1).to(torch.int32), 1)  # q >> 4 is floor(q / 16)
        for rows in q.split(PLANE_ROWS)])
    s = scale.float()[:, None].expand(-1, q.size(1) // group)
    scales = torch.cat([16 * s, s], dim=1)
    offsets = torch.cat([torch.zeros_like(s), 8 * s], dim=1)
    return packed, torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous()


def _one_thread_each(fn, items: list) -> list:
    """[fn(item) for item in items] on a Python thread per core, torch itself on one thread: quantizing is
    hundreds of small ops, after each of which torch's own threads would wait for one another, longest
    where other work shares the cores (GPT-2 124M, two cores shared: 0.6 s this way, 1.85 s that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)


def to_layout(model: GPT, dtype: torch.dtype) -> GPT:
    """The model laid out for decoding on this CPU: int4 or int8 weights with bf16 activations; bf16 packed
    for oneDNN where its bf16 is fast, else plain bf16 (aten's kernels); or fp32."""
    if dtype == INT4:
        return quantize_int4(model)
    if dtype == torch.int8:
        return quantize_int8(model)
    if dtype == torch.bfloat16 and cpu_has_fast_bf16():
        return pack_bf16(model)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------
# Which layout is fastest here: probed once, then read from the cache


def fastest_layout(cache_dir: Path, note=None) -> torch.dtype:
    """The layout decoding runs fastest in on this CPU: probed on first use (~0.12 s), then read from
    cache_dir/cpu_probe.json, keyed by what the kernels' speed depends on (probe_key).

    A machine too busy to measure gets fp32, the most precise, for this start, and no probe is kept:
    runs keep giving the same sample for a seed until a steady probe is, rather than following noise.
    note(why) is told why, when that happens.
    """
    path, key = Path(cache_dir) / PROBE_FILE, probe_key()
    probes = read_probes(path)
    if not _valid(probes.get(key)):
        why = "this CPU was too busy to time them (more threads wanted to run than it has cores)" if _busy() else None
        ns_per_weight, steady = probe() if why is None else (None, False)
        if not steady:
            if note is not None:
                note(why or "their timings on this CPU were not steady (other work was running)")
            return LAYOUTS[0]
        probes[key] = ns_per_weight
        write_probes(path, probes)
    return getattr(torch, choose(probes[key]))


def _busy() -> bool:
    """Whether more threads wanted to run than there are cores, this past minute: then each of torch's
    parallel steps can wait milliseconds for a descheduled thread, evenly enough to look steady (two
    threads on two cores shared with other work: every layout 2.5-3 ns a weight, against 0.1-0.3)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # Windows has no load average
        return False


def probe_key() -> str:
    """The CPU, torch and the instruction sets it may use, oneDNN's bf16, and the threads."""
    parts = [f"{platform.machine()} {cpu_name()}", f"torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"
             + (" oneDNN-bf16" if cpu_has_fast_bf16() else ""), f"{torch.get_num_threads()} threads",
             *(f"{name}={os.environ[name]}" for name in ISA_VARIABLES if name in os.environ)]
    return "; ".join(parts)


def cpu_name() -> str:
    """The CPU's model ("model name" on x86 Linux, the part number on Arm Linux), else what platform knows."""
    with contextlib.suppress(OSError):  # no /proc: macOS, Windows
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "CPU part")):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@torch.inference_mode()
def probe() -> tuple[dict[str, float | None], bool]:
    """Nanoseconds per weight of a pass over PROBE_SHAPES in each layout (None for a layout this torch
    cannot run here), and whether the machine held steady (PROBE_STEADY). The layouts take turns
    (A, B, C, A, ...), so a burst of other work slows each alike, and each keeps its fastest pass."""
    # One buffer, PROBE_SHAPES's fp32 bytes, seen as each dtype: 0x3C3C3C3C as fp32 and 0x3C3C as bf16 are
    # ~0.0115, 0x3C as int8 is 60, so no NaN or denormal slows a kernel.
    raw = torch.full((sum(n * k for n, k in PROBE_SHAPES) * 4,), 0x3C, dtype=torch.uint8)
    passes, weights = {}, {}
    for dtype in LAYOUTS:
        with contextlib.suppress(RuntimeError):  # e.g. a oneDNN that cannot pack bf16 on this CPU after all
            passes[dtype], weights[dtype] = _probe_linears(dtype, raw)
    calls = {dtype: [] for dtype in passes}  # seconds a pass
    for _ in range(PROBE_CALLS):
        for dtype, linears in passes.items():
            with contextlib.suppress(RuntimeError):
                calls[dtype].append(_seconds(linears))
    fastest = {dtype: sorted(seconds)[:2] for dtype, seconds in calls.items() if seconds}
    steady = all(len(two) == 2 and two[1] <= PROBE_STEADY * two[0] for two in fastest.values())
    ns = {_name(dtype): fastest[dtype][0] / weights[dtype] * 1e9 if dtype in fastest else None for dtype in LAYOUTS}
    return ns, steady


def _probe_linears(dtype: torch.dtype, raw: torch.Tensor) -> tuple[list[tuple], int]:
    """(linear, input) for PROBE_SHAPES's matrices in turn, as many as raw's bytes hold in layout `dtype`
    (for int4, the output layer's share in int8, as to_layout does), and the weights they hold.

    Every layout streams the same bytes: with a sixth of the model each, int8's and int4's 20 and 10 MB
    stayed in this machine's cache between passes, and the probe put int8 at half the time a weight it
    took while decoding (emulating AVX2: 0.057 against 0.115 ns) and chose it over int4, which decoded
    1.26x faster."""
    out, start, weights = [], 0, 0
    for i in itertools.cycle(range(len(PROBE_SHAPES))):
        (n, k), head = PROBE_SHAPES[i], i == len(PROBE_SHAPES) - 1  # the last: the output layer's share
        kind = torch.int8 if dtype == INT4 and head else dtype
        size = n * k // 2 if kind == INT4 else n * k * kind.itemsize
        if start + size > raw.numel():
            return out, weights
        region, start, weights = raw[start:start + size], start + size, weights + n * k
        x = torch.ones(1, k, dtype=torch.float32 if kind == torch.float32 else torch.bfloat16)
        if kind == INT4:
            scales_and_zeros = torch.full((k // INT4_GROUP, n, 2), 1e-3, dtype=torch.bfloat16)
            out.append((Int4Linear(region.view(n, k // 2), scales_and_zeros, None), x))
            continue
        weight = region.view(kind).view(n, k)
        if kind == torch.int8 and (group := int8_planes_group(weight.shape, output_layer=head)):  # bytes as planes
            planes_scales = torch.full((2 * k // group, n, 2), 1e-3, dtype=torch.bfloat16)
            linear = Int8Linear(region.view(n, k), planes_scales, None, group)
        elif kind == torch.int8:
            linear = Int8Linear(weight, torch.full((n,), 1e-3, dtype=torch.bfloat16), None)
        elif kind == torch.bfloat16 and cpu_has_fast_bf16():
            linear = PackedLinear(weight, None)
        else:
            linear = partial(F.linear, weight=weight)
        out.append((linear, x))


def _seconds(linears: list[tuple]) -> float:
    t0 = time.perf_counter()
    for linear, x in linears:
        linear(x)
    return time.perf_counter() - t0


def choose(ns_per_weight: dict[str, float | None]) -> str:
    """The most precise layout within PROBE_TIE of the fastest."""
    timed = {name: t for name, t in ns_per_weight.items() if t is not None}
    fastest = min(timed.values())
    return next(name for name in map(_name, LAYOUTS) if name in timed and timed[name] <= PROBE_TIE * fastest)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _valid(entry) -> bool:
    """A probe as probe() returns it (a damaged or hand-edited cache is probed again, not trusted)."""
    return (isinstance(entry, dict) and set(entry) == set(map(_name, LAYOUTS))
            and all(t is None or isinstance(t, (int, float)) and t > 0 for t in entry.values())
            and any(t is not None for t in entry.values()))


def read_probes(path: Path) -> dict:
    try:
        probes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: probe again
        return {}
    return probes if isinstance(probes, dict) else {}


def write_probes(path: Path, probes: dict) -> None:
    with contextlib.suppress(OSError):  # a read-only home: probe again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, probes)
