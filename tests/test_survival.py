"""A run survives what happens over SSH (issue 29): signals to the process or its whole group, with data workers,
a terminal or pipe that goes away; kills before the first scheduled save; an earlier run's files; --resume with
other flags; a CPU step too large for memory."""
import json
import os
import pty
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import eval as E
import plan as P
import train_gpt2 as T
from helpers import child_env, metrics, script_command, train_args, wait_for
import flags as F
import memory as Mem
import model as M

STEPS = ["--max_steps", "16", "--eval_interval", "1000", "--checkpoint_interval", "1000", "--dropout", "0.1"]


def final_val_loss(save_dir) -> float:
    return [r["val_loss"] for r in metrics(save_dir) if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, data_cache, tmp_path_factory):
    save = tmp_path_factory.mktemp("whole")
    assert T.main(train_args(corpus_dir, data_cache, save, *STEPS)) == 0
    return final_val_loss(save)


def start(args, output: str) -> tuple[subprocess.Popen, int]:
    """train_gpt2.py in a session (a process group) of its own, as a shell starts a job; its output to a pty
    (a terminal) or a pipe, whose reading end is returned."""
    reader, writer = pty.openpty() if output == "terminal" else os.pipe()
    proc = subprocess.Popen(script_command("train_gpt2.py", *args), env=child_env(), stdin=subprocess.DEVNULL,
                            stdout=writer, stderr=writer, start_new_session=True)
    os.close(writer)
    os.set_blocking(reader, False)
    return proc, reader


def drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except (BlockingIOError, OSError):
        pass


# The cases of the issue, one of each kind: a dropped SSH connection (the terminal gone, then the hang-up),
# `timeout` or a preempted instance (SIGTERM to the group), Ctrl-C on `... 2>&1 | tee log` (the reader gone
# with the same Ctrl-C); all with the default two data workers, which get every signal the group gets.
@pytest.mark.parametrize("signum, output, group, reader_gone", [
    (signal.SIGHUP, "terminal", True, True),
    (signal.SIGTERM, "pipe", True, False),
    (signal.SIGINT, "pipe", True, True),
])
def test_a_signal_to_the_run_or_its_group_saves_latest_stops_and_resumes_to_the_uninterrupted_model(
        corpus_dir, data_cache, tmp_path, uninterrupted, signum, output, group, reader_gone):
    save = tmp_path / "run"
    args = train_args(corpus_dir, data_cache, save, *STEPS, "--log_interval", "1", "--num_workers", "2")
    proc, reader = start(args, output)
    started = lambda: (save / "metrics.jsonl").exists() and "train_loss" in (save / "metrics.jsonl").read_text()
    assert wait_for(lambda: drain(reader) or started(), proc)
    if reader_gone:
        os.close(reader)  # the terminal closed, or tee ended: what the run prints from now on reaches no one
    (os.killpg if group else os.kill)(proc.pid, signum)
    assert proc.wait(timeout=60) == 128 + signum
    if not reader_gone:
        os.close(reader)
    assert metrics(save)[-1]["event"] == "stopped"
    stopped_at = torch.load(save / "latest.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 16
    assert T.main([*args, "--resume"]) == 0
    assert final_val_loss(save) == pytest.approx(uninterrupted, abs=1e-4)


# train_gpt2.py whose evaluations take 2 s a batch (a long last evaluation over the whole validation split, as on
# a CPU or a slow GPU): the stop check before each batch sleeps first.
SLOW_EVALUATION = ("import sys, time, train_gpt2; score = train_gpt2.validation_loss; "
                   "train_gpt2.validation_loss = lambda *a, stop, **k: score(*a, **k, stop=lambda: time.sleep(2) or stop()); "
                   "sys.exit(train_gpt2.main(sys.argv[1:]))")


def test_a_signal_during_the_last_evaluation_stops_it_and_the_resumed_run_does_it(corpus_dir, data_cache, tmp_path):
    save = tmp_path / "run"
    args = train_args(corpus_dir, data_cache, save, "--max_steps", "4", "--log_interval", "1", "--eval_interval", "1000")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVALUATION, *args], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last_step = lambda: (save / "metrics.jsonl").exists() and any(r.get("step") == 4 for r in metrics(save))  # noqa: E731
    assert wait_for(last_step, proc), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)  # its last evaluation has begun: it reads the whole split, 2 s a batch
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal at step 4" in out and "(its last evaluation does)" in out
    assert not [r for r in metrics(save) if "val_loss" in r]  # stopped inside it, not after it
    latest = torch.load(save / "latest.pt", weights_only=True)
    assert latest["step"] == 4 and latest["final_pending"]
    assert T.main([*args, "--resume"]) == 0
    rows = metrics(save)
    assert [r["step"] for r in rows if "val_loss" in r] == [4] and rows[-1]["event"] == "done"
    assert not torch.load(save / "latest.pt", weights_only=True)["final_pending"]


