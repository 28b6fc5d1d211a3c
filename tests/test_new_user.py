"""What a new user met in a fresh clone (issue 45): a book as the corpus, or an empty one; errors that came after
the expensive part or behind another; short budgets; messages that did not name the way on; --help; the suite
itself after a run had left its checkpoints in the repository."""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import budget as B
import checkpoint
import cpu_decoding
import data
import flags as F
import horizon as H
import sample
import shards
import sources
import startup as U
import step as S
import tokenizer
import train_gpt2 as T
from common import UserError
from helpers import REPO, child_env, make_corpus, metrics, run_command, train_args, wait_for, write_txt_dir


# ----------------------------------------------------------------------------------------------------
# The suite beside a user's runs


def test_the_tests_and_the_scripts_they_run_start_away_from_the_repository_and_the_users_caches():
    assert REPO != Path.cwd() and REPO not in Path.cwd().parents  # where checkpoints/ of a user's run would be
    result = run_command([sys.executable, "-c", "import os, tokenizer; print(os.getcwd()); print(tokenizer.user_cache_dir())"])
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
    missing = [flag for flag, default in defaults.items()
               if default not in (None, False) and str(default) not in texts[flag]]
    assert missing == [] and all(texts.values())


# ----------------------------------------------------------------------------------------------------
# sample.py's precision


@pytest.mark.parametrize("busy", [True, False])
def test_dtype_auto_says_why_it_fell_back_to_float32_and_how_to_choose(busy, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no probe kept yet
    monkeypatch.setattr(cpu_decoding, "_busy", lambda: busy)
    monkeypatch.setattr(cpu_decoding, "probe", lambda: ({}, False))  # a probe the machine disturbed
    said = []
    assert sample.pick_dtype("auto", torch.device("cpu"), say=said.append) == torch.float32
    (line,) = said
    assert line.startswith("note: --dtype auto decodes in float32 this time: ") and "--dtype int4" in line
    assert ("too busy" if busy else "not steady") in line


# ----------------------------------------------------------------------------------------------------
# A book as the corpus; --plan and the run say the same


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """One text file of 60 generated documents' sentences: a corpus of one document."""
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text("\n\n".join(make_corpus(n_docs=60, seed=8)), encoding="utf-8")
    return path


def plan_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("plan:", "note:", "warning:"))]


def test_a_book_trains_and_its_plan_says_every_note_the_run_says(book, tmp_path, capsys):
    args = train_args(book, tmp_path / "cache", tmp_path / "run", "--max_steps", "4", "--warmup_steps", "500")
    assert T.main([*args, "--plan"]) == 0
    planned = plan_lines(capsys.readouterr().out)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert T.main(args) == 0
    out = capsys.readouterr().out
    ran = plan_lines(out)
    for note in ("note: --dataset", "note: --warmup_steps 500 does not fit"):
        assert [line for line in planned if line.startswith(note)] == [line for line in ran if line.startswith(note)]
    split = next(line for line in ran if line.startswith("note: --dataset"))
    assert "too few documents" in split and "the last 10% of each one's tokens" in split  # train_args' --val_split 0.1
    assert any(line.startswith("note: --warmup_steps 500 does not fit in a run of 4 steps") for line in ran)
    estimated = re.search(r"plan: data: about ([\d,]+) training tokens", "\n".join(planned))[1]
    assert re.search(rf"plan: data: [\d,]+ training tokens as prepared \(estimated before at about {estimated}\)", out)
    config = next(line for line in out.splitlines() if line.startswith("config: "))
    assert "subset=" not in config  # --subset names a Hub dataset's configuration
    assert "step 4: validation loss" in out and (tmp_path / "run" / "model_best_val.pt").exists()


