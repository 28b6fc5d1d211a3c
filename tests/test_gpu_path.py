"""The CUDA path checked without a GPU: no host waits in the step (fake CUDA tensors, tests/fake_cuda.py), the
memory probe compiling what training runs, agreeing across ranks and leaving no state behind."""
import json
import textwrap
from functools import partial

import numpy as np
import pytest
import torch
import torch._dynamo.utils

import eval as E
import flags as F
import memory as Mem
import model as M
import muon
import optim as O
import shards
import startup as U
import step as S
from common import EOT
from fake_cuda import AttentionInputs, HostWaits, fake_cuda, frozen, on_fake_cuda
from helpers import REPO, child_env, script_command
from runtime import Env

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32)
CUDA_BF16 = dict(device=torch.device("cuda:0"), amp_dtype=torch.bfloat16)


@pytest.fixture
def fake_model(monkeypatch):
    """The default recipe's tiny model on fake cuda:0, inside fake_cuda(); Newton-Schulz uncompiled."""
    monkeypatch.setattr(muon, "_compiled_newton_schulz", muon.newton_schulz)
    with fake_cuda():
        with torch.device("meta"):
            model = M.GPT(M.GPTConfig.from_preset(F.DEFAULT_ARCH, **TINY))
        yield on_fake_cuda(model)


@pytest.fixture
def fake_speedrun(monkeypatch):
    """The speedrun preset's tiny model on fake cuda:0, as fake_model."""
    monkeypatch.setattr(muon, "_compiled_newton_schulz", muon.newton_schulz)
    with fake_cuda():
        with torch.device("meta"):
            model = M.GPT(M.GPTConfig.from_preset("speedrun", **TINY))
        yield on_fake_cuda(model)


def tokens(*shape):
    return torch.zeros(shape, dtype=torch.long, device="cuda")


def test_the_forward_and_loss_wait_for_nothing_and_attention_gets_bf16(fake_model):
    env = Env(**CUDA_BF16)
    waits, attention = HostWaits(), AttentionInputs()
    with frozen(fake_model), waits, attention, env.autocast():
        _, loss = fake_model(tokens(4, 32), tokens(4, 32))
    assert waits.waits == []
    assert attention.dtypes == [(torch.bfloat16,) * 3] * TINY["n_layer"]  # QK-norm's output too, not fp32
    assert loss.dtype == torch.float32 and loss.shape == ()


def test_the_losss_extra_terms_and_their_weights_wait_for_nothing(fake_model):
    fake_model.set_loss_terms(2, torch.full((fake_model.config.padded_vocab_size,), -1))
    env, waits = Env(**CUDA_BF16), HostWaits()
    with frozen(fake_model), waits, env.autocast():
        fake_model.set_loss_weights((0.5, 0.25, 0.25))
        _, loss = fake_model.train()(tokens(4, 32), tokens(4, 32))
    assert waits.waits == []
    assert loss.dtype == torch.float32 and loss.shape == ()


def test_the_chunked_losss_own_backward_waits_for_nothing(fake_model):
    class Ctx:  # what autograd hands the Function: its saved tensors and attributes
        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    logits = torch.empty(3000, 50304, dtype=torch.bfloat16, device="cuda")  # three chunks of rows
    targets = tokens(3000)
    ctx, waits = Ctx(), HostWaits()
    with waits:
        M._ChunkedCrossEntropy.forward(ctx, logits, targets[:, None], 0.0, 50257)
        grad, *_ = M._ChunkedCrossEntropy.backward(ctx, torch.ones(1, device="cuda"))
    assert waits.waits == []
    assert grad.dtype == torch.bfloat16 and grad.shape == logits.shape


def optimizer_steps(model, optimizer: str, steps: int = 2, flags: tuple = ()) -> list[HostWaits]:
    """step_optimizers `steps` times on synthetic gradients; what each step waited for (and dispatched)."""
    settings = U.optimizer_settings(F.parse_args(["--optimizer", optimizer, "--device", "cpu", *flags]), None)
    t = S.Learner(model, model, O.make_optimizers(model, settings, torch.device("cuda")), None)
    traces = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        traces.append(HostWaits())
        with traces[-1], zeros_like_count() as made:
            S.step_optimizers(t, torch.zeros((), device="cuda"), Env(**CUDA_BF16), grad_clip=1.0)
        traces[-1].zeros_like = made
    return traces


