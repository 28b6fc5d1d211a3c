"""train_gpt2.py on a tiny model and generated text, run as a user runs it (and in-process where faster)."""
import copy
import math
import subprocess
from pathlib import Path

import pytest
import torch

import budget as B
import checkpoint
import flags as F
import horizon as H
import model as M
import optim as O
import plan as P
import runtime
import shards
import startup as U
import step as S
import train_gpt2 as T
from helpers import (TINY_MODEL_ARGS, make_items, metrics, prepared_data, run_script, start_script, train_args,
                     wait_for, write_items)


def final_val_loss(save_dir: Path) -> float:
    return [r["val_loss"] for r in metrics(save_dir) if "val_loss" in r][-1]


def test_learning_rate_warms_up_linearly_then_decays_to_min_lr_at_the_last_step():
    lr = lambda s: H.lr_scale(s, warmup=10, max_steps=100, schedule="cosine", cooldown_frac=0.5, floor=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)
    assert lr(99) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 99))
    assert H.lr_scale(0, warmup=0, max_steps=1, schedule="cosine", cooldown_frac=0.5, floor=0.1) == pytest.approx(1.0)


def test_the_default_warmup_is_llm_cs_or_a_tenth_of_a_shorter_run_and_a_given_one_is_kept_where_it_fits():
    default = H.DEFAULT_WARMUP_STEPS
    assert H.fitting_warmup(None, 100 * default) == default
    assert H.fitting_warmup(None, default + 136) == (default + 136) // 10  # not most of the run
    assert H.fitting_warmup(500, 836) == 500 and H.fitting_warmup(500, 6) == 0  # given: kept, or 10% of a short run
    assert H.warmup_note(None, 6) == [] and H.warmup_note(500, 836) == []
    assert "does not fit in a run of 6 steps" in H.warmup_note(500, 6)[0]


@pytest.mark.parametrize("flags, message", [
    (["--n_embd", "100", "--n_head", "12"], "--n_embd 100 is not divisible by --n_head 12"),
    (["--lr", "-1"], "must be a positive number, not -1"),
    (["--val_split", "1.5"], "val_split"),
    (["--dropout", "1"], "must be in [0, 1), not 1"),
    (["--batch_size", "0"], "must be a positive integer, not 0"),
    (["--batch_size", "10", "--grad_accum", "3"], "--batch_size 10 is not divisible by GPUs × --grad_accum"),
    (["--lr", "1e-4", "--min_lr", "1e-3"], "--min_lr 0.001 is above --lr 0.0001"),
    (["--sample_size", "0"], "sample_size"),
    (["--arch_option", "mlp=relu3"], "--arch_option: mlp must be one of"),
    (["--arch_option", "tie_embeddings=maybe"], "tie_embeddings takes true or false, not 'maybe'"),
    (["--arch_option", "window_pattern=SLX"], "window_pattern takes the letters S (short) and L (long), not 'SLX'"),
    (["--arch", "speedrun", "--arch_option", "softcap_form=cubic"], "softcap_form must be one of"),
    (["--muon_iteration", "halley"], "--muon_iteration: invalid choice: 'halley'"),
    (["--init_from", "gpt2", "--arch_option", "mlp=relu2"], "with --init_from the architecture is the weights'"),
    (["--arch", "gpt2", "--arch_option", "pos_emb=rope", "--n_embd", "30", "--n_head", "6"],
     "rotary positions turn pairs of channels: the head size (n_embd / n_head = 30 / 6) must be even, not 5"),
    (["--time", "soon"], "--time: must be a duration such as 45m, 2h, 1h30m or 5400 (seconds), not 'soon'"),
    (["--time", "0"], "--time: must be a duration"),
    (["--price_per_hour", "-3"], "--price_per_hour: must be 0 or more, not -3"),
    (["--grad_accum", "some"], "--grad_accum: must be auto or a positive integer, not 'some'"),
])
def test_invalid_flags_end_in_argument_parsing_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        F.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and ": error: " in err[0] and message in err[0]
    assert "--help" in err[1]


