"""sample.py on tiny checkpoints: what a user talking to a model relies on, and each bad input's message."""
import io
import json
import subprocess
import sys

import pytest
import torch

import checkpoint
import cpu_decoding
import model as M
import sample
from common import EOT
from helpers import child_env, one_torch_thread, run_script
from tokenizer import get_tokenizer
from weights import model_with_weights


class Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def save_tiny(path, always_eot: bool = False):
    """A 2-layer GPT-2 over the real vocabulary, saved as train_gpt2.py saves checkpoints."""
    torch.manual_seed(0)
    config = M.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257)
    m = M.GPT(config)
    if always_eot:  # final hidden state = ones, aligned with the EOT row only: greedy always picks EOT
        with torch.no_grad():
            m.transformer.ln_f.weight.zero_()
            m.transformer.ln_f.bias.fill_(1.0)
            m.lm_head.weight[EOT] = 1.0
    checkpoint.save_checkpoint(path, m, step=7, val_loss=2.5)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


@pytest.fixture(scope="module")
def eot_ckpt(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("ckpt") / "eot.pt", always_eot=True))


def test_a_character_split_across_tokens_is_streamed_whole_and_exact():
    enc = get_tokenizer()
    text = "東京🙂 café"
    tokens = enc.encode_ordinary(text)
    pieces = [enc.decode_single_token_bytes(t) for t in tokens]
    assert any(not _is_utf8(p) for p in pieces)  # the test means something: some tokens hold half a character
    streamed = list(sample.decode_stream(enc, tokens))
    assert "".join(streamed) == text
    assert all("\ufffd" not in s for s in streamed)
    # A character the model never finished is flushed at the end, as one replacement character.
    assert "".join(sample.decode_stream(enc, enc.encode_ordinary("🙂")[:-1])) == "\ufffd"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_an_empty_prompt_starts_from_end_of_text_as_gpt2_samples_do():
    enc = get_tokenizer()
    assert sample.encode_prompt(enc, "") == [EOT]
    assert sample.encode_prompt(enc, "a<|endoftext|>") == enc.encode_ordinary("a") + [EOT]


