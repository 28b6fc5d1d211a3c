"""Hugging Face weights in and out: OpenAI's GPT-2 and save_pretrained directories read into our GPT, and
our GPT written as the transformers model that computes the same logits: GPT-2, Llama or Qwen3, or where none of
them does (the `speedrun` preset), model.py itself with the modeling code of hf_remote_code/ (trust_remote_code).

Read and written directly (safetensors, config.json): transformers is not needed at run time.
checkpoint.py's load_model calls `from_pretrained` for a directory or a Hub name; export_hf.py calls `to_hf`.
This file imports model.py, never the reverse.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from common import EOT, CheckpointError, check_hub_reachable
from model import ARCH_PRESETS, RMSNORM_EPS, SPEEDRUN_ONLY, GPT, GPTConfig, swiglu_width
from weights import model_with_weights, strip_wrapper_prefixes

HUB_PROBE_SECONDS = 10  # the Hub client retries for half a minute before giving up
# A model no transformers model computes is exported with its own modeling code (hf_remote_code/ and model.py):
# its config.json's model_type (the repository's name), and the prefix of its weights (the wrapper's `gpt`).
REMOTE_MODEL_TYPE, REMOTE_PREFIX = "gpt2_rented_gpu", "gpt."
REMOTE_CODE = Path(__file__).with_name("hf_remote_code")


def from_pretrained(name_or_path: str) -> GPT:
    """OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl: the Hub, online) or a save_pretrained
    directory: GPT-2, a Llama or Qwen3 model of the `modern` preset's layout, or one with our own modeling code
    (what export_hf.py writes)."""
    directory = _resolve_hf_dir(name_or_path)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory} has no readable config.json ({e})") from None
    kind = hf.get("model_type")
    if kind == "gpt2":
        config = _gpt2_config(hf)
        return model_with_weights(config, _from_hf_state(_read_hf_weights(directory), config))
    if kind in ("llama", "qwen3"):  # the `modern` preset, as export_hf.py writes it
        config = _llama_config(hf, directory)
        return model_with_weights(config, _from_llama_state(_read_hf_weights(directory), config))
    if kind == REMOTE_MODEL_TYPE:  # any mix of switches (the `speedrun` preset), as export_hf.py writes it
        config = _remote_config(hf, directory)
        return model_with_weights(config, _from_remote_state(_read_hf_weights(directory), config))
    raise CheckpointError(f"{directory} holds a {kind!r} model, not GPT-2 (nor a Llama or Qwen3 export)")


# ----------------------------------------------------------------------------------------------------
# Reading

# Hugging Face's GPT-2 stores these as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _resolve_hf_dir(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        raise CheckpointError(f"{name_or_path} is neither a checkpoint file nor a Hugging Face model directory")
    try:
        from huggingface_hub import snapshot_download  # comes with `datasets`
        check_hub_reachable(HUB_PROBE_SECONDS)
        return Path(snapshot_download(str(name_or_path), allow_patterns=["config.json", *_HF_WEIGHT_FILES]))
    except Exception as e:  # the Hub raises many types (offline, unknown repo, HTTP); all mean the same here
        raise CheckpointError(f"could not fetch {name_or_path!r} from the Hugging Face Hub "
                              f"({type(e).__name__}); pass a local directory saved with save_pretrained") from None


def _read_hf_weights(directory: Path) -> dict:
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory} has none of {', '.join(_HF_WEIGHT_FILES)}")


def _gpt2_config(hf: dict) -> GPTConfig:
    return GPTConfig.from_preset("gpt2", block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                                 n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])


def _from_hf_state(hf_state: dict, config: GPTConfig) -> dict:
    state = {}
    for k, v in hf_state.items():
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k  # GPT2Model has no prefix
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        state[k] = v.t() if k.endswith(HF_TRANSPOSED) else v
    state["transformer.wte.weight"] = _pad_vocab(state["transformer.wte.weight"], config)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return {k: v.float().contiguous() for k, v in state.items()}


def _pad_vocab(table: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    # Padded rows are zeros: those ids are never produced (generation masks them), never seen in data,
    # and left out of the loss.
    return torch.cat([table, table.new_zeros(config.padded_vocab_size - table.size(0), table.size(1))])


# The `modern` preset is Llama's block (RoPE, RMSNorm, SwiGLU, no biases), with per-head q/k RMSNorm
# as Qwen3 has it: each of our tensors against the transformers tensors it holds, cut along rows.
def _llama_pairs(c: GPTConfig) -> list[tuple[str, tuple[str, ...]]]:
    pairs = [("transformer.wte.weight", ("model.embed_tokens.weight",)), ("transformer.ln_f.weight", ("model.norm.weight",))]
    if not c.tie_embeddings:
        pairs.append(("lm_head.weight", ("lm_head.weight",)))
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        pairs += [(ours + "ln_1.weight", (theirs + "input_layernorm.weight",)),
                  (ours + "attn.c_attn.weight", (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight")),
                  (ours + "attn.c_proj.weight", (attn + "o_proj.weight",)),
                  (ours + "ln_2.weight", (theirs + "post_attention_layernorm.weight",)),
                  (ours + "mlp.c_fc.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight")),  # gate first
                  (ours + "mlp.c_proj.weight", (mlp + "down_proj.weight",))]
        if c.qk_norm:
            pairs += [(ours + "attn.q_norm.weight", (attn + "q_norm.weight",)),
                      (ours + "attn.k_norm.weight", (attn + "k_norm.weight",))]
    return pairs


def _llama_config(hf: dict, directory: Path) -> GPTConfig:
    """Our config for a Llama or Qwen3 directory, refused in one line where it is not one of our shapes."""
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0), "rope_type": "default"}
    C, heads = hf["hidden_size"], hf["num_attention_heads"]
    config = GPTConfig.from_preset("modern", qk_norm=hf["model_type"] == "qwen3", block_size=hf["max_position_embeddings"],
                                   vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=C,
                                   rope_base=rope["rope_theta"], tie_embeddings=hf.get("tie_word_embeddings", False),
                                   embed_norm=False)
    hidden = swiglu_width(C)
    differences = [f"{key} {hf.get(key)!r} (ours: {want!r})" for key, want in (
        ("num_key_value_heads", heads), ("head_dim", C // heads), ("intermediate_size", hidden),
        ("rms_norm_eps", RMSNORM_EPS), ("hidden_act", "silu")) if hf.get(key, want) != want]
    if rope.get("rope_type", "default") != "default" or hf.get("attention_bias") or hf.get("mlp_bias"):
        differences.append("rope scaling or biases")
    if differences:
        raise CheckpointError(f"{directory} is a {hf['model_type']} model this repository cannot hold: "
                              + ", ".join(differences))
    return config


def _from_llama_state(hf_state: dict, config: GPTConfig) -> dict:
    state = {ours: torch.cat([hf_state[k] for k in theirs]) for ours, theirs in _llama_pairs(config)}
    state["transformer.wte.weight"] = _pad_vocab(state["transformer.wte.weight"], config)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    else:
        state["lm_head.weight"] = _pad_vocab(state["lm_head.weight"], config)
    return {k: v.float().contiguous() for k, v in state.items()}


def _remote_config(hf: dict, directory: Path) -> GPTConfig:
    if not isinstance(hf.get("gpt"), dict):
        raise CheckpointError(f"{directory}/config.json has no `gpt` (the model's switches and shape)")
    return GPTConfig.from_dict(hf["gpt"])


def _from_remote_state(hf_state: dict, config: GPTConfig) -> dict:
    """Our keys, which the export prefixed with `gpt.`; a tied head is stored once, as the token table."""
    state = {k.removeprefix(REMOTE_PREFIX): v.float() if v.is_floating_point() else v for k, v in hf_state.items()}
    if config.tie_embeddings and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# ----------------------------------------------------------------------------------------------------
# Writing


def missing_in_transformers(c: GPTConfig) -> list[str]:
    """Each switch of this config that transformers' GPT-2, Llama and Qwen3 (and llama.cpp's gpt2, llama and
    qwen3) have no counterpart for, named with its value; empty where one of them computes the model."""
    missing = [f"{name} {value!r}" for name, value, has in (
        ("logit_softcap", c.logit_softcap, not c.logit_softcap),
        ("embed_norm with learned positions", c.embed_norm, not c.embed_norm or c.pos_emb == "rope"),
        ("tie_embeddings", c.tie_embeddings, c.tie_embeddings or not _gpt2_block(c))) if not has]
    missing += [f"{name} {getattr(c, name)!r}" for name in SPEEDRUN_ONLY if getattr(c, name) != ARCH_PRESETS["gpt2"][name]]
    if not (_gpt2_block(c) or _llama_block(c)):
        missing.append(f"a block of {c.pos_emb} positions, {c.norm}, a {c.mlp} MLP and bias={c.bias}")
    return missing


def _gpt2_block(c: GPTConfig) -> bool:
    return (c.pos_emb, c.norm, c.mlp, c.bias, c.qk_norm) == ("learned", "layernorm", "gelu", True, False)


def _llama_block(c: GPTConfig) -> bool:
    return (c.pos_emb, c.norm, c.mlp, c.bias) == ("rope", "rmsnorm", "swiglu", False)


def _hf_family(c: GPTConfig) -> str:
    """"gpt2", "llama" or "qwen3": the transformers model that computes what this config does; REMOTE_MODEL_TYPE
    (our own modeling code) where none does."""
    if missing_in_transformers(c):
        return REMOTE_MODEL_TYPE
    return "gpt2" if _gpt2_block(c) else "qwen3" if c.qk_norm else "llama"


def to_hf(model: GPT) -> tuple[dict, dict]:
    """(config.json contents, state dict) that transformers loads with the same logits: GPT2LMHeadModel,
    LlamaForCausalLM or Qwen3ForCausalLM, or where none computes the model, our own modeling code (the config's
    `auto_map` names it; remote_code_files are its files)."""
    c, family = model.config, _hf_family(model.config)
    if family == REMOTE_MODEL_TYPE:
        return _to_remote(model)
    weights = {k: v.detach().float().cpu() for k, v in strip_wrapper_prefixes(model.state_dict()).items()}
    if c.embed_norm:
        # With rotary positions the normalised embedding is a function of the token alone, so the norm
        # folds into the table; the head keeps the table as it was, so the export has its own head.
        weights["transformer.wte.weight"] = F.rms_norm(weights["transformer.wte.weight"], (c.n_embd,),
                                                       weights.pop("transformer.ln_e.weight"),
                                                       eps=RMSNORM_EPS)
        c = replace(c, embed_norm=False, tie_embeddings=False)
    for k in ("transformer.wte.weight", "lm_head.weight"):
        weights[k] = weights[k][:c.vocab_size]  # the padding rows are ours alone
    common = {"vocab_size": c.vocab_size, "bos_token_id": EOT, "eos_token_id": EOT,
              "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
    if family == "gpt2":
        config = common | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": c.block_size,
                           "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                           "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
        # lm_head is tied to wte: safetensors refuses shared tensors and transformers ties them again on load.
        state = {k: (v.t() if k.endswith(HF_TRANSPOSED) else v) for k, v in weights.items() if k != "lm_head.weight"}
    else:
        config = common | {
            "architectures": ["Qwen3ForCausalLM" if family == "qwen3" else "LlamaForCausalLM"], "model_type": family,
            "hidden_size": c.n_embd, "intermediate_size": model.transformer.h[0].mlp.c_proj.in_features,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head,
            "head_dim": c.head_dim, "max_position_embeddings": c.block_size, "rms_norm_eps": RMSNORM_EPS,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_theta": c.rope_base,
            "rope_parameters": {"rope_theta": c.rope_base, "rope_type": "default"}}  # the older key, and transformers 5's
        state = {}
        for ours, theirs in _llama_pairs(c):
            state |= dict(zip(theirs, weights[ours].chunk(len(theirs))))
    return config, {k: v.contiguous() for k, v in state.items()}


def _to_remote(model: GPT) -> tuple[dict, dict]:
    """to_hf for a model that only model.py computes: its config whole under `gpt`, its weights as they are (the
    padded vocabulary included), the wrapper's `gpt.` before each key; a tied head stored once, as the table."""
    c = model.config
    config = {"architectures": ["RentedGPTForCausalLM"], "model_type": REMOTE_MODEL_TYPE,
              "auto_map": {"AutoConfig": "configuration_rented_gpt.RentedGPTConfig",
                           "AutoModelForCausalLM": "modeling_rented_gpt.RentedGPTForCausalLM"},
              "gpt": c.to_dict(), "vocab_size": c.vocab_size, "bos_token_id": EOT, "eos_token_id": EOT,
              "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
              # transformers' usual names, for tools that read them (the model reads `gpt` alone)
              "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
              "max_position_embeddings": c.block_size}
    state = {REMOTE_PREFIX + k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
             for k, v in strip_wrapper_prefixes(model.state_dict()).items()
             if not (c.tie_embeddings and k == "lm_head.weight")}
    return config, {k: v.contiguous() for k, v in state.items()}


# model.py's one import from this repository, and what stands for it in the exported copy: transformers copies
# only the directory's files, so the copy imports nothing but torch and the standard library.
_MODEL_IMPORT = "from common import EOT, CheckpointError\n"
_MODEL_IMPORT_STANDALONE = (f"EOT = {EOT}  # GPT-2's <|endoftext|>: it ends each document\n\n\n"
                            "class CheckpointError(ValueError):\n"
                            '    """A config this file cannot build."""\n\n')


def remote_code_files() -> dict[str, str]:
    """{file name: source} a directory of our own modeling code holds beside config.json: hf_remote_code/'s
    configuration and modeling files, and model.py with its import from common.py written in."""
    files = {path.name: path.read_text(encoding="utf-8") for path in sorted(REMOTE_CODE.glob("*.py"))}
    source = Path(__file__).with_name("model.py").read_text(encoding="utf-8")
    if source.count(_MODEL_IMPORT) != 1:  # a programming error: model.py's imports changed, so must this
        raise RuntimeError(f"model.py no longer has the one line {_MODEL_IMPORT.strip()!r} the export replaces")
    files["model.py"] = source.replace(_MODEL_IMPORT, _MODEL_IMPORT_STANDALONE)
    return files