def test_the_seed_command_runs_shrunk_and_leaves_loadable_checkpoints(corpus_dir, data_cache, tmp_path):
    # The README's command with the model shrunk, steps capped and local data.
    save = tmp_path / "run"
    result = run_script("train_gpt2.py", "--block_size", "32", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                        "--lr", "8e-4", "--min_lr", "8e-5", "--batch_size", "8", "--val_split", "0.05",
                        "--num_workers", "4", "--warmup_steps", "500", "--amp", "--dropout", "0.2",
                        "--sample_size", "1000", "--max_steps", "6", "--eval_interval", "3",
                        "--dataset", str(corpus_dir), "--data_cache", str(data_cache), "--save_dir", str(save),
                        "--sample_during_training")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "plan:" in out and "tokens a step" in out and "epochs" in out and "summary: 6 steps" in out
    assert "--warmup_steps 500 does not fit in a run of 6 steps" in out
    amp_note = runtime.choose_amp(True, "cpu")[1]  # bf16 where the CPU has it natively, else fp32, said either way
    assert amp_note in out and "sample at step 3" in out
    for name in ("latest.pt", "model_best_val.pt"):
        ckpt = torch.load(save / name, weights_only=True)
        assert {"model", "config", "step", "val_loss"} <= set(ckpt)
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    latest = torch.load(save / "latest.pt", weights_only=True)
    assert latest["step"] == 6 and {"optimizer", "args", "scaler", "best_val_loss"} <= set(latest)
    rows = metrics(save)
    assert rows[0]["event"] == "start" and "git" in rows[0] and "torch" in rows[0]
    assert any("val_loss" in r for r in rows) and any("grad_norm" in r and "tokens_per_s" in r for r in rows)
    assert (save / "loss.png").stat().st_size > 0


def test_training_lowers_the_loss_on_generated_text(corpus_dir, data_cache, tmp_path):
    save = tmp_path / "run"
    result = run_script("train_gpt2.py", *train_args(corpus_dir, data_cache, save, "--max_steps", "20",
                                                      "--eval_interval", "20", "--log_interval", "5"))
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [r["train_loss"] for r in metrics(save) if "train_loss" in r]
    # ln(50257) = 10.8 at the start; a model that learned the tiny grammar's words drops well below.
    assert losses[0] > 8.0 and losses[-1] < losses[0] - 2.0
    assert final_val_loss(save) < losses[0] - 2.0


def start_training(args) -> subprocess.Popen:
    return start_script("train_gpt2.py", *args)