def test_greedy_decoding_gives_the_same_text_every_run_and_continues_a_prompt_file(tiny_ckpt, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quiet river 東京", encoding="utf-8")
    args = ("--checkpoint", tiny_ckpt, "--prompt", str(prompt), "--temperature", "0", "--max_tokens", "8",
            "--ignore_eot", "--cpu")
    a, b = run_script("sample.py", *args, "--seed", "1"), run_script("sample.py", *args, "--seed", "2")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The quiet river 東京")
    assert len(a.stdout) > len("The quiet river 東京\n")
    assert "1.6M parameters, gpt2 preset, step 7, val loss 2.5000" in a.stderr and "on cpu" in a.stderr


def test_the_same_seed_gives_the_same_sample_and_another_seed_another(tiny_ckpt, capsys):
    def sample_with(seed):
        assert sample.main(["--checkpoint", tiny_ckpt, "--prompt", "The", "--temperature", "1",
                            "--max_tokens", "12", "--ignore_eot", "--cpu", "--seed", str(seed)]) == 0
        return capsys.readouterr().out

    first = sample_with(1)
    assert sample_with(1) == first and sample_with(2) != first


def test_generation_stops_at_end_of_text_and_ignore_eot_goes_on(eot_ckpt):
    args = ("--checkpoint", eot_ckpt, "--prompt", "hi", "--temperature", "0", "--max_tokens", "3", "--cpu")
    stopped, going = run_script("sample.py", *args), run_script("sample.py", *args, "--ignore_eot", "--stream")
    assert stopped.returncode == 0 and stopped.stdout == "hi\n"
    assert going.returncode == 0 and going.stdout == "hi" + "<|endoftext|>" * 3 + "\n"


def test_piped_prompts_are_each_continued_then_it_exits_cleanly(eot_ckpt):
    result = run_script("sample.py", "--interactive", "--checkpoint", eot_ckpt, "--temperature", "0",
                        "--max_tokens", "2", "--ignore_eot", "--cpu",
                        input="The quiet river\n\nThe green garden\n")
    assert result.returncode == 0, result.stderr
    # One continuation per non-empty line, no "> " prompts in piped output.
    eot = "<|endoftext|>" * 2
    assert result.stdout == f"The quiet river{eot}\nThe green garden{eot}\n"


def test_quit_ends_the_session_with_status_zero(eot_ckpt):
    result = run_script("sample.py", "--interactive", "--checkpoint", eot_ckpt, "--max_tokens", "1",
                        "--cpu", input="first\nquit\nsecond\n")
    assert result.returncode == 0 and result.stdout == "first\n"


class FakeModel:
    """Stands in for GPT.generate: the first continuation is interrupted (Ctrl-C) after one token."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompt, max_new_tokens, **kw):
        self.calls += 1
        yield 64  # "a"
        if self.calls == 1:
            raise KeyboardInterrupt


def test_ctrl_c_during_a_continuation_returns_to_the_prompt(monkeypatch, capsys):
    stdin = io.StringIO("first\nsecond\n")
    stdin.isatty = lambda: True  # input() then reads this, as a terminal; its end is Ctrl-D
    monkeypatch.setattr("sys.stdin", stdin)
    args = sample.parse_args(["--interactive", "--max_tokens", "5"])
    sample.interactive(FakeModel(), get_tokenizer(), sample.Sampling.from_args(args, torch.Generator()))
    out = capsys.readouterr().out
    assert out == "> firsta\n[stopped]\n> seconda\n> \n"


def test_sample_py_answers_without_importing_the_compiler_stack(tiny_ckpt):
    # torch._dynamo takes seconds to import and decoding never compiles: start-up must not pay for it.
    code = ("import sys, sample; sample.main(['--checkpoint', sys.argv[1], '--cpu', '--max_tokens', '2', "
            "'--prompt', 'x']); print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    result = subprocess.run([sys.executable, "-c", code, tiny_ckpt], env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_int8_weights_keep_the_logits_within_2_percent_and_fp32s_next_token_9_times_in_10(arch):
    torch.manual_seed(0)
    # Initialised at random throughout (the modern preset's head and projections start at zero: every logit 0).
    config = M.GPTConfig.from_preset(arch, n_layer=2, n_head=2, n_embd=32, block_size=64, zero_init=False)
    fp32 = M.GPT(config).eval()
    int8 = cpu_decoding.quantize_int8(model_with_weights(config, fp32.state_dict()))
    assert isinstance(int8.lm_head, cpu_decoding.Int8Linear) and int8.transformer.wte.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = fp32(tokens)[0][0, :, :config.vocab_size], int8(tokens)[0][0, :, :config.vocab_size].float()
    assert (b - a).norm() / a.norm() < 0.02  # per-row int8 keeps the logits within 2% (bf16 alone: ~0.5%)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


# Each preset as sample.py loads it, the speedrun's short window (5) well inside the context.
PRESET_SWITCHES = {"gpt2": {}, "modern": {}, "speedrun": dict(window_pattern="SL", short_window=5)}


@pytest.fixture(scope="module")
def preset_ckpts(tmp_path_factory):
    """A checkpoint of each preset over GPT-2's vocabulary, perturbed where it starts at zero (the speedrun's head,
    tables and gates), so that every switch changes the logits."""
    folder, paths = tmp_path_factory.mktemp("presets"), {}
    for arch, switches in PRESET_SWITCHES.items():
        torch.manual_seed(0)
        model = M.GPT(M.GPTConfig.from_preset(arch, n_layer=4, n_head=2, n_embd=64, block_size=32, **switches))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        paths[arch] = folder / f"{arch}.pt"
        checkpoint.save_checkpoint(paths[arch], model, step=1)
    return paths


@pytest.mark.parametrize("arch", PRESET_SWITCHES)
def test_every_preset_decodes_in_every_cpu_layout_and_its_cache_gives_its_full_forwards_logits(preset_ckpts, arch):
    x = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(1))
    x[0, 13] = EOT  # two documents: the speedrun's document mask acts
    pieces = [x[:, :7], x[:, 7:12]] + [x[:, i:i + 1] for i in range(12, 32)]  # a prefill, a chunk, single tokens
    for dtype in cpu_decoding.LAYOUTS:
        model, _ = sample.load(str(preset_ckpts[arch]), torch.device("cpu"), dtype)
        with one_torch_thread(), torch.inference_mode():
            full = model(x)[0][0, :, :EOT + 1].float()
            cache = M.KVCache(model.config, 1, "cpu", torch.float32)  # generate()'s cache on a CPU
            cached = torch.cat([model.head(model.hidden_states(p, cache)) for p in pieces], dim=1)[0, :, :EOT + 1]
            tokens = list(model.generate(x[0, :20].tolist(), 30, temperature=0, stop_at_eot=False))
        # Within the layout's rounding (bf16 activations: about 1% of the logits' spread); a cache that missed
        # a window or a document boundary is off by about 10% (measured on the speedrun model).
        error = (cached.float() - full).abs().max() / (full - full.mean(-1, keepdim=True)).abs().max()
        assert error < (1e-5 if dtype == torch.float32 else 0.03), f"{dtype}: {error:.2e}"
        assert len(tokens) == 30  # past block_size: the cache was rebuilt on the way


@pytest.mark.skipif(not cpu_decoding.HAS_INT4, reason="int4's kernel came in torch 2.6")
def test_int8_weights_as_two_int4_planes_multiply_as_the_int8_kernel_does():
    # 336 rows: more than one block of PLANE_ROWS, and a last block that is not a whole 64 rows of the packing.
    q = torch.randint(-128, 128, (336, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scale, x = torch.rand(336) / 100, torch.randn(3, 128).bfloat16()
    int8 = cpu_decoding.Int8Linear(q, scale.bfloat16(), None)
    for group in (32, 128):
        packed, scales = cpu_decoding.to_planes(q, scale.bfloat16().float(), group)
        planes = cpu_decoding.Int8Linear(packed, scales.bfloat16(), None, group)
        torch.testing.assert_close(planes(x).float(), int8(x).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["int8", "int4"])
def test_quantizing_in_pieces_of_rows_on_threads_gives_the_model_quantized_whole(layout, monkeypatch):
    # In pieces of 64 rows (the packing's block), the blocks' matrices of 192 and 256 rows span 3 and 4, the
    # output layer's 50304 rows 786: each piece quantized apart, then joined (at 4096 rows a piece, GPT-2's
    # own blocks are whole pieces; its output layer is not).
    torch.manual_seed(0)
    config = M.GPTConfig.from_preset("gpt2", n_layer=1, n_head=2, n_embd=64, block_size=32)
    weights = M.GPT(config).state_dict()
    quantize = cpu_decoding.quantize_int8 if layout == "int8" else cpu_decoding.quantize_int4
    whole = quantize(model_with_weights(config, weights))
    monkeypatch.setattr(cpu_decoding, "QUANTIZE_ROWS", 64)
    pieces = quantize(model_with_weights(config, weights))
    for a, b in zip(whole.state_dict().values(), pieces.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_int8_takes_the_planes_only_in_the_output_layer_where_aten_uses_avx512_and_the_shape_fits(monkeypatch):
    for capability, shape, output_layer, group in (
            ("AVX512", (3072, 768), True, 256), ("AVX512", (50304, 64), True, 64),
            ("AVX512", (50257, 768), True, 0), ("AVX512", (768, 48), True, 0), ("AVX512", (3072, 768), False, 0),
            ("AVX2", (3072, 768), True, 0), ("DEFAULT", (3072, 768), True, 0)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        expected = group if cpu_decoding.HAS_INT4 else 0
        assert cpu_decoding.int8_planes_group(torch.Size(shape), output_layer) == expected


@pytest.mark.skipif(not cpu_decoding.cpu_has_fast_bf16(), reason="bf16 weights are packed only where oneDNN has fast bf16")
def test_bf16_weights_packed_for_the_cpu_give_plain_bf16s_logits(tiny_ckpt):
    packed, _ = sample.load(tiny_ckpt, torch.device("cpu"), torch.bfloat16)
    assert isinstance(packed.lm_head, cpu_decoding.PackedLinear)
    plain = checkpoint.model_from_checkpoint(torch.load(tiny_ckpt, weights_only=True)).to(torch.bfloat16).eval()
    tokens = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(packed(tokens)[0], plain(tokens)[0])
    assert list(packed.generate([1, 2, 3], 6, temperature=0)) == list(plain.generate([1, 2, 3], 6, temperature=0))


def test_int8_decoding_runs_end_to_end_and_says_so(tiny_ckpt):
    result = run_script("sample.py", "--checkpoint", tiny_ckpt, "--prompt", "The quiet river", "--dtype", "int8",
                        "--temperature", "0", "--max_tokens", "6", "--ignore_eot", "--cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The quiet river") and len(result.stdout) > len("The quiet river\n")
    assert "1.6M parameters" in result.stderr and "on cpu in int8" in result.stderr


@pytest.fixture
def one_thread():
    """The test below took 30 s on two threads, 5 s on one, both on a busy machine."""
    with one_torch_thread():
        yield


def test_a_trained_models_greedy_tokens_are_fp32s_in_every_layout_auto_can_choose(tmp_path, monkeypatch, one_thread):
    # Trained, because a random model's top two logits are often closer than bf16's rounding: this one has
    # memorised a sequence of 64 tokens, as a trained model is sure of its likeliest continuations.
    torch.manual_seed(0)
    config = M.GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=64)
    model, text = M.GPT(config), torch.randint(0, 64, (1, 65), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(25):  # enough to put fp32's two likeliest tokens >= 3 logits apart everywhere on it
        optimizer.zero_grad()
        model(text[:, :-1], text[:, 1:])[1].backward()
        optimizer.step()
    checkpoint.save_checkpoint(tmp_path / "trained.pt", model, step=25, val_loss=None)
    prompt, cpu = text[0, :4].tolist(), torch.device("cpu")

    def greedy(dtype):
        return list(sample.load(str(tmp_path / "trained.pt"), cpu, dtype)[0].generate(prompt, 40, temperature=0))

    fp32 = greedy(torch.float32)
    assert fp32 == text[0, 4:44].tolist()  # it learned the sequence: the comparison below means something
    tokens = {dtype: greedy(dtype) for dtype in cpu_decoding.LAYOUTS}
    monkeypatch.setattr(cpu_decoding, "cpu_has_fast_bf16", lambda: False)  # bf16 as AVX2 CPUs run it: unpacked
    tokens["bf16 unpacked"] = greedy(torch.bfloat16)
    assert tokens == dict.fromkeys(tokens, fp32)


def probe_figures(**ns_per_weight) -> dict:
    """A probe's figures for the layouts this torch has (int4's kernel came in torch 2.6)."""
    return {str(d).removeprefix("torch."): ns_per_weight[str(d).removeprefix("torch.")] for d in cpu_decoding.LAYOUTS}


def test_auto_takes_the_most_precise_layout_within_a_twentieth_of_the_fastest():
    choose = lambda **ns: cpu_decoding.choose(probe_figures(**ns))
    assert choose(float32=1.0, bfloat16=0.5, int8=0.3, int4=0.27) == ("int4" if cpu_decoding.HAS_INT4 else "int8")
    assert choose(float32=1.0, bfloat16=0.5, int8=0.3, int4=0.29) == "int8"
    assert choose(float32=1.0, bfloat16=0.5, int8=0.51, int4=0.52) == "bfloat16"
    assert choose(float32=0.5, bfloat16=0.51, int8=0.6, int4=0.7) == "float32"
    assert choose(float32=1.0, bfloat16=None, int8=0.7, int4=None) == "int8"  # two failed to run


def test_auto_keeps_a_steady_probe_per_cpu_setting_and_int8_stays_on_the_cpu(tmp_path, monkeypatch):
    probes = []

    def fake_probe(ns: dict, steady: bool = True):
        monkeypatch.setattr(cpu_decoding, "probe", lambda: probes.append(ns) or (ns, steady))

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_decoding, "_busy", lambda: False)
    cpu, bf16_fastest = torch.device("cpu"), probe_figures(float32=1.0, bfloat16=0.4, int8=0.6, int4=0.5)
    fake_probe(bf16_fastest)
    assert sample.pick_dtype("auto", cpu) == torch.bfloat16
    fake_probe(probe_figures(float32=1.0, bfloat16=0.9, int8=0.5, int4=0.7))
    assert sample.pick_dtype("auto", cpu) == torch.bfloat16 and len(probes) == 1  # the same CPU: the cached probe
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # another instruction-set limit: probed afresh
    assert sample.pick_dtype("auto", cpu) == torch.int8 and len(probes) == 2
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    fake_probe(bf16_fastest, steady=False)  # a probe the machine disturbed: fp32 this time, a new probe next time
    assert [sample.pick_dtype("auto", cpu) for _ in range(2)] == [torch.float32] * 2 and len(probes) == 4
    monkeypatch.setattr(cpu_decoding, "_busy", lambda: True)  # too busy to measure: fp32, and no probe at all
    fake_probe(bf16_fastest)
    assert sample.pick_dtype("auto", cpu) == torch.float32 and len(probes) == 4
    assert sample.pick_dtype("float32", cpu) == torch.float32 and len(probes) == 4
    with pytest.raises(sample.SampleError, match="--dtype int8 runs on the CPU only"):
        sample.pick_dtype("int8", torch.device("cuda"))


def test_auto_follows_the_probe_on_this_cpu_and_emulating_an_avx2_laptop(tmp_path):
    # One child per setting: the instruction-set limits only act when set before torch is imported.
    # The machine may be busy with other tests: the child probes anyway, and reports what it measured.
    code = ("import json, torch, sample, cpu_decoding as C; probe, seen = C.probe, []; C._busy = lambda: False; "
            "C.probe = lambda: seen.append(probe()) or seen[-1]; dtype = sample.pick_dtype('auto', torch.device('cpu')); "
            "print(json.dumps([str(dtype), *seen[0], C.probe_key(), torch.backends.cpu.get_cpu_capability(), "
            "C.cpu_has_fast_bf16()]))")
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    procs = {name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=child_env(XDG_CACHE_HOME=str(tmp_path), **env))
             for name, env in (("native", {}), ("avx2", avx2))}  # side by side: each is one thread
    children = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        children[name] = json.loads(out.splitlines()[-1])
    for dtype, ns_per_weight, steady, *_ in children.values():  # each probed, and took what it measured
        assert dtype == f"torch.{cpu_decoding.choose(ns_per_weight) if steady else 'float32'}"
    assert children["native"][3] != children["avx2"][3]  # kept apart in the cache
    *_, capability, fast_bf16 = children["avx2"]
    assert capability == "AVX2" and not fast_bf16  # the emulation took effect: aten's AVX2 kernels, no oneDNN bf16


def test_cpu_flag_never_asks_about_cuda(tiny_ckpt, monkeypatch, capsys):
    def forbidden(*a, **k):
        raise AssertionError("CUDA was queried")

    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", forbidden)
    assert sample.main(["--checkpoint", tiny_ckpt, "--cpu", "--max_tokens", "2", "--prompt", "x"]) == 0


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(tiny_ckpt, tmp_path):
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    torch.save(ckpt | {"extra": Payload()}, evil)
    result = run_script("sample.py", "--checkpoint", str(evil), "--prompt", "hi", "--cpu")
    assert result.returncode == 1
    assert "PAYLOAD RAN" not in result.stdout + result.stderr
    assert result.stderr.startswith("error: refused") and "could run code" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("contents, message", [(None, "error: no checkpoint at"),
                                               (b"", "is empty, not a checkpoint")])
def test_a_missing_or_empty_checkpoint_is_one_error_line(tmp_path, capsys, contents, message):
    path = tmp_path / "model_best_val.pt"
    if contents is not None:
        path.write_bytes(contents)
    assert sample.main(["--checkpoint", str(path), "--cpu"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_prompt_file_is_reported_before_the_model_loads(tmp_path, capsys):
    assert sample.main(["--checkpoint", str(tmp_path / "not_loaded.pt"), "--prompt", "./story.txt"]) == 1
    assert capsys.readouterr().err == "error: no prompt file at story.txt\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--top_p", "1.5", "argument --top_p: must be in (0, 1], not 1.5"),
    ("--top_p", "0", "argument --top_p: must be in (0, 1], not 0"),
    ("--temperature", "-0.5", "argument --temperature: must be 0 (greedy) or more, not -0.5"),
    ("--max_tokens", "0", "argument --max_tokens: must be a positive integer, not 0"),
    ("--top_k", "0", "argument --top_k: must be a positive integer, not 0"),
    ("--num_samples", "two", "argument --num_samples: must be a positive integer, not 'two'"),
])
def test_bad_values_end_in_argument_parsing_with_one_line(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith(f": error: {message}") and len(err) == 2