class zeros_like_count(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts zeros_like calls (a fresh buffer filled with zeros)."""

    def __enter__(self):
        self.count = [0]
        super().__enter__()
        return self.count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.zeros_like.default:
            self.count[0] += 1
        return func(*args, **(kwargs or {}))


def test_the_default_recipes_optimizer_step_waits_for_nothing_and_builds_no_buffer_once_set_up(fake_model):
    first, steady = optimizer_steps(fake_model, F.DEFAULT_OPTIMIZER)
    assert first.waits == [] and steady.waits == []
    assert first.zeros_like[0] > 0  # the state set up at the first step: AdamW's moments, Muon's momentum
    assert steady.zeros_like == [0]  # and nothing built afresh after it


def test_the_speedrun_forward_and_loss_wait_for_nothing_and_attention_gets_bf16(fake_speedrun):
    env = Env(**CUDA_BF16)
    waits, attention = HostWaits(), AttentionInputs()
    x = tokens(4, 32)
    x[:, 7] = EOT  # documents, as the boolean masks of eager CUDA see them
    with frozen(fake_speedrun), waits, attention, env.autocast():
        _, loss = fake_speedrun(x, tokens(4, 32))
    assert waits.waits == []
    assert attention.dtypes == [(torch.bfloat16,) * 3] * TINY["n_layer"]  # value embeddings added in bf16 too
    assert loss.dtype == torch.float32 and loss.shape == ()


def test_flex_attentions_block_masks_are_built_without_waiting(fake_speedrun):
    waits = HostWaits()
    with waits:
        M.block_mask(fake_speedrun.attn_windows[0], M.document_ids(tokens(4, 256)), 256, "cuda")
    assert waits.waits == []


def test_a_schedule_setting_the_windows_waits_for_nothing(fake_speedrun):
    waits = HostWaits()
    with waits:
        fake_speedrun.set_attention_windows(128, 1024)
    assert waits.waits == []


def test_the_speedruns_optimizer_step_waits_for_nothing_and_builds_no_buffer_once_set_up(fake_speedrun):
    first, steady = optimizer_steps(fake_speedrun, "muon", flags=("--arch", "speedrun"))
    assert first.waits == [] and steady.waits == []
    assert steady.zeros_like == [0]


def test_unfused_adamw_reads_the_loss_on_the_host_which_the_trace_sees(fake_model, monkeypatch):
    monkeypatch.setattr(O, "fused_adamw_devices", lambda: [])  # AdamW's for-each path: no found_inf
    first, steady = optimizer_steps(fake_model, "adamw")
    assert "_local_scalar_dense" in steady.waits  # found_inf.item(): it must know before updating


def write_split(directory, n_tokens: int):
    """A prepared cache holding one validation shard of n_tokens, as data.py lays it out."""
    directory.mkdir()
    shards.write_shard(directory / "val_000000.bin", [np.arange(n_tokens) % 50000])
    (directory / "manifest.json").write_text(json.dumps({"splits": {"val": {"shards": ["val_000000.bin"]}}}))
    return shards.TokenShards(directory, "val")


def test_validation_reads_the_gpu_once_however_many_batches(tmp_path, fake_model):
    shards = write_split(tmp_path / "cache", 33 * 24)  # 24 windows of 32 + 1 tokens: 6 batches of 4
    counted = []
    for batches in (1, 6):
        waits = HostWaits()
        with frozen(fake_model), waits:
            E.validation_loss(fake_model, shards, 32, torch.device("cuda"), Env(**CUDA_BF16).autocast,
                              rows=4, sample=batches * 4)
        counted.append(waits.waits)
    assert counted[0] == counted[1]  # no wait per batch
    assert set(counted[0]) == {"_local_scalar_dense"}  # only the sums', read at the end


# ----------------------------------------------------------------------------------------------------
# The memory probe


def tiny_learner(compile_backend: str | None = None, world: int = 1) -> tuple[S.Learner, Env]:
    env = Env(device=torch.device("cpu"), world=world, compile=compile_backend is not None)
    settings = U.optimizer_settings(F.parse_args(["--device", "cpu"]), None)
    config = M.GPTConfig.from_preset(F.DEFAULT_ARCH, n_layer=1, n_head=2, n_embd=32, block_size=16)
    return S.build(config, env, settings, seed=0), env


def random_batch(micro: int, block: int = 16, seed: int = 0):
    x = torch.randint(0, 50257, (micro, block + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def steps(t, env, accum: int, micro: int, n: int) -> list[float]:
    losses = []
    for step in range(n):
        batches = [random_batch(micro, seed=step * accum + k) for k in range(accum)]
        stats = S.train_step(t, batches, env, step=step, seed=0, grad_clip=1.0)
        losses.append(stats[0].item())
    return losses


def test_the_probe_compiles_the_graph_training_runs(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    t, env = tiny_learner(compile_backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    assert Mem.fitting_grad_accum(t, env, batch_size=4, block_size=16) == 1
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    steps(t, env, accum=1, micro=4, n=3)
    assert graphs >= 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile
    torch._dynamo.reset()


def test_out_of_memory_inside_adamws_state_set_up_leaves_nothing_for_the_next_try(monkeypatch):
    t, env = tiny_learner()
    adamw = t.optimizers[0]
    init_group, tries = type(adamw)._init_group, []

    def out_of_memory_once(self, group, *args):
        if not tries:  # the first try dies after setting up part of a parameter's state
            tries.append(1)
            p = group["params"][0]
            self.state[p]["step"], self.state[p]["exp_avg"] = torch.tensor(0.0), torch.zeros_like(p)
            raise torch.cuda.OutOfMemoryError("simulated")
        return init_group(self, group, *args)

    monkeypatch.setattr(type(adamw), "_init_group", out_of_memory_once)
    assert Mem.fitting_grad_accum(t, env, batch_size=4, block_size=16) == 2  # 4 failed, 2 fitted
    assert all(np.isfinite(steps(t, env, accum=2, micro=2, n=2)))


TWO_RANK_PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    import memory as Mem, model, runtime, step as S
    from test_gpu_path import random_batch, steps, tiny_learner


    def main():  # what the ranks hold goes with this frame, while the interpreter still runs (see below)
        env, _ = runtime.setup_env("cpu", None, False)
        t, _ = tiny_learner(world=2)
        t.model, env = S.wrap_for_ranks(t.raw_model, env), env  # DDP (gloo) around the model
        seen = []
        forward, adamw_step = model.GPT.forward, type(t.optimizers[0]).step
        def forward_oom(self, idx, *a, **k):  # rank 1 cannot hold 4 sequences' activations
            seen.append(idx.size(0))
            if env.rank == 1 and idx.size(0) > 2:
                raise torch.cuda.OutOfMemoryError("simulated")
            return forward(self, idx, *a, **k)
        def step_oom(self, *a, **k):  # nor, with 2 sequences, AdamW's state
            if env.rank == 1 and seen[-1] == 2:
                raise torch.cuda.OutOfMemoryError("simulated")
            return adamw_step(self, *a, **k)
        model.GPT.forward, type(t.optimizers[0]).step = forward_oom, step_oom
        accum = Mem.fitting_grad_accum(t, env, batch_size=8, block_size=16)
        model.GPT.forward, type(t.optimizers[0]).step = forward, adamw_step
        losses = steps(t, env, accum=accum, micro=8 // 2 // accum, n=3)
        pointers = lambda: [None if p.grad is None else p.grad.data_ptr() for p in t.raw_model.parameters()]
        grads = pointers()
        steps(t, env, accum=accum, micro=8 // 2 // accum, n=1)
        same = None not in grads and grads == pointers()
        with open(f"{sys.argv[2]}/rank{env.rank}.json", "w") as f:
            json.dump({"accum": accum, "losses": losses, "grads_kept": same}, f)
        runtime.leave_together(env)
        runtime.cleanup_env(env)


    # DDP keeps gloo's process group alive after destroy_process_group. Left to interpreter finalization, as a
    # script's module globals are, its worker threads can find no GIL to take and abort the process ("terminate
    # called without an active exception" on rank 0, seen three times in this suite). train_gpt2.py's run lives in
    # main()'s frame too.
    main()
""")


def test_two_ranks_agree_on_the_micro_batch_when_one_runs_out_of_memory_and_keep_ddps_gradient_views(tmp_path):
    import subprocess
    driver = tmp_path / "probe.py"
    driver.write_text(TWO_RANK_PROBE)
    cmd = script_command(str(driver), str(REPO), str(tmp_path), torchrun_ranks=2)
    run = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["accum"] for r in ranks] == [4, 4]  # 4 failed on rank 1, then 2; 1 fitted both
    assert ranks[0]["losses"] == ranks[1]["losses"] and all(np.isfinite(ranks[0]["losses"]))
    assert all(r["grads_kept"] for r in ranks)  # gradients stay DDP's bucket views from step to step