@pytest.mark.parametrize("kind", ["empty.txt", "empty.jsonl", "a folder of one empty file"])
def test_an_empty_corpus_gets_the_same_line_from_the_plan_and_the_run(kind, tmp_path):
    path = write_txt_dir(tmp_path / "texts", [""]) if kind.startswith("a folder") else tmp_path / kind
    if not kind.startswith("a folder"):
        path.write_text("")
    lines = []
    for plan in ([], ["--plan"]):
        with pytest.raises(SystemExit) as refused:
            T.main(train_args(path, tmp_path / "cache", tmp_path / "run", *plan))
        lines.append(str(refused.value.code))
    assert lines[0] == lines[1] and lines[0].startswith(f"error: --dataset {path} is empty")
    assert len(lines[0].splitlines()) == 1 and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------------
# The first real problem, before any data work


@pytest.mark.parametrize("flags, expected", [
    (["--dataset", "/nonexistent/dir"], "error: no such file or directory: /nonexistent/dir"),
    (["--init_from", "/nope.pt"], "error: --init_from /nope.pt: no such file or directory"),
    (["--chat", "--init_from", "/nope.pt"], "error: --init_from /nope.pt: no such file or directory"),
])
def test_over_an_earlier_run_a_bad_flag_is_named_before_the_earlier_run(corpus_dir, tmp_path, flags, expected):
    save = tmp_path / "run"
    save.mkdir()
    (save / "latest.pt").write_bytes(b"an earlier run")
    args = [*train_args(corpus_dir, tmp_path / "cache", save), *flags]
    if "--chat" in flags:  # its own dataset (SmolTalk, on the Hub): the weights are what is wrong
        args = [*flags, "--save_dir", str(save), "--data_cache", str(tmp_path / "cache"), "--device", "cpu"]
    for plan in ([], ["--plan"]):
        with pytest.raises(SystemExit) as refused:
            T.main([*args, *plan])
        assert str(refused.value.code).startswith(expected)
    assert not (tmp_path / "cache").exists()  # before the data is prepared


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_save_dir_that_cannot_be_a_folder_is_one_line_before_the_data_and_the_plan(corpus_dir, tmp_path, where):
    (tmp_path / "taken").write_text("a file")
    save = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "run"
    for plan in ([], ["--plan"]):
        with pytest.raises(SystemExit) as refused:
            T.main([*train_args(corpus_dir, tmp_path / "cache", save), *plan])
        message = str(refused.value.code)
        assert message.startswith(f"error: --save_dir {save} ") and "not a folder: choose another --save_dir" in message
    assert not (tmp_path / "cache").exists()


def test_a_save_dir_that_cannot_be_written_in_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(U.os, "access", lambda path, mode: Path(path) != tmp_path)  # as a read-only folder (root
    with pytest.raises(UserError, match=r"cannot be written in \(permission denied"):  # writes in any, so mocked)
        U.check_save_dir(tmp_path / "run")
    U.check_save_dir(tmp_path.parent / "elsewhere")


# ----------------------------------------------------------------------------------------------------
# Budgets too short for a step, and budgets kept


def sized(corpus_dir, tmp_path, *extra) -> list[str]:
    """train_args without a shape: --time chooses one."""
    args = train_args(corpus_dir, tmp_path / "cache", tmp_path / "run", *extra)
    for flag in ("--n_layer", "--n_head", "--n_embd"):
        del args[args.index(flag):args.index(flag) + 2]
    return args


@pytest.mark.parametrize("plan", [[], ["--plan"]])
def test_a_budget_that_start_up_uses_up_is_one_line_naming_the_least_that_works(corpus_dir, tmp_path, plan):
    with pytest.raises(SystemExit) as refused:  # as if importing torch had taken 4.5 s of --time 5
        T.main(sized(corpus_dir, tmp_path, "--time", "5", *plan), started=time.monotonic() - 4.5)
    message = str(refused.value.code)
    least = int(re.fullmatch(r"error: --time 5 s is too short here: start-up takes \d+ s before the first step, and "
                             r"a step with the last evaluation and save about [\d.]+ s: give at least --time (\d+)s",
                             message)[1])
    assert least > 5 and not (tmp_path / "run").exists()
    assert T.main(sized(corpus_dir, tmp_path, "--time", f"{least}s", "--plan"), started=time.monotonic() - 4.5) == 0


