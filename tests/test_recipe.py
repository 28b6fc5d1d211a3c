"""The FineWeb speedrun's switches (model.py's speedrun preset, muon.py's and optim.py's variants) on tiny CPU models:
each trains, each computes what its definition says, and generation and old checkpoints keep working."""
import math
import warnings

import pytest
import torch
import torch._dynamo.utils

import batches
import flags as F
import horizon as H
import model as M
import muon
import optim as O
import startup as U
import tokenizer
from common import EOT

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)
SPEEDRUN, MODERN = M.ARCH_PRESETS["speedrun"], M.ARCH_PRESETS["modern"]
# Each architecture switch the speedrun sets apart from modern, as it sets it (the soft cap with its form).
ARCH_SWITCHES = {k: {k: v} | ({"softcap_form": SPEEDRUN["softcap_form"]} if k == "logit_softcap" else {})
                 for k, v in SPEEDRUN.items() if v != MODERN[k] and k != "softcap_form"}
OPTIMIZER_FLAGS = {"muon_iteration": ["--muon_iteration", "polar_express"], "normuon": ["--normuon"],
                   "cautious_weight_decay": ["--cautious_weight_decay"], "adamw_groups": ["--adamw_groups", "speedrun"]}


def batch(seed=0, rows=4, length=16, vocab=100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, length + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train_losses(config: M.GPTConfig, flags: list[str], steps: int = 12) -> list[float]:
    """The loss of each of `steps` steps on one fixed batch, with make_optimizers' optimizers as the flags set them."""
    torch.manual_seed(0)
    model = M.GPT(config)
    optimizers = O.make_optimizers(model, U.optimizer_settings(F.parse_args(flags + ["--device", "cpu"]), None),
                                   torch.device("cpu"))
    x, y = batch()
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("switch", sorted(ARCH_SWITCHES))
def test_each_speedrun_architecture_switch_alone_trains_and_its_loss_falls(switch):
    losses = train_losses(M.GPTConfig.from_preset("modern", **TINY, **ARCH_SWITCHES[switch]), [])
    assert all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("switch", sorted(OPTIMIZER_FLAGS))
def test_each_speedrun_optimizer_switch_alone_trains_and_its_loss_falls(switch):
    losses = train_losses(M.GPTConfig.from_preset("modern", **TINY), ["--arch", "modern", *OPTIMIZER_FLAGS[switch]])
    assert all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.3


def test_the_whole_speedrun_recipe_trains_and_its_loss_falls():
    losses = train_losses(M.GPTConfig.from_preset("speedrun", **TINY), ["--arch", "speedrun"])
    assert losses[-1] < losses[0] - 0.3


def switches(*flags: str) -> tuple:
    s = U.optimizer_settings(F.parse_args([*flags, "--device", "cpu"]), None)
    return s.muon_iteration, s.normuon, s.cautious_weight_decay, s.adamw_groups


def test_the_record_optimizer_is_the_defaults_and_the_speedruns_with_muon_and_each_flag_wins():
    record, off = ("polar_express", True, True, "speedrun"), ("newton_schulz", False, False, "one")
    assert switches() == switches("--arch", "speedrun") == switches("--arch", "modern") == record
    assert switches("--arch", "speedrun", "--no-normuon", "--adamw_groups", "one") == \
        ("polar_express", False, True, "one")
    assert switches("--arch", "gpt2") == off  # GPT-2 as it was, the baseline others are held to
    assert switches("--optimizer", "adamw") == switches("--init_from", "gpt2") == off  # AdamW alone: one group
    assert switches("--muon_iteration", "newton_schulz", "--no-normuon", "--no-cautious_weight_decay",
                    "--adamw_groups", "one") == off


def test_the_record_optimizer_warms_up_no_rate_and_adamw_alone_as_gpt2_did():
    warmup = lambda *flags: U.optimizer_settings(F.parse_args([*flags, "--device", "cpu"]), None).warmup_steps
    assert warmup() == warmup("--arch", "speedrun") == 0
    assert warmup("--arch", "gpt2") is warmup("--optimizer", "adamw") is warmup("--init_from", "gpt2") is None
    assert warmup("--warmup_steps", "30") == warmup("--arch", "gpt2", "--warmup_steps", "30") == 30


def test_the_speedruns_gates_and_scalars_go_to_adamw_and_its_linear_weights_to_muon():
    model = M.GPT(M.GPTConfig.from_preset("speedrun", **TINY))
    kinds = O.split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for p in kinds["matrices"])
    assert {names[id(p)] for p in kinds["gates"]} == {"transformer.smear.gate", "transformer.h.0.attn.ve_gate",
                                                      "transformer.h.1.attn.ve_gate"}
    assert "skip_weights" in {names[id(p)] for p in kinds["scalars"]}
    assert sum(map(len, kinds.values())) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------------