def test_a_new_run_refuses_an_earlier_runs_best_model_and_metrics_before_writing_anything(corpus_dir, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "model_best_val.pt").write_bytes(b"17 minutes of work")  # killed before its first latest.pt
    (save / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as refused:
        T.main(train_args(corpus_dir, tmp_path / "cache", save, "--max_steps", "2"))
    message = str(refused.value.code)
    assert ("holds an earlier run (model_best_val.pt, metrics.jsonl) that stopped before it saved latest.pt: "
            "--resume starts it again from step 0 there, or choose another --save_dir") in message
    assert (save / "model_best_val.pt").read_bytes() == b"17 minutes of work"
    assert sorted(p.name for p in save.iterdir()) == ["metrics.jsonl", "model_best_val.pt"]
    assert not (tmp_path / "cache").exists()  # nothing downloaded or prepared either


def test_latest_is_saved_by_the_clock_as_well_as_by_steps(corpus_dir, data_cache, tmp_path, monkeypatch):
    saved = []
    real_save = checkpoint.save_latest
    monkeypatch.setattr(checkpoint, "save_latest", lambda *a: saved.append(a[5].step) or real_save(*a))
    monkeypatch.setattr(T, "FIRST_SAVE_S", 0.0)  # the first save by the clock falls due at once, the next never
    monkeypatch.setattr(T, "SAVE_EVERY_S", 1e9)
    assert T.main(train_args(corpus_dir, data_cache, tmp_path / "run", "--max_steps", "5",
                             "--checkpoint_interval", "1000")) == 0
    assert saved == [1, 5]  # by the clock after the first step, then the last step's


def test_resume_names_each_changed_setting_keeps_the_decayed_rate_and_counts_the_tokens_trained(
        corpus_dir, data_cache, tmp_path, capsys):
    save = tmp_path / "run"
    first = train_args(corpus_dir, data_cache, save, "--max_steps", "6", "--log_interval", "1", "--eval_interval", "6")
    assert T.main(first) == 0
    capsys.readouterr()
    more = [*first, "--resume"]
    more[more.index("--max_steps") + 1], more[more.index("--batch_size") + 1] = "10", "16"
    assert T.main(more) == 0
    out = capsys.readouterr().out
    assert "note: --resume: batch_size 16, was 8: the run will not match an uninterrupted one" in out
    assert "note: --resume: 10 steps, the run had planned 6; the learning rate stays at 3.00e-04" in out
    rows = [r for r in metrics(save) if "train_loss" in r]
    assert [r["lr"] for r in rows[6:]] == pytest.approx([3e-4] * 4)  # where the decay left it, not back to 3e-3
    done = [r for r in metrics(save) if r.get("event") == "done"][-1]
    assert f"summary: 10 steps, {6 * 8 * 32 + 4 * 16 * 32:,} tokens" in out and done["step"] == 10
    assert T.main([*more, "--reschedule", "--max_steps", "14"]) == 0  # asked: the decay planned anew
    assert [r for r in metrics(save) if "train_loss" in r][-4]["lr"] > 3e-4
    args = E.parse_args(["--checkpoint", str(save / "model_best_val.pt")])  # eval.py finds the run's data
    assert (args.dataset, args.tasks) == (str(corpus_dir), ["hellaswag", "val"]) and args.val_split == 0.1


def test_a_cpu_step_too_large_for_memory_is_refused_before_the_run_or_accumulated(
        corpus_dir, data_cache, tmp_path, monkeypatch, capsys):
    config = F.model_config(F.parse_args(train_args(corpus_dir, data_cache, tmp_path)))
    fixed = Mem.step_bytes(config, 0, M.GPT(config).num_params(), False)  # weights, gradients, moments
    two = Mem.step_bytes(config, 2, 0, False)  # what 2 sequences add
    free = (fixed + 1.5 * two) / Mem.RAM_SHARE  # the share of it a step may take holds 2 sequences' step, not 4's
    monkeypatch.setattr(Mem, "available_memory", lambda: int(free))
    with pytest.raises(SystemExit) as refused:
        T.main(train_args(corpus_dir, data_cache, tmp_path / "run", "--max_steps", "2", "--grad_accum", "1"))
    message = str(refused.value.code)
    assert message.startswith("error: a step of micro-batches of 8 × 32 tokens needs about")
    assert "--grad_accum 4 (micro-batches of 2) fits" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert T.main(train_args(corpus_dir, data_cache, tmp_path / "auto", "--max_steps", "2")) == 0
    assert "--grad_accum auto: micro-batches of 2 × 32 tokens fit in cpu memory" in capsys.readouterr().out


def test_the_way_home_says_when_the_address_is_a_private_one(tmp_path, monkeypatch):
    best = tmp_path / "model_best_val.pt"
    best.write_bytes(b"weights")
    outcome = P.Outcome(steps=1, tokens=1, seconds=1.0, best_val=1.0, best_step=1, checkpoint=best)
    monkeypatch.setenv("SSH_CONNECTION", "198.51.100.7 51234 172.17.0.2 22")  # a container's address
    assert any("private" in line for line in outcome.lines())
    monkeypatch.setenv("SSH_CONNECTION", "198.51.100.7 51234 203.0.113.5 22")
    assert not any("private" in line for line in outcome.lines())


def test_without_matplotlib_the_run_says_once_that_it_draws_no_picture(tmp_path, monkeypatch, capsys):
    from metrics import Metrics
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    m = Metrics(tmp_path, None)
    m.log(step=1, train_loss=1.0)
    m.plot(), m.plot()
    assert capsys.readouterr().out.count("note: no loss.png without matplotlib (pip install matplotlib)") == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["train_loss"] == 1.0


# A step that raises after the first one: a bug (its traceback), or the CPU allocator out of memory (one line).
FAILING_STEP = """import sys, train_gpt2 as T
real, calls, message = T.step_optimizers, [], sys.argv.pop()
def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        raise RuntimeError(message)
    return real(*args, **kwargs)
T.step_optimizers = failing
sys.exit(T.main(sys.argv[1:]))"""


@pytest.mark.parametrize("error, expected", [
    ("a bug in the step", "RuntimeError: a bug in the step"),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB",
     "error: out of CPU memory with micro-batches of 8 × 32 tokens: lower --batch_size"),
])
def test_an_error_after_the_first_step_ends_the_run_at_once_with_its_readers(corpus_dir, data_cache, tmp_path,
                                                                              error, expected):
    args = train_args(corpus_dir, data_cache, tmp_path / "run", "--max_steps", "50", "--num_workers", "2")
    result = subprocess.run([sys.executable, "-c", FAILING_STEP, *args, error], env=child_env(),
                            capture_output=True, text=True, timeout=120)  # a run that hangs fails here
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
    if error.startswith("DefaultCPUAllocator"):
        assert "Traceback" not in result.stderr


def test_resume_starts_again_a_run_killed_before_its_first_save(corpus_dir, data_cache, tmp_path, uninterrupted):
    save = tmp_path / "run"
    save.mkdir()
    (save / "model_best_val.pt").write_bytes(b"killed before latest.pt")
    (save / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    dead_pid = 2**22 + 1  # above Linux's pid_max: the process that wrote it is gone
    (save / f".latest.pt.tmp-{dead_pid}").write_bytes(b"half a checkpoint")
    result = subprocess.run(script_command("train_gpt2.py", *train_args(corpus_dir, data_cache, save, *STEPS,
                                                                        "--resume")),
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "has no latest.pt (the run stopped before its first save): starting it again from step 0" in result.stdout
    assert "removed the unfinished files a killed run left" in result.stdout
    assert not list(save.glob(".*.tmp-*")) and final_val_loss(save) == pytest.approx(uninterrupted, abs=1e-4)
