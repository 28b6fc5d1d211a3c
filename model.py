"""GPT-2 and the modern block: the network and KV-cached generation.

No file is read or written here: checkpoint.py reads and writes this repository's checkpoints, hf.py
Hugging Face weights; both build the network with weights.model_with_weights. Every script imports the network
from here, and none holds a copy of any of it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import EOT, CheckpointError

RMSNORM_EPS = 1e-6  # Llama's and Qwen3's, so the modern preset exports as they compute it


# ----------------------------------------------------------------------------------------------------
# Configuration

# The architecture switches each preset sets. `gpt2` is OpenAI's GPT-2 exactly; `modern` is what
# current LMs use (LLaMA-style blocks, plus QK-norm as in modded-nanogpt and OLMo 2), with the switches
# that measured better here side by side and that transformers and llama.cpp still compute: a norm after
# the embedding (BENCHMARKS.md, "Recipes"), and an untied head and projections into the residual stream
# starting at zero, which pay with the speedrun's AdamW groups (BENCHMARKS.md, "The field's recipe").
_GPT2_SWITCHES = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False,
                      tie_embeddings=True, zero_init=False, logit_softcap=0.0, softcap_form="tanh", embed_norm=False,
                      value_embeds=0, x0_mix=False, unet_skips=False, backout=False, smear=False, bigram_embed=0,
                      window_pattern="", short_window=0, document_mask=False)
_MODERN_SWITCHES = _GPT2_SWITCHES | dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True,
                                         embed_norm=True, tie_embeddings=False, zero_init=True)
# The FineWeb speedrun's architecture (KellerJordan/modded-nanogpt, its README's record table), each switch with
# the record that brought it and what that record measured on 8 H100s to val loss 3.28; BENCHMARKS.md, "The
# field's recipe", measures them here. transformers and llama.cpp have no counterpart for most of them.
_SPEEDRUN_SWITCHES = _MODERN_SWITCHES | dict(
    mlp="relu2",  # 2024-10-14, with QK-norm and zero-initialised projections: 22.3 -> 15.2 min
    # (from modern: an untied head starting at zero, the record of 2024-11-03: 12.0 -> 10.8 min)
    logit_softcap=23.0, softcap_form="sigmoid",  # 2025-12-26, 23·σ((z + 5) / 7.5) for 15·tanh(z / 15): -40 steps
    value_embeds=3,  # 2024-12-04 and -08, value embeddings in a U-net pattern: 4.66 -> 3.95 min; gated 2025-12-29
    x0_mix=True,  # 2024-11-06, the embedding mixed into every block's input: with a soft cap, 10.8 -> 8.2 min
    unet_skips=True,  # 2024-11-10, U-net skips from the first half's layers to the second's: 7.8 -> 7.2 min
    backout=True,  # 2025-10-04, the 2/3-depth residual subtracted before the head: 2,380 -> 2,290 steps, tuned
    smear=True,  # 2025-09-18, the previous token's embedding mixed in, gated: -15 steps
    bigram_embed=5,  # 2026-01-19, a hashed table of (previous, current) token pairs, 5 × the vocabulary: -165 steps
    window_pattern="SSSL",  # 2025-01-16, long and short windows (nanochat's tiling; the record's long layers: 3, 10 of 11)
    document_mask=True,  # 2024-11-19, attention within each document (FlexAttention): 7.2 -> 5.03 min
)
ARCH_PRESETS = {"gpt2": _GPT2_SWITCHES, "modern": _MODERN_SWITCHES, "speedrun": _SPEEDRUN_SWITCHES}
# The speedrun's switches that neither transformers' GPT-2, Llama and Qwen3 nor llama.cpp compute (hf.py names them).
SPEEDRUN_ONLY = ("value_embeds", "x0_mix", "unet_skips", "backout", "smear", "bigram_embed", "window_pattern",
                 "document_mask")
# How many of the residual stream's channels the speedrun's gates read (smear, value embeddings): its 12.
GATE_CHANNELS = 12
# The sigmoid soft cap's offset and scale, c·σ((z + 5) / 7.5): modded-nanogpt's record of 2025-12-26.
SIGMOID_CAP_OFFSET, SIGMOID_CAP_SCALE = 5.0, 7.5


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded (see padded_vocab_size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rope"
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu" (tanh-approximated, GPT-2), "swiglu" (LLaMA) or "relu2" (ReLU squared, modded-nanogpt)
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    qk_norm: bool = False  # normalise queries and keys per head before attention
    rope_base: float = 10000.0
    tie_embeddings: bool = True  # the output layer is the token embedding, as GPT-2
    zero_init: bool = False  # projections into the residual stream (and an untied head) start at zero
    logit_softcap: float = 0.0  # > 0: logits bounded by c (Gemma 2, modded-nanogpt), as softcap_form says
    softcap_form: str = "tanh"  # "tanh": c·tanh(z / c); "sigmoid": c·σ((z + 5) / 7.5) (modded-nanogpt, 2025-12)
    embed_norm: bool = False  # normalise the embedding before the first block (modded-nanogpt)
    # The FineWeb speedrun's switches (_SPEEDRUN_SWITCHES says where each comes from):
    value_embeds: int = 0  # N > 0: N token tables added, gated, to the values of the first N and the last N layers
    # (as many as fit: n_layer // 2 at most, so a preset suits any depth)
    x0_mix: bool = False  # each block's input is a·x + b·x0, x0 the normalised embedding, a and b learned per layer
    unet_skips: bool = False  # the first half's outputs added, scaled, to the inputs of the second half, mirrored
    backout: bool = False  # the residual stream at 2/3 of the depth, scaled, subtracted before the final norm
    smear: bool = False  # each token's embedding plus a gated share of the previous token's
    bigram_embed: int = 0  # N > 0: a table of N × vocab rows for hashed (previous, current) pairs, added per layer
    window_pattern: str = ""  # per layer, tiled (the last layer always L): L sees the whole context, S short_window
    short_window: int = 0  # tokens a short-window layer sees; 0: half the context (the record's short/long ratio)
    document_mask: bool = False  # attention stays within a document (documents end with <|endoftext|>)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions turn pairs of channels: the head size (n_embd / n_head = "
                             f"{self.n_embd} / {self.n_head}) must be even, not {self.head_dim}")
        for name, allowed in (("pos_emb", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu", "relu2")), ("softcap_form", ("tanh", "sigmoid"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.window_pattern.strip("SL"):
            raise ValueError(f"window_pattern takes the letters S (short) and L (long), not {self.window_pattern!r}")
        if min(self.value_embeds, self.bigram_embed, self.short_window) < 0:
            raise ValueError("value_embeds, bigram_embed and short_window cannot be negative")

    @classmethod
    def from_preset(cls, arch: str, **fields) -> "GPTConfig":
        """The preset's switches, then `fields` (the shape, or switches changed from the preset)."""
        return cls(**(ARCH_PRESETS[arch] | fields))

    @property
    def padded_vocab_size(self) -> int:
        # 50257 -> 50304, a multiple of 128: matmuls with such widths run on faster GPU kernels.
        return -(-self.vocab_size // 128) * 128

    @property
    def value_tables(self) -> int:
        """The value-embedding tables this depth holds: value_embeds, at most one per pair of layers."""
        return min(self.value_embeds, self.n_layer // 2)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def arch(self) -> str | None:
        """The preset this configuration matches, if any."""
        switches = {k: getattr(self, k) for k in ARCH_PRESETS["gpt2"]}
        return next((name for name, preset in ARCH_PRESETS.items() if preset == switches), None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model config has unknown fields {sorted(unknown)}; "
                                  "was it written by a newer version of this repository?")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------
# Small math


def rope_tables(head_dim: int, length: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, (length, head_dim/2) each (RoFormer, Su et al. 2021)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's channels; x is (B, nh, T, hs), cos/sin (T, hs/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


def softcap(logits: torch.Tensor, cap: float, form: str = "tanh") -> torch.Tensor:
    """The logits bounded by cap, in fp32: cap·tanh(z / cap) (Gemma 2), or cap·σ((z + 5) / 7.5), which bounds
    them to (0, cap) (modded-nanogpt's record of 2025-12-26); the logits as they are if cap is 0."""
    if not cap:
        return logits
    if form == "sigmoid":
        return cap * torch.sigmoid((logits.float() + SIGMOID_CAP_OFFSET) / SIGMOID_CAP_SCALE)
    return cap * torch.tanh(logits.float() / cap)


def softcap_slope(logits: torch.Tensor, cap: float, form: str = "tanh") -> torch.Tensor:
    """d softcap(z) / dz at the logits z, in fp32 (cap > 0)."""
    if form == "sigmoid":
        s = torch.sigmoid((logits.float() + SIGMOID_CAP_OFFSET) / SIGMOID_CAP_SCALE)
        return s.mul_(1 - s).mul_(cap / SIGMOID_CAP_SCALE)
    return 1 - torch.tanh(logits.float() / cap).square_()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float = 0.0, vocab: int | None = None,
                  form: str = "tanh") -> torch.Tensor:
    """Mean cross-entropy of softcap(logits (N, V), cap, form) over the targets (N,) that are not -1, in fp32.

    Only the first `vocab` columns count: the padding ids past the tokenizer's vocabulary never occur,
    and weights from elsewhere (OpenAI's GPT-2) leave their rows zero, whose logit of 0 would outweigh
    every real token's. Under torch.compile, inductor fuses the upcast into its softmax kernels and
    keeps no fp32 copy of the logits. Eager PyTorch has no such kernel: F.cross_entropy on bf16 logits
    makes a full fp32 copy and keeps an fp32 log-softmax for the backward pass (three copies of the
    largest activation of the step), so eager runs go through _ChunkedCrossEntropy instead.
    """
    vocab = vocab or logits.size(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(softcap(logits[:, :vocab].float(), cap, form), targets, ignore_index=-1)
    return _ChunkedCrossEntropy.apply(logits, targets[:, None], cap, vocab, form)[0]


def cross_entropies(logits: torch.Tensor, targets: torch.Tensor, cap: float = 0.0, vocab: int | None = None,
                    form: str = "tanh") -> torch.Tensor:
    """cross_entropy against J targets a row (N, J): (J,), each column's cross-entropy summed over its rows
    that are not -1 and divided by the count of rows whose first target is not -1 (the next token's), so that
    the terms add up as parts of one mean. One logsumexp a row serves every column."""
    vocab = vocab or logits.size(-1)
    if torch.compiler.is_compiling():
        z = softcap(logits[:, :vocab].float(), cap, form)
        valid = targets != -1
        picked = z.gather(1, targets.clamp(min=0))
        return ((z.logsumexp(-1, keepdim=True) - picked) * valid).sum(0) / valid[:, 0].sum().clamp(min=1)
    return _ChunkedCrossEntropy.apply(logits, targets, cap, vocab, form)


LOSS_ROWS = 1024  # rows per fp32 chunk of the loss: 200 MB at GPT-2's vocabulary


def token_losses(logits: torch.Tensor, targets: torch.Tensor, cap: float = 0.0, vocab: int | None = None,
                 form: str = "tanh") -> torch.Tensor:
    """The cross-entropy of each row (N,) in fp32, by cross_entropy's rule, 0 where the target is -1 (no gradient)."""
    vocab = vocab or logits.size(-1)
    if torch.compiler.is_compiling():  # inductor fuses the upcast into its kernels, as in cross_entropy
        return F.cross_entropy(softcap(logits[:, :vocab].float(), cap, form), targets, ignore_index=-1,
                               reduction="none")
    lse, target_logit = _logsumexp_and_target(logits, targets[:, None], cap, vocab, form)
    return (lse - target_logit[:, 0]) * (targets != -1)


@torch.no_grad()
def _logsumexp_and_target(logits, targets, cap: float, vocab: int, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of softcap(logits[:, :vocab], cap, form): its logsumexp (N,) and its targets' logits (N, J), fp32,
    LOSS_ROWS at a time."""
    lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    target_logit = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for a in range(0, logits.size(0), LOSS_ROWS):
        z = softcap(logits[a:a + LOSS_ROWS, :vocab].float(), cap, form)
        lse[a:a + LOSS_ROWS] = torch.logsumexp(z, dim=-1)
        target_logit[a:a + LOSS_ROWS] = z.gather(1, targets[a:a + LOSS_ROWS].clamp(min=0))
    return lse, target_logit


class _ChunkedCrossEntropy(torch.autograd.Function):
    """cross_entropies (of soft-capped logits, over their first `vocab` columns, against targets (N, J)) whose
    fp32 work is done 1,024 rows at a time; it keeps only the logits and a logsumexp per row for the backward
    pass, whose gradient it writes in the logits' own dtype (zero in the columns past `vocab`).

    Written here because no PyTorch op does this outside torch.compile (Liger-Kernel's fused
    cross-entropy does it with Triton, a GPU-only dependency).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float, vocab: int, form: str = "tanh") -> torch.Tensor:
        lse, target_logit = _logsumexp_and_target(logits, targets, cap, vocab, form)
        valid = targets != -1
        count = valid[:, 0].sum().clamp(min=1)
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.cap, ctx.vocab, ctx.form = cap, vocab, form
        return ((lse[:, None] - target_logit) * valid).sum(0) / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, count = ctx.saved_tensors
        R, cap, V = LOSS_ROWS, ctx.cap, ctx.vocab
        scale = (grad / count) * (targets != -1)  # (N, J): d(each term)/d(each row's loss); 0 where ignored
        grad_logits = torch.empty_like(logits)
        grad_logits[:, V:] = 0  # the padding columns: every other one is written below
        for a in range(0, logits.size(0), R):
            t, s = targets[a:a + R], scale[a:a + R]
            z = logits[a:a + R, :V].to(torch.float32, copy=True)  # a copy even of fp32 logits: changed in place
            if cap:
                z = softcap(z, cap, ctx.form)
            g = torch.sub(z, lse[a:a + R, None], out=z).exp_()  # the softmax
            g.mul_(s.sum(1, keepdim=True)).scatter_add_(1, t.clamp(min=0), -s)  # minus each one-hot target
            if cap:  # through the cap
                g.mul_(softcap_slope(logits[a:a + R, :V], cap, ctx.form))
            grad_logits[a:a + R, :V] = g
        return grad_logits, None, None, None, None


def swiglu_width(n_embd: int) -> int:
    """SwiGLU has three matrices, so its hidden width is 2/3 of 4C to keep the parameter count
    (Shazeer 2020), rounded up to a multiple of 64 for the matmul kernels."""
    return -(-8 * n_embd // 3 // 64) * 64


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in its input's dtype, with its gain cast to it, whatever autocast says.

    CUDA autocast runs rms_norm in fp32 (CPU autocast does not), so QK-norm would hand RoPE and SDPA fp32
    queries and keys that SDPA then casts back to bf16. Here they stay bf16, which is what reaches
    attention either way: an eager 124M layer at 16 x 1024 tokens writes 50 MB less and runs 12 fewer
    operators (traced on fake CUDA tensors, BENCHMARKS.md), and what is saved for the backward pass is the
    same. The kernel accumulates in fp32 whatever the dtype. The residual stream is fp32, so the norms
    of the blocks still run in fp32, and in fp32 (the exported model's arithmetic) nothing changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=RMSNORM_EPS)
    return nn.LayerNorm(dim, bias=config.bias)


# ----------------------------------------------------------------------------------------------------
# Attention masks: sliding windows and documents, one rule for SDPA's boolean masks (the CPU, eager CUDA, the KV
# cache) and FlexAttention's block masks (CUDA under torch.compile, which skips the blocks no query sees)


def visible(q_pos, k_pos, window, q_doc=None, k_doc=None) -> torch.Tensor:
    """Whether the query at q_pos sees the key at k_pos: at or before it, fewer than `window` positions back,
    and (given documents) in the same document. Broadcasts over its tensors; a query always sees itself."""
    seen = (k_pos <= q_pos) & (q_pos - k_pos < window)
    return seen if q_doc is None else seen & (q_doc == k_doc)


def document_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Each position's document (B, T): <|endoftext|> ends a text, so it opens the next document (it is what
    predicts that document's first token, from nothing before it), as modded-nanogpt numbers them."""
    return (tokens == EOT).cumsum(-1)


def boolean_mask(window, docs: torch.Tensor | None, start: int, length: int) -> torch.Tensor:
    """SDPA's mask for `length` queries after `start` cached positions over all start + length keys: (length,
    keys), or (B, 1, length, keys) with documents (docs: (B, keys))."""
    device = docs.device if docs is not None else window.device if torch.is_tensor(window) else None
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    if docs is None:
        return visible(q, k, window)
    return visible(q, k, window, docs[:, start:, None], docs[:, None, :]).unsqueeze(1)


def block_mask(window, docs: torch.Tensor | None, length: int, device):
    """The same mask as FlexAttention's BlockMask, for a whole sequence (training and evaluation)."""
    from torch.nn.attention.flex_attention import create_block_mask  # 0.4 s to import: only where it runs

    def mask_mod(b, h, q, k):
        return visible(q, k, window, None if docs is None else docs[b, q], None if docs is None else docs[b, k])
    return create_block_mask(mask_mod, None if docs is None else docs.size(0), None, length, length, device=device)


def attend(q, k, v, mask, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q over k, v (B, nh, T, hs): causal where mask is None, else as the boolean or block mask says."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1, dropout_p=dropout)
    if torch.is_tensor(mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=mask)


def layer_windows(config: GPTConfig) -> list[int]:
    """Each layer's window, as an index into GPT.attn_windows (0: short, 1: long): window_pattern tiled over the
    layers, the last one always long (nanochat's rule; the speedrun's last layer is long too)."""
    pattern = config.window_pattern or "L"
    kinds = ["SL".index(pattern[i % len(pattern)]) for i in range(config.n_layer)]
    return kinds[:-1] + [1]


# ----------------------------------------------------------------------------------------------------
# Small math of the speedrun's embeddings


def previous_tokens(idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """The token before each of idx's (B, T), -1 where the context starts; after a cache's positions, its last."""
    if cache is None or cache.pos == 0:
        first = torch.full_like(idx[:, :1], -1)
    else:
        first = cache.tokens[:, cache.pos - 1:cache.pos]
    return torch.cat([first, idx[:, :-1]], dim=1)


# The bigram hash's multipliers, large odd constants that spread the pairs: modded-nanogpt's get_bigram_hash.
BIGRAM_HASH = (36313, 27191)


def bigram_hash(prev: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """The row of a table of `rows` for each (previous, current) pair: (a·current xor b·previous) mod (rows - 1),
    the last row where there is no previous token (modded-nanogpt's record of 2026-01-19)."""
    a, b = BIGRAM_HASH
    pairs = torch.bitwise_xor(a * idx, b * prev.clamp(min=0)) % (rows - 1)
    return torch.where(prev < 0, rows - 1, pairs)


def value_table(config: GPTConfig, layer: int) -> int | None:
    """Which value-embedding table a layer adds: table j to layer j and to the j-th of the last value_embeds
    layers (the speedrun's "012 ... 012" U-net pattern, records of 2024-12-08 and 2026-01-19), else None."""
    n, first_of_last = config.value_tables, config.n_layer - config.value_tables
    if layer < n:
        return layer
    if n and layer >= first_of_last:
        return layer - first_of_last
    return None


def backout_layer(n_layer: int) -> int:
    """The layer whose output backout subtracts: 2/3 of the way (modded-nanogpt's record of 2025-10-04: the 8th
    of 12)."""
    return max(0, 2 * n_layer // 3 - 1)


# ----------------------------------------------------------------------------------------------------
# The network


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated for block_size positions, and the
    rotary tables for all of them (rope models): what generation keeps from token to token."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (config.n_layer, 2, batch_size, config.n_head, config.block_size, config.head_dim)
        self.kv = torch.empty(shape, device=device, dtype=dtype)  # only positions written are ever read
        # Each layer's keys and values as views made once: indexing kv[layer, 0] at every token was four more
        # operators a layer, and at batch 1 each operator's dispatch costs about what its arithmetic does.
        self.keys = [self.kv[i, 0] for i in range(config.n_layer)]
        self.values = [self.kv[i, 1] for i in range(config.n_layer)]
        # Once per cache, in fp32, rather than at every token for every position so far.
        self.rope = rope_tables(config.head_dim, config.block_size, config.rope_base, device) \
            if config.pos_emb == "rope" else None
        # The token at each position: smear and the bigram hash read the previous one, document masks all of them.
        self.tokens = torch.zeros(batch_size, config.block_size, dtype=torch.long, device=device)
        self.pos = 0  # positions filled so far (advanced by GPT after all layers have run)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, nh, T, hs) in place and return all keys and values so far."""
        keys, values, T = self.keys[layer], self.values[layer], k.size(2)
        keys.narrow(2, self.pos, T).copy_(k)
        values.narrow(2, self.pos, T).copy_(v)
        return keys.narrow(2, 0, self.pos + T), values.narrow(2, 0, self.pos + T)

    def rope_at(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, hs/2) of the T positions after the cached ones."""
        return self.rope[0].narrow(0, self.pos, T), self.rope[1].narrow(0, self.pos, T)


class PromptCache:
    """What generate() leaves for its next call, for a caller whose next prompt repeats this one's start (a
    conversation: the history, then a new turn): the KV cache and the tokens it holds. A prompt sharing n of
    them feeds only the rest, as llama.cpp reuses its cached prompt: a turn costs its own tokens, not the
    whole history's again."""

    def __init__(self):
        self.cache: KVCache | None = None
        self.tokens: list[int] = []  # what the cache holds, position by position

    def reusable(self, prompt: list[int]) -> KVCache | None:
        """The cache cut back to the start it shares with prompt, leaving at least one token of it to feed
        (for its logits); None when nothing is shared."""
        shared = next((i for i, (a, b) in enumerate(zip(self.tokens, prompt)) if a != b),
                      min(len(self.tokens), len(prompt)))
        shared = min(shared, len(prompt) - 1)
        if self.cache is None or shared == 0:
            return None
        self.cache.pos = shared  # the positions after it are written over as they are fed again
        return self.cache


@dataclass
class BlockInputs:
    """What each block reads besides the residual stream, the same for every block of one forward pass."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos and sin of the positions (rope models)
    cache: KVCache | None = None  # generation's keys and values so far
    x0: torch.Tensor | None = None  # (B, T, C) the normalised embedding (x0_mix)
    bigram: torch.Tensor | None = None  # (B, T, C) the bigram embedding (bigram_embed)
    values: list[torch.Tensor | None] | None = None  # each layer's value embedding (B, T, C), or None (value_embeds)
    masks: list | None = None  # each layer's attention mask (windows, documents); None: causal


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        # value_embeds: a gate per head read from the input's first channels, 2·σ(0) = 1 at first (modded-nanogpt's
        # record of 2025-12-29, as its attention gates).
        has_values = value_table(config, layer) is not None
        self.ve_gate = nn.Parameter(torch.zeros(config.n_head, GATE_CHANNELS)) if has_values else None

    def forward(self, x, inputs: BlockInputs, layer: int = 0):
        if inputs.cache is not None:
            return self.cached(x, inputs, layer)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.ve_gate is not None:
            v = self.with_value_embedding(v, x, inputs.values[layer])
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inputs.rope is not None:
            q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        mask = inputs.masks[layer] if inputs.masks is not None else None
        y = attend(q, k, v, mask, dropout=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def with_value_embedding(self, v: torch.Tensor, x: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
        """v (B, nh, T, hs) plus the layer's value embedding ve (B, T, C), gated per head by 2·σ(w·x[:12])."""
        B, nh, T, hs = v.shape
        gate = 2 * torch.sigmoid(F.linear(x[..., :GATE_CHANNELS], self.ve_gate.to(x.dtype)))  # (B, T, nh)
        return v + (gate.unsqueeze(-1) * ve.view(B, T, nh, hs)).transpose(1, 2).to(v.dtype)

    def cached(self, x, inputs: BlockInputs, layer: int):
        """forward for T new positions after cache.pos cached ones (generation), the same arithmetic in fewer
        operators: a 124M token ran about 600, each a few microseconds of dispatch (BENCHMARKS.md, "Decoding")."""
        B, T, C = x.shape
        nh, cache = self.n_head, inputs.cache
        q, k, v = self.c_attn(x).view(B, T, 3 * nh, self.head_dim).transpose(1, 2).split(nh, dim=1)  # (B, nh, T, hs) each
        if self.ve_gate is not None:
            v = self.with_value_embedding(v, x, inputs.values[layer])
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if inputs.rope is not None:
            q, k = apply_rope(torch.cat([q, k], dim=1), *inputs.rope).split(nh, dim=1)  # queries and keys turned at once
        k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs), in the cache's dtype
        if inputs.masks is None:
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=query_mask(T, k.size(2), q.device),
                                               is_causal=T == k.size(2) and T > 1)
        else:
            y = attend(q.to(k.dtype), k, v, inputs.masks[layer])
        # (B, T, C), back from the cache's dtype (fp32 on CPUs) to the weights' (under autocast, where x is fp32
        # after a norm, a copy c_proj casts back: generation runs without autocast)
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)
        return self.resid_dropout(self.c_proj(y))


def query_mask(t_q: int, t_k: int, device) -> torch.Tensor | None:
    """Mask for T new queries that follow t_k - t_q cached positions.

    SDPA's is_causal aligns its mask top-left, which is wrong once keys outnumber queries, so that
    case gets an explicit bottom-right mask. One query (decoding) sees every key and needs none.
    """
    if t_q == t_k or t_q == 1:
        return None
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = swiglu_width(config.n_embd) if self.kind == "swiglu" else 4 * config.n_embd
        # SwiGLU's gate and up projections side by side in one matrix: (2 * hidden, C)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()  # So et al. 2021 (Primer); the FineWeb speedrun's activation
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        # x0_mix: the input is a·x + b·x0, a = 1 and b = 0 at first (modded-nanogpt's "block lambdas", 2024-11-06;
        # nanochat's resid_lambdas and x0_lambdas).
        self.x_scale = nn.Parameter(torch.ones(1)) if config.x0_mix else None
        self.x0_scale = nn.Parameter(torch.zeros(1)) if config.x0_mix else None
        # bigram_embed: the input gets c·bigram, c = 0.1 at first (modded-nanogpt's record of 2026-01-19).
        self.bigram_scale = nn.Parameter(torch.full((1,), 0.1)) if config.bigram_embed else None

    def forward(self, x, inputs: BlockInputs | None = None, layer: int = 0):
        inputs = inputs or BlockInputs()
        if self.x_scale is not None:
            x = self.x_scale * x + self.x0_scale * inputs.x0
        if self.bigram_scale is not None:
            x = x + self.bigram_scale * inputs.bigram
        x = x + self.attn(self.ln_1(x), inputs, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class Smear(nn.Module):
    """x_t + λ·σ(w·x_t[:12])·x_{t-1}: each token's embedding plus a gated share of the previous token's (modded-
    nanogpt's record of 2025-09-18, which saw heads attending to the previous token). λ and w start at 0."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1, GATE_CHANNELS))
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """x and the previous tokens' embeddings (B, T, C), zero where there is none."""
        return x + self.scale * torch.sigmoid(F.linear(x[..., :GATE_CHANNELS], self.gate)) * previous


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.padded_vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd) if c.pos_emb == "learned" else None,
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c, i) for i in range(c.n_layer)]),
            ln_f=make_norm(c, c.n_embd),
            ln_e=make_norm(c, c.n_embd) if c.embed_norm else None,
            # The speedrun's tables, lookups with no matmul (value_embeds, bigram_embed), and its smear.
            ve=nn.ModuleList([nn.Embedding(c.padded_vocab_size, c.n_embd) for _ in range(c.value_tables)]) or None,
            bigram=nn.Embedding(c.bigram_embed * c.padded_vocab_size, c.n_embd) if c.bigram_embed else None,
            smear=Smear() if c.smear else None,
        ))
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False)
        if c.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings, as GPT-2
        # unet_skips: a weight per mirrored pair of layers, 1 at first (modded-nanogpt's record of 2024-11-10).
        self.skip_weights = nn.Parameter(torch.ones(c.n_layer // 2)) if c.unet_skips else None
        # backout: 0.5 at first (modded-nanogpt's record of 2025-10-04; nanochat starts it at 0.2).
        self.backout_scale = nn.Parameter(torch.full((1,), 0.5)) if c.backout else None
        if c.window_pattern:
            # The windows (short, long) in tokens, as data: the loop may change them between steps (set_attention_windows)
            # without torch.compile compiling again; saved with the weights, which were trained with them.
            self.register_buffer("attn_windows", torch.tensor([c.short_window or c.block_size // 2, c.block_size]))
        # The training loss's extra terms (set_loss_terms), none until asked for: not saved with the weights.
        self.register_buffer("loss_weights", None, persistent=False)
        self.register_buffer("prefix_table", None, persistent=False)
        self.apply(self._init_weights)
        for table in [*(self.transformer.ve or []), self.transformer.bigram]:
            if table is not None:
                nn.init.zeros_(table.weight)  # as the speedrun's: they add nothing until trained

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by 1/sqrt(2 * n_layer)
        # because each layer adds two of them to it. With zero_init they start at zero instead, so each
        # block starts as the identity (modded-nanogpt), and so does an untied head.
        if isinstance(module, nn.Linear):
            into_residual = getattr(module, "residual_scale", False)
            untied_head = module is self.lm_head and not self.config.tie_embeddings
            if self.config.zero_init and (into_residual or untied_head):
                nn.init.zeros_(module.weight)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if into_residual else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied embedding counted once and without the padding rows of the token tables (never used).

        non_embedding leaves out the lookups that do no matmul: the position table, the value-embedding and
        bigram tables; the token table stays in, since as the output layer it does (nanoGPT's convention).
        """
        c = self.config
        token_tables = (1 if c.tie_embeddings else 2) + c.value_tables
        n = sum(p.numel() for p in self.parameters()) - (c.padded_vocab_size - c.vocab_size) * c.n_embd * token_tables
        if non_embedding:
            lookups = [self.transformer.wpe, *(self.transformer.ve or []), self.transformer.bigram]
            n -= sum(t.weight.numel() for t in lookups if t is not None)
            n += (c.padded_vocab_size - c.vocab_size) * c.n_embd * c.value_tables  # their padding, already left out
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N for the matmuls of forward and backward plus 12·L·C·T for attention.

        The convention of nanoGPT and the PaLM paper (appendix B). Padded vocabulary columns are not
        counted: they are work the GPU does, not work the model needs, so MFU does not credit them.
        """
        T = seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * self.config.n_layer * self.config.n_embd * T

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, C) for tokens idx (B, T), after `cache.pos` cached ones."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions exceed block_size {self.config.block_size}")
        if cache is not None:
            cache.tokens[:, start:start + T] = idx
        c, t = self.config, self.transformer
        previous = previous_tokens(idx, cache) if c.smear or c.bigram_embed else None
        x = self.embed(idx, previous, start)  # (B, T, C)
        inputs = BlockInputs(cache=cache, x0=x if c.x0_mix else None, masks=self.attention_masks(idx, cache))
        if t.wpe is None:
            # Computed per call in fp32 rather than kept as buffers, which model.to(bfloat16) would round.
            inputs.rope = cache.rope_at(T) if cache is not None else rope_tables(c.head_dim, T, c.rope_base, idx.device)
        if t.bigram is not None:
            inputs.bigram = t.bigram(bigram_hash(previous, idx, t.bigram.num_embeddings))  # (B, T, C)
        if t.ve is not None:
            tables = [table(idx) for table in t.ve]  # (B, T, C) each
            inputs.values = [None if value_table(c, i) is None else tables[value_table(c, i)] for i in range(c.n_layer)]
        x = self.blocks(t.drop(x), inputs)
        if cache is not None:
            cache.pos += T
        return t.ln_f(x)

    def embed(self, idx: torch.Tensor, previous: torch.Tensor | None, start: int) -> torch.Tensor:
        """The tokens' embeddings (B, T, C): smeared with the previous tokens' (smear), plus their positions' (learned
        positions), normalised (embed_norm)."""
        t = self.transformer
        x = t.wte(idx)
        if t.smear is not None:
            x = t.smear(x, torch.where((previous >= 0)[..., None], t.wte(previous.clamp(min=0)), 0.0))
        if t.wpe is not None:
            x = x + t.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
        return t.ln_e(x) if t.ln_e is not None else x

    def blocks(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        """The blocks in turn. unet_skips: the first half's outputs, weighted, added to the second half's inputs in
        mirror order (layer L-1-j gets layer j's); backout: the output of backout_layer, scaled, taken away at the end."""
        L, skips, kept = self.config.n_layer, [], None
        for i, block in enumerate(self.transformer.h):
            if self.skip_weights is not None and i >= L - L // 2:
                x = x + self.skip_weights[L - 1 - i] * skips.pop()
            x = block(x, inputs, i)
            if self.skip_weights is not None and i < L // 2:
                skips.append(x)
            if self.backout_scale is not None and i == backout_layer(L):
                kept = x
        return x if kept is None else x - self.backout_scale * kept

    def attention_masks(self, idx: torch.Tensor, cache: KVCache | None) -> list | None:
        """Each layer's attention mask for idx's positions after the cached ones; None for plain causal attention
        (no windows, no documents). FlexAttention's block masks on CUDA under torch.compile, SDPA's boolean ones
        elsewhere: the same rule (`visible`)."""
        c = self.config
        if not (c.window_pattern or c.document_mask):
            return None
        start, T = (cache.pos if cache is not None else 0), idx.size(1)
        docs = document_ids(idx if cache is None else cache.tokens[:, :start + T]) if c.document_mask else None
        windows = self.attn_windows if c.window_pattern else [start + T] * 2  # whole context: documents alone
        flex = idx.is_cuda and cache is None and c.dropout == 0 and torch.compiler.is_compiling()
        masks = {kind: block_mask(windows[kind], docs, T, idx.device) if flex else
                 boolean_mask(windows[kind], docs, start, T) for kind in set(layer_windows(c))}
        return [masks[kind] for kind in layer_windows(c)]

    def set_attention_windows(self, short: int, long: int) -> None:
        """The windows (in tokens) of the short and long layers from the next forward pass on: written into the
        tensor the forward reads, in place (no host wait, no recompilation), e.g. by a schedule before each step.
        The context and the batch are idx's shape: torch.compile compiles once more the first time they change,
        then treats them as dynamic (none at all where the loop marks them with torch._dynamo.mark_dynamic)."""
        if not self.config.window_pattern:
            raise ValueError("this model has no attention windows to set (its window_pattern is empty)")
        self.attn_windows[0].fill_(short)
        self.attn_windows[1].fill_(long)

    def set_long_window(self, long: int) -> None:
        """A window schedule's step: the long layers see `long` tokens, the short ones short_window (or, unset,
        half of long: the record's ratio), never more than the long ones."""
        self.set_attention_windows(max(1, min(self.config.short_window or long // 2, long)), long)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer: logits over the padded vocabulary, soft-capped when the config says so."""
        return softcap(self.lm_head(hidden), self.config.logit_softcap, self.config.softcap_form)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, per_token: bool = False):
        """(logits (B, T, padded vocab), None); or, given targets (B, T; -1 is ignored), (None, mean cross-entropy),
        or with per_token (for evaluation: no gradient) (None, each position's cross-entropy (B*T,), 0 at -1).

        With targets the logits are not returned: a caller holding them would keep them alive through
        the backward pass, 6.6 GB in bf16 for a micro-batch of 64 x 1024.
        """
        if targets is None:
            return self.head(self.hidden_states(idx)), None
        logits = self.lm_head(self.hidden_states(idx))  # soft-capped inside the loss, chunk by chunk
        logits, c = logits.view(-1, logits.size(-1)), self.config
        if self.training and not per_token and self.loss_weights is not None:
            return None, self._training_loss(logits, targets)
        loss = token_losses if per_token else cross_entropy
        return None, loss(logits, targets.reshape(-1), c.logit_softcap, c.vocab_size, c.softcap_form)

    def set_loss_terms(self, ahead: int, prefix_table: torch.Tensor | None) -> None:
        """Train the logits on more than the next token (the FineWeb speedrun's multi-token and prefix-token
        prediction): also on each of the tokens 2 .. ahead + 1 positions ahead, and (prefix_table: each token's
        longest proper prefix that is itself a token, -1 where none) on the next token's prefix, every extra term
        weighted by loss_weights, which set_loss_weights changes between steps. No new weights: what is evaluated,
        generated and saved is the next token's prediction alone."""
        device = self.lm_head.weight.device
        self.loss_weights = torch.zeros(ahead + (prefix_table is not None), device=device)
        self.prefix_table = prefix_table.to(device) if prefix_table is not None else None

    def set_loss_weights(self, weights: tuple[float, ...]) -> None:
        """The extra terms' weights for the next steps, in place (no host wait, no recompilation)."""
        for i, weight in enumerate(weights):
            self.loss_weights[i].fill_(weight)

    def _training_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The next token's mean cross-entropy in value, so that the training loss logged is the one validation
        measures; in gradient, that plus each extra term times its weight (a term of weight 0 adds nothing)."""
        ahead = len(self.loss_weights) - (self.prefix_table is not None)
        columns = [targets] + [F.pad(targets[:, k:], (0, k), value=-1) for k in range(1, ahead + 1)]
        if self.prefix_table is not None:
            columns.append(torch.where(targets >= 0, self.prefix_table[targets.clamp(min=0)], -1))
        c = self.config
        terms = cross_entropies(logits, torch.stack(columns, -1).view(-1, len(columns)), c.logit_softcap,
                                c.vocab_size, c.softcap_form)
        extra = (terms[1:] * self.loss_weights).sum()
        return terms[0] + (extra - extra.detach())

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, stop_at_eot: bool = True,
                 reuse: PromptCache | None = None) -> Iterator[int]:
        """Yield up to max_new_tokens token ids continuing `prompt`, one at a time as they are chosen.

        The prompt is run once to fill a KV cache; each new token then costs one position. When the
        context would pass block_size, the window slides: the cache is rebuilt from the last half block
        (so the rebuild cost is spread over block_size/2 new tokens, not paid at every token). With `reuse`,
        the start of the prompt that the previous call's tokens share is not run again, and the cache is
        left there for the next call, however far the caller reads.
        """
        if not prompt:
            raise ValueError("generation needs at least one prompt token (e.g. <|endoftext|>)")
        device, block = self.transformer.wte.weight.device, self.config.block_size
        # On CPUs SDPA over a bf16 cache is several times slower than over fp32, and the cache is small.
        cache_dtype = torch.float32 if device.type == "cpu" else self.transformer.wte.weight.dtype
        tokens = list(prompt)
        cache = reuse.reusable(tokens) if reuse is not None and len(tokens) <= block else None
        fed = cache.pos if cache is not None else 0  # fed: how many of `tokens` the cache holds
        for _ in range(max_new_tokens):
            if cache is None or cache.pos + len(tokens) - fed > block:
                keep = min(len(tokens), block) if cache is None else max(1, block // 2)
                cache = KVCache(self.config, 1, device, cache_dtype)
                fed = len(tokens) - keep
            new = torch.tensor([tokens[fed:]], dtype=torch.long, device=device)
            hidden = self.hidden_states(new, cache)[:, -1]
            fed = len(tokens)
            if reuse is not None:  # after the layers: a reply stopped inside them leaves the cache as it was
                reuse.cache, reuse.tokens = cache, tokens[fed - cache.pos:fed]
            logits = self.head(hidden).float()[0, :self.config.vocab_size]
            token = sample_token(logits, temperature, top_k, top_p, generator)
            if stop_at_eot and token == EOT:
                return
            tokens.append(token)
            yield token


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Choose one id from a vector of logits: greedy at temperature 0, else sampled after top-k and top-p."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the most likely always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
