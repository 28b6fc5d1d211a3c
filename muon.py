"""Muon for the weight matrices inside the blocks: momentum, then each update orthogonalised by Newton-Schulz.

Written here rather than taken from torch.optim.Muon (torch 2.9+), which walks the matrices one at a time
(about 23 small operators, each a kernel launch, per matrix), has no `found_inf`, so a loop that must not
update on a non-finite step has to wait for the GPU first, and repeats the whole work on every rank.
This one, as the FineWeb speedrun's and nanochat's do:
- cuts each matrix into the blocks it holds side by side (c_attn's Q, K and V; SwiGLU's gate and up),
  each orthogonalised as a matrix of its own, and groups the blocks of every parameter by shape;
- runs one batched Newton-Schulz per shape (bf16 matmuls; compiled on CUDA), and foreach updates;
- skips the whole update on the device when `found_inf` (set by the caller, as GradScaler sets it for
  fused AdamW) is 1, so the CPU never waits to learn whether a step was finite;
- under torch.distributed, gives each rank its share of every group and all-gathers the results.
The update of an unsplit matrix is torch.optim.Muon's (Keller Jordan's Muon, its default coefficients
and its "original" lr adjustment), and the state is the same (a momentum buffer per parameter), so a
checkpoint of either loads into the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Keller Jordan's quintic iteration, as torch.optim.Muon's defaults: 5 steps, these coefficients.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(G: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The orthogonalised (U S' V^T, S' near 1) version of each matrix of the stack G (K, rows, cols), in bf16.

    Wide matrices iterate on X X^T, the smaller Gram matrix, so tall ones are transposed first.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


_compiled_newton_schulz = None


def orthogonalise(G: torch.Tensor) -> torch.Tensor:
    """newton_schulz, compiled on CUDA (one graph per shape: about 20 launches become a few fused kernels)."""
    global _compiled_newton_schulz
    if G.device.type != "cuda":
        return newton_schulz(G)
    if _compiled_newton_schulz is None:
        _compiled_newton_schulz = torch.compile(newton_schulz, dynamic=False, fullgraph=True)
    return _compiled_newton_schulz(G)


@dataclass
class _Shape:
    """The parameters whose blocks share one shape (rows, cols): they are stacked and orthogonalised together."""
    rows: int
    cols: int
    params: list[torch.Tensor]

    def row_counts(self) -> list[int]:
        return [p.size(0) for p in self.params]

    def lr_scale(self) -> float:
        # torch.optim.Muon's "original" adjustment: sqrt(max(1, fan-out / fan-in)) of the matrix orthogonalised.
        return math.sqrt(max(1.0, self.rows / self.cols))


class Muon(torch.optim.Optimizer):
    """Muon (Nesterov momentum, orthogonalised update, decoupled weight decay) for 2-D weights.

    `blocks` maps a parameter to the number of equal row blocks it holds (3 for a fused Q, K, V);
    parameters not in it are one block. Set `found_inf` (a 0-dim tensor, 1.0 for a non-finite step)
    before step() to skip that step on the device: weights and momentum stay as they were. GradScaler
    sets it the same way (fp16), as it does for fused AdamW.
    """

    found_inf: torch.Tensor | None = None
    # Off, a step runs no collective: for a step that some ranks may not reach (train_gpt2.py's memory probe).
    shared: bool = True
    _step_supports_amp_scaling = True  # GradScaler.step: pass found_inf rather than read it on the host

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 blocks: dict[torch.Tensor, int] | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True))
        blocks = blocks or {}
        self._shapes: list[list[_Shape]] = []  # per param group, in a fixed order (the same on every rank)
        for group in self.param_groups:
            by_shape: dict[tuple[int, int], _Shape] = {}
            for p in group["params"]:
                if p.dim() != 2 or p.size(0) % blocks.get(p, 1):
                    raise ValueError(f"Muon takes 2-D weights cut into equal row blocks, not {tuple(p.shape)} "
                                     f"in {blocks.get(p, 1)}")
                rows = p.size(0) // blocks.get(p, 1)
                by_shape.setdefault((rows, p.size(1)), _Shape(rows, p.size(1), [])).params.append(p)
            self._shapes.append(list(by_shape.values()))

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, cols, blocks) of each stack of blocks orthogonalised together, in every param group."""
        return [(shape.rows, shape.cols, sum(p.size(0) // shape.rows for p in shape.params))
                for shapes in self._shapes for shape in shapes]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("Muon.step: unscale the gradients first (GradScaler.unscale_)")
        keep = None if self.found_inf is None else 1.0 - self.found_inf  # a 0-dim tensor, 0 on a step to skip
        for group, shapes in zip(self.param_groups, self._shapes):
            lr, wd = group["lr"], group["weight_decay"]
            params = [p for shape in shapes for p in shape.params]
            # Decoupled weight decay (before the update, as torch.optim.Muon: the update does not read weights).
            torch._foreach_mul_(params, 1 - lr * wd if keep is None else 1 - lr * wd * keep)
            for shape in shapes:
                update = self._orthogonalised(self._nesterov_momentum(shape, group["momentum"], keep), shape)
                update.mul_(-lr * shape.lr_scale() if keep is None else -lr * shape.lr_scale() * keep)
                torch._foreach_add_(shape.params, update.view(-1, shape.cols).split(shape.row_counts()))

    def _nesterov_momentum(self, shape: _Shape, mu: float, keep: torch.Tensor | None) -> torch.Tensor:
        """Updates the momentum buffers of shape's parameters; returns g + mu * (buf - g), (blocks, rows, cols).

        On a step to skip (keep 0) the gradients may be inf or nan: they are zeroed, and the buffers
        lerped by 0, so they stay exactly as they were.
        """
        if any(p.grad is None for p in shape.params):
            raise RuntimeError("Muon.step: a parameter has no gradient (was backward run on the whole model?)")
        G = torch.cat([p.grad for p in shape.params])  # a copy: the Nesterov step below writes into it
        for p in shape.params:  # not setdefault, whose zeros_like would be built (and thrown away) every step
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in shape.params]
        M = torch.cat(buffers)
        if keep is None:
            M.lerp_(G, 1 - mu)
        else:
            G = torch.where(keep > 0, G, 0.0)
            M.lerp_(G, ((1 - mu) * keep).to(M.dtype))
        torch._foreach_copy_(buffers, M.split(shape.row_counts()))
        return G.lerp_(M, mu).view(-1, shape.rows, shape.cols)

    def _orthogonalised(self, stack: torch.Tensor, shape: _Shape) -> torch.Tensor:
        """orthogonalise(stack), in the stack's dtype; under torch.distributed each rank does its share
        (unless `shared` is off: then each does all of it, with no collective)."""
        world = dist.get_world_size() if self.shared and dist.is_available() and dist.is_initialized() else 1
        out = orthogonalise(stack) if world == 1 else _orthogonalise_shared(stack, world, dist.get_rank())
        return out.to(stack.dtype, memory_format=torch.contiguous_format)


def _orthogonalise_shared(stack: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """orthogonalise(stack), rank r doing blocks [r*n, (r+1)*n) (the stack padded with zero blocks to
    n*world, whose result is zero), then all-gathered: the same result on every rank."""
    K = stack.size(0)
    n = -(-K // world)
    padded = torch.cat([stack, stack.new_zeros(n * world - K, *stack.shape[1:])]) if n * world > K else stack
    mine = orthogonalise(padded[rank * n:(rank + 1) * n]).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return torch.cat(gathered)[:K]
