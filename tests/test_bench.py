"""bench.py's smoke test: every benchmark runs on a tiny model and reports its figures (no speed is asserted)."""
import dataclasses
import json
import math
import signal
import subprocess

import pytest

import bench
import cpu_decoding
import flags as F
import startup as U
from helpers import REPO, TINY_MODEL_ARGS, child_env, make_corpus, prepared_data, run_script, write_txt_dir


def test_the_tiny_benchmark_reports_every_figure_as_json(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--loop",
                        "--decode", "--tokenize", "--hellaswag", "--update", "--json", str(out))
    assert result.returncode == 0, f"{how_it_ended(result)}\n{result.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert [(r["arch"], r["optimizer"]) for r in report["train"]] == [("modern", "muon")]  # train_gpt2.py's defaults
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in report["train"])
    assert report["loop"]["tokens_per_s"] > 0
    assert report["decode"]["greedy_fp32_equals_hf"] is True
    decode = report["decode"]
    assert all(decode[f"{name}_tokens_per_s"] > 0 for name in ("hf_fp32", "ours_fp32", "ours_bf16", "ours_int8"))
    assert decode["bandwidth_gb_s"] > 0 and decode["ours_int8_weight_mb"] < decode["ours_bf16_weight_mb"]
    assert decode["int8_vs_fp32"]["positions"] == decode["n_tokens"] + decode["prompt_len"]
    names = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}  # bench.py's, then torch's
    assert names[decode["auto_dtype"]] == cpu_decoding.choose(decode["probe_ns_per_weight"])  # the probe's pick
    assert decode["startup_first_token_s"] > 0
    try:  # llama.cpp beside ours, on export_gguf.py's files of the same weights, when llama-cpp-python is installed
        import gguf, llama_cpp  # noqa: F401
        assert decode["peers"] == ["llama_f16", "llama_q8_0", "llama_q4_0"]
    except ImportError:
        assert decode["peers"] == []
    assert all(decode[f"{name}_tokens_per_s"] > 0 and decode[f"{name}_load_s"] > 0 for name in decode["peers"])
    assert report["tokenize"]["ratio"] > 0 and report["tokenize"]["tokens"] > 0
    assert report["hellaswag"]["fp32_items_per_s"] > 0 and report["hellaswag"]["bf16_items_per_s"] > 0
    assert "training" in result.stdout and "loop / table" in result.stdout
    update = report["update"]
    assert set(update["operators"]) == {"AdamW.step", "Muon.step"}
    if "operators_torch_muon" in update:  # the batched Muon dispatches fewer operators than one matrix at a time
        assert update["operators"]["Muon.step"] < update["operators_torch_muon"]
    assert update["save"]["file_gb"] > 0 and update["newton_schulz_tflop"] > 0


def how_it_ended(result) -> str:
    """A script's crash in one line: the signal that killed it, or its last line (bench.py's one-line error, such
    as "error: llama.cpp crashed with SIGSEGV loading model-q8_0.gguf")."""
    if result.returncode < 0:
        return f"killed by {signal.Signals(-result.returncode).name}"
    return (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]


def test_a_benchmark_cut_short_keeps_the_figures_it_measured(tmp_path):
    # --also adds a setting (here one that cannot run) after train_gpt2.py's defaults
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--tiny", "--device", "cpu", "--also", "arch=no_such_preset", "--steps", "1",
                        "--warmup", "1", "--json", str(out))
    assert result.returncode != 0  # the second setting cannot run
    assert [r["arch"] for r in json.loads(out.read_text())["train"]] == ["modern"]
    assert "measured: tokens/s" in result.stdout


def test_also_changes_its_keys_together_in_one_setting():
    import bench
    assert bench.parse_also("arch=gpt2,optimizer=adamw") == {"arch": "gpt2", "optimizer": "adamw"}  # nanoGPT's recipe
    with pytest.raises(Exception, match="KEY=V,KEY=V"):
        bench.parse_also("arch=gpt2,no_such_key=1")


