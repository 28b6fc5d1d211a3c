"""Fine-tuning with --init_from: transformers' GPT-2 weights or our own checkpoint, on local text."""
import json
import signal

import pytest
import torch
import torch.nn.functional as F

import batches
import checkpoint
import data
import flags as train_flags
import hf
import sources
import startup as U
from common import CheckpointError
from helpers import make_corpus, run_script, start_script, wait_for, write_txt_dir
from shards import TokenShards
from weights import model_with_weights

transformers = pytest.importorskip("transformers")

CONTEXT = 64  # the weights' context; runs crop it to 32


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers GPT-2 (the Hub is out of reach), saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=CONTEXT, vocab_size=50257)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_txt_dir(tmp_path_factory.mktemp("corpus"), make_corpus(n_docs=80, seed=7))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tune_args(init_from, corpus_dir, cache, save_dir, *extra) -> list[str]:
    return ["--init_from", str(init_from), "--dataset", str(corpus_dir), "--data_cache", str(cache),
            "--save_dir", str(save_dir), "--block_size", "32", "--batch_size", "8", "--lr", "1e-3",
            "--optimizer", "adamw", "--warmup_steps", "2", "--val_split", "0.1", "--eval_iters", "3",
            "--num_workers", "0", "--no-amp", "--no-compile", "--device", "cpu", *extra]


def metrics(save_dir) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def val_losses(save_dir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(save_dir) if "val_loss" in r}


def transformers_val_loss(hf_dir, corpus_dir, cache) -> float:
    """transformers' own loss on the whole validation split, which a fine-tune's first evaluation reads."""
    args = train_flags.parse_args(tune_args(hf_dir, corpus_dir, cache, "unused"))
    shards = TokenShards(data.prepare(sources.DataSpec.from_args(args), progress=False), "val")
    windows = batches.Windows(shards, 32)
    x, y = windows.read(windows.spread(None))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()


def test_a_fine_tune_from_transformers_weights_starts_at_transformers_own_loss(hf_dir, corpus_dir, cache, tmp_path):
    save = tmp_path / "tune"
    result = run_script("train_gpt2.py", *tune_args(hf_dir, corpus_dir, cache, save, "--max_steps", "4",
                                                    "--eval_interval", "4"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "starting from the weights of" in result.stdout + result.stderr
    losses = val_losses(save)
    assert set(losses) == {0, 4}
    assert losses[0] == pytest.approx(transformers_val_loss(hf_dir, corpus_dir, cache), abs=1e-4)
    best = torch.load(save / "model_best_val.pt", weights_only=True)
    assert best["init_from"] == str(hf_dir) and best["config"]["block_size"] == 32


def test_a_fine_tune_from_our_checkpoint_starts_at_its_saved_validation_loss(hf_dir, corpus_dir, cache, tmp_path):
    first = tmp_path / "first"
    assert run_script("train_gpt2.py", *tune_args(hf_dir, corpus_dir, cache, first, "--max_steps", "3",
                                                  "--eval_interval", "3")).returncode == 0
    saved = torch.load(first / "model_best_val.pt", weights_only=True)
    again = tmp_path / "again"
    result = run_script("train_gpt2.py", *tune_args(first / "model_best_val.pt", corpus_dir, cache, again,
                                                    "--max_steps", "1", "--dropout", "0.1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert val_losses(again)[0] == pytest.approx(saved["val_loss"], abs=1e-5)


def test_cropping_the_context_keeps_the_logits_of_the_first_positions(hf_dir):
    whole = hf.from_pretrained(str(hf_dir)).eval()
    args = train_flags.parse_args(["--init_from", str(hf_dir), "--block_size", "16"])
    weights, state = checkpoint.read_weights(str(hf_dir), 16)  # as --init_from reads them
    cropped = model_with_weights(U.fine_tune_config(weights, args, str(hf_dir)), state).eval()
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    assert cropped.config.block_size == 16 and cropped.transformer.wpe.weight.shape[0] == 16
    assert torch.equal(cropped(x)[0], whole(x)[0])


@pytest.mark.parametrize("flags, message", [
    (["--n_layer", "3"], "--n_layer 3 but the weights have 2"),
    (["--arch", "modern"], "--arch modern but the weights are gpt2"),
    (["--block_size", "128"], "--block_size 128 but the weights know 64 positions"),
])
def test_shape_flags_that_contradict_the_weights_are_named_with_both_values(hf_dir, flags, message):
    weights = hf.from_pretrained(str(hf_dir)).config
    with pytest.raises(CheckpointError, match=f"--init_from {hf_dir}: {message}"):
        U.fine_tune_config(weights, train_flags.parse_args(["--init_from", str(hf_dir), *flags]), str(hf_dir))


def test_contradictions_and_an_unreachable_hub_end_in_one_line(hf_dir, corpus_dir, cache, tmp_path):
    wrong = run_script("train_gpt2.py", *tune_args(hf_dir, corpus_dir, cache, tmp_path / "a", "--n_embd", "64"))
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1].startswith("error: --init_from")
    assert "--n_embd 64 but the weights have 32" in wrong.stderr and "Traceback" not in wrong.stderr
    offline = run_script("train_gpt2.py", *tune_args("gpt2", corpus_dir, cache, tmp_path / "b"))
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert "could not fetch 'gpt2' from the Hugging Face Hub" in offline.stderr
    assert "pass a local directory" in offline.stderr.strip().splitlines()[-1]


def test_a_killed_fine_tune_resumes_to_the_model_of_an_uninterrupted_one(hf_dir, corpus_dir, cache, tmp_path):
    common = ["--max_steps", "8", "--checkpoint_interval", "2", "--eval_interval", "1000", "--dropout", "0.1"]
    whole = run_script("train_gpt2.py", *tune_args(hf_dir, corpus_dir, cache, tmp_path / "whole", *common))
    assert whole.returncode == 0, whole.stderr[-2000:]
    save = tmp_path / "killed"
    proc = start_script("train_gpt2.py", *tune_args(hf_dir, corpus_dir, cache, save, *common))
    assert wait_for(lambda: (save / "latest.pt").exists(), proc), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(save / "latest.pt", weights_only=True)["step"] < 8
    resumed = run_script("train_gpt2.py", *tune_args(hf_dir, corpus_dir, cache, save, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert val_losses(save)[8] == pytest.approx(val_losses(tmp_path / "whole")[8], abs=1e-4)
