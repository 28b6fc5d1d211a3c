"""model.py on tiny CPU models: the properties training and generation rely on."""

import threading

import pytest
import torch

import checkpoint
import model as M
import weights
from common import EOT, CheckpointError, SaveError
from model import GPT, GPTConfig, KVCache, sample_token

# Every architecture switch of transformers' families on at once, beside the presets.
EVERY_SWITCH = dict(mlp="relu2", tie_embeddings=False, logit_softcap=15.0, embed_norm=True)
PRESETS = ["gpt2", "modern", "every_switch", "speedrun"]


def tiny(arch="gpt2", **kw) -> GPT:
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100) | kw
    if arch == "every_switch":
        arch, shape = "modern", EVERY_SWITCH | shape
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_preset(arch, **shape)).eval()
    if m.config.zero_init:  # what starts at zero (the head, the projections, the speedrun's tables, gates and mixes)
        # perturbed: every logit would be 0, and every switch acts
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("arch", PRESETS)
def test_changing_a_later_token_never_changes_earlier_logits(arch):
    m = tiny(arch)
    x = torch.randint(0, 100, (1, 16))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 100
    a, _ = m(x)
    b, _ = m(y)
    assert torch.allclose(a[0, :9], b[0, :9], atol=1e-6)
    assert not torch.allclose(a[0, 9], b[0, 9])


@pytest.mark.parametrize("arch", PRESETS)
def test_cached_forward_gives_the_logits_of_a_full_forward(arch):
    m = tiny(arch)
    x = torch.randint(0, 100, (2, 16))
    full, _ = m(x)
    cache = KVCache(m.config, 2, "cpu", torch.float32)
    # A 5-token prefill, a 3-token chunk (keys outnumber queries: the bottom-right mask), then single tokens.
    pieces = [x[:, :5], x[:, 5:8]] + [x[:, i:i + 1] for i in range(8, 16)]
    cached = torch.cat([m.head(m.hidden_states(p, cache)) for p in pieces], dim=1)
    assert torch.allclose(full, cached, atol=1e-5)


