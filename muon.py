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
# Polar Express (Amsel, Persson, Musco and Gower 2025, arXiv 2505.16932): a quintic of its own at each of 5 steps,
# computed for a safety factor of 2e-2 and a cushion of 2, the coefficients modded-nanogpt (record of 2025-09-29,
# -10 steps) and nanochat use. The input is first scaled to a norm of 1 / (1 + 2e-2), as they were computed for.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 2e-2
# The iterations by name: (each step's coefficients, the factor the input's norm is raised by first).
ITERATIONS = {"newton_schulz": ((NS_COEFFICIENTS,) * NS_STEPS, 1.0),
              "polar_express": (POLAR_EXPRESS_COEFFICIENTS, 1 + POLAR_EXPRESS_SAFETY)}


def newton_schulz(G: torch.Tensor, iteration: str = "newton_schulz") -> torch.Tensor:
    """The orthogonalised (U S' V^T, S' near 1) version of each matrix of the stack G (K, rows, cols), in bf16:
    ITERATIONS[iteration]'s quintic steps X <- a X + (b A + c A^2) X, A = X X^T.

    Wide matrices iterate on X X^T, the smaller Gram matrix, so tall ones are transposed first.
    """
    coefficients, safety = ITERATIONS[iteration]
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety).clamp(min=NS_EPS)  # spectral norm <= Frobenius norm <= 1
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


_compiled_newton_schulz = None


def orthogonalise(G: torch.Tensor, iteration: str = "newton_schulz") -> torch.Tensor:
    """newton_schulz, compiled on CUDA (one graph per shape: about 20 launches become a few fused kernels)."""
    global _compiled_newton_schulz
    if G.device.type != "cuda":
        return newton_schulz(G, iteration)
    if _compiled_newton_schulz is None:
        _compiled_newton_schulz = torch.compile(newton_schulz, dynamic=False, fullgraph=True)
    return _compiled_newton_schulz(G, iteration)


def normuon_scale(U: torch.Tensor, second_moment: torch.Tensor, beta2, keep=None) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv 2510.05491): U (K, rows, cols) with each row (each column of a wide
    matrix) divided by the root of its running mean square, then rescaled to U's own norm, so only the rows'
    balance changes. second_moment (K, rows, 1) or (K, 1, cols) is updated in place, lerped by 1 - beta2 (times
    keep, 0 on a step to skip). modded-nanogpt's record of 2025-10-24 (-10 steps) and nanochat compute it so."""
    mean_square = U.float().square().mean(dim=-1 if U.size(-2) >= U.size(-1) else -2, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2 if keep is None else (1 - beta2) * keep)
    scaled = U.float() * second_moment.clamp(min=1e-10).rsqrt()
    norm = U.float().norm(dim=(-2, -1), keepdim=True)
    return (scaled * (norm / scaled.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10))).to(U.dtype)


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


# NorMuon's second-moment decay: modded-nanogpt's (nanochat uses 0.9).
NORMUON_BETA2 = 0.95


def cautious_decay(params: list[torch.Tensor], update: torch.Tensor, rate) -> torch.Tensor:
    """Cautious weight decay (Chen et al. 2025, arXiv 2510.12402): rate·p only where the update (K, rows, cols,
    the step that will be added) already moves p towards zero, 0 elsewhere; modded-nanogpt's record of 2025-11-10
    (-40 steps) and nanochat decay so."""
    P = torch.cat(params).view_as(update)  # a copy: the update is added to the parameters themselves
    return P.mul_((update * P <= 0).to(P.dtype)).mul_(rate)