def test_recipes_train_on_the_same_data_and_are_held_to_the_baselines_final_loss(tmp_path):
    corpus = write_txt_dir(tmp_path / "text", make_corpus(n_docs=80, seed=3))
    flags = ["--dataset", str(corpus), "--data_cache", str(tmp_path / "cache"), *TINY_MODEL_ARGS, "--batch_size", "8",
             "--max_steps", "6", "--eval_interval", "2", "--eval_iters", "2", "--lr", "3e-3", "--min_lr", "3e-4",
             "--val_split", "0.1", "--num_workers", "0", "--device", "cpu"]
    out = tmp_path / "recipes.json"
    args = ["--device", "cpu", "--recipes", "--runs", str(tmp_path / "runs"), "--train_flags", " ".join(flags),
            "--recipe", "muon=--optimizer muon --schedule wsd", "--only", "gpt2-adamw-cosine,muon", "--json", str(out)]
    first = run_script("bench.py", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["recipes"]}
    assert set(rows) == {"gpt2-adamw-cosine", "muon"}
    assert [step for step, _ in rows["muon"]["evals"]] == [2, 4, 6] and rows["gpt2-adamw-cosine"]["ratio"] == 1.0
    again = run_script("bench.py", *args)  # finished runs are reused, not trained again
    assert again.returncode == 0 and json.loads(out.read_text())["recipes"][0]["seconds"] == rows["gpt2-adamw-cosine"]["seconds"]
    # --budgets scores every run's best checkpoint on the same held-out tokens, whatever its batch
    same = bench.same_validation_loss(tmp_path / "runs" / "muon" / "model_best_val.pt", prepared_data(flags))
    assert 0 < same < math.log(50257)


def test_the_gpu_check_script_ends_with_its_summary_of_speed_and_validation_at_fixed_steps(tmp_path):
    # What a device runs, run here on the CPU at a tiny shape: every figure it promises lands in summary.json.
    corpus = write_txt_dir(tmp_path / "corpus", make_corpus(n_docs=40, seed=5))
    flags = [*TINY_MODEL_ARGS, "--dataset", str(corpus), "--val_split", "0.1", "--batch_size", "4",
             "--eval_iters", "2", "--num_workers", "0", "--no-compile"]
    env = child_env(OUT=str(tmp_path / "out"), DEVICE="cpu", STEPS="2", EVERY="1", BENCH_FLAGS="--tiny",
                    BENCH_STEPS="1", BENCH_WARMUP="1", DATA_CACHE=str(tmp_path / "cache"), TRAIN_FLAGS=" ".join(flags))
    result = subprocess.run(["bash", str(REPO / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(summary["validation"]) == ["1", "2"] and summary["seconds"] > 0
    assert summary["bench"][0]["tokens_per_s"] > 0 and summary["bench"][0]["peak_memory_gib"] >= 0


def test_the_fields_recipes_are_the_default_the_one_before_it_and_the_default_less_one_piece_each():
    def trained_with(flags: str) -> dict:
        args = F.parse_args(flags.split() + ["--device", "cpu"])
        return dataclasses.asdict(F.model_config(args)) | dataclasses.asdict(U.optimizer_settings(args, None))

    recipes = {name: trained_with(flags) for name, flags in bench.field_recipes([1337, 1], 200).items()}
    default = trained_with("")
    differs = {name: {k for k in default if recipes[name][k] != default[k]} for name in recipes}
    assert differs["default"] == differs["default-seed1"] == set()
    assert differs["previous"] == {"tie_embeddings", "zero_init", "muon_iteration", "normuon",
                                   "cautious_weight_decay", "adamw_groups", "warmup_steps"}
    assert recipes["previous"]["warmup_steps"] == 20 and default["warmup_steps"] == 0  # a tenth of 200 steps; none
    pieces = [differs[name] for name in recipes if name.startswith("default-no-")]
    assert pieces == [{"tie_embeddings", "zero_init"}, {"muon_iteration"}, {"normuon"}, {"cautious_weight_decay"},
                      {"adamw_groups"}, {"warmup_steps"}]