def reference_greedy(m: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache, with generate()'s window rule: once the context would pass
    block_size, it restarts from the last block_size // 2 tokens."""
    block, tokens = m.config.block_size, list(prompt)
    start = max(0, len(tokens) - block)
    out = []
    for _ in range(n):
        if len(tokens) - start > block:
            start = len(tokens) - block // 2
        logits, _ = m(torch.tensor([tokens[start:]]))
        t = int(logits[0, -1, :m.config.vocab_size].argmax())
        tokens.append(t)
        out.append(t)
    return out


@pytest.mark.parametrize("arch", PRESETS)
@pytest.mark.parametrize("prompt_len", [3, 20])
def test_cached_greedy_generation_equals_uncached_across_the_block_boundary(arch, prompt_len):
    m = tiny(arch)
    prompt = torch.randint(0, 100, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = 40  # passes block_size (16) several times
    got = list(m.generate(prompt, n, temperature=0, stop_at_eot=False))
    assert got == reference_greedy(m, prompt, n)


def test_cached_greedy_generation_equals_uncached_across_documents_short_windows_and_the_block_boundary():
    # The speedrun's masks through the cache: a short window of 5 in a context of 16, and two documents (the
    # prompt's <|endoftext|>, and any the model writes), the cache rebuilt each time the context passes block_size.
    m = tiny("speedrun", vocab_size=50257, window_pattern="SL", short_window=5)
    prompt = torch.randint(0, 50257, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    prompt[5] = EOT
    n = 40
    got = list(m.generate(prompt, n, temperature=0, stop_at_eot=False))
    assert got == reference_greedy(m, prompt, n)


@pytest.mark.parametrize("arch", PRESETS)
def test_a_kept_prompt_cache_feeds_only_what_follows_the_shared_start_and_generates_the_same(arch, monkeypatch):
    m = tiny(arch, block_size=32)
    fed = []  # the positions each forward pass was given
    run = m.hidden_states
    monkeypatch.setattr(m, "hidden_states", lambda idx, cache=None: fed.append(idx.size(1)) or run(idx, cache))
    kept, history = M.PromptCache(), [5, 17, 3, 42, 8]
    greedy = lambda prompt, n, **kw: list(m.generate(prompt, n, temperature=0, stop_at_eot=False, **kw))
    first = greedy(history, 6, reuse=kept)
    # A conversation's next turn: the history, the reply (its last token never fed), then the new turn.
    turn = history + first + [9, 9, 4]
    fed.clear()
    assert greedy(turn, 6, reuse=kept) == greedy(turn, 6)
    assert fed[0] == 1 + 3  # the reply's last token and the new turn: the 10 before it were not run again
    for prompt, feeds in ((turn[:3] + [1, 2, 3], 3),  # shares only its first 3 tokens: cut back to them
                          (turn[:3], 1),  # all of it held already: the last is fed again, for its logits
                          ([7, 7, 7], 3)):  # shares nothing: a fresh cache
        fed.clear()
        assert greedy(prompt, 5, reuse=kept) == greedy(prompt, 5)
        assert fed[0] == feeds
    long = list(range(40))  # past the block: the window slides as without a kept cache
    assert greedy(long, 30, reuse=kept) == greedy(long, 30)
    assert greedy(long[:20], 5, reuse=kept) == greedy(long[:20], 5)


def test_padded_vocabulary_ids_are_never_generated():
    m = tiny(vocab_size=100)  # padded to 128 rows
    with torch.no_grad():
        m.lm_head.weight[100:] = 5.0  # make the padding rows the most likely by far
    g = torch.Generator().manual_seed(0)
    tokens = list(m.generate([1, 2], 50, temperature=2.0, generator=g, stop_at_eot=False))
    assert len(tokens) == 50 and max(tokens) < 100
    assert max(m.generate([1, 2], 5, temperature=0, stop_at_eot=False)) < 100


def test_generation_stops_at_end_of_text_unless_told_not_to():
    m = tiny(vocab_size=50257, block_size=8)
    with torch.no_grad():  # final hidden state = ones, aligned with the EOT row only
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.fill_(1.0)
        m.lm_head.weight[EOT] = 1.0
    assert list(m.generate([1, 2], 5, temperature=0)) == []
    assert list(m.generate([1, 2], 5, temperature=0, stop_at_eot=False)) == [EOT] * 5


def test_the_same_generator_seed_gives_the_same_sample():
    m = tiny()
    a = list(m.generate([5], 30, temperature=1.0, generator=torch.Generator().manual_seed(7)))
    b = list(m.generate([5], 30, temperature=1.0, generator=torch.Generator().manual_seed(7)))
    c = list(m.generate([5], 30, temperature=1.0, generator=torch.Generator().manual_seed(8)))
    assert a == b and a != c


def test_top_k_and_top_p_keep_only_the_intended_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {0, 1}
    probs = logits.softmax(-1)  # about [.64, .24, .09, .03, .01]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert {sample_token(logits, 1.0, top_p=0.7, generator=g) for _ in range(200)} == {0, 1}
    assert {sample_token(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)} == {0}
    assert sample_token(torch.tensor([0.0, 9.0, 1.0]), temperature=0) == 1


@pytest.mark.parametrize("arch", PRESETS)
def test_a_model_overfits_one_batch(arch):
    m = tiny(arch).train()
    x = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = m(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.5


def test_gpt2_124m_has_the_published_parameter_count_and_flops():
    with torch.device("meta"):
        m = GPT(GPTConfig(vocab_size=50257))
    assert m.num_params() == 124_439_808
    # 6N + 12·L·C·T at T=1024, N without the position table: about 855 MFLOP per token.
    assert m.flops_per_token(1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024


def test_presets_set_the_documented_switches():
    g, m = tiny("gpt2"), tiny("modern")
    assert g.transformer.wpe is not None and isinstance(g.transformer.ln_f, torch.nn.LayerNorm)
    assert m.transformer.wpe is None and isinstance(m.transformer.ln_f, torch.nn.RMSNorm)
    assert all(p.ndim >= 2 or "ln" in n or "norm" in n for n, p in m.named_parameters())  # no biases
    assert m.transformer.h[0].attn.q_norm is not None and m.transformer.h[0].mlp.kind == "swiglu"
    assert g.config.arch == "gpt2" and m.config.arch == "modern"


def test_initialisation_scales_residual_projections():
    m = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=1000))
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert abs(m.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("arch", PRESETS)
def test_generation_runs_in_bfloat16(arch):
    m = tiny(arch).to(torch.bfloat16)
    out = list(m.generate([1, 2, 3], 20, temperature=0, stop_at_eot=False))
    assert len(out) == 20 and max(out) < 100


def test_a_saved_checkpoint_loads_back_with_weights_only(tmp_path):
    m = tiny("modern")
    path = tmp_path / "c.pt"
    checkpoint.save_checkpoint(path, m, step=3, val_loss=1.5)
    loaded, info = checkpoint.load_model(str(path))
    x = torch.randint(0, 100, (1, 8))
    assert torch.equal(loaded(x)[0], m(x)[0]) and info["step"] == 3 and info["val_loss"] == 1.5


def test_a_background_save_holds_the_state_of_its_call_whatever_changes_after(tmp_path):
    m = tiny("gpt2")  # a tied head: one tensor in the file, as torch.save of the model itself writes it
    writer = checkpoint.CheckpointWriter()
    writer.save(tmp_path / "c.pt", checkpoint.checkpoint_state(m, step=1, moments=[torch.ones(3)]))
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # training goes on while the file is written
    writer.wait()
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    assert saved["step"] == 1 and torch.equal(saved["moments"][0], torch.ones(3))
    head, table = saved["model"]["lm_head.weight"], saved["model"]["transformer.wte.weight"]
    assert head.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()


def test_a_save_waits_for_the_one_before_and_a_failed_write_is_reported_in_one_line(tmp_path, monkeypatch):
    release, written = threading.Event(), []
    real_write = checkpoint.write_checkpoint

    def slow_write(path, state):
        release.wait(30)
        written.append(path.name)
        real_write(path, state)

    monkeypatch.setattr(checkpoint, "write_checkpoint", slow_write)
    writer, m = checkpoint.CheckpointWriter(), tiny("modern")
    writer.save(tmp_path / "first.pt", checkpoint.checkpoint_state(m))  # returns while the write waits
    second = threading.Thread(target=writer.save, args=(tmp_path / "second.pt", checkpoint.checkpoint_state(m)))
    second.start()
    second.join(0.5)
    assert second.is_alive() and written == []  # the second save waits for the first write to finish
    release.set()
    second.join(30)
    writer.wait()
    assert written == ["first.pt", "second.pt"] and (tmp_path / "second.pt").is_file()
    writer.save(tmp_path / "missing" / "third.pt", checkpoint.checkpoint_state(m))  # no such directory
    with pytest.raises(SaveError, match=r"^cannot write .*third\.pt \(RuntimeError: Parent directory .* does not exist"):
        writer.wait()
    assert not list(tmp_path.glob("*.tmp-*"))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_that_would_run_code_or_are_not_checkpoints_are_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Payload()}, evil)
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="could run code"):
        checkpoint.load_checkpoint(evil)
    assert "must never run" not in capsys.readouterr().out
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        checkpoint.load_checkpoint(tmp_path / "empty.pt")
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "config": {}}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this repository"):
        checkpoint.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load_model(str(tmp_path / "missing.pt"))


