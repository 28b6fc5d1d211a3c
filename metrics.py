"""What a training run records: its header (git revision, versions, flags), metrics.jsonl, loss.png, and
optionally Weights & Biases.

Rank 0 writes all of it. Every row of metrics.jsonl is a JSON object: the first records the header, then a
row per logged step (loss, lr, gradient norm, tokens/s, MFU, cost), per evaluation, and the plan.
"""
from __future__ import annotations

import contextlib
import functools
import json
import subprocess
from pathlib import Path

import torch
from tqdm import tqdm

from common import SaveError, atomic_write, first_line
from runtime import Env


@functools.lru_cache(maxsize=1)  # asked for the header printed and the one logged: run git once
def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("+uncommitted" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_header(env: Env, flags: dict) -> dict:
    """Everything needed to trace a figure back to what produced it (llm.c and modded-nanogpt log the same)."""
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else env.device.type
    return {"git": git_revision(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device_name, "world_size": env.world,
            "amp": str(env.amp_dtype).replace("torch.", "") if env.amp_dtype else "fp32",
            "compile": env.compile, "args": flags}


def print_header(env: Env, flags: dict, notes: list[str]) -> None:
    header = run_header(env, flags)
    tqdm.write(f"train_gpt2.py at git {header['git']}, torch {header['torch']} (CUDA {header['cuda']}), "
               f"device {header['device']} × {env.world}, {header['amp']}, compile {env.compile}")
    tqdm.write("config: " + " ".join(f"{k}={v}" for k, v in flags.items()))
    for note in notes:
        tqdm.write(f"note: {note}")


class Metrics:
    """metrics.jsonl (one JSON object a line) and loss.png in the save directory; with a `wandb_project`,
    every row with a step also goes to Weights & Biases (the flags as the run's config)."""

    def __init__(self, save_dir: Path, resume_step: int | None, wandb_project: str | None = None,
                 config: dict | None = None, enabled: bool = True):
        """enabled=False (ranks other than 0): logs, plots and writes nothing."""
        self.path = save_dir / "metrics.jsonl"
        self.plot_path = save_dir / "loss.png"
        self.rows = []
        self.enabled, self.wandb, self.said_no_plot = enabled, None, False
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Keep the curve continuous: drop what the interrupted run logged past the resumed step.
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines())
                         if r.get("step", 0) <= resume_step]
        with writing(self.path), atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.wandb = start_wandb(wandb_project, save_dir, config or {}) if wandb_project else None

    def log(self, **row):
        if not self.enabled:
            return
        self.rows.append(row)
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None and "step" in row:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                           step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def plot(self):
        if not self.enabled:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the picture is optional; metrics.jsonl has the numbers
            if not self.said_no_plot:
                tqdm.write(f"note: no {self.plot_path.name} without matplotlib (pip install matplotlib); "
                           f"{self.path.name} has every figure")
                self.said_no_plot = True
            return
        hellaswag = [(r["step"], r["hellaswag_acc_norm"]) for r in self.rows if "hellaswag_acc_norm" in r]
        fig, axes = plt.subplots(1, 2 if hellaswag else 1, figsize=(14 if hellaswag else 8, 5), squeeze=False)
        ax = axes[0][0]
        for key, label in (("train_loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in self.rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set(xlabel="step", ylabel="loss")
        ax.legend()
        ax.grid(alpha=0.3)
        if hellaswag:
            right = axes[0][1]
            right.plot(*zip(*hellaswag), marker="o", color="tab:green")
            right.set(xlabel="step", ylabel="HellaSwag acc_norm", title="HellaSwag (random guessing: 0.25)")
            right.grid(alpha=0.3)
        try:
            with writing(self.plot_path), atomic_write(self.plot_path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        finally:
            plt.close(fig)


@contextlib.contextmanager
def writing(path: Path):
    """Inside: writing `path`; the folder failing (full, removed, replaced by a file) is a SaveError, one line."""
    try:
        yield
    except OSError as e:
        raise SaveError(path, e) from None


def start_wandb(project: str, save_dir: Path, config: dict):
    """A Weights & Biases run (its files under save_dir/wandb), or None with one line when wandb is not
    installed or will not start: the training goes on either way."""
    try:
        import wandb
    except ImportError:
        tqdm.write("note: --wandb: wandb is not installed (pip install wandb); metrics.jsonl has every figure")
        return None
    try:
        return wandb.init(project=project, config=json.loads(json.dumps(config, default=str)), dir=str(save_dir))
    except Exception as e:  # a login or network problem; wandb raises many types
        tqdm.write(f"note: --wandb: Weights & Biases did not start ({type(e).__name__}: {first_line(e)}); "
                   "metrics.jsonl has every figure")
        return None
