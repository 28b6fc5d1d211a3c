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
# current small LMs use (LLaMA-style blocks, plus QK-norm as in modded-nanogpt and OLMo 2), with the
# switches that measured better here side by side (BENCHMARKS.md, "Recipes") and that transformers can
# still compute: a norm after the embedding does; ReLU², a logit soft cap and an untied zero-initialised
# head did not measure better enough to cost the export.
_GPT2_SWITCHES = dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qk_norm=False,
                      tie_embeddings=True, zero_init=False, logit_softcap=0.0, embed_norm=False)
ARCH_PRESETS = {
    "gpt2": _GPT2_SWITCHES,
    "modern": _GPT2_SWITCHES | dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True,
                                    embed_norm=True),
}


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
    logit_softcap: float = 0.0  # > 0: logits become c * tanh(logits / c) (Gemma 2, modded-nanogpt)
    embed_norm: bool = False  # normalise the embedding before the first block (modded-nanogpt)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions turn pairs of channels: the head size (n_embd / n_head = "
                             f"{self.n_embd} / {self.n_head}) must be even, not {self.head_dim}")
        for name, allowed in (("pos_emb", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                              ("mlp", ("gelu", "swiglu", "relu2"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, arch: str, **fields) -> "GPTConfig":
        """The preset's switches, then `fields` (the shape, or switches changed from the preset)."""
        return cls(**(ARCH_PRESETS[arch] | fields))

    @property
    def padded_vocab_size(self) -> int:
        # 50257 -> 50304, a multiple of 128: matmuls with such widths run on faster GPU kernels.
        return -(-self.vocab_size // 128) * 128

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


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in fp32, bounding every logit to (-cap, cap); the logits as they are if cap is 0."""
    return cap * torch.tanh(logits.float() / cap) if cap else logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float = 0.0, vocab: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of softcap(logits (N, V), cap) over the targets (N,) that are not -1, in fp32.

    Only the first `vocab` columns count: the padding ids past the tokenizer's vocabulary never occur,
    and weights from elsewhere (OpenAI's GPT-2) leave their rows zero, whose logit of 0 would outweigh
    every real token's. Under torch.compile, inductor fuses the upcast into its softmax kernels and
    keeps no fp32 copy of the logits. Eager PyTorch has no such kernel: F.cross_entropy on bf16 logits
    makes a full fp32 copy and keeps an fp32 log-softmax for the backward pass (three copies of the
    largest activation of the step), so eager runs go through _ChunkedCrossEntropy instead.
    """
    vocab = vocab or logits.size(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(softcap(logits[:, :vocab].float(), cap), targets, ignore_index=-1)
    return _ChunkedCrossEntropy.apply(logits, targets, cap, vocab)


LOSS_ROWS = 1024  # rows per fp32 chunk of the loss: 200 MB at GPT-2's vocabulary


def token_losses(logits: torch.Tensor, targets: torch.Tensor, cap: float = 0.0, vocab: int | None = None) -> torch.Tensor:
    """The cross-entropy of each row (N,) in fp32, by cross_entropy's rule, 0 where the target is -1 (no gradient)."""
    vocab = vocab or logits.size(-1)
    if torch.compiler.is_compiling():  # inductor fuses the upcast into its kernels, as in cross_entropy
        return F.cross_entropy(softcap(logits[:, :vocab].float(), cap), targets, ignore_index=-1, reduction="none")
    lse, target_logit = _logsumexp_and_target(logits, targets, cap, vocab)
    return (lse - target_logit) * (targets != -1)


@torch.no_grad()
def _logsumexp_and_target(logits, targets, cap: float, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of softcap(logits[:, :vocab], cap): its logsumexp and its target's logit, fp32, LOSS_ROWS at a time."""
    lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    rows = torch.arange(min(LOSS_ROWS, logits.size(0)), device=logits.device)
    for a in range(0, logits.size(0), LOSS_ROWS):
        z = softcap(logits[a:a + LOSS_ROWS, :vocab].float(), cap)
        lse[a:a + LOSS_ROWS] = torch.logsumexp(z, dim=-1)
        target_logit[a:a + LOSS_ROWS] = z[rows[:len(z)], targets[a:a + LOSS_ROWS].clamp(min=0)]
    return lse, target_logit


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy (of soft-capped logits, over their first `vocab` columns) whose fp32 work is done
    1,024 rows at a time; it keeps only the logits and a logsumexp per row for the backward pass,
    whose gradient it writes in the logits' own dtype (zero in the columns past `vocab`).

    Written here because no PyTorch op does this outside torch.compile (Liger-Kernel's fused
    cross-entropy does it with Triton, a GPU-only dependency).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, cap: float, vocab: int) -> torch.Tensor:
        lse, target_logit = _logsumexp_and_target(logits, targets, cap, vocab)
        valid = targets != -1
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.cap, ctx.vocab = cap, vocab
        return ((lse - target_logit) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse, count = ctx.saved_tensors
        R, cap, V = LOSS_ROWS, ctx.cap, ctx.vocab
        scale = (grad / count) * (targets != -1)  # d(mean loss)/d(each row's loss); 0 where ignored
        grad_logits = torch.empty_like(logits)
        grad_logits[:, V:] = 0  # the padding columns: every other one is written below
        for a in range(0, logits.size(0), R):
            t = targets[a:a + R]
            z = logits[a:a + R, :V].to(torch.float32, copy=True)  # a copy even of fp32 logits: changed in place
            if cap:
                z = softcap(z, cap)
            g = torch.sub(z, lse[a:a + R, None], out=z).exp_()  # the softmax
            g[torch.arange(len(t), device=g.device), t.clamp(min=0)] -= 1.0  # minus the one-hot target
            g.mul_(scale[a:a + R, None])
            if cap:  # through the cap: d(cap * tanh(x / cap))/dx = 1 - tanh(x / cap)^2
                g.mul_(1 - torch.tanh(logits[a:a + R, :V].float() / cap).square_())
            grad_logits[a:a + R, :V] = g
        return grad_logits, None, None, None


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0):
        if cache is not None:
            return self.cached(x, rope, cache, layer)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def cached(self, x, rope, cache: KVCache, layer: int):
        """forward for T new positions after cache.pos cached ones (generation), the same arithmetic in fewer
        operators: a 124M token ran about 600, each a few microseconds of dispatch (BENCHMARKS.md, "Decoding")."""
        B, T, C = x.shape
        nh = self.n_head
        q, k, v = self.c_attn(x).view(B, T, 3 * nh, self.head_dim).transpose(1, 2).split(nh, dim=1)  # (B, nh, T, hs) each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(torch.cat([q, k], dim=1), *rope).split(nh, dim=1)  # queries and keys turned at once
        k, v = cache.update(layer, k, v)  # (B, nh, pos + T, hs), in the cache's dtype
        y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=query_mask(T, k.size(2), q.device),
                                           is_causal=T == k.size(2) and T > 1)
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
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
            ln_e=make_norm(config, config.n_embd) if config.embed_norm else None,
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings, as GPT-2
        self.apply(self._init_weights)

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
        """Parameters, the tied embedding counted once and without its padding rows (never used).

        non_embedding leaves out the position table, a lookup that does no matmul; the token table
        stays in, since as the output layer it does (nanoGPT's convention).
        """
        c = self.config
        padding = (c.padded_vocab_size - c.vocab_size) * c.n_embd * (1 if c.tie_embeddings else 2)
        n = sum(p.numel() for p in self.parameters()) - padding
        if non_embedding and self.transformer.wpe is not None:
            n -= self.transformer.wpe.weight.numel()
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
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        elif cache is not None:
            rope = cache.rope_at(T)
        else:
            # Computed per call in fp32 rather than kept as buffers, which model.to(bfloat16) would round.
            rope = rope_tables(self.config.head_dim, T, self.config.rope_base, idx.device)
        if self.transformer.ln_e is not None:
            x = self.transformer.ln_e(x)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer: logits over the padded vocabulary, soft-capped when the config says so."""
        return softcap(self.lm_head(hidden), self.config.logit_softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, per_token: bool = False):
        """(logits (B, T, padded vocab), None); or, given targets (B, T; -1 is ignored), (None, mean cross-entropy),
        or with per_token (for evaluation: no gradient) (None, each position's cross-entropy (B*T,), 0 at -1).

        With targets the logits are not returned: a caller holding them would keep them alive through
        the backward pass, 6.6 GB in bf16 for a micro-batch of 64 x 1024.
        """
        if targets is None:
            return self.head(self.hidden_states(idx)), None
        logits = self.lm_head(self.hidden_states(idx))  # soft-capped inside the loss, chunk by chunk
        loss = token_losses if per_token else cross_entropy
        return None, loss(logits.view(-1, logits.size(-1)), targets.reshape(-1), self.config.logit_softcap,
                          self.config.vocab_size)

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
