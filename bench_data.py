"""How soon a run's first step comes, against how much data it reads and where the data comes from: local text once
and many times over, and FineWeb's pre-tokenized shards downloaded from a stand-in for the Hub on this machine.

    python bench_data.py --text DIR --repeat 1,80   # a tiny model on DIR's text, and on 80 copies of it
    python bench_data.py --shards 3                 # 3 training shards of 100 M tokens, through 127.0.0.1
    python bench_data.py --shards 1 --link_mb_s 5   # ... through a link of 5 MB/s

For each case: seconds from launch to the run's first step (train_gpt2.py, the data preparing behind it), and the
seconds `python data.py` takes to prepare all of it, as every run took before its first step when it prepared the
data first. Each case gets a data cache of its own. Figures are printed (--json writes them); nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import EOT
from shards import SHARD_TOKENS

REPO = Path(__file__).resolve().parent
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "256", "--batch_size", "8",
        "--max_steps", "3", "--log_interval", "1", "--eval_interval", "1000", "--num_workers", "0", "--device", "cpu"]


def first_step(flags: list[str], folder: Path, env: dict) -> float:
    """Seconds from launching train_gpt2.py to its first step's line in metrics.jsonl."""
    save = folder / "run"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *flags, *TINY, "--save_dir", str(save)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = save / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and any("train_loss" in json.loads(line) for line in metrics.read_text().splitlines()):
            seconds = time.monotonic() - started
            proc.kill()
            proc.wait()
            return seconds
        time.sleep(0.05)
    raise SystemExit(f"train_gpt2.py ended before its first step: {proc.stderr.read()[-2000:]}")


def whole_preparation(flags: list[str], env: dict) -> tuple[float, str]:
    """Seconds `python data.py` takes to prepare (or fetch) all of the data, and its summary line."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "data.py"), *flags], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"data.py failed: {done.stderr[-2000:]}")
    return time.monotonic() - started, done.stdout.strip().splitlines()[-1]


def copies(text: Path, n: int, into: Path) -> Path:
    """`text`'s files n times over (hard links, each a document of its own)."""
    files = [p for p in text.rglob("*") if p.is_file()]
    for k in range(n):
        for f in files:
            target = into / f"copy_{k:04d}" / f.relative_to(text)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
    return into


def local_case(text: Path, n: int, folder: Path, env: dict) -> dict:
    corpus = copies(text, n, folder / "text") if n > 1 else text
    flags = ["--dataset", str(corpus), "--data_cache", str(folder / "first")]
    seconds = first_step(flags, folder, env)
    whole, summary = whole_preparation(["--dataset", str(corpus), "--data_cache", str(folder / "whole")], env)
    return {"case": f"local text x{n}", "first_step_s": seconds, "prepare_all_s": whole, "data": summary}


def shards_case(count: int, folder: Path, env: dict, link_mb_s: float | None) -> dict:
    """`count` training shards of SHARD_TOKENS random tokens (documents of ~1,000 each) and a validation one,
    served by tests/helpers.HubStandIn as kjj0/fineweb10B-gpt2's files (through a link of link_mb_s MB/s)."""
    sys.path.insert(0, str(REPO / "tests"))
    import fineweb
    from helpers import HubStandIn
    from shards import write_shard
    repo = fineweb.PRETOKENIZED[("HuggingFaceFW/fineweb", "sample-10BT")]
    hub_files, rng, documents = folder / "hub", np.random.default_rng(0), 0
    hub_files.mkdir()
    for split, index in [("val", 0), *(("train", i) for i in range(1, count + 1))]:
        tokens = rng.integers(0, EOT, SHARD_TOKENS, dtype=np.uint16)
        tokens[::1000] = EOT  # a document opens every 1,000 tokens
        documents += SHARD_TOKENS // 1000 if split == "train" else 0
        write_shard(hub_files / repo.file(split, index), [tokens])
    hub = HubStandIn({repo.repo_id: hub_files}, bytes_per_s=link_mb_s * 1e6 if link_mb_s else None)
    try:
        hub_env = {**env, **hub.env()}
        flags = ["--dataset", "HuggingFaceFW/fineweb", "--subset", "sample-10BT", "--sample_size", str(documents)]
        seconds = first_step([*flags, "--data_cache", str(folder / "first")], folder, hub_env)
        whole, summary = whole_preparation([*flags, "--data_cache", str(folder / "whole")], hub_env)
    finally:
        hub.close()
    link = f", {link_mb_s:g} MB/s" if link_mb_s else ""
    return {"case": f"FineWeb shards x{count} (loopback{link})", "first_step_s": seconds, "prepare_all_s": whole,
            "data": summary}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, default=None, help="a directory of local text")
    p.add_argument("--repeat", default="1,80", help="how many copies of --text each case reads (default %(default)s)")
    p.add_argument("--shards", type=int, default=0, help="also: this many FineWeb shards through a stand-in Hub")
    p.add_argument("--link_mb_s", type=float, default=None, help="the stand-in Hub's link, in MB/s (default: loopback)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        cases = [(n, Path(tmp) / f"local{n}") for n in map(int, args.repeat.split(","))] if args.text else []
        for n, folder in cases:
            folder.mkdir()
            results.append(local_case(args.text, n, folder, env))
            print(f"{results[-1]['case']}: first step after {results[-1]['first_step_s']:.1f} s; preparing all of "
                  f"it takes {results[-1]['prepare_all_s']:.1f} s ({results[-1]['data']})", flush=True)
        if args.shards:
            folder = Path(tmp) / "shards"
            folder.mkdir()
            results.append(shards_case(args.shards, folder, env, args.link_mb_s))
            print(f"{results[-1]['case']}: first step after {results[-1]['first_step_s']:.1f} s; fetching all of "
                  f"it takes {results[-1]['prepare_all_s']:.1f} s ({results[-1]['data']})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
