"""Our GPT-2 against transformers' GPT2LMHeadModel: the same weights give the same logits, both ways."""
import ast
import sys

import pytest
import torch

from helpers import run_command, run_script
import hf
import checkpoint
import model as M
from common import EOT

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


# ----------------------------------------------------------------------------------------------------
# Models no transformers model computes: exported with their own modeling code (trust_remote_code=True)

SHAPE = dict(n_layer=4, n_head=2, n_embd=32, block_size=24)  # 4 layers: value embeddings, U-net skips and backout act
# The speedrun preset with a short window well inside the context; a mix with a tied head, which the file holds once.
OWN_CODE = {"speedrun": ("speedrun", dict(window_pattern="SL", short_window=5)),
            "tied-mix": ("modern", dict(mlp="relu2", logit_softcap=15.0, tie_embeddings=True))}
PROMPT = [464, 5897, 7850, EOT, 1858, 373, 257, 640, 11, 612]  # two documents: the mask between them acts
NEW_TOKENS = 8  # prompt and reply within block_size: transformers' generate() has no sliding window


@pytest.fixture(scope="module")
def own_code(tmp_path_factory):
    """{name: (our model, checkpoint, export directory)} for each OWN_CODE config, perturbed where it starts at zero
    (the head, the tables, the gates), so every switch changes the logits."""
    out = {}
    for name, (arch, switches) in OWN_CODE.items():
        torch.manual_seed(0)
        ours = M.GPT(M.GPTConfig.from_preset(arch, **SHAPE, **switches)).eval()
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(0.1 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(name)
        checkpoint.save_checkpoint(folder / "model_best_val.pt", ours, step=1)
        result = run_script("export_hf.py", str(folder / "model_best_val.pt"), str(folder / "exported"))
        assert result.returncode == 0, result.stderr
        assert "trust_remote_code=True" in result.stdout
        out[name] = (ours, folder / "model_best_val.pt", folder / "exported")
    return out


# Run in a fresh interpreter without the repository on its path, from another folder: the directory alone must do.
TRANSFORMERS_CHILD = """
import sys, torch, transformers
prompt, new, results = torch.load(sys.argv[1]), int(sys.argv[2]), {}
for directory in sys.argv[4:]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = hf(prompt).logits
        greedy = hf.generate(prompt, max_new_tokens=new, do_sample=False)[0, prompt.size(1):]
    results[directory] = {"logits": logits, "greedy": greedy.tolist(), "class": type(hf).__name__,
                          "tied": hf.gpt.lm_head.weight is hf.gpt.transformer.wte.weight}
torch.save(results, sys.argv[3])
"""


@pytest.fixture(scope="module")
def in_transformers(own_code, tmp_path_factory):
    """What transformers computes from each export: its logits on PROMPT, its greedy tokens, its class."""
    folder = tmp_path_factory.mktemp("transformers")
    torch.save(torch.tensor([PROMPT]), folder / "prompt.pt")
    directories = {name: str(directory) for name, (_, _, directory) in own_code.items()}
    result = run_command([sys.executable, "-c", TRANSFORMERS_CHILD, str(folder / "prompt.pt"), str(NEW_TOKENS),
                          str(folder / "results.pt"), *directories.values()], env={"PYTHONPATH": ""}, cwd=folder)
    assert result.returncode == 0, result.stderr
    results = torch.load(folder / "results.pt")
    return {name: results[directory] for name, directory in directories.items()}


@pytest.mark.parametrize("name", OWN_CODE)
def test_a_model_no_transformers_model_computes_loads_with_its_own_code_and_gives_our_logits_and_tokens(
        own_code, in_transformers, name):
    ours, _, directory = own_code[name]
    assert hf.missing_in_transformers(ours.config)  # the test means something: no GPT-2, Llama or Qwen3 computes it
    theirs = in_transformers[name]
    assert theirs["class"] == "RentedGPTForCausalLM"
    with torch.no_grad():
        logits, _ = ours(torch.tensor([PROMPT]))
    torch.testing.assert_close(theirs["logits"], logits[..., :ours.config.vocab_size], rtol=0, atol=1e-5)
    assert theirs["greedy"] == list(ours.generate(PROMPT, NEW_TOKENS, temperature=0, stop_at_eot=False))
    assert theirs["tied"] == ours.config.tie_embeddings


def test_the_exported_modeling_code_imports_nothing_from_the_repository(own_code):
    _, _, directory = own_code["speedrun"]
    for path in directory.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
        imported |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert imported <= {"__future__", "contextlib", "math", "dataclasses", "typing", "torch", "transformers"}, path.name


@pytest.mark.parametrize("name", OWN_CODE)
def test_an_export_with_its_own_code_reads_back_for_sample_and_init_from(own_code, name):
    ours, _, directory = own_code[name]
    again, _ = checkpoint.load_model(str(directory))  # sample.py --checkpoint DIR
    assert again.config == ours.config
    config, state = checkpoint.read_weights(str(directory), None)  # train_gpt2.py --init_from DIR
    assert config == ours.config
    for key, tensor in ours.state_dict().items():
        assert torch.equal(state[key], tensor), key
    assert (again.lm_head.weight is again.transformer.wte.weight) == ours.config.tie_embeddings


def test_sample_py_continues_a_speedrun_export_as_it_continues_the_checkpoint(own_code):
    _, ckpt, directory = own_code["speedrun"]
    flags = ["--prompt", "The quiet river", "--temperature", "0", "--max_tokens", "6", "--ignore_eot", "--cpu",
             "--dtype", "float32"]
    from_checkpoint = run_script("sample.py", "--checkpoint", str(ckpt), *flags)
    from_export = run_script("sample.py", "--checkpoint", str(directory), *flags)
    assert from_checkpoint.returncode == from_export.returncode == 0, from_export.stderr
    assert from_export.stdout == from_checkpoint.stdout and len(from_export.stdout) > len("The quiet river\n")
