"""What a new user met in a fresh clone (issue 45): a book as the corpus, or an empty one; errors that came after
the expensive part or behind another; short budgets; messages that did not name the way on; --help; the suite
itself after a run had left its checkpoints in the repository."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpu_decoding
import flags as F
import sample
from helpers import REPO, run_command


# ----------------------------------------------------------------------------------------------------
# The suite beside a user's runs


def test_the_tests_and_the_scripts_they_run_start_away_from_the_repository_and_the_users_caches():
    assert REPO != Path.cwd() and REPO not in Path.cwd().parents  # where checkpoints/ of a user's run would be
    result = run_command([sys.executable, "-c", "import os, data; print(os.getcwd()); print(data.user_cache_dir())"])
    assert result.returncode == 0, result.stderr
    cwd, cache = map(Path, result.stdout.split())
    assert cwd == Path.cwd() and Path.home() / ".cache" not in cache.parents
    assert subprocess.run(["git", "status"], cwd=Path.cwd(), capture_output=True).returncode != 0  # no clone here


# ----------------------------------------------------------------------------------------------------
# --help


def helps(parser, formatter) -> dict[str, str]:
    """Each flag's help as --help prints it (defaults filled in), by its first spelling."""
    return {action.option_strings[0]: " ".join(formatter._expand_help(action).split()) if action.help else ""
            for action in parser._actions if action.option_strings and action.dest != "help"}


def test_every_training_flag_has_help_that_names_its_default_at_most_once():
    texts = helps(F.build_parser(), F._HelpFormatter("train_gpt2.py"))
    assert all(texts.values()), [flag for flag, text in texts.items() if not text]
    assert [flag for flag, text in texts.items() if text.count("(default") > 1] == []
    assert "(default: scratch)" in texts["--init_from"] and "1337" in texts["--seed"]
    assert "1 on a CPU" not in texts["--grad_accum"] and "estimated" in texts["--grad_accum"]


def test_sample_py_help_names_every_default():
    parser = sample.build_parser()
    texts = helps(parser, argparse.RawDescriptionHelpFormatter("sample.py"))
    defaults = {a.option_strings[0]: a.default for a in parser._actions if a.option_strings and a.dest != "help"}
    missing = [flag for flag, default in defaults.items() if default not in (None, False) and str(default) not in texts[flag]]
    assert missing == [] and all(texts.values())


# ----------------------------------------------------------------------------------------------------
# sample.py's precision


@pytest.mark.parametrize("busy", [True, False])
def test_dtype_auto_says_why_it_fell_back_to_float32_and_how_to_choose(busy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no probe kept yet
    monkeypatch.setattr(cpu_decoding, "_busy", lambda: busy)
    monkeypatch.setattr(cpu_decoding, "probe", lambda: ({}, False))  # a probe the machine disturbed
    assert sample.pick_dtype("auto", torch.device("cpu")) == torch.float32
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("note: --dtype auto decodes in float32 this time: ") and "--dtype int4" in line
    assert ("too busy" if busy else "not steady") in line
