"""eval.py's CORE on the generated bundle of test_eval.py: scored as an independent transformers scorer that
follows nanochat's rules scores it, whole and with --limit; a bad bundle ends in one line; the bundle is
downloaded once, and without a network the error names --core at once."""
import json
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import eval as E
import tokenizer
from common import EOT
import test_eval
from helpers import serving
from test_eval import WINDOW

# test_eval.py's fixtures, used here too: the tiny random GPT-2 (transformers' and ours), transformers'
# tokenizer, the generated bundle, one thread.
hf_dir, hf_model, ours, hf_tokenizer = test_eval.hf_dir, test_eval.hf_model, test_eval.ours, test_eval.hf_tokenizer
core_dir, one_thread = test_eval.core_dir, test_eval.one_thread

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------------
# The independent scorer: the issue's rules, written plainly, on transformers' model and tokenizer


def reference_prompts(kind: str, delimiter: str, item: dict, shots: list[dict]) -> list[str]:
    """Each example, then the item, as paragraphs (a blank line between them)."""
    d = delimiter
    if kind == "multiple_choice":
        head = [s["query"] + d + s["choices"][s["gold"]] for s in shots]
        return ["\n\n".join(head + [item["query"] + d + choice]) for choice in item["choices"]]
    if kind == "schema":
        head = [s["context_options"][s["gold"]] + d + s["continuation"] for s in shots]
        return ["\n\n".join(head + [option + d + item["continuation"]]) for option in item["context_options"]]
    head = [s["context"].strip() + d + s["continuation"] for s in shots]
    prompt = "\n\n".join(head + [item["context"].strip() + d])
    return [prompt.strip(), prompt + item["continuation"]]


def reference_rows(kind: str, prompts: list[str], tok) -> list[tuple[list[int], int]]:
    """(tokens, where the scored continuation starts) of each option, cut from the left to WINDOW tokens."""
    rows = [[EOT, *tok.encode(p)] for p in prompts]
    shortest = min(map(len, rows))
    if kind == "language_modeling":
        assert rows[1][:len(rows[0])] == rows[0]
        rows, starts = rows[1:], [len(rows[0])]
    elif kind == "multiple_choice":  # the first position where the options differ
        shared = next((k for k in range(shortest) if len({row[k] for row in rows}) > 1), shortest)
        starts = [shared] * len(rows)
    else:  # schema: the last position, from the end, where they differ
        shared = next((k for k in range(shortest) if len({row[-1 - k] for row in rows}) > 1), shortest)
        starts = [len(row) - shared for row in rows]
    cut = [max(0, len(row) - WINDOW) for row in rows]
    assert all(start - c >= 1 for start, c in zip(starts, cut))  # the generated continuations fit the window
    return [(row[c:], start - c) for row, start, c in zip(rows, starts, cut)]