def test_mismatched_weights_are_named_not_silently_skipped():
    a, b = tiny("gpt2"), tiny("modern")
    with pytest.raises(CheckpointError, match="missing"):
        weights.load_state(b, a.state_dict())


def test_compile_and_ddp_prefixes_are_stripped_in_any_nesting():
    w = torch.zeros(1)
    keys = {"module._orig_mod.lm_head.weight": w, "_orig_mod.module.x": w, "module.module.y": w, "z": w}
    assert set(weights.strip_wrapper_prefixes(keys)) == {"lm_head.weight", "x", "y", "z"}


@pytest.mark.parametrize("cap", [0.0, 15.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_equals_cross_entropy_in_value_and_gradient(dtype, cap):
    # More rows than one chunk, and ignored positions (-1), as padded evaluation batches have.
    logits = (torch.randn(2 * M.LOSS_ROWS + 37, 300, generator=torch.Generator().manual_seed(0)) * 3)
    targets = torch.randint(0, 290, (logits.size(0),), generator=torch.Generator().manual_seed(1))
    targets[::7] = -1
    ours = logits.to(dtype).requires_grad_()
    theirs = logits.to(dtype).requires_grad_()
    loss = M.cross_entropy(ours, targets, cap, vocab=290)  # the last 10 columns: padding, left out
    capped = cap * torch.tanh(theirs[:, :290].float() / cap) if cap else theirs[:, :290].float()
    reference = torch.nn.functional.cross_entropy(capped, targets, ignore_index=-1)
    loss.backward()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert ours.grad.dtype == dtype and ours.grad[:, 290:].abs().sum() == 0
    assert torch.allclose(ours.grad.float(), theirs.grad.float(), atol=2e-6 if dtype == torch.float32 else 1e-5)


def reference_terms(logits: torch.Tensor, targets: torch.Tensor, table: torch.Tensor) -> list[torch.Tensor]:
    """The next token's, the next but one's, the next but two's and the prefix's cross-entropy, each summed and
    divided by the next token's count, by F.cross_entropy."""
    flat, count = logits.reshape(-1, logits.size(-1)), (targets != -1).sum()
    ahead = [torch.nn.functional.pad(targets[:, k:], (0, k), value=-1) for k in range(3)]
    prefix = torch.where(targets >= 0, table[targets.clamp(min=0)], -1)
    return [torch.nn.functional.cross_entropy(flat, t.reshape(-1), ignore_index=-1, reduction="sum") / count
            for t in [*ahead, prefix]]


def test_the_losss_extra_terms_add_the_tokens_ahead_and_the_prefix_to_the_gradient_not_to_the_value():
    m = tiny("modern").train()
    x = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    targets[0, 5] = -1  # ignored: its own term and every term that would look ahead to it
    table = torch.randint(-1, 100, (m.config.padded_vocab_size,), generator=torch.Generator().manual_seed(1))
    m.set_loss_terms(2, table)
    m.set_loss_weights((0.5, 0.25, 0.3))
    _, loss = m(inputs, targets)
    loss.backward()
    ours = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    terms = reference_terms(m(inputs)[0][..., :100], targets, table)
    (terms[0] + 0.5 * terms[1] + 0.25 * terms[2] + 0.3 * terms[3]).backward()
    assert loss.item() == pytest.approx(terms[0].item(), rel=1e-6)  # what is logged: the next token's alone
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ours, m.parameters()))
    m.eval()
    assert m(inputs, targets)[1].item() == pytest.approx(terms[0].item(), rel=1e-6)  # evaluation: the next token


