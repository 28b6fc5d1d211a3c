"""Measure speed and cost: training throughput (tokens/s, MFU, memory), the training loop itself, the optimizer
step, CPU decoding and tokenizing; and, apart from speed, the validation loss recipes reach per step.

    python bench.py                                   # GPT-2 124M, T=1024, on this machine's GPU
    python bench.py --vary compile=on,off --vary micro_batch=16,32,64 --also arch=gpt2,optimizer=adamw
    python bench.py --loop                            # train_gpt2.py end to end, against the table's figure
    python bench.py --decode --tokenize               # the CPU side: sample.py vs transformers, data.py vs tiktoken
    python bench.py --tiny --loop --decode --tokenize # seconds on a CPU (the smoke test CI runs)
    python bench.py --update                          # the optimizer step: operators, Newton-Schulz FLOPs, save stall
    python bench.py --recipes --train_flags "..."     # not speed: validation loss per step of whole runs
    python bench.py --budgets 3m,10m --train_flags "..."  # what --time chooses, against a grid of depths

Figures are printed (and with --json written as one JSON object); nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cpu_decoding
import flags as F
import runtime
import shards
import sources
import step as S
import tokenizer
from checkpoint import save_checkpoint
from common import EOT, ArgumentParser, UserError, atomic_write, pick_device
from metrics import run_header
from model import GPT, GPTConfig
from optim import split_parameters
from plan import peak_flops
from startup import optimizer_settings

REPO = Path(__file__).resolve().parent
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)


@dataclasses.dataclass
class Setting:
    """One training configuration to time."""
    arch: str = F.DEFAULT_ARCH  # train_gpt2.py's defaults
    optimizer: str = F.DEFAULT_OPTIMIZER
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    micro_batch: int = 16  # sequences per step, per GPU (train_gpt2.py's --batch_size over GPUs and accumulation)
    compile: bool = True
    amp: bool = True

    def label(self) -> str:
        return (f"{self.arch} {self.optimizer} L{self.n_layer} C{self.n_embd} T{self.block_size} B{self.micro_batch} "
                f"{'compile' if self.compile else 'eager'} {'bf16' if self.amp else 'fp32'}")


SETTING_TYPES = {"int": int, "bool": lambda v: v.lower() in ("1", "on", "true", "yes"), "str": str}


def parse_variant(text: str) -> tuple[str, list]:
    key, _, values = text.partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(Setting)}
    if key not in fields or not values:
        raise argparse.ArgumentTypeError(f"--vary takes KEY=V1,V2 with KEY one of {', '.join(fields)}")
    return key, [SETTING_TYPES[fields[key]](v) for v in values.split(",")]


def parse_also(text: str) -> dict:
    """--also KEY=V,KEY=V: one setting with each KEY changed from the base."""
    fields = {f.name: f.type for f in dataclasses.fields(Setting)}
    pairs = [part.partition("=") for part in text.split(",")]
    if not all(sep and key in fields for key, sep, _ in pairs):
        raise argparse.ArgumentTypeError(f"--also takes KEY=V,KEY=V with each KEY one of {', '.join(fields)}")
    return {key: SETTING_TYPES[fields[key]](value) for key, _, value in pairs}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_training(s: Setting, steps: int, warmup: int, device: torch.device) -> dict:
    """An optimizer step, exactly as train_gpt2.py builds and runs it (and as --plan times it), on random tokens.

    Peak memory: CUDA's allocator peak on a GPU; on the CPU, the process's peak resident memory above
    what it held before the model was built (meaningful because each setting runs in its own process).
    """
    resident_before = resident_bytes() if device.type == "cpu" else 0
    config = GPTConfig.from_preset(s.arch, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                   block_size=s.block_size)
    amp, _ = runtime.choose_amp(s.amp, device.type)
    env = runtime.Env(device=device, amp_dtype=amp if s.amp else None, compile=s.compile)
    settings = optimizer_settings(F.parse_args(["--optimizer", s.optimizer]), None)  # the flags' defaults
    t = S.build(config, env, settings, seed=0)
    step_s = S.time_random_steps(t, env, s.micro_batch, 1, s.block_size, steps=steps, warmup=warmup)
    tokens_per_s = s.micro_batch * s.block_size / step_s
    peak = peak_flops(device)
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(device)
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident_before
    return {"setting": s.label(), **dataclasses.asdict(s), "ms_per_step": step_s * 1e3,
            "tokens_per_s": tokens_per_s, "params": t.raw_model.num_params(),
            "mfu": tokens_per_s * t.raw_model.flops_per_token(s.block_size) / peak if peak else None,
            "peak_memory_gib": peak_memory / 2**30}


def time_training_alone(s: Setting, steps: int, warmup: int, device: torch.device) -> dict:
    """time_training in a fresh process, so no setting inherits another's memory, compiled code or caches."""
    cmd = [sys.executable, str(REPO / "bench.py"), "--device", device.type, "--steps", str(steps),
           "--warmup", str(warmup), "--one_setting", json.dumps(dataclasses.asdict(s))]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"error: timing {s.label()} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def write_report(path: Path | None, report: dict) -> None:
    """--json, rewritten whole (atomically) each time a figure is added."""
    if path is not None:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2, default=str))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
    """columns: (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def write_random_corpus(directory: Path, n_words: int, seed: int = 0) -> Path:
    """Text of random lowercase words (varied tokens, so the loop sees real token ids), 200 words a file."""
    import random
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(0, n_words, 200):
        (directory / f"{i // 200:07d}.txt").write_text(" ".join(rng.choices(words, k=200)) + ".")
    return directory


def time_loop(s: Setting, steps: int, warmup: int, device: torch.device) -> dict:
    """train_gpt2.py itself, end to end on generated text, read back from its metrics.jsonl."""
    log_every = max(1, min(10, steps // 4))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Random letter strings are several tokens a word, so words = tokens / 2 leaves room to spare;
        # at least 200 documents, so the 5% validation split has some.
        needed = (warmup + steps + 4) * s.micro_batch * (s.block_size + 1) // 2
        write_random_corpus(tmp / "text", max(needed, 40_000))
        cmd = [sys.executable, str(REPO / "train_gpt2.py"), "--dataset", str(tmp / "text"),
               "--data_cache", str(tmp / "cache"), "--save_dir", str(tmp / "run"), "--arch", s.arch,
               "--optimizer", s.optimizer,
               "--n_layer", str(s.n_layer), "--n_head", str(s.n_head), "--n_embd", str(s.n_embd),
               "--block_size", str(s.block_size), "--batch_size", str(s.micro_batch), "--max_steps",
               str(warmup + steps), "--warmup_steps", "10", "--log_interval", str(log_every),
               "--eval_interval", "1000000", "--checkpoint_interval", "1000000", "--eval_iters", "1",
               "--compile" if s.compile else "--no-compile", "--amp" if s.amp else "--no-amp",
               "--device", device.type, "--val_split", "0.05", "--num_workers", "2"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"error: train_gpt2.py failed in the loop benchmark:\n{run.stderr[-3000:]}")
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] - log_every >= warmup]
    if not timed:
        raise SystemExit("error: the loop benchmark logged no step after warm-up; raise --steps")
    return {"setting": "train_gpt2.py loop: " + s.label(), "tokens_per_s": statistics.median(timed),
            "ms_per_step": s.micro_batch * s.block_size / statistics.median(timed) * 1e3, "windows": len(timed)}


def optimizer_step_operators(optimizers: list) -> dict[str, int]:
    """Operators dispatched by one step of each optimizer: the top-level ones inside its
    `Optimizer.step#...` range in torch's profiler (each a kernel launch, or more, on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for optimizer in optimizers:
            optimizer.step()
    events = prof.events()
    return {e.name.removeprefix("Optimizer.step#"): sum(1 for c in events if c.cpu_parent is not None
                                                         and c.cpu_parent.id == e.id)
            for e in events if e.name.startswith("Optimizer.step#")}


