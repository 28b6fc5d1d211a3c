"""The optimizers: AdamW for everything, or Muon (muon.py) for the matrices inside the blocks and AdamW for the rest.

Each parameter group keeps its peak rate in group["peak_lr"]; the loop sets group["lr"] = peak × the step's share
(horizon.py) before each step, in plain sight, as nanochat's loop does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import GPT
from muon import Muon


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """What updates the weights, and at what rate: the optimizer flags as start-up resolved them."""
    kind: str  # "muon" (Muon for the blocks' matrices, AdamW for the rest) or "adamw"
    lr: float  # AdamW's peak rate
    min_lr: float  # AdamW's rate at the end of the decay; Muon's decays in proportion
    weight_decay: float  # AdamW's, on matrices only
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float
    grad_clip: float  # the largest gradient norm (0: none)
    lr_schedule: str  # "wsd" or "cosine"
    warmup_steps: int | None  # as given (None: DEFAULT_WARMUP_STEPS or a tenth of the run)
    cooldown_frac: float  # wsd: the decaying share of the run


def split_parameters(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """Every trainable parameter in exactly one group: `matrices`, the 2-D weights inside the blocks;
    `embeddings`, the token and position tables and an untied head (2-D, but a lookup or the output
    layer, which Muon is not made for); `vectors`, norm gains and biases."""
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    groups = {"matrices": [], "embeddings": [], "vectors": []}
    for p in model.parameters():  # each tied tensor once
        if p.requires_grad:
            kind = "vectors" if p.dim() < 2 else "matrices" if id(p) in in_blocks else "embeddings"
            groups[kind].append(p)
    return groups


def fused_blocks(model: GPT) -> dict[torch.nn.Parameter, int]:
    """The matrices that hold several side by side, and how many: c_attn's Q, K and V; SwiGLU's gate and up.
    Muon orthogonalises each block as a matrix of its own, as the FineWeb speedrun treats them."""
    blocks = {}
    for block in model.transformer.h:
        blocks[block.attn.c_attn.weight] = 3
        if block.mlp.kind == "swiglu":
            blocks[block.mlp.c_fc.weight] = 2
    return blocks


def make_optimizers(model: GPT, s: OptimizerSettings, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the block matrices and AdamW for the rest; weight decay on
    matrices only (GPT-3's recipe). Each group keeps its peak learning rate in group["peak_lr"]."""
    groups = split_parameters(model)
    decayed = groups["embeddings"] + ([] if s.kind == "muon" else groups["matrices"])
    # The fused kernel does the whole update in a few launches, and skips it on the device when found_inf is set.
    adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": s.weight_decay},
                               {"params": groups["vectors"], "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95),
                              eps=1e-8, fused=device.type in fused_adamw_devices())
    optimizers = [adamw]
    if s.kind == "muon":
        optimizers.append(Muon(groups["matrices"], lr=s.muon_lr, momentum=s.muon_momentum,
                               weight_decay=s.muon_weight_decay, blocks=fused_blocks(model)))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def fused_adamw_devices() -> list[str]:
    """Where this torch has fused AdamW: CUDA, and since 2.4 the CPU (MPS since 2.5)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return _get_fused_kernels_supported_devices()
    except ImportError:
        return ["cuda"]