@pytest.mark.parametrize("compiling", [False, True])
def test_the_cross_entropies_of_several_targets_a_row_equal_f_cross_entropys(compiling, monkeypatch):
    # Chunked (eager) and as inductor sees it; duplicate targets in a row, ignored ones, more rows than a chunk.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    logits = torch.randn(M.LOSS_ROWS + 37, 300, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.randint(0, 290, (logits.size(0), 3), generator=torch.Generator().manual_seed(1))
    targets[::5, 1] = targets[::5, 0]
    targets[::7, 2] = -1
    targets[::11, 0] = -1
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    weights = torch.tensor([1.0, 0.5, 0.25])
    terms = M.cross_entropies(ours, targets, 15.0, vocab=290)
    (terms * weights).sum().backward()
    capped, count = 15.0 * torch.tanh(theirs[:, :290] / 15.0), (targets[:, 0] != -1).sum()
    reference = torch.stack([torch.nn.functional.cross_entropy(capped, t, ignore_index=-1, reduction="sum") / count
                             for t in targets.T])
    (reference * weights).sum().backward()
    assert torch.allclose(terms, reference, rtol=1e-6)
    assert torch.allclose(ours.grad, theirs.grad, atol=2e-6) and ours.grad[:, 290:].abs().sum() == 0


def test_training_forward_returns_the_loss_and_no_logits():
    m = tiny()
    x = torch.randint(0, 100, (2, 16))
    logits, loss = m(x[:, :-1], x[:, 1:])
    full, _ = m(x[:, :-1])
    assert logits is None
    reference = torch.nn.functional.cross_entropy(full[..., :100].reshape(-1, 100), x[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_zero_init_starts_every_block_as_the_identity_and_an_untied_head_at_zero():
    torch.manual_seed(0)  # as built, not perturbed as tiny() does
    m = GPT(GPTConfig.from_preset("modern", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    assert m.config.zero_init and not m.config.tie_embeddings  # the preset's
    x = torch.randint(0, 100, (1, 16))
    blocks_off = m.transformer.ln_f(m.transformer.ln_e(m.transformer.wte(x)))  # the preset's norm after the embedding
    assert torch.allclose(m.hidden_states(x), blocks_off, atol=1e-6)  # each block adds zero to the stream
    assert m.lm_head.weight.abs().sum() == 0 and m.lm_head.weight is not m.transformer.wte.weight
    assert m.transformer.wte.weight.std() > 0.01


def test_soft_capped_logits_stay_inside_the_cap():
    m = tiny("modern", logit_softcap=2.0)
    with torch.no_grad():
        m.lm_head.weight.mul_(1000)
    logits, _ = m(torch.randint(0, 100, (1, 16)))
    assert 1.9 < logits.abs().max() <= 2.0


def test_an_untied_head_counts_its_own_parameters():
    tied, untied = tiny("modern", tie_embeddings=True), tiny("modern", tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 100 * 32  # the head's real rows