def newton_schulz_flops(muon) -> float:
    """FLOPs of one Muon step's orthogonalisation: per block of r <= c (tall blocks are transposed), each
    of the 5 iterations costs X X^T (2 r r c), b A + c A A (2 r r r) and B X (2 r r c)."""
    from muon import NS_STEPS
    total = 0
    for rows, cols, blocks in muon.block_shapes():
        r, c = sorted((rows, cols))
        total += blocks * NS_STEPS * (4 * r * r * c + 2 * r ** 3)
    return total


def save_stall(t, directory: Path) -> dict:
    """Seconds the training loop stops for one latest.pt: save_checkpoint written in the loop (before),
    against CheckpointWriter.save (after), which copies the state and writes it on a thread."""
    from checkpoint import CheckpointWriter, checkpoint_state
    state = lambda: dict(step=1, optimizer=[o.state_dict() for o in t.optimizers], scaler=None)
    started = time.perf_counter()
    save_checkpoint(directory / "sync.pt", t.raw_model, **state())
    synchronous = time.perf_counter() - started
    writer, stalls = CheckpointWriter(), []
    for _ in range(2):  # the first save also allocates the buffers every later one reuses
        started = time.perf_counter()
        writer.save(directory / "async.pt", checkpoint_state(t.raw_model, **state()))
        stalls.append(time.perf_counter() - started)
        writer.wait()
    return {"file_gb": (directory / "async.pt").stat().st_size / 1e9, "synchronous_save_s": synchronous,
            "background_first_save_stall_s": stalls[0], "background_save_stall_s": stalls[1],
            "background_write_s": time.perf_counter() - started}


def bench_update(tiny: bool) -> dict:
    """The default recipe's optimizer step at GPT-2 124M's shape, on the CPU: operators dispatched per
    step (ours, and torch.optim.Muon's where this torch has it), Newton-Schulz FLOPs against the step's
    forward and backward (arithmetic), and the loop's stall per save of latest.pt."""
    shape = TINY if tiny else dict(n_layer=12, n_head=12, n_embd=768)
    config = GPTConfig.from_preset(F.DEFAULT_ARCH, **{k: shape[k] for k in ("n_layer", "n_head", "n_embd")},
                                   block_size=64)
    env = runtime.Env(device=torch.device("cpu"))
    t = S.build(config, env, optimizer_settings(F.parse_args([]), None), seed=0)
    x = torch.randint(0, config.vocab_size, (1, 65))
    batch = [(x[:, :-1], x[:, 1:])]
    S.train_step(t, batch, env, step=0, seed=0, grad_clip=1.0)  # state exists
    _, loss = t.model(*batch[0])
    loss.backward()
    report = {"layers": config.n_layer, "width": config.n_embd, "operators": optimizer_step_operators(t.optimizers)}
    if hasattr(torch.optim, "Muon"):  # what train_gpt2.py used before muon.py, on the same matrices
        reference = torch.optim.Muon(split_parameters(t.raw_model)["matrices"], lr=0.02, weight_decay=0.05)
        reference.step()  # its state exists too
        report["operators_torch_muon"] = optimizer_step_operators([reference])["Muon.step"]
    muon = t.optimizers[1]
    ns = newton_schulz_flops(muon)
    per_token = t.raw_model.flops_per_token(1024)
    report |= {"newton_schulz_tflop": ns / 1e12,
               "share_of_step_64x1024": ns / (per_token * 64 * 1024),
               "share_of_step_128x128": ns / (t.raw_model.flops_per_token(128) * 128 * 128)}
    with tempfile.TemporaryDirectory(prefix="bench-save-", dir=REPO) as tmp:
        report["save"] = save_stall(t, Path(tmp))
    ops = report["operators"]
    print(f"optimizer step, {config.n_layer} layers x {config.n_embd} ({F.DEFAULT_ARCH}, Muon + AdamW), CPU: "
          f"operators dispatched {sum(ops.values())} ({', '.join(f'{k} {v}' for k, v in ops.items())})"
          + (f"; torch.optim.Muon alone {report['operators_torch_muon']}" if "operators_torch_muon" in report else ""))
    print(f"Newton-Schulz: {report['newton_schulz_tflop']:.2f} TFLOP a step, {report['share_of_step_64x1024']:.1%} of "
          f"a 64 x 1024-token step's forward and backward, {report['share_of_step_128x128']:.1%} of a 128 x 128 one")
    s = report["save"]
    print(f"latest.pt ({s['file_gb']:.2f} GB): the loop stops {s['synchronous_save_s']:.2f} s for a synchronous "
          f"save, {s['background_save_stall_s']:.2f} s with the background writer ({s['background_first_save_stall_s']:.2f} "
          f"s at its first save; it then writes for {s['background_write_s']:.2f} s while training goes on)")
    return report


def bench_tokenize(tiny: bool) -> dict:
    """`python data.py` on local text, process start to manifest, against raw tiktoken over the same text.

    Raw is encode_ordinary_batch on all cores over the documents already in memory (which also warms
    the page cache for the end-to-end run, so both read from memory).
    """
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        text = write_random_corpus(Path(tmp) / "text", 300_000 if tiny else 15_000_000, seed=1)
        docs = [p.read_text(encoding="utf-8") for p in sorted(text.iterdir())]
        started = time.perf_counter()
        tokens = sum(map(len, tokenizer.get_tokenizer().encode_ordinary_batch(docs, num_threads=os.cpu_count())))
        raw_s = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "data.py"), "--dataset", str(text), "--data_cache",
                        f"{tmp}/cache", "--sample_size", str(len(docs)), "--val_split", "0.05"],
                       check=True, capture_output=True)
        e2e_s = time.perf_counter() - started
    tokens += len(docs)  # data.py also writes one separator a document
    result = {"documents": len(docs), "tokens": tokens, "cores": os.cpu_count(),
              "raw_tiktoken_tokens_per_s": tokens / raw_s, "data_py_tokens_per_s": tokens / e2e_s,
              "ratio": raw_s / e2e_s}
    print(f"tokenize {tokens:,} tokens on {os.cpu_count()} cores: raw tiktoken {result['raw_tiktoken_tokens_per_s']:,.0f}"
          f" tokens/s, data.py end to end {result['data_py_tokens_per_s']:,.0f} tokens/s, ratio {result['ratio']:.2f}")
    return result


# The random-weight model the decoding benchmark times (the Hub is unreachable here): GPT2Config's
# defaults are GPT-2 124M; gpt2-medium is the 355M shape.
DECODE_SHAPES = {"gpt2": {}, "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024)}
# As sample.load takes them (int4 where this torch has its kernel).
DECODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8} | (
    {"int4": torch.int4} if cpu_decoding.HAS_INT4 else {})
