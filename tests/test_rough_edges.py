"""The rough edges of issue 37, seen the way a user meets them: the memory a container leaves, durations as
people type them, a mistyped flag, the laptop's install, the modes of exported files, the plan's CPU advice."""
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import budget as B
import checkpoint
import common
import flags as F
import memory as Mem
import model as M
import plan as P

from helpers import REPO, child_env, run_script

GB = 10 ** 9


# ----------------------------------------------------------------------------------------------------
# The memory a container leaves


def fake_machine(tmp_path: Path, membership: str, files: dict[str, str], available_gb: float = 14.2):
    """A /proc and a /sys/fs/cgroup: MemAvailable, the process's cgroup lines, and the cgroup files given."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 23000000 kB\nMemAvailable: {int(available_gb * GB / 1024)} kB\n")
    (proc / "self" / "cgroup").write_text(membership)
    for name, text in files.items():
        (cgroups / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroups / name).write_text(text)
    return proc, cgroups


def test_free_memory_in_a_container_is_its_cgroup_v2_limit_less_what_it_uses_but_not_its_cache(tmp_path):
    proc, cgroups = fake_machine(tmp_path, "0::/docker/abc\n", {
        "docker/abc/memory.max": f"{8 * GB}\n", "docker/abc/memory.current": f"{3 * GB}\n",
        "docker/abc/memory.stat": f"anon {2 * GB}\nactive_file 1\ninactive_file {GB}\n"})
    assert Mem.available_memory(proc, cgroups) == 6 * GB  # 8 - 3, of which 1 is cache the kernel gives back


def test_free_memory_under_cgroup_v1_is_its_limit_less_its_usage(tmp_path):
    proc, cgroups = fake_machine(tmp_path, "12:pids:/x\n4:memory:/docker/abc\n0::/\n", {
        "memory/docker/abc/memory.limit_in_bytes": f"{8 * GB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{5 * GB}\n"})
    assert Mem.available_memory(proc, cgroups) == 3 * GB


def test_a_parents_cgroup_limit_binds_and_without_limits_memavailable_stands(tmp_path):
    proc, cgroups = fake_machine(tmp_path, "0::/user.slice/run.scope\n", {
        "user.slice/memory.max": f"{4 * GB}\n", "user.slice/memory.current": f"{GB}\n",
        "user.slice/run.scope/memory.max": "max\n", "user.slice/run.scope/memory.current": f"{GB}\n"})
    assert Mem.available_memory(proc, cgroups) == 3 * GB
    (cgroups / "user.slice" / "memory.max").write_text("max\n")
    assert Mem.available_memory(proc, cgroups) == int(14.2 * GB / 1024) * 1024


def test_free_memory_under_ulimit_v_is_the_address_space_left():
    # In a child: the limit is set on the process that reads it, as `ulimit -v` sets it on a shell's children.
    code = ("import os, resource, memory; size = int(open('/proc/self/statm').read().split()[0]) * os.sysconf("
            "'SC_PAGE_SIZE'); resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY)); "
            "print(memory.available_memory())")
    result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert 0.5 * 2 ** 30 < int(result.stdout) <= 2 ** 30


# ----------------------------------------------------------------------------------------------------
# Durations and flags as people type them


@pytest.mark.parametrize("text, seconds", [("4min", 240), ("4 min", 240), ("4 mins", 240), ("10 minutes", 600),
                                           ("1h 30m", 5400), ("1 hr 30 min", 5400), ("2 hours", 7200), ("1 hour", 3600),
                                           ("90 sec", 90), ("90 seconds", 90), ("1h 30m 15s", 5415), ("45M", 2700)])
def test_durations_take_the_spellings_people_type(text, seconds):
    assert P.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "4 minz", "30m 1h", "1h 1h", "1h 30", "min", "0m", "-5m", "5 m s"])
def test_a_duration_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        P.parse_duration(text)


def test_the_issues_time_budget_is_accepted_by_the_training_script():
    assert F.parse_args(["--time", "4min", "--device", "cpu"]).time == 240


@pytest.mark.parametrize("script, flags, message", [
    ("train_gpt2.py", ["--batchsize", "8"], "unrecognized arguments: --batchsize 8 (did you mean --batch_size?)"),
    ("train_gpt2.py", ["--batch-size=8", "--lrr", "1"],
     "unrecognized arguments: --batch-size=8 --lrr 1 (did you mean --batch_size for --batch-size, --lr for --lrr?)"),
    ("eval.py", ["--taks", "val"], "unrecognized arguments: --taks val (did you mean --tasks?)"),
    ("sample.py", ["--dtype", "bfloat"], "argument --dtype: invalid choice: 'bfloat' (choose from 'auto', 'float32', "
                                         "'bfloat16', 'int8', 'int4') (did you mean bfloat16?)"),
    ("train_gpt2.py", ["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from 'auto', 'cuda', "
                                           "'cpu', 'mps')"),  # a GPU is no typo of the CPU
])
def test_a_mistyped_flag_or_choice_gets_the_closest_in_its_one_line_error(script, flags, message):
    result = run_script(script, *flags)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{script}: error: {message}", f"{script}: see --help for the flags"]


# ----------------------------------------------------------------------------------------------------
# The files the exports write


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model_best_val.pt"
    checkpoint.save_checkpoint(path, M.GPT(M.GPTConfig.from_preset("gpt2", n_layer=2, n_head=2, n_embd=32,
                                                                   block_size=32)), step=1, val_loss=9.0)
    return path


def test_every_exported_file_gets_the_mode_of_the_umask(tiny_checkpoint, tmp_path):
    previous = os.umask(0o022)  # the child inherits it
    try:
        result = run_script("export_hf.py", str(tiny_checkpoint), str(tmp_path / "exported"))
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "exported").iterdir()}
    assert set(modes) >= {"model.safetensors", "config.json", "vocab.json"} and set(modes.values()) == {"0o644"}


def test_a_file_written_atomically_gets_the_umasks_mode_whoever_created_it(tmp_path):
    with common.atomic_write(tmp_path / "weights.bin") as tmp:  # as a library with a private temporary of its own
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    assert (tmp_path / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~common.umask()


def test_exported_directories_are_not_offered_to_git():
    for directory in ("exported", "exported-chat"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{directory}/model.safetensors"], cwd=REPO)
        assert ignored.returncode == 0, directory


# ----------------------------------------------------------------------------------------------------
# The laptop's install


TRAINING_ONLY = ("datasets", "pandas", "pyarrow", "matplotlib")


def test_sampling_on_a_laptop_imports_nothing_of_training(tiny_checkpoint, tmp_path):
    result = run_script("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", "hi", "--max_tokens", "5",
                        "--cpu", env={"PYTHONPROFILEIMPORTTIME": "1", "XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(re.findall(r"^import time:.*\|\s+(\w+)$", result.stderr, flags=re.M))  # top-level modules
    assert "torch" in imported and not imported & set(TRAINING_ONLY)


def requirement_names(path: Path) -> set[str]:
    """The distributions a requirements file names, its -r files followed."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(canonical(re.match(r"[A-Za-z0-9_.-]+", line)[0]))
    return names


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# What the repository's own files import (not what torch tries and does without), sampling and exporting.
DIRECT_IMPORTS = """
import builtins, os, sys
real, seen = builtins.__import__, set()
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and str((globals or {}).get("__file__", "")).startswith(sys.argv[1] + os.sep):
        seen.add(name.split(".")[0])
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = spy
import sample, chat, export_hf, export_gguf
export_gguf.import_gguf()
print(" ".join(seen))
"""


