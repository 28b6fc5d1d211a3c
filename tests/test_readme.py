"""The README's commands stay runnable as written: the seed's commands verbatim, every flag known."""
import re
import shlex

import pytest

from helpers import REPO
import bench
import eval as eval_script
import sample
import train_gpt2

README = (REPO / "README.md").read_text()
SEED_TRAIN = ("python train_gpt2.py --block_size 128 --n_layer 12 --n_head 12 --n_embd 768 --lr 8e-4 --min_lr 8e-5 \\\n"
              "  --batch_size 128 --val_split 0.05 --num_workers 4 --warmup_steps 500 --amp --dropout 0.2 --sample_size 1000")
SEED_SAMPLE = "python sample.py --interactive --stream --checkpoint ./checkpoints/model_best_val.pt --cpu --max_tokens 50"


def commands() -> list[str]:
    """Each command in the README's code blocks, continuation lines joined."""
    blocks = re.findall(r"```\n(.*?)```", README, flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_seed_commands_appear_exactly_as_users_type_them():
    assert SEED_TRAIN in README and SEED_SAMPLE in README


def test_no_command_has_anything_after_a_line_continuation():
    for block in re.findall(r"```\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            assert not re.search(r"\\\s+\S", line), line
            assert "\\" not in line or line.endswith("\\"), line


PARSERS = {"train_gpt2.py": train_gpt2.parse_args, "sample.py": sample.parse_args, "eval.py": eval_script.parse_args,
           "bench.py": lambda flags: bench.build_parser().parse_args(flags)}


@pytest.mark.parametrize("command", [c for c in commands() if any(f"python {script}" in c for script in PARSERS)])
def test_every_readme_command_parses_with_the_scripts_flags(command, tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()  # where the README's commands run: after a pretraining run
    (tmp_path / "checkpoints" / "model_best_val.pt").touch()
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command)
    script = next(i for i, w in enumerate(words) if w in PARSERS)
    flags = [w for w in words[script + 1:] if w not in ("&&",)]
    args = PARSERS[words[script]](flags)  # raises SystemExit on any unknown or invalid flag
    if words[script] == "bench.py" and args.train_flags:
        train_gpt2.parse_args(shlex.split(args.train_flags))  # what every recipe's run is given


def test_the_two_setup_commands_are_there():
    assert "pip install -r requirements.txt && python train_gpt2.py" in README
    assert "pip install -r requirements.txt -r requirements-dev.txt && python -m pytest" in README