# Windows and documents


def reference_attention(q, k, v, tokens, window):
    """Each query over the keys it may see, one at a time: at or before it, within `window`, in its document."""
    B, nh, T, hs = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        doc = 0
        docs = []
        for t in tokens[b].tolist():
            doc += t == EOT  # <|endoftext|> opens the next document
            docs.append(doc)
        for i in range(T):
            keys = [j for j in range(max(0, i - window + 1), i + 1) if docs[j] == docs[i]]
            scores = q[b, :, i, None] @ k[b, :, keys].transpose(-1, -2) / math.sqrt(hs)  # (nh, 1, keys)
            out[b, :, i] = (scores.softmax(-1) @ v[b, :, keys])[:, 0]
    return out


def test_windowed_document_attention_equals_a_query_by_query_reference_with_sdpa_and_flex_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 8, generator=g) for _ in range(3))
    tokens = torch.randint(0, 1000, (2, 24), generator=g)
    tokens[0, 5] = tokens[0, 11] = tokens[1, 17] = EOT
    window = torch.tensor(5)
    reference = reference_attention(q, k, v, tokens, 5)
    docs = M.document_ids(tokens)
    sdpa = M.attend(q, k, v, M.boolean_mask(window, docs, 0, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention uncompiled: its reference implementation, on the CPU
        flex = M.attend(q, k, v, M.block_mask(window, docs, 24, "cpu"))
    assert torch.allclose(sdpa, reference, atol=1e-5)
    assert torch.allclose(flex, reference, atol=1e-5)


def speedrun_with_documents(**kw) -> M.GPT:
    """A tiny speedrun model over GPT-2's vocabulary (so <|endoftext|> occurs), its zero-initialised parts
    perturbed so that every switch changes the output."""
    torch.manual_seed(0)
    model = M.GPT(M.GPTConfig.from_preset("speedrun", **(TINY | dict(vocab_size=50257, block_size=32) | kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_cached_logits_equal_the_full_forward_across_documents_and_windows():
    m = speedrun_with_documents(short_window=5)
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    x[0, 6] = x[0, 20] = x[1, 13] = EOT
    full, _ = m(x)
    cache = M.KVCache(m.config, 2, "cpu", torch.float32)
    pieces = [x[:, :7], x[:, 7:12]] + [x[:, i:i + 1] for i in range(12, 32)]  # a prefill, a chunk, single tokens
    cached = torch.cat([m.head(m.hidden_states(p, cache)) for p in pieces], dim=1)
    assert torch.allclose(full, cached, atol=1e-4)


def test_a_token_after_a_document_boundary_does_not_see_the_document_before_it():
    m = speedrun_with_documents()
    x = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    x[0, 8] = EOT
    y = x.clone()
    y[0, :7] = (y[0, :7] + 1) % 1000  # the first document changed, its end (position 7 and the EOT) kept
    a, _ = m(x)
    b, _ = m(y)
    assert torch.allclose(a[0, 8:], b[0, 8:], atol=1e-5)
    assert not torch.allclose(a[0, :8], b[0, :8])


def test_short_windows_see_no_further_back_than_their_window():
    m = speedrun_with_documents(window_pattern="S", n_layer=1, short_window=4, smear=False, bigram_embed=0,
                                value_embeds=0, backout=False)
    m.set_attention_windows(4, 4)  # one layer, and the last is long: both windows short
    x = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % 1000
    a, _ = m(x)
    b, _ = m(y)
    assert torch.allclose(a[0, 6:], b[0, 6:], atol=1e-5)  # position 6 sees 3, 4, 5, 6
    assert not torch.allclose(a[0, 2:6], b[0, 2:6])


def test_changing_the_windows_between_steps_changes_the_output_and_compiles_nothing_again():
    m = speedrun_with_documents()
    compiled = torch.compile(m, backend="aot_eager")
    x, y = batch(vocab=1000, length=32)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = []
    for short in (16, 3, 7):
        m.set_attention_windows(short, 32)
        _, loss = compiled(x, y)
        loss.backward()
        losses.append(loss.item())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once, for the first call
    assert len(set(losses)) == 3


def test_each_tokens_prefix_token_is_its_longest_proper_prefix_in_the_vocabulary():
    enc = tokenizer.get_tokenizer()
    table = tokenizer.prefix_tokens(enc, 50304)
    prefix = lambda word: enc.decode([int(table[enc.encode_single_token(word)])])
    assert (prefix(" transformer"), prefix(" the"), prefix("hello")) == (" transform", " th", "hell")
    assert table[enc.encode_single_token("a")] == -1 and table[EOT] == -1 and (table[enc.n_vocab:] == -1).all()
    assert (table >= 0).sum() == 50257 - 256 - 1  # every token but the 256 bytes and <|endoftext|>


def test_the_losss_extra_terms_come_from_the_flags_and_a_fine_tune_has_none_unless_asked():
    terms = lambda *flags: F.loss_terms(F.parse_args([*flags, "--device", "cpu"]))
    assert terms("--mtp_weights", "0.5,0.25", "--prefix_weight", "0.25") == H.LossTerms((0.5, 0.25), 0.25)
    assert terms("--mtp_weights", "0") == terms() == H.LossTerms()
    assert terms("--init_from", "gpt2") == H.LossTerms()
    assert terms("--init_from", "gpt2", "--mtp_weights", "0.5") == H.LossTerms((0.5,), 0.0)
    with pytest.raises(SystemExit):
        terms("--mtp_weights", "0.5,-1")  # argparse's one line: each weight must be 0 or more


def test_changing_the_losss_weights_between_steps_changes_the_gradient_and_compiles_nothing_again():
    m = M.GPT(M.GPTConfig.from_preset("modern", **TINY)).train()
    m.set_loss_terms(2, torch.arange(m.config.padded_vocab_size) - 1)
    compiled = torch.compile(m, backend="aot_eager")
    x, y = batch()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    norms = []
    for weights in [(0.5, 0.25, 0.25), (0.5, 0.0, 0.25), (0.0, 0.0, 0.0)]:
        m.set_loss_weights(weights)
        compiled(x, y)[1].backward()
        norms.append(m.lm_head.weight.grad.norm().item())  # the head starts at zero: the only one moved
        m.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(set(norms)) == 3


def test_the_schedules_compile_once_more_at_the_first_change_of_context_and_never_again():
    # What a step of the horizon's schedules changes: the context (each micro-batch re-cut, batches.at_context),
    # the batch (more micro-batches of the same shape: nothing to compile) and the windows (a tensor, in place).
    m = speedrun_with_documents()
    compiled = torch.compile(m, backend="aot_eager")
    x, y = (t.contiguous() for t in batch(vocab=1000, length=32))  # as batches.py reads them
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []
    for context, long in [(32, 32), (16, 8), (16, 16), (8, 8), (32, 16), (32, 32), (8, 4)]:
        m.set_long_window(long)
        for _ in range(2):  # a second micro-batch of the step
            xs, ys = batches.at_context((x, y), context)
            compiled(xs, ys)[1].backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs == [1] + [2] * 6  # the first change of shape marks it dynamic; nothing compiles after it
    assert m.attn_windows.tolist() == [2, 4]  # half the long window, the record's ratio


# ----------------------------------------------------------------------------------------------------
# The optimizer's variants


def exact_polar_factor(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("shape", [(64, 32), (32, 96)])
def test_polar_express_is_the_polar_factor_closer_than_keller_jordans_iteration(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(1, *shape, generator=g) @ torch.diag(torch.logspace(0, -2, shape[1], dtype=torch.float32))
    exact = exact_polar_factor(G[0])
    polar = muon.newton_schulz(G, "polar_express")[0].double()
    keller = muon.newton_schulz(G, "newton_schulz")[0].double()
    assert torch.dist(polar, exact) < 0.5 * torch.dist(keller, exact)
    singular = torch.linalg.svdvals(polar)
    assert singular.min() > 0.6 and singular.max() < 1.25  # Keller Jordan's spreads over about 0.5 to 1.5


def test_polar_express_steps_are_the_papers_quintics():
    G = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    X = (G / (G.norm() * (1 + muon.POLAR_EXPRESS_SAFETY))).double()[0]
    for a, b, c in muon.POLAR_EXPRESS_COEFFICIENTS:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    assert torch.allclose(muon.newton_schulz(G, "polar_express")[0].double(), X, atol=0.05)  # bf16 against fp64


@pytest.mark.parametrize("shape", [(3, 12, 6), (2, 5, 9)])
def test_normuon_evens_out_the_rows_of_a_tall_update_or_the_columns_of_a_wide_one_keeping_its_norm(shape):
    U = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, shape[-1])
    wide = shape[1] < shape[2]
    moments = torch.zeros(shape[0], 1 if wide else shape[1], shape[2] if wide else 1)
    out = muon.normuon_scale(U, moments, 0.95)
    spread = out.square().mean(dim=-2 if wide else -1)  # each column's (wide) or row's mean square
    assert torch.allclose(spread, spread[:, :1].expand_as(spread), rtol=1e-4)  # a first step: all equal
    assert torch.allclose(out.norm(dim=(-2, -1)), U.norm(dim=(-2, -1)), rtol=1e-5)
    assert torch.allclose(moments.squeeze(), 0.05 * U.square().mean(dim=-2 if wide else -1), rtol=1e-5)


def test_cautious_weight_decay_decays_only_where_the_update_shrinks_the_weight():
    p = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    update = torch.tensor([[[-0.1, 0.1, 0.1, -0.1]]])  # shrinks, shrinks, grows, grows
    assert torch.equal(muon.cautious_decay([p], update, 0.5), torch.tensor([[[0.5, -0.5, 0.0, 0.0]]]))


def test_a_muon_checkpoint_without_normuons_state_resumes_with_normuon():
    params = [torch.randn(12, 8, requires_grad=True)]
    plain = muon.Muon(params, lr=0.02)
    params[0].grad = torch.randn(12, 8)
    plain.step()
    variant = muon.Muon(params, lr=0.02, iteration="polar_express", normuon=True, cautious=True)
    variant.load_state_dict(plain.state_dict())
    variant.step()
    assert variant.state[params[0]]["second_moment"].shape == (1, 12, 1)
    assert torch.isfinite(params[0]).all()


def test_a_skipped_step_leaves_normuons_state_and_the_weights_as_they_were():
    params = [torch.randn(6, 10, requires_grad=True)]
    opt = muon.Muon(params, lr=0.02, weight_decay=0.1, normuon=True, cautious=True)
    params[0].grad = torch.randn(6, 10)
    opt.step()
    before = params[0].detach().clone(), opt.state[params[0]]["second_moment"].clone()
    params[0].grad = torch.full((6, 10), float("inf"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert torch.equal(params[0].detach(), before[0])
    assert torch.equal(opt.state[params[0]]["second_moment"], before[1])


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def test_a_config_written_before_the_speedrun_switches_loads_as_the_same_preset():
    for arch in ("gpt2", "modern"):
        old = M.GPTConfig.from_preset(arch).to_dict()
        for name in (*M.SPEEDRUN_ONLY, "softcap_form", "short_window"):
            del old[name]  # what a checkpoint of before these fields holds
        assert M.GPTConfig.from_dict(old).arch == arch


def test_the_speedruns_windows_are_saved_and_loaded_with_its_weights():
    m = speedrun_with_documents()
    m.set_attention_windows(5, 20)
    import weights
    loaded = weights.model_with_weights(m.config, m.state_dict())
    assert loaded.attn_windows.tolist() == [5, 20]
