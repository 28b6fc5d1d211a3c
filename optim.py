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
    warmup_steps: int | None  # flags.warmup_steps (None: DEFAULT_WARMUP_STEPS or a tenth of the run)
    cooldown_frac: float  # wsd: the decaying share of the run
    # The speedrun's variants (RECORD_OPTIMIZER; off: OPTIMIZER_SWITCHES):
    muon_iteration: str  # Muon's orthogonalisation: "newton_schulz" or "polar_express"
    normuon: bool  # NorMuon's per-row normalisation of Muon's update
    cautious_weight_decay: bool  # Muon's weight decay only where its update shrinks a weight
    adamw_groups: str  # "one": one rate and betas for all of AdamW's parameters; "speedrun": SPEEDRUN_ADAMW


# The optimizer's switches off: Muon with Keller Jordan's Newton-Schulz iteration, AdamW with one rate and betas
# (GPT-2's recipe). What --arch gpt2 and every run with AdamW alone (--optimizer adamw, a fine-tune) train with.
OPTIMIZER_SWITCHES = dict(muon_iteration="newton_schulz", normuon=False, cautious_weight_decay=False, adamw_groups="one")
# The FineWeb speedrun's optimizer, each switch with its record: what the modern and speedrun presets train with
# alongside Muon where the flags do not say (BENCHMARKS.md, "The field's recipe", measures them here).
RECORD_OPTIMIZER = dict(
    muon_iteration="polar_express",  # modded-nanogpt's record of 2025-09-29: -10 steps
    normuon=True,  # 2025-10-24 and -27: 2.358 -> 2.313 min
    cautious_weight_decay=True,  # 2025-11-10: -40 steps
    adamw_groups="speedrun",  # SPEEDRUN_ADAMW: its rates and betas by kind of parameter
)
OPTIMIZER_PRESETS = {"modern": RECORD_OPTIMIZER, "speedrun": RECORD_OPTIMIZER}
# The rates' warmup with the record's optimizer: none (the speedrun warms up Muon's momentum alone). A tenth of the
# run cost 0.04 of validation loss at BENCHMARKS.md's proxy ("The field's recipe").
RECORD_WARMUP_STEPS = 0
# The speedrun's AdamW by kind of parameter (split_parameters' kinds; modded-nanogpt's train_gpt.py at the record
# of 2026-01-19, its param_table): the rate as a multiple of its Adam rate (there 0.008, here --lr), betas, and
# whether --weight_decay applies. eps is 1e-10 for all (record of 2025-01-16). Its smear gate's 0.01× is left out
# (the gates share 1×), and its decay is --weight_decay's, decoupled (its own is rate² × 0.005 × a multiple).
SPEEDRUN_ADAMW = {
    "head": (1.0, (0.5, 0.95), True),
    "embeddings": (1.0, (0.5, 0.95), True),
    "value_embeddings": (75.0, (0.75, 0.95), True),  # the value-embedding and bigram tables
    "gates": (1.0, (0.9, 0.99), False),
    "scalars": (5.0, (0.9, 0.99), False),  # its skip weights and lambdas; here also norm gains and biases
}
SPEEDRUN_ADAMW_EPS = 1e-10


def split_parameters(model: GPT) -> dict[str, list[torch.nn.Parameter]]:
    """Every trainable parameter in exactly one kind, in the model's order: `matrices`, the weights of the
    Linear layers inside the blocks (Muon's); `head`, an untied output layer; `embeddings`, the token and position
    tables; `value_embeddings`, the value-embedding and bigram tables; `gates`, the speedrun's gates (smear, value
    embeddings); `scalars`, the rest: norm gains, biases, the speedrun's learned scalars. The embeddings and the
    head are 2-D, but a lookup or the output layer, which Muon is not made for."""
    t = model.transformer
    linear_in_blocks = {id(m.weight) for m in t.h.modules() if isinstance(m, torch.nn.Linear)}
    value_tables = {id(m.weight) for m in [*(t.ve or []), t.bigram] if m is not None}
    tables = {id(m.weight) for m in (t.wte, t.wpe) if m is not None}
    kinds = {"matrices": [], "head": [], "embeddings": [], "value_embeddings": [], "gates": [], "scalars": []}
    for name, p in model.named_parameters():  # each tied tensor once
        if not p.requires_grad:
            continue
        kind = "matrices" if id(p) in linear_in_blocks else "value_embeddings" if id(p) in value_tables else \
            "embeddings" if id(p) in tables else "head" if p is model.lm_head.weight else \
            "gates" if name.endswith("gate") else "scalars"
        kinds[kind].append(p)
    return kinds


def fused_blocks(model: GPT) -> dict[torch.nn.Parameter, int]:
    """The matrices that hold several side by side, and how many: c_attn's Q, K and V; SwiGLU's gate and up.
    Muon orthogonalises each block as a matrix of its own, as the FineWeb speedrun treats them."""
    blocks = {}
    for block in model.transformer.h:
        blocks[block.attn.c_attn.weight] = 3
        if block.mlp.kind == "swiglu":
            blocks[block.mlp.c_fc.weight] = 2
    return blocks


def adamw_groups(model: GPT, kinds: dict[str, list], s: OptimizerSettings) -> list[dict]:
    """AdamW's param groups. "one": at --lr, the tables, the head (and with AdamW alone the matrices, after them)
    decayed, the rest not (GPT-3's recipe: weight decay on matrices only), each group in the model's order, as
    checkpoints' AdamW states map by position; "speedrun": a group per kind, as SPEEDRUN_ADAMW says."""
    matrices = kinds["matrices"] if s.kind == "adamw" else []
    if s.adamw_groups == "speedrun":
        return [{"params": kinds[kind], "lr": s.lr * rate, "betas": betas, "eps": SPEEDRUN_ADAMW_EPS,
                 "weight_decay": s.weight_decay if decayed else 0.0}
                for kind, (rate, betas, decayed) in SPEEDRUN_ADAMW.items() if kinds[kind]] + \
            ([{"params": matrices, "weight_decay": s.weight_decay}] if matrices else [])
    position = {id(p): i for i, p in enumerate(model.parameters())}
    in_order = lambda *names: sorted((p for name in names for p in kinds[name]), key=lambda p: position[id(p)])
    return [{"params": in_order("embeddings", "head", "value_embeddings") + matrices, "weight_decay": s.weight_decay},
            {"params": in_order("gates", "scalars"), "weight_decay": 0.0}]


def make_optimizers(model: GPT, s: OptimizerSettings, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the block matrices and AdamW for the rest (adamw_groups); each group keeps
    its peak learning rate in group["peak_lr"]."""
    kinds = split_parameters(model)
    # The fused kernel does the whole update in a few launches, and skips it on the device when found_inf is set.
    adamw = torch.optim.AdamW(adamw_groups(model, kinds, s), lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
                              fused=device.type in fused_adamw_devices())
    optimizers = [adamw]
    if s.kind == "muon":
        optimizers.append(Muon(kinds["matrices"], lr=s.muon_lr, momentum=s.muon_momentum,
                               weight_decay=s.muon_weight_decay, blocks=fused_blocks(model), iteration=s.muon_iteration,
                               normuon=s.normuon, cautious=s.cautious_weight_decay))
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