class FakeClock:
    """time.monotonic and time.perf_counter for train_gpt2.py, horizon.py and budget.py, moved on only by the
    steps."""

    def __init__(self, monkeypatch, step_seconds: float):
        self.now = 1000.0
        clock = types.SimpleNamespace(monotonic=lambda: self.now, perf_counter=lambda: self.now, sleep=time.sleep)
        for module in (T, H, B):
            monkeypatch.setattr(module, "time", clock)
        real = T.step_optimizers

        def step(*args, **kwargs):
            self.now += step_seconds
            return real(*args, **kwargs)
        monkeypatch.setattr(T, "step_optimizers", step)


def test_before_its_steps_are_timed_a_run_ends_where_another_step_would_not_fit(corpus_dir, data_cache, tmp_path,
                                                                                monkeypatch):
    clock, save = FakeClock(monkeypatch, step_seconds=1.0), tmp_path / "run"
    assert T.main(train_args(corpus_dir, data_cache, save, "--time", "6s", "--log_interval", "1"),
                  started=clock.now) == 0
    done = next(r for r in metrics(save) if r.get("event") == "done")
    assert 1 <= done["step"] < S.WARMUP_STEPS + S.TIMED_STEPS  # ended before the pace could be timed
    assert done["seconds"] <= 6.0  # by the run's clock, faked: each step a second, the rest none


def test_a_budget_one_step_overruns_is_said_by_the_plan_and_the_run_which_ends_there(corpus_dir, data_cache,
                                                                                    tmp_path, monkeypatch, capsys):
    args = train_args(corpus_dir, data_cache, tmp_path / "run", "--time", "3s")
    monkeypatch.setattr(T, "step_seconds", lambda *a, **k: 5.0)  # --plan's timing: a step takes 5 s
    assert T.main([*args, "--plan"], started=time.monotonic()) == 0
    planned = capsys.readouterr().out
    assert "plan: 1 steps" in planned and "warning: --time 3 s is too short here" in planned
    clock = FakeClock(monkeypatch, step_seconds=5.0)
    assert T.main(args, started=clock.now) == 0
    out = capsys.readouterr().out
    assert "warning: --time 3 s is too short here" in out and "this run ends at its first step" in out
    assert next(r for r in metrics(tmp_path / "run") if r.get("event") == "done")["step"] == 1



# ----------------------------------------------------------------------------------------------------
# Messages that name the way on


def short_run(corpus_dir, data_cache, save, *extra) -> list[str]:
    return train_args(corpus_dir, data_cache, save, "--max_steps", "4", "--eval_interval", "4", *extra)