def test_the_laptop_requirements_name_what_sampling_and_the_exports_import_and_nothing_of_training():
    result = subprocess.run([sys.executable, "-c", DIRECT_IMPORTS, str(REPO)], env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    owners = importlib.metadata.packages_distributions()  # module -> the distributions that install it
    imported = {canonical(d) for module in result.stdout.split() for d in owners.get(module, [])}
    laptop = requirement_names(REPO / "requirements-laptop.txt")
    assert "torch" in imported and imported <= laptop, imported - laptop
    assert not laptop & set(TRAINING_ONLY) and laptop <= requirement_names(REPO / "requirements.txt")


# ----------------------------------------------------------------------------------------------------
# The plan on a CPU


def test_a_cpu_run_of_hours_is_told_to_let_the_budget_choose_or_to_take_a_smaller_shape():
    gpt2 = M.GPTConfig()  # 124M
    advice = B.cpu_advice("cpu", 32 * 3600 + 20 * 60, gpt2)
    assert len(advice) == 1 and advice[0].startswith("warning: 32 h 20 min is long for a CPU: --time 10m")
    assert "--n_layer 4 --n_head 4 --n_embd 256" in advice[0]
    F.parse_args(["--time", "10m", "--n_layer", "4", "--n_head", "4", "--n_embd", "256"])  # the flags it names exist
    assert B.cpu_advice("cpu", 50 * 60, gpt2) == [] and B.cpu_advice("cuda", 32 * 3600, gpt2) == []


@pytest.mark.parametrize("shape, suggested", [((3, 3, 192), "--n_layer 2 --n_head 2 --n_embd 128"),
                                              ((2, 2, 128), None), ((2, 2, 32), None)])
def test_the_cpu_advice_suggests_only_a_shape_smaller_than_the_plans(shape, suggested):
    config = M.GPTConfig(**dict(zip(("n_layer", "n_head", "n_embd"), shape)))
    (advice,) = B.cpu_advice("cpu", 2 * 3600, config)
    assert (suggested in advice) if suggested else "--n_layer" not in advice
    assert "--time 10m" in advice


def test_the_familys_smallest_model_is_not_told_to_be_smaller():
    plan = P.Plan(params=7_000_000, params_non_embedding=6_900_000, tokens_per_step=512, sample_size=0, steps=400,
                  smallest=True)
    (warning,) = plan.warnings()
    assert "0.03 tokens a parameter" in warning and "smaller model" not in warning
    assert "the budget is short for any of them: more time, or a GPU, would learn more" in warning
    plan.smallest = False  # a shape the flags gave, or a larger depth: a smaller one is still advice
    assert "a smaller model or a longer run would learn more" in plan.warnings()[0]