class Muon(torch.optim.Optimizer):
    """Muon (Nesterov momentum, orthogonalised update, decoupled weight decay) for 2-D weights.

    `blocks` maps a parameter to the number of equal row blocks it holds (3 for a fused Q, K, V);
    parameters not in it are one block. Set `found_inf` (a 0-dim tensor, 1.0 for a non-finite step)
    before step() to skip that step on the device: weights and momentum stay as they were. GradScaler
    sets it the same way (fp16), as it does for fused AdamW.

    The speedrun's variants, each a switch: `iteration` "polar_express" (Polar Express's coefficients for
    Newton-Schulz's), `normuon` (NorMuon's per-row normalisation), `cautious` (cautious weight decay).
    They are kept as attributes, not in the param groups, so a checkpoint of any variant loads into any other.
    """

    found_inf: torch.Tensor | None = None
    # Off, a step runs no collective: for a step that some ranks may not reach (memory.py's probe; step.update sets it).
    shared: bool = True
    _step_supports_amp_scaling = True  # GradScaler.step: pass found_inf rather than read it on the host

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 blocks: dict[torch.Tensor, int] | None = None, *, iteration: str = "newton_schulz",
                 normuon: bool = False, cautious: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True))
        if iteration not in ITERATIONS:
            raise ValueError(f"iteration must be one of {sorted(ITERATIONS)}, not {iteration!r}")
        self.iteration, self.normuon, self.cautious = iteration, normuon, cautious
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
            decay = lr * wd if keep is None else lr * wd * keep
            if not self.cautious:
                # Decoupled weight decay (before the update, as torch.optim.Muon: the update does not read weights).
                torch._foreach_mul_([p for shape in shapes for p in shape.params], 1 - decay)
            for shape in shapes:
                update = self._orthogonalised(self._nesterov_momentum(shape, group["momentum"], keep), shape)
                if self.normuon:
                    update = self._normalised_rows(update, shape, keep)
                update.mul_(-lr * shape.lr_scale() if keep is None else -lr * shape.lr_scale() * keep)
                if self.cautious:
                    update.sub_(cautious_decay(shape.params, update, decay))
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

    def _normalised_rows(self, update: torch.Tensor, shape: _Shape, keep: torch.Tensor | None) -> torch.Tensor:
        """normuon_scale(update), with each parameter's second moments kept in its state ("second_moment": per
        block, a row's, or for wide blocks a column's)."""
        wide = shape.rows < shape.cols
        for p in shape.params:
            if "second_moment" not in self.state[p]:  # also for a checkpoint saved without NorMuon
                blocks = p.size(0) // shape.rows
                self.state[p]["second_moment"] = torch.zeros(blocks, 1 if wide else shape.rows,
                                                             shape.cols if wide else 1, device=p.device)
        moments = [self.state[p]["second_moment"] for p in shape.params]
        stacked = torch.cat(moments)
        update = normuon_scale(update, stacked, NORMUON_BETA2, keep)
        torch._foreach_copy_(moments, stacked.split([m.size(0) for m in moments]))
        return update

    def _orthogonalised(self, stack: torch.Tensor, shape: _Shape) -> torch.Tensor:
        """orthogonalise(stack), in the stack's dtype; under torch.distributed each rank does its share
        (unless `shared` is off: then each does all of it, with no collective)."""
        world = dist.get_world_size() if self.shared and dist.is_available() and dist.is_initialized() else 1
        out = orthogonalise(stack, self.iteration) if world == 1 else \
            _orthogonalise_shared(stack, world, dist.get_rank(), self.iteration)
        return out.to(stack.dtype, memory_format=torch.contiguous_format)


def _orthogonalise_shared(stack: torch.Tensor, world: int, rank: int, iteration: str) -> torch.Tensor:
    """orthogonalise(stack), rank r doing blocks [r*n, (r+1)*n) (the stack padded with zero blocks to
    n*world, whose result is zero), then all-gathered: the same result on every rank."""
    K = stack.size(0)
    n = -(-K // world)
    padded = torch.cat([stack, stack.new_zeros(n * world - K, *stack.shape[1:])]) if n * world > K else stack
    mine = orthogonalise(padded[rank * n:(rank + 1) * n], iteration).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return torch.cat(gathered)[:K]
