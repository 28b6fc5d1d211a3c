"""common.py: what every script shares, seen the way a user meets it."""
import pytest
import torch

import common
from helpers import run_script


@pytest.mark.parametrize("script, flags, message", [
    ("train_gpt2.py", ["--lr", "-1"], "argument --lr: must be a positive number, not -1"),
    ("data.py", ["--sample_size", "0"], "argument --sample_size: must be a positive integer, not 0"),
    ("sample.py", ["--top_p", "2"], "argument --top_p: must be in (0, 1], not 2"),
    ("bench.py", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("export_hf.py", [], "the following arguments are required: checkpoint, out_dir"),
])
def test_every_scripts_flag_errors_are_one_line_and_a_pointer_to_help(script, flags, message):
    result = run_script(script, *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert lines == [f"{script}: error: {message}", f"{script}: see --help for the flags"], result.stderr


def test_the_cpu_device_never_asks_about_cuda(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("CUDA was queried")

    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    assert common.pick_device("cpu") == torch.device("cpu")


def test_a_missing_gpu_is_one_line_naming_the_cpu_way(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UserError, match="--device cuda: this machine has none .*use --device cpu"):
        common.pick_device("cuda")
    assert common.pick_device("auto", index=3).type in ("cpu", "mps")