def test_resume_over_a_best_model_but_no_latest_says_what_stays_and_keeps_it(corpus_dir, data_cache, tmp_path,
                                                                            capsys):
    save = tmp_path / "run"
    assert T.main(short_run(corpus_dir, data_cache, save)) == 0
    (save / "latest.pt").unlink()  # killed (-9) after the best model of step 4, before latest.pt was first saved
    best = (save / "model_best_val.pt").read_bytes()
    val = torch.load(save / "model_best_val.pt", weights_only=True)["val_loss"]
    capsys.readouterr()
    assert T.main([*short_run(corpus_dir, data_cache, save, "--max_steps", "2"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert (f"note: --resume: {save} has no latest.pt (the run stopped before it saved one): starting it again from "
            f"step 0; its model_best_val.pt (step 4, validation loss {val:.4f}) stays until this run validates "
            "lower") in out
    assert "its first save" not in out and (save / "model_best_val.pt").read_bytes() == best  # not a worse one
    assert f"best validation loss {val:.4f} at step 4 (of an earlier attempt)" in out  # the model the summary names


def test_a_resumed_run_says_no_validation_yet_rather_than_an_infinite_loss(corpus_dir, data_cache, tmp_path,
                                                                          monkeypatch, capsys):
    save, validate = tmp_path / "run", T.validate
    monkeypatch.setattr(T, "validate", lambda *a, **k: {})  # evaluations that record nothing: no validation yet
    assert T.main(train_args(corpus_dir, data_cache, save, "--max_steps", "2", "--checkpoint_interval", "1")) == 0
    monkeypatch.setattr(T, "validate", validate)
    capsys.readouterr()
    assert T.main(train_args(corpus_dir, data_cache, save, "--max_steps", "3", "--resume")) == 0
    out = capsys.readouterr().out
    assert f"resumed from {save / 'latest.pt'} at step 2 (no validation yet)" in out and "inf)" not in out


def test_a_truncated_latest_names_the_best_model_and_a_fresh_start_in_one_whole_line(corpus_dir, data_cache, tmp_path):
    save = tmp_path / "run"
    assert T.main(short_run(corpus_dir, data_cache, save)) == 0
    latest = save / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a copy cut short
    with pytest.raises(SystemExit) as refused:
        T.main([*short_run(corpus_dir, data_cache, save, "--max_steps", "6"), "--resume"])
    message = str(refused.value.code)
    assert len(message.splitlines()) == 1 and message.startswith(f"error: --resume: {latest} is not a readable")
    assert f"{save / 'model_best_val.pt'} holds the best weights (step 4)" in message and "--init_from" in message
    assert message.endswith(f"or delete {latest} and --resume starts the run again from step 0")
    assert "(truncated, or another format: RuntimeError: PytorchStreamReader" in message and "If yo" not in message


# Steps of half a second: a second Ctrl-C comes while the first one's step is still running.
SLOW_STEPS = """import sys, time, train_gpt2 as T
real = T.accumulate_gradients
T.accumulate_gradients = lambda *a, **k: time.sleep(0.5) or real(*a, **k)
sys.exit(T.main(sys.argv[1:]))"""


def test_a_second_ctrl_c_says_the_last_latest_stays_and_resume_continues_from_it(corpus_dir, data_cache, tmp_path):
    save = tmp_path / "run"
    args = train_args(corpus_dir, data_cache, save, "--max_steps", "400", "--checkpoint_interval", "2",
                      "--eval_interval", "1000")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *args], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (save / "latest.pt").exists(), proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.2)  # apart: two signals at once are one
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    step = torch.load(save / "latest.pt", weights_only=True)["step"]
    assert "quit at once, without saving latest.pt" in err
    assert f"{save / 'latest.pt'} of step {step} is still there, and --resume continues from it" in err


def test_ctrl_c_while_the_data_is_prepared_says_a_rerun_continues_it(corpus_dir, tmp_path, monkeypatch, capsys):
    encode = tokenizer.encode_documents
    monkeypatch.setattr(data, "encode_documents", lambda *a, **k: time.sleep(2) or encode(*a, **k))  # a slow tokenizer
    monkeypatch.setattr(shards.TokenShards, "wait", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    args = train_args(corpus_dir, tmp_path / "cache", tmp_path / "run", "--max_steps", "2")
    assert T.main(args) == 128 + signal.SIGINT
    cache = data.route_of(sources.DataSpec.from_args(F.parse_args(args)), probe=False).cache_dir
    err = capsys.readouterr().err
    assert f"interrupted while preparing the data: what is prepared in {cache} is kept, and the same command " \
           "continues from there" in err
    for preparation in list(data.Preparation.running):  # what the process's exit would do
        preparation.close()
    monkeypatch.undo()
    assert T.main(args) == 0  # the same command


# ----------------------------------------------------------------------------------------------------
# --resume alone


def test_resume_alone_continues_a_run_with_its_own_flags_to_the_uninterrupted_model(corpus_dir, data_cache,
                                                                                  tmp_path, monkeypatch):
    flags = ["--max_steps", "7", "--eval_interval", "1000", "--dropout", "0.1"]
    assert T.main(train_args(corpus_dir, data_cache, tmp_path / "whole", *flags)) == 0
    real, save = T.accumulate_gradients, tmp_path / "run"

    def stopped_at_2(*args, step, **kwargs):  # SIGTERM (a preempted instance) during step 2: it stops a step or two on
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, step=step, **kwargs)
    monkeypatch.setattr(T, "accumulate_gradients", stopped_at_2)
    assert T.main(train_args(corpus_dir, data_cache, save, *flags)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert 0 < torch.load(save / "latest.pt", weights_only=True)["step"] < 7
    assert T.main(["--save_dir", str(save), "--resume"]) == 0  # no other flag
    final = lambda folder: [r["val_loss"] for r in metrics(folder) if "val_loss" in r][-1]
    assert final(save) == pytest.approx(final(tmp_path / "whole"), abs=1e-4)
    assert F.parse_args(["--save_dir", str(save), "--resume", "--lr", "1e-3"]).lr == 1e-3  # a flag given wins


# ----------------------------------------------------------------------------------------------------
# The save folder failing during the run


def test_a_save_folder_replaced_by_a_file_mid_run_is_one_line_naming_it_and_the_room_it_needs(
        corpus_dir, data_cache, tmp_path, monkeypatch):
    save, real = tmp_path / "run", T.log_step

    def replaced_at_3(run, *args):
        if run.progress.step == 3:
            shutil.rmtree(save)
            save.write_text("a file now")
        return real(run, *args)
    monkeypatch.setattr(T, "log_step", replaced_at_3)
    with pytest.raises(SystemExit) as failed:
        T.main(train_args(corpus_dir, data_cache, save, "--max_steps", "6", "--log_interval", "1"))
    message = str(failed.value.code)
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert message.startswith(f"error: cannot write {save / 'metrics.jsonl'} (NotADirectoryError")
    assert f"{save} must be a folder with about " in message and "what was saved there stays" in message


def test_a_full_disk_mid_run_is_one_line_and_the_latest_saved_before_stays_for_resume(corpus_dir, data_cache,
                                                                                    tmp_path, monkeypatch):
    save, real, saves = tmp_path / "run", checkpoint.write_checkpoint, []

    def full_after_the_first(path, state):
        saves.append(path)
        if len(saves) > 1:
            raise OSError(28, "No space left on device")
        return real(path, state)
    monkeypatch.setattr(checkpoint, "write_checkpoint", full_after_the_first)
    with pytest.raises(SystemExit) as failed:
        T.main(train_args(corpus_dir, data_cache, save, "--max_steps", "8", "--checkpoint_interval", "2",
                          "--eval_interval", "1000"))
    message = str(failed.value.code)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"error: cannot write {save / 'latest.pt'} (OSError: [Errno 28] No space left on device")
    assert f"{save / 'latest.pt'} of step 2 is still there, and --resume continues from it" in message
    assert torch.load(save / "latest.pt", weights_only=True)["step"] == 2


def test_choosing_the_model_does_not_begin_a_depth_that_cannot_be_timed_in_what_is_left(monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(B, "time", types.SimpleNamespace(monotonic=lambda: clock.now))

    def timed(r, depth, env, limit, tokens):  # each depth takes 3 s to time, and would get plenty of tokens
        clock.now += 3.0
        return B.Candidate(depth, params=1000, batch=1, tokens_per_s=1e6, tokens=1e9)
    monkeypatch.setattr(B, "timed_candidate", timed)
    request = types.SimpleNamespace(depth=None)
    candidates = B.timed_candidates(request, types.SimpleNamespace(world=1, master=True), limit=5.0, seconds=60.0)
    assert [c.depth for c in candidates] == [B.DEPTHS[0]] and clock.now <= 5.0  # depth 3 would end at 6 s
