"""Our GPT-2 against transformers' GPT2LMHeadModel: the same weights give the same logits, both ways."""
import pytest
import torch

from helpers import run_script
import hf
import checkpoint
from common import CheckpointError
import model as M

transformers = pytest.importorskip("transformers")


def hf_tiny(tmp_path):
    """A randomly initialised Hugging Face GPT-2 (the Hub is out of reach), saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped weight and bias would show
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor):
    ours = ours[..., :50257]
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_hugging_face_gpt2_weights_give_the_reference_logits(tmp_path):
    hf, directory = hf_tiny(tmp_path)
    ours = hf.from_pretrained(str(directory)).eval()
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_logits(ours(idx)[0], hf(idx).logits)


def test_an_exported_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    ours = M.GPT(M.GPTConfig.from_preset("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=24)).eval()
    ckpt = tmp_path / "model_best_val.pt"
    checkpoint.save_checkpoint(ckpt, ours, step=1, val_loss=9.0)
    result = run_script("export_hf.py", str(ckpt), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    idx = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_logits(ours(idx)[0], hf(idx).logits)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tok.encode("Hello world") == [15496, 995]


def test_a_switch_with_no_transformers_counterpart_is_named_in_a_one_line_refusal(tmp_path):
    config = M.GPTConfig.from_preset("modern", n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=100,
                                     logit_softcap=15.0, mlp="relu2")
    ckpt = tmp_path / "m.pt"
    checkpoint.save_checkpoint(ckpt, M.GPT(config))
    result = run_script("export_hf.py", str(ckpt), str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no transformers model computes what this one does")
    assert "logit_softcap 15.0" in lines[0] and "a relu2 MLP" in lines[0]
    learned = M.GPTConfig.from_preset("gpt2", n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=100, embed_norm=True)
    with pytest.raises(CheckpointError, match="embed_norm with learned positions True"):
        hf.to_hf(M.GPT(learned))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qk_norm, tie, embed_norm, family", [
    (True, False, False, "Qwen3ForCausalLM"), (True, True, False, "Qwen3ForCausalLM"),
    (False, False, False, "LlamaForCausalLM"), (True, True, True, "Qwen3ForCausalLM")])
def test_the_modern_preset_exports_as_qwen3_or_llama_with_the_same_logits_and_reads_back(tmp_path, qk_norm, tie,
                                                                                         embed_norm, family):
    torch.manual_seed(0)
    config = M.GPTConfig.from_preset("modern", n_layer=2, n_head=2, n_embd=64, block_size=24, qk_norm=qk_norm,
                                     tie_embeddings=tie, embed_norm=embed_norm)
    ours = M.GPT(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so a swapped or missing one would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.1)
    ckpt = tmp_path / "modern.pt"
    checkpoint.save_checkpoint(ckpt, ours, step=1)
    result = run_script("export_hf.py", str(ckpt), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert type(hf).__name__ == family
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_logits(ours(idx)[0], hf(idx).logits)
        again, _ = checkpoint.load_model(str(tmp_path / "exported"))
        assert torch.allclose(again.eval()(idx)[0][..., :50257], ours(idx)[0][..., :50257], atol=1e-5)
    # A norm after the embedding is folded into the table, which then needs a head of its own.
    folded = dict(embed_norm=False, tie_embeddings=False) if embed_norm else {}
    assert again.config.to_dict() == config.to_dict() | folded
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tok.encode("Hello world") == [15496, 995]
