"""muon.py: the update torch.optim.Muon makes, block by block, and a state any Muon checkpoint can resume."""
import pytest
import torch

import model as M

from muon import Muon, newton_schulz
import flags as F
import optim as O
import startup as U

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                      reason="torch.optim.Muon, the reference, is in torch 2.9 and later")


def matrices(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def step_both(ours, theirs, grads):
    for optimizer, params in ((ours, ours.param_groups[0]["params"]), (theirs, theirs.param_groups[0]["params"])):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()


@needs_torch_muon
def test_an_unsplit_matrix_gets_torch_muons_update_and_momentum():
    start = matrices((48, 16), (16, 40), (48, 16))  # tall, wide, and two of one shape (stacked together)
    a = [p.clone().requires_grad_() for p in start]
    b = [p.clone().requires_grad_() for p in start]
    ours = Muon(a, lr=0.02, momentum=0.9, weight_decay=0.1)
    theirs = torch.optim.Muon(b, lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True)
    for seed in range(3):
        step_both(ours, theirs, matrices((48, 16), (16, 40), (48, 16), seed=seed + 1))
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)  # bf16 Newton-Schulz, batched against one by one
        assert torch.allclose(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], atol=1e-7)


def test_a_fused_qkv_matrix_is_orthogonalised_block_by_block():
    q, k, v = matrices((8, 8), (8, 8), (8, 8))
    fused = torch.cat([q, k, v]).requires_grad_()
    alone = [w.clone().requires_grad_() for w in (q, k, v)]
    split = Muon([fused], lr=0.1, blocks={fused: 3})
    separate = Muon(alone, lr=0.1)
    grads = matrices((8, 8), (8, 8), (8, 8), seed=5)
    fused.grad = torch.cat(grads)
    for w, g in zip(alone, grads):
        w.grad = g.clone()
    split.step()
    separate.step()
    assert torch.allclose(fused.detach(), torch.cat([w.detach() for w in alone]), atol=1e-6)
    # ...which differs from orthogonalising the 24 x 8 matrix as one (what torch.optim.Muon does)
    assert not torch.allclose(newton_schulz(torch.cat(grads)[None])[0].float(),
                              torch.cat([newton_schulz(g[None])[0] for g in grads]).float(), atol=1e-2)


@needs_torch_muon
def test_a_checkpoint_of_torch_muon_resumes_into_ours_with_its_momentum():
    start = matrices((24, 8), (8, 24))
    theirs = torch.optim.Muon([p.clone().requires_grad_() for p in start], lr=0.02, momentum=0.95)
    for p, g in zip(theirs.param_groups[0]["params"], matrices((24, 8), (8, 24), seed=3)):
        p.grad = g
    theirs.step()
    for p in theirs.param_groups[0]["params"]:
        p.grad = None
    ours = Muon([p.clone().requires_grad_() for p in start], lr=0.02, momentum=0.95)
    ours.load_state_dict(theirs.state_dict())
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])
    for p, g in zip(ours.param_groups[0]["params"], matrices((24, 8), (8, 24), seed=4)):
        p.grad = g
    ours.step()  # the loaded state is usable as it is


def test_the_state_round_trips_so_a_resumed_step_equals_an_uninterrupted_one():
    config = M.GPTConfig.from_preset("modern", n_layer=2, n_head=2, n_embd=32, block_size=16)
    settings = U.optimizer_settings(F.parse_args([]), None)
    runs = []
    for interrupted in (False, True):
        torch.manual_seed(0)
        model = M.GPT(config)
        optimizer = O.make_optimizers(model, settings, torch.device("cpu"))[1]
        for step in range(3):
            if interrupted and step == 2:  # a new optimizer, from what a checkpoint keeps
                state = optimizer.state_dict()
                optimizer = O.make_optimizers(model, settings, torch.device("cpu"))[1]
                optimizer.load_state_dict(state)
            torch.manual_seed(step)
            for p in optimizer.param_groups[0]["params"]:
                p.grad = torch.randn_like(p)
            optimizer.step()
        runs.append([p.detach().clone() for p in optimizer.param_groups[0]["params"]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_the_default_recipe_orthogonalises_q_k_v_and_gate_up_as_separate_matrices():
    config = M.GPTConfig.from_preset("modern", n_layer=2, n_head=2, n_embd=64, block_size=16)
    model = M.GPT(config)
    muon = O.make_optimizers(model, U.optimizer_settings(F.parse_args([]), None), torch.device("cpu"))[1]
    shapes = sorted((s.rows, s.cols, len(s.params)) for s in muon._shapes[0])
    hidden = M.swiglu_width(64)
    # (64, 64): c_attn's three blocks and attn.c_proj; (hidden, 64): gate and up; (64, hidden): mlp.c_proj
    assert shapes == sorted([(64, 64, 4), (hidden, 64, 2), (64, hidden, 2)])