def reference_score(hf_model, row: list[int], start: int) -> tuple[float, bool]:
    """The mean loss of row[start:], and whether each of those tokens was the argmax; one row, unbatched."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([row])).logits[0, start - 1:-1]  # the positions predicting row[start:]
    target = torch.tensor(row[start:])
    return F.cross_entropy(logits, target).item(), bool((logits.argmax(-1) == target).all())


def reference_task(hf_model, tok, directory: Path, spec: dict, limit: int | None) -> list[dict]:
    """Per item of one core.yaml task: its rows, their scores, and whether the model got it right."""
    lines = (directory / "eval_data" / spec["dataset_uri"]).read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    random.Random(1337).shuffle(items)
    items = items[:limit]
    kind, k, d = spec["icl_task_type"], spec["num_fewshot"][0], spec.get("continuation_delimiter", " ")
    out = []
    for i, item in enumerate(items):
        others = [j for j in range(len(items)) if j != i]
        shots = [items[j] for j in random.Random(1234 + i).sample(others, k)] if k else []
        rows = reference_rows(kind, reference_prompts(kind, d, item, shots), tok)
        scores = [reference_score(hf_model, row, start) for row, start in rows]
        means = [mean for mean, _ in scores]
        right = scores[0][1] if kind == "language_modeling" else means.index(min(means)) == item["gold"]
        out.append({"rows": rows, "means": means, "exact": [e for _, e in scores], "right": right})
    return out


def reference_core(hf_model, tok, directory: Path, limit: int | None = None) -> tuple[dict, dict]:
    """({label: reference_task}, {"core", "tasks"}) for the bundle in `directory`."""
    specs = yaml.safe_load((directory / "core.yaml").read_text())["icl_tasks"]
    rows = (directory / "eval_meta_data.csv").read_text().splitlines()
    per_task = {spec["label"]: reference_task(hf_model, tok, directory, spec, limit) for spec in specs}
    figures = {}
    for label, scored in per_task.items():
        baseline = next(float(row.split(",")[2]) for row in rows if row.startswith(label + ",")) / 100
        accuracy = sum(s["right"] for s in scored) / len(scored)
        figures[label] = {"accuracy": accuracy, "centered": (accuracy - baseline) / (1 - baseline), "n": len(scored)}
    return per_task, {"core": sum(f["centered"] for f in figures.values()) / len(figures), "tasks": figures}


@pytest.fixture(scope="module", params=[None, 6], ids=["all items", "--limit 6"])
def reference(request, hf_model, hf_tokenizer, core_dir):
    """(limit, what the independent scorer gives): all items, or the first 6 of each task after its
    shuffle, whose examples are then drawn from those 6 (as nanochat's --max-per-task does)."""
    return request.param, *reference_core(hf_model, hf_tokenizer, core_dir, request.param)


def read_core(directory: Path, limit: int | None = None) -> list[tuple[E.Task, list[E.CoreItem]]]:
    return [(task, E.read_task(task, limit)) for task in E.core_bundle(str(directory), None)]


# ----------------------------------------------------------------------------------------------------
# Scoring


def test_every_items_tokens_and_option_scores_match_the_independent_scorer(ours, core_dir, reference):
    limit, per_task, _ = reference
    enc, cropped = tokenizer.get_tokenizer(), 0
    for task, items in read_core(core_dir, limit):
        assert len(items) == len(per_task[task.label])
        for i, expected in enumerate(per_task[task.label]):
            options, = E.encode_options(enc, task, items, [i], WINDOW)
            assert list(zip(map(list, options.rows), options.starts)) == expected["rows"], (task.label, i)
            _, means, exact = E.option_scores(ours, [options], "cpu")
            assert means == pytest.approx(expected["means"], rel=1e-5, abs=1e-4) and exact == expected["exact"]
            cropped += any(len(row) == WINDOW for row in options.rows)
    assert cropped > 5  # prompts longer than the context were cut from the left, and still agree


def test_core_and_each_tasks_accuracy_match_the_independent_scorer(ours, core_dir, reference):
    limit, per_task, expected = reference
    if limit is None:  # neither all right nor all wrong: the comparison can fail
        assert all(0 < sum(s["right"] for s in scored) < len(scored) for scored in per_task.values())
    result = E.core_accuracy(ours, read_core(core_dir, limit), "cpu", rows=7)  # passes of several items
    assert result["tasks"] == expected["tasks"] and result["core"] == pytest.approx(expected["core"], rel=1e-12)
    assert limit is None or {f["n"] for f in result["tasks"].values()} == {limit}


# ----------------------------------------------------------------------------------------------------
# A bad bundle: one line naming the file (and line), before the model is loaded


def edit(relative: str, old: str, new: str):
    """A change to one file of a bundle: the first `old` in it becomes `new`."""
    def change(directory: Path):
        path = directory / relative
        text = path.read_text(encoding="utf-8")
        assert old in text
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return change


def edit_line(relative: str, n: int, line: str):
    """Line n (from 1) of one file of a bundle becomes `line`."""
    def change(directory: Path):
        path = directory / relative
        lines = path.read_text(encoding="utf-8").splitlines()
        lines[n - 1] = line
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return change


MC, SCHEMA = "eval_data/generated/mc_answer.jsonl", "eval_data/generated/schema_pairs.jsonl"


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "core.yaml").unlink(), "core.yaml (No such file or directory); is --core the unzipped eval_bundle?"),
    (edit("core.yaml", "icl_tasks:", "icl_tasks: ["), "core.yaml: not valid YAML"),
    (edit("core.yaml", "icl_tasks:", "tasks:"), "core.yaml: no 'icl_tasks' list of tasks in it"),
    (edit("core.yaml", "icl_task_type: schema", "icl_task_type: generation"),
     "task 'schema_pairs': 'icl_task_type' must be one of multiple_choice, schema, language_modeling"),
    (edit("core.yaml", "num_fewshot: [3]", "num_fewshot: [-1]"), "task 'mc_answer': 'num_fewshot' must be [N]"),
    (lambda d: (d / "eval_data/generated/lm_plain.jsonl").unlink(), "task 'lm_plain': no file"),
    (edit("eval_meta_data.csv", "lm_examples,", "lm_example,"), "eval_meta_data.csv: no row for task 'lm_examples'"),
    (edit("eval_meta_data.csv", ",30.5,", ",thirty,"), "eval_meta_data.csv:4: 'Random baseline' must be a number"),
    (edit_line(MC, 3, '{"query": "x", "choices": ['), "mc_answer.jsonl:3: not valid JSON"),
    (edit_line(MC, 2, json.dumps({"query": "x", "choices": ["a", "b"], "gold": 2})),
     "mc_answer.jsonl:2: 'gold' must be the index of one of the 2 choices"),
    (edit_line(MC, 5, json.dumps({"query": "x", "choices": "ab", "gold": 0})),
     "mc_answer.jsonl:5: 'choices' must be a non-empty list of strings"),
    (edit_line(SCHEMA, 4, json.dumps({"context_options": ["a", "b"], "gold": 0})),
     "schema_pairs.jsonl:4: no field 'continuation' (a schema item has context_options, continuation, gold)"),
])
def test_each_bad_bundle_file_gets_one_line_and_status_1(change, message, core_dir, tmp_path, capsys):
    bundle = shutil.copytree(core_dir, tmp_path / "eval_bundle")
    change(bundle)
    assert E.main(["--tasks", "core", "--core", str(bundle), "--checkpoint", str(tmp_path / "unused.pt"),
                   "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_limit_too_small_for_a_tasks_examples_names_the_task_and_the_flag(core_dir, tmp_path, capsys):
    assert E.main(["--tasks", "core", "--core", str(core_dir), "--limit", "3", "--checkpoint",
                   str(tmp_path / "unused.pt"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {core_dir}/eval_data/generated/mc_answer.jsonl: 3 items, but task mc_answer shows "
                   "each item 3 others as examples: it needs 4 at least (raise --limit)"]


# ----------------------------------------------------------------------------------------------------
# The download


def test_the_bundle_is_downloaded_once_then_read_from_the_cache(core_dir, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as z:  # as the real one: everything under eval_bundle/
        for path in sorted(core_dir.rglob("*")):
            z.write(path, Path("eval_bundle") / path.relative_to(core_dir))
    cache = tmp_path / "cache"
    with serving(served, "eval_bundle.zip", monkeypatch, E, "CORE_URL"):
        tasks = E.core_bundle(None, cache)
    assert [t.label for t in tasks] == ["mc_plain", "mc_answer", "schema_pairs", "lm_plain", "lm_examples"]
    assert sorted(p.name for p in (cache / "core").iterdir()) == ["eval_bundle"]  # no temporary left
    # The server is gone: the cache must do.
    assert E.core_bundle(None, cache) == tasks and tasks[0].path.is_relative_to(cache / "core" / "eval_bundle")


def test_a_download_that_is_not_a_zip_is_refused_and_not_kept(tmp_path, monkeypatch):
    (tmp_path / "page.html").write_text("<html>moved</html>")
    with serving(tmp_path, "page.html", monkeypatch, E, "CORE_URL"), pytest.raises(E.EvalError, match="not a whole zip file.*--core"):
        E.core_bundle(None, tmp_path / "cache")
    assert list((tmp_path / "cache" / "core").iterdir()) == []


def test_unreachable_network_gets_one_line_naming_core(tmp_path, monkeypatch, capsys):
    # Port 9 (discard) on this machine refuses at once: a stand-in for a network that cannot answer.
    monkeypatch.setenv("CORE_URL", "http://127.0.0.1:9/eval_bundle.zip")
    assert E.main(["--tasks", "core", "--data_cache", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download CORE's eval bundle from http://127.0.0.1:9/")
    assert "--core DIR" in err[0] and not (tmp_path / "core").exists()