def test_a_run_killed_and_resumed_ends_with_the_model_of_an_uninterrupted_run(corpus_dir, data_cache, tmp_path):
    # Muon trains the matrices and AdamW the rest, so both optimizers' states are restored here (a fine-tune,
    # AdamW alone with its own schedule, is killed and resumed in test_finetune.py).
    # Across a change of the batch, the context, the attention windows and the token-ahead term (the step 6 of 12)
    # and of the prefix term (8), on the speedrun's architecture: the data goes on where it was, the windows and the
    # loss's weights are the step's.
    common = ["--max_steps", "12", "--checkpoint_interval", "3", "--eval_interval", "1000", "--dropout", "0.1",
              "--batch_stages", "1/2,1", "--context_stages", "1/2,1", "--grad_accum", "2", "--arch", "speedrun",
              "--window_stages", "1/4,1", "--mtp_weights", "0.5", "--prefix_weight", "0.25"]
    whole = run_script("train_gpt2.py", *train_args(corpus_dir, data_cache, tmp_path / "whole", *common))
    assert whole.returncode == 0, whole.stderr[-2000:]

    save = tmp_path / "killed"
    proc = start_training(train_args(corpus_dir, data_cache, save, *common))
    assert wait_for(lambda: (save / "latest.pt").exists())
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait()
    interrupted_at = torch.load(save / "latest.pt", weights_only=True)["step"]
    assert interrupted_at < 12, "the run finished before it could be killed"
    resumed = run_script("train_gpt2.py", *train_args(corpus_dir, data_cache, save, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {save / 'latest.pt'} at step {interrupted_at}" in resumed.stdout + resumed.stderr
    assert final_val_loss(save) == pytest.approx(final_val_loss(tmp_path / "whole"), abs=1e-4)
    windows = torch.load(save / "latest.pt", weights_only=True)["model"]["attn_windows"]
    assert windows.tolist() == [16, 32]  # the last stage's: the whole context, and half of it


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(optimizer, monkeypatch):
    config = M.GPTConfig.from_preset("modern", n_layer=2, n_head=2, n_embd=32, block_size=16)
    env = runtime.Env(device=torch.device("cpu"))
    t = S.build(config, env, U.optimizer_settings(F.parse_args(["--optimizer", optimizer]), None), seed=0)
    x = torch.randint(0, 1000, (4, 17))
    step = lambda s: S.train_step(t, [(x[:, :-1], x[:, 1:])], env, step=s, seed=0, grad_clip=1.0)
    step(0)  # optimizer state exists from here on
    before = copy.deepcopy(([p.detach() for p in t.raw_model.parameters()], [o.state_dict() for o in t.optimizers]))
    real_forward = M.GPT.forward
    monkeypatch.setattr(M.GPT, "forward", lambda self, *a, **k: (lambda out: (out[0], out[1] * float("inf")))(
        real_forward(self, *a, **k)))  # an infinite loss: every gradient is inf or nan
    stats = step(1)
    assert not torch.isfinite(stats[:2]).all()
    assert all(torch.equal(a, b) for a, b in zip(before[0], t.raw_model.parameters()))
    assert repr(before[1]) == repr([o.state_dict() for o in t.optimizers])  # moments, momenta and step counts


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_checkpoints_before_it(corpus_dir, data_cache, tmp_path,
                                                                            monkeypatch, optimizer):
    real_forward, steps = M.GPT.forward, []

    def poisoned(self, idx, targets=None, **kwargs):  # step 3's loss is nan (its update is skipped: the test above)
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training:
            steps.append(len(steps))
        return logits, (loss * float("nan") if self.training and steps[-1] == 3 else loss)

    monkeypatch.setattr(M.GPT, "forward", poisoned)
    # latest.pt holds 3 finished steps; the poisoned one that follows is caught while the next one runs
    # (the check is deferred a step so the CPU never waits for the GPU), before any log or save.
    with pytest.raises(SystemExit, match="not finite at step 3; stopped before its update"):
        T.main(train_args(corpus_dir, data_cache, tmp_path / "run", "--max_steps", "10", "--checkpoint_interval", "3",
                          "--eval_interval", "100", "--log_interval", "100", "--optimizer", optimizer))
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["step"] == 3
    assert not (tmp_path / "run" / "model_best_val.pt").exists()  # no evaluation, so no save, after the bad step


def test_a_compiler_that_fails_at_the_first_step_leaves_one_note_and_the_eager_run(corpus_dir, data_cache, tmp_path,
                                                                                  monkeypatch, capsys):
    class NoCompiler(torch.nn.Module):  # what torch.compile gives where inductor cannot build its kernels
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nCommand: g++ ... (no such file)")

    flags = ["--max_steps", "3", "--eval_interval", "3", "--log_interval", "1"]
    eager = T.main(train_args(corpus_dir, data_cache, tmp_path / "eager", *flags))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: NoCompiler(model))
    capsys.readouterr()
    compiled = T.main([*train_args(corpus_dir, data_cache, tmp_path / "compiled", *flags), "--compile"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert eager == compiled == 0
    assert notes == ["note: torch.compile failed (RuntimeError: InductorError: CppCompileError: C++ compile error); "
                     "training without it (--no-compile skips the attempt)"]
    losses = lambda run: [r["train_loss"] for r in metrics(tmp_path / run) if "train_loss" in r]
    assert losses("compiled") == losses("eager") and len(losses("eager")) == 3


def test_out_of_memory_is_one_line_naming_what_to_lower(corpus_dir, data_cache, tmp_path, monkeypatch, capsys):
    def oom(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(T, "accumulate_gradients", oom)
    with pytest.raises(SystemExit) as exit_info:
        T.main(train_args(corpus_dir, data_cache, tmp_path / "run", "--max_steps", "2"))
    message = str(exit_info.value.code)
    assert message.startswith("error: out of GPU memory with micro-batches of 8 × 32 tokens")
    assert "--batch_size" in message and "--grad_accum" in message


def test_two_ranks_train_the_model_of_one_process_with_accumulation(corpus_dir, data_cache, tmp_path):
    # The default optimizers: Muon's updates are split between the ranks, AdamW's gradients all-reduced by DDP; the
    # batch doubles at step 4 (a batch-size schedule).
    common = ["--max_steps", "8", "--eval_interval", "8", "--log_interval", "1", "--dropout", "0.1",
              "--batch_stages", "1/2,1"]
    single = run_script("train_gpt2.py", *train_args(corpus_dir, data_cache, tmp_path / "one", *common,
                                                     "--grad_accum", "4"))
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_script("train_gpt2.py", *train_args(corpus_dir, data_cache, tmp_path / "two", *common, "--grad_accum", "2"),
                     torchrun_ranks=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = [r["train_loss"] for r in metrics(tmp_path / "one") if "train_loss" in r]
    two = [r["train_loss"] for r in metrics(tmp_path / "two") if "train_loss" in r]
    assert len(one) == len(two) == 8
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert final_val_loss(tmp_path / "one") == pytest.approx(final_val_loss(tmp_path / "two"), abs=1e-4)


def test_resume_refuses_another_shape_another_optimizer_and_a_missing_checkpoint_and_a_new_run_refuses_an_old_one(
        corpus_dir, data_cache, tmp_path):
    save = tmp_path / "run"
    assert T.main(train_args(corpus_dir, data_cache, save, "--max_steps", "2")) == 0  # in this process: the refusals
    # below are the script's own main, without a new interpreter each

    def refusal(*args: str) -> str:
        with pytest.raises(SystemExit) as exit:  # as `python train_gpt2.py` ends: status 1, one line
            T.main(list(args))
        assert isinstance(exit.value.code, str) and len(exit.value.code.splitlines()) == 1
        return exit.value.code

    other_shape = train_args(corpus_dir, data_cache, save, "--max_steps", "4", "--resume")
    other_shape[other_shape.index("--n_embd") + 1] = "64"
    assert "another model shape; n_embd: checkpoint 32, flags 64" in refusal(*other_shape)
    assert "trained with --optimizer muon, not adamw" in refusal(  # muon: the default
        *train_args(corpus_dir, data_cache, save, "--max_steps", "4", "--resume", "--optimizer", "adamw"))
    assert "--resume: no checkpoint at" in refusal(*train_args(corpus_dir, data_cache, tmp_path / "none", "--resume"))
    assert "holds an earlier run: continue it with --resume" in refusal(
        *train_args(corpus_dir, data_cache, save, "--max_steps", "2"))
    # A latest.pt as this repository wrote it before Settings existed (its args held the derived values) resumes.
    old = torch.load(save / "latest.pt", weights_only=True)
    old["args"] |= {"grad_accum": old.pop("run")["grad_accum"], "optimizer": "muon"}
    del old["best_step"]
    torch.save(old, save / "latest.pt")
    assert T.main(train_args(corpus_dir, data_cache, save, "--max_steps", "4", "--resume")) == 0
    assert torch.load(save / "latest.pt", weights_only=True)["step"] == 4


def test_a_checkpoint_that_needs_pickled_code_is_refused_on_resume(corpus_dir, data_cache, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    torch.save({"model": {}, "config": {}, "optimizer": math.sqrt}, save / "latest.pt")  # a pickled global
    result = run_script("train_gpt2.py", *train_args(corpus_dir, data_cache, save, "--resume"))
    assert result.returncode == 1 and "could run code" in result.stderr and "Traceback" not in result.stderr


def test_amp_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    dtype, note = runtime.choose_amp(True, "cpu")
    assert dtype is None and "no native bf16" in note and "fp32" in note
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.choose_amp(True, "cpu")[0] == torch.bfloat16 and runtime.choose_amp(None, "cpu") == (None, None)


def test_emulated_bf16_is_not_taken_for_real_bf16(monkeypatch):
    # V100 and T4 report bf16 as supported only through emulation: fp16 with loss scaling is faster there.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.choose_amp(None, "cuda")[0] == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.choose_amp(None, "cuda")[0] == torch.bfloat16


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 4090"])
def test_mfu_uses_the_peak_of_the_exact_card_and_none_for_a_card_it_does_not_know(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    known = P.PEAK_BF16_TFLOPS.get(name)
    assert P.peak_flops(torch.device("cuda", 0)) == (known * 1e12 if known else None)
    assert P.peak_flops(torch.device("cpu")) is None


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(nodes: list[Path], args: list[str]) -> list[subprocess.Popen]:
    """Two one-process "machines" of one run: each in its own directory, as machines without a shared disk."""
    port = str(free_port())
    procs = []
    for rank, node in enumerate(nodes):
        node.mkdir(exist_ok=True)
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        procs.append(start_script("train_gpt2.py", *args, env=env, cwd=node))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit status, stderr) of each process, once it has ended."""
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def test_two_machines_without_a_shared_disk_resume_from_rank_0s_checkpoint(corpus_dir, tmp_path):
    # Relative --save_dir and --data_cache: each "machine" writes its own; only rank 0 writes checkpoints.
    args = ["--dataset", str(corpus_dir), "--data_cache", "cache", "--save_dir", "run", *TINY_MODEL_ARGS,
            "--batch_size", "8", "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2", "--val_split", "0.1",
            "--num_workers", "0", "--no-amp", "--no-compile", "--device", "cpu", "--max_steps", "12",
            "--checkpoint_interval", "3", "--eval_interval", "1000", "--dropout", "0.1"]
    whole = run_script("train_gpt2.py", *[a.replace("run", str(tmp_path / "whole")).replace("cache", str(tmp_path / "c"))
                                          if a in ("run", "cache") else a for a in args], "--grad_accum", "2")
    assert whole.returncode == 0, whole.stderr[-2000:]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = start_nodes(nodes, args)
    assert wait_for(lambda: (nodes[0] / "run" / "latest.pt").exists())
    for p in procs:
        p.kill()
    finish(procs)
    assert torch.load(nodes[0] / "run" / "latest.pt", weights_only=True)["step"] < 12
    assert not (nodes[1] / "run" / "latest.pt").exists()

    resumed = finish(start_nodes(nodes, [*args, "--resume"]))
    assert all(code == 0 for code, _ in resumed), resumed[0][1][-2000:] + resumed[1][1][-2000:]
    assert final_val_loss(nodes[0] / "run") == pytest.approx(final_val_loss(tmp_path / "whole"), abs=1e-4)

    again = finish(start_nodes(nodes, args))  # a new run over rank 0's checkpoint: refused on both machines
    assert [code for code, _ in again] == [1, 1]
    assert all("holds an earlier run: continue it with --resume" in err for _, err in again)


def test_the_wsd_schedule_holds_the_rate_then_decays_linearly_to_min_lr_at_the_last_step():
    lr = lambda s: H.lr_scale(s, warmup=10, max_steps=100, schedule="wsd", cooldown_frac=0.4, floor=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert all(lr(s) == 1.0 for s in range(10, 61))  # stable until the last 40% (steps 60..99)
    assert lr(99) == pytest.approx(0.1) and lr(80) == pytest.approx(1.0 - 0.9 * 20 / 39)
    assert all(lr(s) > lr(s + 1) for s in range(60, 99))


def test_a_run_whose_length_the_data_has_not_settled_takes_each_rate_only_where_no_length_changes_it():
    for kind, warmup in (("wsd", None), ("wsd", 50), ("cosine", 50)):
        rate = H.LearningRate(kind, warmup, 0.5, 0.1)
        for step in (0, 10, 49, 50, 700, 1500, 1999, 2000, 3999):
            lengths = [rate.share(step, n) for n in (4000, 4001, 9000, 10**6)]
            if rate.known(step, 4000):  # known: what every longer run would give
                assert lengths == [lengths[0]] * 4, (kind, warmup, step)
        assert rate.known(10, 4000) or warmup is None  # a given warmup that fits is known at once
    assert not H.LearningRate("wsd", None, 0.5, 0.1).known(0, 4000)  # 700, or a tenth of a shorter run
    assert H.LearningRate("wsd", None, 0.5, 0.1).known(5000, 20_000)  # constant before any decay
    assert H.LearningRate("wsd", 50, 0.5, 0.1).known(1999, 4000)
    assert not H.LearningRate("wsd", 50, 0.5, 0.1).known(2000, 4000)  # the decay may start here
    assert not H.LearningRate("cosine", 50, 0.5, 0.1).known(60, 4000)


def test_muon_momentum_warms_up_to_the_flag_value():
    assert H.muon_momentum_at(0, 0.95) == pytest.approx(0.85)
    assert H.muon_momentum_at(H.MUON_MOMENTUM_WARMUP // 2, 0.95) == pytest.approx(0.90)
    assert H.muon_momentum_at(10 * H.MUON_MOMENTUM_WARMUP, 0.95) == pytest.approx(0.95)


@pytest.mark.parametrize("arch, untie", [("gpt2", False), ("modern", True)])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_parameter_is_updated_by_exactly_one_optimizer_group(arch, untie, optimizer):
    config = M.GPTConfig.from_preset(arch, n_layer=2, n_head=2, n_embd=32, block_size=16, tie_embeddings=not untie)
    model = M.GPT(config)
    args = F.parse_args(["--optimizer", optimizer])
    optimizers = O.make_optimizers(model, U.optimizer_settings(args, None), torch.device("cpu"))
    grouped = [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none left out
    if optimizer == "muon":
        muon = {id(p) for g in optimizers[1].param_groups for p in g["params"]}
        assert muon == {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}


def test_the_default_recipe_is_the_measured_one_and_fine_tuning_defaults_to_adamw():
    args = F.parse_args([])
    optimizer = lambda *flags: U.optimizer_settings(F.parse_args(list(flags)), None).kind
    assert (F.model_config(args).arch, optimizer(), args.schedule) == (F.DEFAULT_ARCH, "muon", "wsd") == \
        ("modern", "muon", "wsd")
    assert optimizer("--init_from", "gpt2") == "adamw"
    assert optimizer("--init_from", "gpt2", "--optimizer", "muon") == "muon"
    assert vars(args) == vars(F.parse_args([]))  # nothing after parsing changes the flags


def png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width field


def test_hellaswag_is_scored_during_training_and_unreachable_items_only_warn(corpus_dir, data_cache, tmp_path):
    items = write_items(tmp_path / "hellaswag.jsonl", make_items(12))
    save = tmp_path / "run"
    args = train_args(corpus_dir, data_cache, save, "--max_steps", "6", "--eval_interval", "6",
                      "--hellaswag_interval", "3", "--hellaswag", str(items))
    scored = run_script("train_gpt2.py", *args)
    assert scored.returncode == 0, scored.stderr[-2000:]
    rows = [r for r in metrics(save) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in rows] == [3, 6]
    import eval as E  # the last score is eval.py's score of the final weights (latest.pt, saved at the end)
    final = checkpoint.model_from_checkpoint(torch.load(save / "latest.pt", weights_only=True))
    expected = E.hellaswag_accuracy(final, E.read_items(items), torch.device("cpu"))
    assert (rows[-1]["hellaswag_acc_norm"], rows[-1]["hellaswag_acc"]) == (expected["acc_norm"], expected["acc"])
    # ...and so is the validation loss: eval.py's, over the same windows (here the whole split)
    logged = [r for r in metrics(save) if "val_loss" in r][-1]
    val = E.validation_loss(final, shards.TokenShards(prepared_data(args), "val"), 32, torch.device("cpu"))
    assert (logged["val_loss"], logged["val_bpb"]) == pytest.approx((val["loss"], val["bpb"]), rel=1e-5)
    assert png_width(save / "loss.png") == 1400  # a second panel beside the losses
    offline = run_script("train_gpt2.py", *train_args(corpus_dir, tmp_path / "cache", tmp_path / "offline",
                                                      "--max_steps", "4", "--hellaswag_interval", "2"),
                         env={"HELLASWAG_URL": "http://127.0.0.1:9/hellaswag_val.jsonl"})
    assert offline.returncode == 0, offline.stderr[-2000:]
    out = offline.stdout + offline.stderr
    assert out.count("warning: no HellaSwag scoring in this run (cannot download HellaSwag") == 1
    assert not any("hellaswag_acc_norm" in r for r in metrics(tmp_path / "offline"))


def test_arch_options_change_single_switches_of_the_preset():
    args = F.parse_args(["--arch", "modern", "--arch_option", "mlp=relu2", "--arch_option", "tie_embeddings=false",
                         "--arch_option", "logit_softcap=15"])
    config = F.model_config(args)
    assert (config.mlp, config.tie_embeddings, config.logit_softcap, config.qk_norm) == ("relu2", False, 15.0, True)


def test_a_target_loss_ends_the_run_at_the_first_evaluation_that_reaches_it_over_the_whole_split(
        corpus_dir, data_cache, tmp_path, capsys):
    save = tmp_path / "run"
    args = train_args(corpus_dir, data_cache, save, "--max_steps", "30", "--eval_interval", "2", "--eval_iters", "1",
                      "--target_loss", "9.8")
    assert T.main(args) == 0
    out = capsys.readouterr().out
    evaluations = [r for r in metrics(save) if "val_loss" in r]
    whole = max(r["val_tokens"] for r in evaluations)
    step = evaluations[-1]["step"]
    # Sampled figures above the target, then one at or below it, checked over the whole split: the run ends there.
    assert all(r["val_loss"] > 9.8 for r in evaluations[:-2]) and evaluations[-2]["val_loss"] <= 9.8
    assert evaluations[-2]["step"] == step < 30 and evaluations[-1]["val_tokens"] == whole
    assert evaluations[-1]["val_loss"] <= 9.8
    assert f"summary: --target_loss 9.8 reached at step {step}, " in out
    assert checkpoint.load_checkpoint(save / "latest.pt")["step"] == step
    assert metrics(save)[-1] | {"target_step": step} == metrics(save)[-1]


def test_the_horizon_gives_each_step_its_stages_batch_context_and_rate_and_counts_their_work():
    shape = H.Shape(grad_accum=4, block_size=64, batch=H.Stages((1 / 4, 1 / 2, 1)), context=H.Stages((1 / 2, 1, 1)),
                    window=H.Stages((1 / 4, 1 / 2, 1)))
    plan = P.Plan(params=1, params_non_embedding=1, tokens_per_step=4 * 64, sample_size=1)
    costs = B.Costs(eval_batches=1, eval_interval=1000, hellaswag_interval=0, hellaswag_tokens=0,
                    tokens_per_step=4 * 64, checkpoint_bytes=0, work=shape.work)
    horizon = H.Horizon(rate=H.LearningRate("wsd", 0, 0.5, 0.1), muon_momentum=0.95, held=None, given=30,
                        plan=plan, costs=costs, step=0, tokens_per_step=4 * 64, started=0.0, shape=shape)
    steps = [horizon.at(step) for step in range(30)]
    assert [s.accum for s in steps] == [1] * 10 + [2] * 10 + [4] * 10
    assert [s.context for s in steps] == [32] * 10 + [64] * 20
    assert [s.window for s in steps] == [8] * 10 + [32] * 10 + [64] * 10  # shares of the step's context
    assert [s.lr for s in steps[:15]] == pytest.approx([0.5] * 10 + [0.5 ** 0.5] * 5)  # sqrt of the batch's share
    assert horizon.steps == plan.steps == 30 and costs.work(0, 30) == pytest.approx(10 * (1 + 2 + 4) / 4)
    assert plan.tokens == 10 * (1 + 2 + 4) * 64  # what the plan says the run reads: the stages' batches
    assert shape.steps_for(costs.work(0, 30)) == 30  # --epochs: the steps that hold a number of full batches


def test_the_losss_extra_terms_count_for_their_parts_of_the_run_and_are_known_only_in_the_first():
    # The record's thirds: the third token ahead for the first, the second token ahead and the prefix for two.
    terms = H.LossTerms(ahead=(0.5, 0.25), prefix=0.3)
    assert [terms.at(step, 30) for step in (0, 9, 10, 19, 20, 29)] == \
        [(0.5, 0.25, 0.3)] * 2 + [(0.5, 0.0, 0.3)] * 2 + [(0.0, 0.0, 0.0)] * 2
    assert [H.LossTerms(ahead=(0.5,)).at(step, 30) for step in (14, 15)] == [(0.5,), (0.0,)]  # halves
    assert terms.known(9, 30) and not terms.known(10, 30)  # a longer run keeps the first part's weights, no more
    assert H.LossTerms().at(5, 30) == () and H.LossTerms().known(29, 30)


def test_a_window_schedule_for_a_model_without_windows_is_one_line(corpus_dir, tmp_path):
    with pytest.raises(SystemExit) as refused:
        T.main([*train_args(corpus_dir, tmp_path / "cache", tmp_path / "run"), "--window_stages", "1/2,1", "--plan"])
    assert str(refused.value.code) == ("error: --window_stages: this model has no attention windows (--arch speedrun "
                                       "has them, or --arch_option window_pattern=SSSL); leave the flag out")