# A laptop CPU with AVX2 only (no AVX-512, no AMX), emulated: each library that picks its kernels by the CPU
# is held to AVX2 (aten's own kernels, oneDNN, MKL's BLAS, FBGEMM). The cores, caches and memory stay this
# machine's, so this shows which kernels are slow on such a CPU, not that CPU's speed.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
# Prompts for the trained-model agreement figure: openings common in English and in Python's documentation.
QUALITY_PROMPTS = ("The", "In Python,", "To install the package", "This module provides", "Return the")


def _tokens_per_s(run, n_tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    tokens = run()
    elapsed = time.perf_counter() - t0
    assert len(tokens) == n_tokens, f"asked for {n_tokens} tokens, got {len(tokens)}"
    return n_tokens / elapsed, tokens


def _sample_py_once(checkpoint: Path, cache_dir: str) -> tuple[float, float, str]:
    """Seconds from `python sample.py` (default --dtype) starting to its first generated text, and to its exit;
    and the precision it chose (the end of the line it prints first)."""
    prompt = "hi"
    cmd = [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(checkpoint), "--prompt", prompt,
           "--max_tokens", "1", "--stream", "--temperature", "0", "--ignore_eot", "--cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": cache_dir}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, first = b"", None
    while chunk := os.read(proc.stdout.fileno(), 4096):  # the prompt is echoed first; then the token
        out += chunk
        if first is None and len(out) > len(prompt):
            first = time.perf_counter() - t0
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sample.py failed: {proc.stderr.read().decode()[-500:]}")
    return (first if first is not None else total), total, proc.stderr.read().decode().split()[-1]


def _import_torch_s() -> float:
    """Seconds for a bare `python -c "import torch"`: the floor under sample.py's start-up on this machine."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def time_startup(checkpoint: Path, runs: int) -> dict:
    """sample.py's start-up as a new user meets it: a first run in an empty cache directory (it writes the
    tokenizer's cache and probes the CPU for --dtype auto), then `runs` more, as every later start goes;
    each beside a bare `import torch`, taken in turn with them."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        first_run, _, first_dtype = _sample_py_once(checkpoint, cache_dir)
        later, torch_only = [], []
        for _ in range(runs):
            later.append(_sample_py_once(checkpoint, cache_dir))
            torch_only.append(_import_torch_s())
    return {"startup_first_run_s": first_run, "startup_first_run_dtype": first_dtype,
            "startup_first_token_s": statistics.median(t for t, _, _ in later),
            "startup_first_token_s_best": min(t for t, _, _ in later),
            "startup_exit_s": statistics.median(t for _, t, _ in later),
            "startup_dtypes": sorted({dtype for _, _, dtype in later}),
            "startup_import_torch_s": statistics.median(torch_only)}


def memory_bandwidth(tiny: bool) -> float:
    """Bytes/s of one pass reading a tensor far larger than the caches (torch's sum, torch's threads).

    Decoding a token reads every weight once, so this over the bytes of weights bounds tokens/s.
    """
    x = torch.ones((16 if tiny else 256) * 2**20)  # 64 MiB (smoke test) or 1 GiB of fp32
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every tensor but the embeddings, which give one row each.

    A head tied to the token embedding is counted once, as the head (it is read whole).
    """
    tensors = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.Embedding):
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensors[id(t)] = t.numel() * t.element_size()
    return sum(tensors.values())


def argmax_agreement(reference, other, paths: list[list[int]]) -> dict:
    """Teacher-forced on each path: how often `other` picks reference's next token, and reference's top-2
    margin (its two best logits' gap) where it does not, against the median margin."""
    same, margin = [], []
    for path in paths:
        x = torch.tensor([path[:reference.config.block_size]])
        with torch.inference_mode():
            a = reference(x)[0][0, :, :reference.config.vocab_size].float()
            b = other(x)[0][0, :, :reference.config.vocab_size].float()
        same.append(a.argmax(-1) == b.argmax(-1))
        top2 = a.topk(2, dim=-1).values
        margin.append(top2[:, 0] - top2[:, 1])
    same, margin = torch.cat(same), torch.cat(margin)
    return {"agreement": same.float().mean().item(), "positions": len(same),
            "margin_where_differs_max": margin[~same].max().item() if (~same).any() else None,
            "margin_median": margin.median().item()}


def bench_quality(checkpoint: str, data_cache: str | None = None, n_tokens: int = 200, windows: int = 20) -> dict:
    """bf16's and int8's next-token agreement with fp32 on a trained checkpoint (random weights have
    near-ties a trained model has not): teacher-forced on fp32's greedy continuation of each of
    QUALITY_PROMPTS and, with data_cache (a prepared cache of train_gpt2.py), on `windows` block-long
    windows of its held-out text, where a model that has settled into repeating itself cannot flatter
    the figure."""
    import sample

    enc, cpu = tokenizer.get_tokenizer(), torch.device("cpu")
    models = {name: sample.load(checkpoint, cpu, dtype)[0] for name, dtype in DECODE_DTYPES.items()}
    fp32, block = models["fp32"], models["fp32"].config.block_size
    texts = {"greedy": []}
    for prompt in (enc.encode_ordinary(t) for t in QUALITY_PROMPTS):
        n = min(n_tokens, block - len(prompt))
        texts["greedy"].append(prompt + list(fp32.generate(prompt, n, temperature=0, stop_at_eot=False)))
    if data_cache:
        val = shards.TokenShards(data_cache, "val")
        texts["held_out"] = [val.read(i * block, block).astype(int).tolist()
                             for i in range(min(windows, val.num_tokens // block))]
    others = [name for name in DECODE_DTYPES if name != "fp32"]
    report = {f"{name}_{kind}": argmax_agreement(fp32, models[name], paths) for kind, paths in texts.items()
              for name in others}
    report["cpu"] = cpu_decoding.probe_key()
    for kind in texts:
        print(f"trained checkpoint {checkpoint} ({report['cpu']}): next-token agreement with fp32 on "
              f"{'its greedy continuations' if kind == 'greedy' else 'held-out text'} "
              f"({report['bf16_' + kind]['positions']} positions): "
              + ", ".join(f"{name} {report[f'{name}_{kind}']['agreement']:.1%}" for name in others))
    return report


def _alternate(runs: dict, n_tokens: int, rounds: int) -> tuple[dict, dict]:
    """Tokens/s of each run over `rounds` rounds taken in turn (A, B, C, A, B, C), so a noisy neighbour on the
    machine hits each alike; after one untimed warm-up of each (first-call allocations, kernel choice)."""
    speeds, tokens = {name: [] for name in runs}, {}
    for run in runs.values():
        _tokens_per_s(run, n_tokens)
    for _ in range(rounds):
        for name, run in runs.items():
            tps, tokens[name] = _tokens_per_s(run, n_tokens)
            speeds[name].append(tps)
    return speeds, tokens


def bench_decode(tiny: bool = False, shape: str = "gpt2", n_tokens: int = 200, prompt_len: int = 5,
                 rounds: int = 3) -> dict:
    """Greedy tokens/s of transformers (fp32), of model.generate as sample.py runs it (fp32, bf16, int8, int4) and,
    where llama-cpp-python is installed, of llama.cpp on export_gguf.py's files of the same weights (f16, q8_0, q4_0).

    The same random-init GPT-2 weights go through save_pretrained/from_pretrained on every side; medians
    and bests of alternating rounds, the agreement of each dtype with fp32, the memory-bandwidth bound,
    which dtype --dtype auto's probe picks, each side's load time, and sample.py's start-up to its first token.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    import sample
    from export_gguf import LlamaCppProcess

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = (dict(n_layer=TINY["n_layer"], n_head=TINY["n_head"], n_embd=TINY["n_embd"],
                   n_positions=TINY["block_size"]) if tiny else DECODE_SHAPES[shape])
    n_tokens, rounds = (min(n_tokens, 32), 1) if tiny else (n_tokens, rounds)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp, LlamaCppProcess() as llama:  # llama.cpp's child starts if it is used
        GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).eval()
        ours = {name: sample.load(tmp, cpu, dtype)[0] for name, dtype in DECODE_DTYPES.items()}
        checkpoint = Path(tmp) / "model.pt"
        save_checkpoint(checkpoint, ours["fp32"], step=0, val_loss=None)
        load_s = {f"ours_{name}": _load_seconds(lambda d=dtype: sample.load(str(checkpoint), cpu, d)) for name, dtype
                  in DECODE_DTYPES.items()}
        peers, nbytes, peer_figures = llama_cpp_peers(checkpoint, Path(tmp), llama)
        startup = time_startup(checkpoint, runs=1 if tiny else 3)
        prompt = torch.randint(0, 50257, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                  do_sample=False, pad_token_id=EOT)
            return out[0, prompt_len:].tolist()

        runs = {"hf_fp32": run_hf} | {f"ours_{name}": (lambda m=m: list(m.generate(
            prompt, n_tokens, temperature=0, stop_at_eot=False))) for name, m in ours.items()}
        runs |= {name: (lambda path=path: llama.run(path, llama_cpp_greedy, prompt, n_tokens))
                 for name, path in peers.items()}
        speeds, tokens = _alternate(runs, n_tokens, rounds)
    report = {"shape": "tiny" if tiny else shape, "params": ours["fp32"].num_params(), "n_tokens": n_tokens,
              "prompt_len": prompt_len, "rounds": rounds, "threads": torch.get_num_threads(),
              "cpu": cpu_decoding.probe_key(), "load_avg": os.getloadavg(), "peers": list(peers),
              "greedy_fp32_equals_hf": tokens["ours_fp32"] == tokens["hf_fp32"]}
    report |= _probe_figures()
    nbytes |= {name: weight_bytes_per_token(ours["fp32" if name == "hf_fp32" else name.removeprefix("ours_")])
               for name in runs if not name.startswith("llama_")}
    report |= _speed_figures(speeds, nbytes, memory_bandwidth(tiny))
    path = prompt + tokens["ours_fp32"]
    report |= {f"{name}_vs_fp32": argmax_agreement(ours["fp32"], ours[name], [path]) for name in DECODE_DTYPES
               if name != "fp32"}
    report |= {f"{name}_greedy_same_as_fp32": _same_prefix(tokens[name], tokens["ours_fp32"]) for name in peers}
    report |= {f"{name}_load_s": seconds for name, seconds in load_s.items()} | peer_figures
    report |= startup
    _print_decode(report)
    return report


# llama.cpp's types the decoding benchmark runs, each beside sample.py's layout of the same bits (bf16, int8, int4).
LLAMA_CPP_TYPES = ("f16", "q8_0", "q4_0")


def llama_cpp_peers(checkpoint: Path, directory: Path, llama) -> tuple[dict, dict, dict]:
    """llama.cpp on export_gguf.py's files of the checkpoint, one per LLAMA_CPP_TYPES, loaded in `llama`'s process
    (export_gguf.LlamaCppProcess) on torch's thread count: ({run name: file}, {run name: weight bytes a token reads},
    {run name + "_load_s": seconds to load, run name + "_weight_buffers": where llama.cpp put its weights}); empty
    where llama-cpp-python is not installed."""
    try:
        import gguf  # noqa: F401 (export_gguf's)
        import llama_cpp  # noqa: F401 (run in export_gguf.LlamaCppProcess's child)
    except ImportError:
        print("llama-cpp-python or gguf is not installed: no llama.cpp peer (pip install -r requirements-dev.txt)")
        return {}, {}, {}
    import export_gguf
    llama.start()  # its start-up (seconds) beside the exports, not inside the first load's time
    peers, nbytes, figures = {}, {}, {}
    for kind in LLAMA_CPP_TYPES:
        path = directory / f"model-{kind}.gguf"
        tensor_bytes = export_gguf.export(str(checkpoint), path, kind).tensor_bytes
        # Every tensor is read whole per token but the position table (one row); GPT-2's tied token table
        # is read whole as the output layer.
        nbytes[f"llama_{kind}"] = sum(n for name, n in tensor_bytes.items() if name != "position_embd.weight")
        # Read into memory rather than mapped: a load time with the weights read. Its threads as torch's, so both
        # sides use the same cores (llama-cpp-python's default is half the cores); the context the model's.
        load = lambda: llama.load(path, n_ctx=0, n_threads=torch.get_num_threads(), use_mmap=False)
        figures[f"llama_{kind}_load_s"] = _load_seconds(load)
        figures[f"llama_{kind}_weight_buffers"] = load()["weight_buffers"]
        peers[f"llama_{kind}"] = path
    return peers, nbytes, figures


def llama_cpp_greedy(llm, prompt: list[int], n_tokens: int) -> list[int]:
    """n_tokens greedy tokens from llama.cpp as a Python user runs it (llama-cpp-python's generate, its sampler)."""
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n_tokens:
            return out


def _load_seconds(load, rounds: int = 3) -> float:
    """The median of `rounds` loads (the file in the page cache after the first): weights to a model ready to decode."""
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        load()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy continuations share before they part."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _probe_figures() -> dict:
    """A fresh run of --dtype auto's probe (not the cached one): its ns per weight, its time, its pick."""
    t0 = time.perf_counter()
    ns_per_weight, steady = cpu_decoding.probe()
    seconds = time.perf_counter() - t0
    chosen = getattr(torch, cpu_decoding.choose(ns_per_weight))
    auto = next(name for name, dtype in DECODE_DTYPES.items() if dtype == chosen)
    return {"probe_ns_per_weight": ns_per_weight, "probe_steady": steady, "probe_s": seconds, "auto_dtype": auto}


def _speed_figures(speeds: dict, nbytes: dict, bandwidth: float) -> dict:
    """Median and best tokens/s of each run, its speed-up over transformers, and its share of the
    bandwidth bound (nbytes: the weight bytes each run reads a token)."""
    out = {"bandwidth_gb_s": bandwidth / 1e9}
    hf = statistics.median(speeds["hf_fp32"])
    for name, values in speeds.items():
        out |= {f"{name}_tokens_per_s": statistics.median(values), f"{name}_tokens_per_s_best": max(values),
                f"{name}_speedup_vs_hf": statistics.median(values) / hf, f"{name}_weight_mb": nbytes[name] / 1e6,
                f"{name}_bound_tokens_per_s": bandwidth / nbytes[name],
                f"{name}_share_of_bound": statistics.median(values) * nbytes[name] / bandwidth}
    return out


# Each of sample.py's layouts beside llama.cpp's type of the same bits, for the ratio _print_decode gives.
LLAMA_CPP_PEER_OF = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}


def _print_decode(r: dict) -> None:
    print(f"decoding {r['n_tokens']} tokens after {r['prompt_len']}, {r['shape']} shape ({r['params'] / 1e6:.0f}M, "
          f"random weights), CPU, {r['threads']} threads; tokens/s, median (best) of {r['rounds']} alternating rounds;"
          f" bound = memory bandwidth {r['bandwidth_gb_s']:.1f} GB/s / weight bytes per token; CPU: {r['cpu']}; "
          f"load average at the end {' '.join(f'{x:.2f}' for x in r['load_avg'])}")
    labels = {"fp32": "ours fp32", "bf16": "ours bf16", "int8": "ours int8", "int4": "ours int4 (head int8)"}
    rows = [("hf_fp32", "transformers fp32")] + [("ours_" + n, labels[n]) for n in DECODE_DTYPES]
    rows += [(name, f"llama.cpp {name.removeprefix('llama_')}" + (" (head q8_0)" if name == "llama_q4_0" else ""))
             for name in r["peers"]]
    for name, label in rows:
        label += " = auto" if name == "ours_" + r["auto_dtype"] else ""
        load = f", load {r[name + '_load_s']:.2f} s" if name + "_load_s" in r else ""
        print(f"  {label:28s} {r[name + '_tokens_per_s']:7.1f} ({r[name + '_tokens_per_s_best']:.1f})  "
              f"{r[name + '_speedup_vs_hf']:.2f}x  {r[name + '_weight_mb']:6.0f} MB/token, bound "
              f"{r[name + '_bound_tokens_per_s']:.1f}, reached {r[name + '_share_of_bound']:.0%}{load}")
    if r["peers"]:
        where = ", ".join(f"{n.removeprefix('llama_')} {'+'.join(r[n + '_weight_buffers'])}" for n in r["peers"])
        print(f"  llama.cpp without extra buffer types (use_extra_bufts=False, as --no-repack); weights in {where}")
    for ours, theirs in LLAMA_CPP_PEER_OF.items():
        if f"llama_{theirs}" in r["peers"] and f"ours_{ours}_tokens_per_s" in r:
            print(f"  ours {ours} / llama.cpp {theirs}: {r[f'ours_{ours}_tokens_per_s'] / r[f'llama_{theirs}_tokens_per_s']:.2f}x; "
                  f"llama.cpp's greedy tokens equal ours in fp32 for the first {r[f'llama_{theirs}_greedy_same_as_fp32']}")
    agree = ", ".join(f"{n} {r[n + '_vs_fp32']['agreement']:.1%} (fp32's top-2 margin where they differ at most "
                      f"{r[n + '_vs_fp32']['margin_where_differs_max'] or 0:.3f}, median margin "
                      f"{r[n + '_vs_fp32']['margin_median']:.3f})" for n in DECODE_DTYPES if n != "fp32")
    print(f"greedy ours fp32 == transformers: {r['greedy_fp32_equals_hf']}; teacher-forced next-token agreement "
          f"with fp32 on its greedy path: {agree}")
    probe = ", ".join(f"{k} {v:.3f}" if v else f"{k} failed" for k, v in r["probe_ns_per_weight"].items())
    print(f"--dtype auto's probe: {probe} ns per weight, in {r['probe_s'] * 1e3:.0f} ms -> {r['auto_dtype']}"
          f"{'' if r['probe_steady'] else ' (unsteady: the machine was busy; sample.py would not keep it)'}")
    print(f"sample.py (--dtype auto = {'/'.join(r['startup_dtypes'])}), process start to first token: "
          f"{r['startup_first_token_s']:.2f} s median (best {r['startup_first_token_s_best']:.2f}), exit "
          f"{r['startup_exit_s']:.2f} s, bare `import torch` {r['startup_import_torch_s']:.2f} s; first run in an "
          f"empty cache directory (it probes unless the machine is busy) {r['startup_first_run_s']:.2f} s "
          f"({r['startup_first_run_dtype']})")


def bench_hellaswag(tiny: bool, device: torch.device, n_items: int = 200) -> dict:
    """eval.py's HellaSwag scoring of GPT-2 124M (random weights) on generated items (contexts of 28 random
    words, endings of 9): items/s in fp32 and bf16 autocast, and the 10,042 items' time at that pace."""
    import random
    from eval import HELLASWAG_ITEMS, Item, hellaswag_accuracy
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    phrase = lambda n: " ".join(rng.choices(words, k=n)).capitalize() + "."
    n_items = 8 if tiny else n_items
    items = [Item(phrase(28), tuple(phrase(9) for _ in range(4)), rng.randrange(4)) for _ in range(n_items)]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", **({k: TINY[k] for k in ("n_layer", "n_head", "n_embd")} if tiny else {})))
    model = model.to(device).eval()
    report = {"items": n_items, "device": device.type, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        autocast = lambda: torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        hellaswag_accuracy(model, items[:4], device, autocast)  # warm-up: first-call allocations
        t0 = time.perf_counter()
        hellaswag_accuracy(model, items, device, autocast)
        report[f"{name}_items_per_s"] = n_items / (time.perf_counter() - t0)
        report[f"{name}_full_set_minutes"] = HELLASWAG_ITEMS / report[f"{name}_items_per_s"] / 60
    print(f"HellaSwag scoring, {'tiny model' if tiny else 'GPT-2 124M'} on {device.type} ({report['threads']} threads), "
          f"{n_items} items: fp32 {report['fp32_items_per_s']:.2f} items/s ({report['fp32_full_set_minutes']:.0f} min "
          f"for {HELLASWAG_ITEMS:,}), bf16 {report['bf16_items_per_s']:.2f} items/s ({report['bf16_full_set_minutes']:.0f} min)")
    return report


# DCLM's 22 CORE tasks in core.yaml's order, and the shape of their items in GPT-2 tokens (means): kind,
# examples, delimiter, items, options, context, continuation. Measured on llm-foundry's copy of the data
# (scripts/eval/local_data, which DCLM's bundle takes up); the four marked "est." are not stored there.
CORE_SHAPE = {
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", 10042, 4, 50, 22),  # est.
    "jeopardy": ("language_modeling", 10, "\nAnswer: ", 2117, 1, 23, 3),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", 20321, 1, 9, 1),
    "arc_easy": ("multiple_choice", 10, "\nAnswer: ", 2376, 4, 25, 5),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", 1172, 4, 28, 6),
    "copa": ("multiple_choice", 0, " ", 100, 2, 9, 7),
    "commonsense_qa": ("multiple_choice", 10, " ", 1221, 4, 43, 1),
    "piqa": ("multiple_choice", 10, "\nAnswer: ", 1838, 2, 12, 23),
    "openbook_qa": ("multiple_choice", 0, " ", 500, 4, 12, 3),
    "lambada_openai": ("language_modeling", 0, " ", 5153, 1, 82, 1),
    "hellaswag": ("multiple_choice", 10, " ", 10042, 4, 50, 22),  # est.
    "winograd": ("schema", 0, " ", 273, 2, 15, 5),
    "winogrande": ("schema", 0, " ", 1267, 2, 16, 6),
    "bigbench_dyck_languages": ("language_modeling", 10, " ", 1000, 1, 50, 2),
    "agi_eval_lsat_ar": ("multiple_choice", 3, " ", 230, 4, 216, 1),
    "bigbench_cs_algorithms": ("language_modeling", 10, " ", 1320, 1, 40, 1),
    "bigbench_operators": ("language_modeling", 10, " ", 210, 1, 35, 1),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, " ", 32, 1, 27, 16),
    "squad": ("language_modeling", 10, " ", 10570, 1, 175, 4),  # est.
    "coqa": ("language_modeling", 0, " ", 7983, 1, 400, 3),  # est.
    "boolq": ("multiple_choice", 10, "\nAnswer: ", 3270, 2, 136, 1),
    "bigbench_language_identification": ("multiple_choice", 10, " ", 10000, 4, 149, 1),
}


def core_tasks_of_shape(directory: Path, per_task: int) -> list:
    """(eval.Task, its items after the shuffle, the real task's item count) for each task of CORE_SHAPE: its
    examples and `per_task` items more of random one-token words, in jsonl files written to `directory`."""
    import random
    from tokenizer import get_tokenizer
    from eval import Task, read_task
    enc, rng = get_tokenizer(), random.Random(0)
    words = [w for w in map(enc.decode, ([t] for t in range(enc.n_vocab))) if w[:1] == " " and w[1:].isalpha()]
    text = lambda n: "".join(rng.choices(words, k=n)).strip()  # n tokens, give or take the first
    tasks = []
    for label, (kind, shots, delimiter, n, options, context, continuation) in CORE_SHAPE.items():
        fields = {"multiple_choice": lambda: {"query": text(context), "gold": 0,
                                              "choices": [text(continuation) for _ in range(options)]},
                  "schema": lambda: {"context_options": [text(context) for _ in range(options)],
                                     "continuation": text(continuation), "gold": 0},
                  "language_modeling": lambda: {"context": text(context), "continuation": text(continuation)}}[kind]
        path = directory / f"{label}.jsonl"
        path.write_text("".join(json.dumps(fields()) + "\n" for _ in range(shots + per_task)))
        task = Task(label, kind, path, shots, delimiter, 0.0)
        tasks.append((task, read_task(task), n))
    return tasks


def bench_core(tiny: bool, device: torch.device, per_task: int = 3) -> dict:
    """eval.py's CORE scoring of GPT-2 124M (random weights) on generated items of the real bundle's shape:
    `per_task` items of each task timed (prompts built and tokenized, passes of 32 rows at most), in fp32 and
    bf16 autocast; the whole CORE's time is each task's seconds per item times its items, summed."""
    from tokenizer import get_tokenizer
    from eval import batches, encode_options, option_scores
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", **(TINY if tiny else {}))).to(device).eval()
    report = {"device": device.type, "threads": torch.get_num_threads(), "items_per_task": per_task}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = core_tasks_of_shape(Path(tmp), per_task)
    enc = get_tokenizer()
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        autocast = lambda: torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        seconds = tokens = scored = 0.0
        for k, (task, items, n) in enumerate([tasks[0], *tasks]):  # the first once more, untimed: warm-up
            t0 = time.perf_counter()
            encoded = encode_options(enc, task, items, range(per_task), model.config.block_size)
            for batch in batches(sorted(encoded, key=lambda o: -max(map(len, o.rows))), 32):
                with autocast(), torch.no_grad():
                    option_scores(model, batch, device)  # returns Python lists: waits for the device
            if k:
                elapsed = time.perf_counter() - t0
                seconds, scored = seconds + elapsed / per_task * n, scored + elapsed
                tokens += sum(len(row) for o in encoded for row in o.rows)
        report[f"{name}_core_hours"], report[f"{name}_tokens_per_s"] = seconds / 3600, tokens / scored
    print(f"CORE scoring, {'tiny model' if tiny else 'GPT-2 124M'} on {device.type} ({report['threads']} threads), "
          f"{len(tasks)} tasks x {per_task} items: fp32 {report['fp32_tokens_per_s']:,.0f} tokens/s "
          f"({report['fp32_core_hours']:.1f} h for the whole CORE), bf16 {report['bf16_tokens_per_s']:,.0f} "
          f"tokens/s ({report['bf16_core_hours']:.1f} h)")
    return report


# ----------------------------------------------------------------------------------------------------
# Recipes: how much model a number of steps buys, each recipe trained by train_gpt2.py itself

BASELINE = "gpt2-adamw-cosine"
# GPT-2's recipe, what others are held to; at --lr's default, which measured best for AdamW too.
RECIPES = {BASELINE: "--arch gpt2 --optimizer adamw --schedule cosine",
           "default": ""}  # python train_gpt2.py as it comes


# The field's recipe: the default as it was before it took the FineWeb speedrun's pieces (the modern block, tied,
# with plain Muon, its rates warmed up), the default and --arch speedrun, each at every seed; then, at the first
# seed, the default with each piece it took set back in turn, and the speedrun with each of its own architecture
# switches set back.
PREVIOUS_DEFAULT = ("--arch_option tie_embeddings=true --arch_option zero_init=false --muon_iteration newton_schulz "
                    "--no-normuon --no-cautious_weight_decay --adamw_groups one")


def field_recipes(seeds: list[int], max_steps: int) -> dict[str, str]:
    """The recipes of --field, each main one at every seed (named NAME, then NAME-seedS), the ablations at the first;
    the previous default warms its rates up as GPT-2's AdamW does (a tenth of a run of max_steps that is short)."""
    from horizon import fitting_warmup
    from model import ARCH_PRESETS
    from optim import OPTIMIZER_SWITCHES, RECORD_OPTIMIZER
    warmup = f"--warmup_steps {fitting_warmup(None, max_steps)}"
    recipes = {}
    for name, flags in [("previous", f"{PREVIOUS_DEFAULT} {warmup}"), ("default", ""), ("speedrun", "--arch speedrun")]:
        for seed in seeds:
            recipes[name if seed == seeds[0] else f"{name}-seed{seed}"] = f"{flags} --seed {seed}".strip()
    first = f"--seed {seeds[0]}"
    recipes["default-no-untied_head"] = f"--arch_option tie_embeddings=true --arch_option zero_init=false {first}"
    for switch in RECORD_OPTIMIZER:
        off = OPTIMIZER_SWITCHES[switch]
        recipes[f"default-no-{switch}"] = f"--{switch} {off} {first}" if isinstance(off, str) else f"--no-{switch} {first}"
    recipes["default-no-record_warmup"] = f"{warmup} {first}"
    speedrun, modern = ARCH_PRESETS["speedrun"], ARCH_PRESETS["modern"]
    for switch in (k for k in speedrun if speedrun[k] != modern[k] and k != "softcap_form"):
        off = str(modern[switch]).lower() if isinstance(modern[switch], bool) else modern[switch]
        recipes[f"speedrun-no-{switch}"] = f"--arch speedrun --arch_option {switch}={off} {first}"
    return recipes


def field_length(train_flags: str) -> int:
    """--max_steps in --train_flags: --field compares recipes at one length, which sets the previous default's
    warmup."""
    steps = F.parse_args(train_flags.split()).max_steps
    if steps is None:
        raise SystemExit("error: --field compares recipes at one length: give --max_steps in --train_flags")
    return steps


def parse_recipe(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("--recipe takes NAME=FLAGS, e.g. 'muon-lr-0.04=--optimizer muon --muon_lr 0.04'")
    return name, flags


def train_recipe(name: str, flags: str, common: list[str], runs: Path, threads: int) -> dict:
    """One recipe's run (reused when runs/NAME holds a finished one); its validation loss at each evaluation."""
    save = runs / name
    metrics = save / "metrics.jsonl"
    if not (metrics.exists() and "done" in metrics.read_text().splitlines()[-1]):
        import shutil
        shutil.rmtree(save, ignore_errors=True)  # an unfinished run: start it again
        cmd = [sys.executable, str(REPO / "train_gpt2.py"), *common, *flags.split(), "--save_dir", str(save)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise SystemExit(f"error: recipe {name} failed:\n{run.stderr[-3000:]}")
        with open(metrics, "a") as f:
            f.write(json.dumps({"done": True, "seconds": time.perf_counter() - started}) + "\n")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    run = next((r["run"] for r in rows if r.get("event") == "start"), {})
    tokens_per_step = run["batch_size"] * run["config"]["block_size"] if run else None
    paces = sorted(tokens_per_step / r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    return {"recipe": name, "flags": flags, "evals": evals, "final": evals[-1][1], "steps": evals[-1][0],
            "seconds": rows[-1]["seconds"], "sizing": run.get("sizing"),
            "s_per_step": paces[len(paces) // 2] if paces else None}  # the median log interval's


def steps_to(target: float, evals: list[tuple[int, float]]) -> float | None:
    """The step at which the validation loss first reaches `target`, interpolated between evaluations."""
    prev_step, prev_loss = 0, float("inf")
    for step, loss in evals:
        if loss <= target:
            if prev_loss == float("inf"):
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def compare_recipes(recipes: dict[str, str], common: list[str], runs: Path, parallel: int) -> list[dict]:
    """Every recipe on the same data, shape, batch and steps; the baseline first, the others held to its
    final validation loss: the steps each takes to reach it, and the ratio to the baseline's steps."""
    from concurrent.futures import ThreadPoolExecutor
    import data
    data.prepare(sources.DataSpec.from_args(F.parse_args(common)))  # once, before runs in parallel would race to it
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda item: train_recipe(*item, common, runs, threads), recipes.items()))
    base = next((r for r in results if r["recipe"] == BASELINE), results[0])
    for r in results:
        reached = steps_to(base["final"], r["evals"])
        r |= {"steps_to_baseline": reached, "ratio": reached / base["steps"] if reached is not None else None}
        for frac in (0.25, 0.5, 0.75):
            r[f"val_at_{frac:.0%}"] = next((loss for step, loss in r["evals"] if step >= frac * r["steps"]), None)
    print(f"validation loss of each recipe; steps to reach {base['recipe']}'s final {base['final']:.4f}")
    print_table(results, [("recipe", "recipe", "s"), ("val_at_25%", "25%", ".4f"), ("val_at_50%", "50%", ".4f"),
                          ("val_at_75%", "75%", ".4f"), ("final", "final", ".4f"), ("steps", "steps", "d"),
                          ("steps_to_baseline", "steps to base", ".0f"), ("ratio", "ratio", ".2f"),
                          ("s_per_step", "s/step", ".2f"), ("seconds", "seconds", ".0f")])
    return results


TRAIN_COLUMNS = [("setting", "training", "s"), ("tokens_per_s", "tokens/s", ",.0f"), ("ms_per_step", "ms/step", ".1f"),
                 ("mfu", "MFU", ".1%"), ("peak_memory_gib", "peak GiB", ".1f")]


def compare_budgets(budgets: list[str], depths: list[int], common: list[str], runs: Path) -> list[dict]:
    """--budgets: for each budget, train_gpt2.py --time T alone (it chooses the depth) and --time T --depth D for
    each of `depths` (the same rule sizing only D's batch, rates and data), one after another on the whole
    machine, on the same data: each run's final validation loss, its depth, and from outside, the process's
    whole time against the budget."""
    import data
    cache = data.prepare(sources.DataSpec.from_args(F.parse_args(common)))  # once, before any run's clock starts
    rows = []
    for budget in budgets:
        for name, flags in [("chosen", ""), *((f"depth {d}", f"--depth {d}") for d in depths)]:
            label = f"{budget}-{name.replace(' ', '')}"
            r = train_recipe(label, f"--time {budget} {flags}", common, runs, os.cpu_count() or 1)
            rows.append({"budget": budget, "run": name, "final": r["final"], "steps": r["steps"],
                         "depth": r["sizing"]["depth"], "batch": r["sizing"]["batch"], "seconds": r["seconds"],
                         "choosing_s": r["sizing"]["seconds"] if name == "chosen" else None,
                         "same_val": same_validation_loss(runs / label / "model_best_val.pt", cache)})
            print(f"measured: --time {budget} {flags or '(chooses)'}: depth {rows[-1]['depth']}, validation loss "
                  f"{rows[-1]['same_val']:.4f} on {SAME_VAL_TOKENS:,} held-out tokens (in the run: "
                  f"{r['final']:.4f}), {r['steps']} steps, {r['seconds']:.0f} s from launch to exit", flush=True)
    print_table(rows, [("budget", "budget", "s"), ("run", "run", "s"), ("depth", "depth", "d"), ("batch", "batch", "d"),
                       ("steps", "steps", "d"), ("same_val", "val loss", ".4f"), ("final", "in the run", ".4f"),
                       ("seconds", "wall s", ".0f"), ("choosing_s", "choosing s", ".1f")])
    for budget in budgets:
        mine = [r for r in rows if r["budget"] == budget]
        best = min((r for r in mine if r["run"] != "chosen"), key=lambda r: r["same_val"])
        chosen = next(r for r in mine if r["run"] == "chosen")
        print(f"--time {budget}: chose depth {chosen['depth']} at {chosen['same_val']:.4f}; the grid's best, depth "
              f"{best['depth']}, {best['same_val']:.4f}: {chosen['same_val'] - best['same_val']:+.4f}")
    return rows


# The held-out tokens every --budgets run is scored on at the end: a run's own evaluations read --eval_iters
# batches of its own batch, so runs of different batches would be compared on different text.
SAME_VAL_TOKENS = 40_960


def same_validation_loss(checkpoint_path: Path, cache: Path) -> float:
    """A run's best checkpoint scored on SAME_VAL_TOKENS tokens of the validation split, on the CPU: windows of its
    context spread evenly over the split, the same ones for every run of the same context."""
    import eval as scoring
    from checkpoint import load_model
    model, _ = load_model(str(checkpoint_path))
    with torch.inference_mode():
        return scoring.validation_loss(model, shards.TokenShards(cache, "val"), model.config.block_size,
                                       torch.device("cpu"), sample=SAME_VAL_TOKENS // model.config.block_size)["loss"]


def training_speed(base: Setting, settings: list[Setting], steps: int, warmup: int, device: torch.device, *,
                   report: dict, keep, table: bool, loop: bool) -> None:
    """The training table (the base setting, then `settings`), and with `loop` train_gpt2.py's own figure.

    Each figure is printed and kept (keep(report) writes --json) as soon as it is measured, so a run cut
    short (a lent GPU's time running out) keeps what it measured."""
    if table:
        report["train"] = []
        for s in [base, *settings]:
            report["train"].append(time_training_alone(s, steps, warmup, device))
            keep(report)
            print("measured: " + "  ".join(format_cell(report["train"][-1], key, f"{header} {{}}", f)
                                           for key, header, f in TRAIN_COLUMNS[1:]) + f"  ({s.label()})", flush=True)
        print_table(report["train"], TRAIN_COLUMNS)
    if loop:
        report["loop"] = time_loop(base, steps, warmup, device)
        keep(report)
        print(f"{report['loop']['setting']}: {report['loop']['tokens_per_s']:,.0f} tokens/s "
              f"(median of {report['loop']['windows']} logged windows)")
        if table:
            print(f"loop / table: {report['loop']['tokens_per_s'] / report['train'][0]['tokens_per_s']:.1%}")


def format_cell(row: dict, key: str, template: str, f: str) -> str:
    return template.format("-" if row.get(key) is None else format(row[key], f))


def settings_to_run(base: Setting, variants: list[tuple[str, list]], also: list[dict]) -> list[Setting]:
    """Each --vary applied to the base setting one key at a time, then each --also (several keys at once)."""
    out = []
    for key, values in variants:
        out += [dataclasses.replace(base, **{key: v}) for v in values if getattr(base, key) != v]
    return out + [dataclasses.replace(base, **changes) for changes in also]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n")[1])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true", help=f"a tiny model ({TINY}) and few steps: a smoke test")
    p.add_argument("--arch", default=None)
    p.add_argument("--micro_batch", type=int, default=None,
                   help="sequences a step runs at once on each GPU (default 16; 8 with --tiny)")
    p.add_argument("--vary", type=parse_variant, action="append", default=[], metavar="KEY=V1,V2",
                   help="also time the base setting with KEY changed to each value")
    p.add_argument("--also", type=parse_also, action="append", default=[], metavar="KEY=V,KEY=V",
                   help="also time one setting with these keys changed together, e.g. arch=gpt2,optimizer=adamw "
                        "(nanoGPT's recipe, like for like)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; 5 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; 2 with --tiny)")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training table")
    p.add_argument("--loop", action="store_true", help="also time train_gpt2.py end to end")
    p.add_argument("--decode", action="store_true", help="sample.py's CPU decoding against transformers' generate()")
    p.add_argument("--decode_shape", choices=sorted(DECODE_SHAPES), default="gpt2",
                   help="the random-weight model --decode times (default %(default)s, 124M)")
    p.add_argument("--emulate_avx2", action="store_true", help="run as on a laptop CPU with AVX2 only: torch, "
                   "oneDNN, MKL and FBGEMM held to AVX2 (the whole run, restarted with " + " ".join(AVX2_ENV) + ")")
    p.add_argument("--quality", metavar="CHECKPOINT", default=None,
                   help="also measure bf16's, int8's and int4's next-token agreement with fp32 on this trained checkpoint")
    p.add_argument("--quality_data", metavar="CACHE_DIR", default=None,
                   help="with --quality, also on the held-out text of this prepared data cache")
    p.add_argument("--tokenize", action="store_true", help="data.py's preparation against raw tiktoken")
    p.add_argument("--update", action="store_true", help="the optimizer step at 124M on the CPU: operators "
                   "dispatched, Newton-Schulz FLOPs, the loop's stall per save")
    p.add_argument("--hellaswag", action="store_true", help="eval.py's HellaSwag scoring speed, GPT-2 124M")
    p.add_argument("--core", action="store_true", help="eval.py's CORE scoring speed, GPT-2 124M, and the whole CORE's time")
    b = p.add_argument_group("budgets: what --time chooses against a grid of depths (python bench.py --budgets ...)")
    b.add_argument("--budgets", default=None, metavar="T1,T2",
                   help="train --time T alone and with each of --depths, for each budget, on --train_flags' data")
    b.add_argument("--depths", default="2,4,6,12", metavar="D1,D2", help="the grid of depths (default %(default)s)")
    r = p.add_argument_group("recipes: validation loss per step of whole runs (python bench.py --recipes ...)")
    r.add_argument("--recipes", action="store_true", help=f"train {', '.join(RECIPES)} and each --recipe on "
                   "the same data, shape, batch and steps, and compare their validation loss")
    r.add_argument("--recipe", type=parse_recipe, action="append", default=[], metavar="NAME=FLAGS",
                   help="one more recipe: train_gpt2.py flags (e.g. a learning rate to sweep)")
    r.add_argument("--field", action="store_true", help="with --recipes: the field's recipe instead of RECIPES: "
                   "the previous default (" + PREVIOUS_DEFAULT + " and GPT-2's warmup), the default and "
                   "--arch speedrun at each --seeds, "
                   "the default with each piece of the record it took set back, and "
                   "the speedrun with each switch set back to the default's in turn (at the first seed)")
    r.add_argument("--seeds", default="1337,1", help="--field's seeds (default %(default)s)")
    r.add_argument("--only", default=None, help="comma-separated recipe names: run just these")
    r.add_argument("--train_flags", default="", help="flags every recipe gets: data, shape, batch, steps, ...")
    r.add_argument("--runs", type=Path, default=REPO / "runs" / "recipes",
                   help="where each recipe's run is kept; a finished run there is reused, not trained again")
    r.add_argument("--parallel", type=int, default=1, help="recipes trained at once (the cores are shared out)")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    p.add_argument("--one_setting", default=None, help=argparse.SUPPRESS)  # a child of time_training_alone
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        # The limits act only when set before the libraries load: run again, from the start, with them.
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **AVX2_ENV})
    try:
        device = pick_device(args.device)
    except UserError as e:
        p.error(str(e))
    if args.one_setting:
        print(json.dumps(time_training(Setting(**json.loads(args.one_setting)), args.steps, args.warmup, device)))
        return
    on_gpu = device.type == "cuda"
    base = Setting(**(TINY if args.tiny else {}), compile=on_gpu, amp=on_gpu)
    base.micro_batch = args.micro_batch or (8 if args.tiny else 16)
    base.arch = args.arch or base.arch
    steps, warmup = args.steps or (5 if args.tiny else 30), args.warmup or (2 if args.tiny else 10)
    report = {"machine": run_header(runtime.Env(device=device), vars(args))}
    keep = functools.partial(write_report, args.json)
    print(f"bench.py on {report['machine']['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"git {report['machine']['git']}")
    if peak_flops(device):
        print(f"MFU against a dense bf16 peak of {peak_flops(device) / 1e12:.0f} TFLOP/s")
    if (args.train or args.loop) and not (args.recipes or args.budgets):  # those compare quality, not speed
        training_speed(base, settings_to_run(base, args.vary, args.also), steps, warmup, device, report=report,
                       keep=keep, table=args.train, loop=args.loop)
    if args.budgets:
        report["budgets"] = compare_budgets(args.budgets.split(","), [int(d) for d in args.depths.split(",")],
                                            args.train_flags.split(), args.runs)
    if args.recipes:
        recipes = (field_recipes([int(x) for x in args.seeds.split(",")], field_length(args.train_flags))
                   if args.field else RECIPES) | dict(args.recipe)
        if args.only:
            recipes = {k: v for k, v in recipes.items() if k in args.only.split(",")}
        report["recipes"] = compare_recipes(recipes, args.train_flags.split(), args.runs, args.parallel)
    if args.decode:
        try:
            report["decode"] = bench_decode(tiny=args.tiny, shape=args.decode_shape)
        except UserError as e:  # llama.cpp crashed in its process (export_gguf.LlamaCppCrashed)
            keep(report)
            sys.exit(f"error: {e}")
    if args.quality:
        report["quality"] = bench_quality(args.quality, args.quality_data)
    if args.tokenize:
        report["tokenize"] = bench_tokenize(tiny=args.tiny)
    if args.update:
        report["update"] = bench_update(tiny=args.tiny)
    if args.hellaswag:
        report["hellaswag"] = bench_hellaswag(args.tiny, device)
    if args.core:
        report["core"] = bench_core(args.tiny, device, per_task=1 if args.tiny else 3)
    keep(report)


if __name__ == "__main__":
    main()
