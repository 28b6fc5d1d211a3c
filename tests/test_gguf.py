"""export_gguf.py checked by its real consumer: each exported file loaded in llama.cpp (llama-cpp-python) gives
our logits and our greedy tokens, for a tiny trained model of each preset; and what cannot be exported says so."""
import os
import signal

import numpy as np
import pytest
import torch

import checkpoint
import export_gguf
import model as M
from common import EOT
from helpers import REPO, llama_cpp_process, make_corpus, one_torch_thread, run_script
from tokenizer import get_tokenizer

gguf = pytest.importorskip("gguf", reason="llama.cpp's gguf package writes the files (pip install -r requirements-dev.txt)")

# llama.cpp's three architectures: gpt2, qwen3 (the modern preset) and llama (the modern block without QK-norm,
# whose rotary pairs llama.cpp takes in another order).
PRESETS = {"gpt2": ("gpt2", {}), "modern": ("modern", {}), "modern-no-qk-norm": ("modern", dict(qk_norm=False))}
SHAPE = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)  # rows of 64: whole blocks of 32 for q8_0 and q4_0
PROMPT = "The quiet river follows the"
TRICKY = "It's 2026:  café, 東京🙂\n\tdon't  stop"
STEPS = 12  # the fixture's training: 4 x 32 tokens a step; the 50304-wide output layer makes each step ~0.3 s
GREEDY_STEPS = 24  # the issue asks for at least 20 at f16
# How far llama.cpp's logits may be from ours, as a fraction of the largest |logit|. Measured on these models
# (llama-cpp-python 0.3.36, 2026-12-02): f32 at most 1e-5 (the order of additions), f16 1.5e-4 (weights rounded
# to 11 bits), q8_0 2.5e-3 and q4_0 3.5e-3 (llama.cpp also rounds the activations to 8 bits for these, and q4_0
# keeps the token table, the largest matrix, at q8_0); each bound is about 5 times its figure.
TOLERANCE = {"f32": 1e-4, "f16": 1e-3, "q8_0": 1e-2, "q4_0": 2e-2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model of each preset trained for a few steps on generated sentences, as a checkpoint: trained, its
    next tokens have margins that random weights lack, so a rounding error does not flip greedy choices."""
    enc, out = get_tokenizer(), {}
    tokens = torch.tensor(enc.encode_ordinary(" ".join(make_corpus(n_docs=40, seed=5))))
    batches = tokens[:len(tokens) // 33 * 33].view(-1, 33)
    for name, (arch, switches) in PRESETS.items():
        torch.manual_seed(0)  # random projections and head: 12 steps from zero leave logits too flat for the bounds
        model = M.GPT(M.GPTConfig.from_preset(arch, **SHAPE, **switches, zero_init=False))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with one_torch_thread():
            for step in range(STEPS):
                batch = batches[torch.randint(len(batches), (4,))]
                _, loss = model(batch[:, :-1], batch[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        path = tmp_path_factory.mktemp(name) / "model_best_val.pt"
        checkpoint.save_checkpoint(path, model, step=STEPS, val_loss=loss.item())
        out[name] = (model.eval(), path)
    return out


def our_logits(model: M.GPT, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0][0, :, :EOT + 1].numpy()


# Functions llama.cpp's process runs (helpers.llama_cpp_process), each given the Llama of one file.

def llama_cpp_logits(llm, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """How llama.cpp tokenizes the prompt, and its logits at each of our ids."""
    llm.eval(ids)
    return llm.tokenize(PROMPT.encode(), add_bos=False), llm.scores[:len(ids)]


def llama_cpp_tokenizer(llm, text: str, ids: list[int]) -> tuple[list[int], str]:
    """llama.cpp's tokens for `text`, and its text for our tokens of it."""
    return llm.tokenize(text.encode(), add_bos=False), llm.detokenize(ids).decode()


def llama_cpp_greedy(llm, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation from llama.cpp's own logits, one token at a time through its KV cache."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@pytest.mark.parametrize("arch", PRESETS)
def test_llama_cpp_gives_our_logits_and_greedy_tokens_at_each_type(trained, tmp_path, arch):
    model, checkpoint = trained[arch]
    enc = get_tokenizer()
    ids, tricky = enc.encode_ordinary(PROMPT), enc.encode_ordinary(TRICKY)
    with llama_cpp_process() as llama:  # one child for the four files, started first: seconds to start, ms a load
        ours = our_logits(model, ids)
        blocks, model.transformer.h = model.transformer.h, torch.nn.ModuleList()
        without_blocks = our_logits(model, ids)
        model.transformer.h = blocks
        # The test means something: a block llama.cpp got wrong would move the logits far past every tolerance.
        assert np.abs(ours - without_blocks).max() / np.abs(ours).max() > 0.1
        greedy = list(model.generate(ids, GREEDY_STEPS, temperature=0, stop_at_eot=False))
        for kind, tolerance in TOLERANCE.items():
            path = tmp_path / f"model-{kind}.gguf"
            export_gguf.export(str(checkpoint), path, kind)
            loaded = llama.load(path, n_ctx=SHAPE["block_size"], logits_all=True, n_threads=1)
            # No AMX or repacked weights (they crash on CPUs with AMX); with them an AVX2 CPU's q4_0 is CPU_REPACK.
            assert loaded == {"use_extra_bufts": False, "weight_buffers": ["CPU_Mapped"]}, f"{kind}: {loaded}"
            tokens, logits = llama.run(path, llama_cpp_logits, ids)
            assert tokens == ids  # the tokenizer went in as GPT-2's
            error = np.abs(logits - ours).max() / np.abs(ours).max()
            assert error <= tolerance, \
                f"{arch} {kind}: llama.cpp's logits differ from ours by {error:.2e} of the largest"
            if kind == "f16":  # GPT-2's split pattern too: spaces, digits, contractions, bytes of characters
                assert llama.run(path, llama_cpp_tokenizer, TRICKY, tricky) == (tricky, TRICKY)
                assert llama.run(path, llama_cpp_greedy, ids, GREEDY_STEPS) == greedy


def segfault(llm) -> None:
    """Dies as llama.cpp does where its kernels crash (ggml-org/llama.cpp#20824 on CPUs with AMX)."""
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_llama_cpp_crash_fails_the_test_in_one_line_naming_the_signal_and_the_file(tmp_path):
    path = tmp_path / "m.gguf"
    with pytest.raises(pytest.fail.Exception) as failed:
        with llama_cpp_process() as llama:
            checkpoint.save_checkpoint(tmp_path / "m.pt", M.GPT(M.GPTConfig.from_preset("gpt2", **SHAPE)))
            export_gguf.export(str(tmp_path / "m.pt"), path, "q8_0")
            llama.load(path, n_ctx=SHAPE["block_size"], n_threads=1)
            llama.run(path, segfault)
    assert str(failed.value) == "llama.cpp crashed with SIGSEGV in segfault on m.gguf"


def test_the_file_carries_gpt2s_tokenizer_and_the_modelfile_completes_plain_text(trained, tmp_path):
    _, checkpoint = trained["modern"]
    result = run_script("export_gguf.py", str(checkpoint), str(tmp_path / "out" / "m.gguf"), "--type", "q4_0")
    assert result.returncode == 0, result.stderr
    assert "--no-repack" in result.stdout and "use_extra_bufts=False" in result.stdout  # what a CPU with AMX needs
    reader = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "qwen3"  # the modern preset has QK-norm
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == EOT
    assert field("tokenizer.ggml.tokens")[EOT] == "<|endoftext|>" and len(field("tokenizer.ggml.tokens")) == EOT + 1
    assert "tokenizer.chat_template" not in reader.fields  # a base model: plain completion
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./m.gguf\n") and 'TEMPLATE """{{ .Prompt }}"""' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and f"PARAMETER num_ctx {SHAPE['block_size']}" in modelfile


def test_what_llama_cpp_cannot_take_is_one_line_and_no_file(tmp_path):
    capped = M.GPTConfig.from_preset("modern", n_layer=1, n_head=2, n_embd=64, block_size=8, logit_softcap=15.0)
    checkpoint.save_checkpoint(tmp_path / "capped.pt", M.GPT(capped))
    result = run_script("export_gguf.py", str(tmp_path / "capped.pt"), str(tmp_path / "capped.gguf"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "logit_softcap 15.0" in result.stderr
    cases = {"small vocabulary": (dict(vocab_size=100), "f16", "vocabulary has 100 tokens"),
             "rows of 48": (dict(n_embd=48, n_head=2), "q8_0", "rows of 48"),
             "no checkpoint": (None, "f16", "no checkpoint at")}
    for name, (fields, kind, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        if fields is not None:
            checkpoint.save_checkpoint(path, M.GPT(M.GPTConfig.from_preset("gpt2", **(SHAPE | fields))))
        with pytest.raises(SystemExit) as exit_:
            export_gguf.main([str(path), str(tmp_path / f"{name}.gguf"), "--type", kind])
        assert message in str(exit_.value.code) and "\n" not in str(exit_.value.code), name
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "Modelfile").exists()


def test_a_speedrun_model_is_one_line_naming_what_llama_cpp_lacks_and_the_presets_that_export(tmp_path):
    speedrun = M.GPTConfig.from_preset("speedrun", n_layer=2, n_head=2, n_embd=64, block_size=8)
    checkpoint.save_checkpoint(tmp_path / "speedrun.pt", M.GPT(speedrun))
    result = run_script("export_gguf.py", str(tmp_path / "speedrun.pt"), str(tmp_path / "out" / "m.gguf"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: llama.cpp has no counterpart for this speedrun-preset model's ")
    for switch in ("logit_softcap 23.0", "value_embeds 3", "window_pattern 'SSSL'", "document_mask True", "a relu2 MLP"):
        assert switch in line
    assert line.endswith("train with --arch modern (or --arch gpt2) to export to GGUF; export_hf.py writes this one "
                         "for transformers")
    assert not (tmp_path / "out").exists()


def test_the_readmes_gguf_command_parses_with_the_scripts_flags():
    commands = [line.split() for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("python export_gguf.py")]
    assert commands
    for words in commands:
        export_gguf.build_parser().parse_args(words[2:])  # SystemExit on an unknown flag or type
