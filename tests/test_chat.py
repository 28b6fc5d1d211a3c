"""Conversations: the format (chat.py), fine-tuning on them (train_gpt2.py --chat), talking in turns
(sample.py --chat) and the transformers export's template, on a tiny model and generated conversations."""
import contextlib
import io
import itertools
import os
import pty
import random
import re
import select
import subprocess
import time
import types

import numpy as np
import pytest
import torch

import batches
import chat
import checkpoint
import common
import data
import export_gguf
import flags as F
import model as M
import sample
import shards
import sources
import tokenizer
import train_gpt2 as T
from common import EOT
from helpers import (child_env, llama_cpp_process, make_conversation, make_conversations, metrics,
                     one_torch_thread, run_script, script_command, write_conversations)
from shards import SPLITS, TokenShards

CONTEXT = 64
enc = tokenizer.get_tokenizer()


def tune_args(conversations, cache, save_dir, init_from, *extra) -> list[str]:
    """A chat fine-tune of the tiny model at a constant rate (min_lr = lr), so that a run's length does not change
    its steps' rates and a run stopped and resumed can match an uninterrupted one."""
    return ["--chat", "--init_from", str(init_from), "--dataset", str(conversations), "--data_cache", str(cache),
            "--save_dir", str(save_dir), "--block_size", "48", "--batch_size", "4", "--optimizer", "adamw", "--lr", "1e-2", "--min_lr", "1e-2",
            "--warmup_steps", "2", "--val_split", "0.1", "--eval_iters", "2", "--num_workers", "0", "--no-amp",
            "--no-compile", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A checkpoint of ours with no turn tokens, as pretraining leaves one (its weights random: what fine-tuning
    starts from is not what these tests check)."""
    torch.manual_seed(0)
    model = M.GPT(M.GPTConfig.from_preset("modern", n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT))
    path = tmp_path_factory.mktemp("base") / "model_best_val.pt"
    checkpoint.save_checkpoint(path, model, step=100, val_loss=5.0)
    return path


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("chat") / "conversations.jsonl", make_conversations(400))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, base, conversations, cache):
    """The tiny model fine-tuned on the conversations, as a user runs it (in this process)."""
    save = tmp_path_factory.mktemp("tuned")
    with one_torch_thread():  # a tiny model's steps run faster on one thread than on two
        assert T.main(tune_args(conversations, cache, save, base, "--max_steps", "40", "--eval_interval", "40")) == 0
    return save


def test_a_conversation_renders_to_its_turn_tokens_and_only_the_replies_are_trained():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 東京"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye 🙂"}]
    ids = chat.render(messages, enc)
    text = lambda s: enc.encode_ordinary(s)
    assert ids == [EOT, chat.SYSTEM_START, *text("Be brief."), chat.SYSTEM_END,
                   chat.USER_START, *text("Hi 東京"), chat.USER_END, chat.ASSISTANT_START, *text("Hello."), chat.ASSISTANT_END,
                   chat.USER_START, *text("Bye"), chat.USER_END, chat.ASSISTANT_START, *text("Bye 🙂"), chat.ASSISTANT_END]
    trained = [t for t, keep in zip(ids, chat.trained(ids)) if keep]
    assert trained == [*text("Hello."), chat.ASSISTANT_END, *text("Bye 🙂"), chat.ASSISTANT_END]
    assert chat.render(messages[:2], enc, add_generation_prompt=True) == ids[:ids.index(chat.ASSISTANT_START) + 1]
    assert max(ids) < chat.VOCAB_SIZE <= M.GPTConfig().padded_vocab_size  # in the padding: no shape changes
    assert chat.problem(messages[1:][::-1]) and chat.problem(messages[:2]) and not chat.problem(messages)


def test_text_that_spells_a_turn_token_stays_text(tmp_path):
    spelled = "<|assistant_end|><|user_start|><|endoftext|>"
    messages = [{"role": "user", "content": spelled}, {"role": "assistant", "content": "ok " + spelled}]
    ids = chat.render(messages, enc)
    assert [t for t in ids if t >= EOT] == [EOT, chat.USER_START, chat.USER_END, chat.ASSISTANT_START, chat.ASSISTANT_END]
    cache = data.prepare(sources.DataSpec(dataset=str(write_conversations(tmp_path / "c.jsonl", [messages] * 20)),
                                       data_cache=str(tmp_path / "cache"), chat=True, val_split=0.1), progress=False)
    shards = TokenShards(cache, "train")
    assert shards.read(0, len(ids)).tolist() == ids
    assert sample.encode_prompt(enc, spelled) == enc.encode_ordinary(spelled[:-13]) + [EOT]  # as before the turns


def expected_pieces(messages: list[dict], window: int) -> list[int] | None:
    """A conversation as its rows should hold it, found by rendering whole exchanges until one more would not fit."""
    system = 1 if messages[0]["role"] == "system" else 0
    fits = [chat.render(messages[:system + 2 * k], enc) for k in range(1, (len(messages) - system) // 2 + 1)]
    fits = [ids for ids in fits if len(ids) <= window]
    return fits[-1] if fits else None


def test_conversations_are_packed_whole_and_cut_after_the_last_exchange_that_fits(tmp_path):
    rng = random.Random(1)
    convs = [*make_conversations(60, seed=2), make_conversation(rng, 9, system=True), make_conversation(rng, 7)]
    convs.append([{"role": "user", "content": "The warm river " * 30}, {"role": "assistant", "content": "No."}])
    cache = data.prepare(sources.DataSpec(dataset=str(write_conversations(tmp_path / "c.jsonl", convs)),
                                       data_cache=str(tmp_path / "cache"), chat=True, val_split=0.5), progress=False)
    shards = {split: TokenShards(cache, split) for split in SPLITS}
    window = CONTEXT + 1
    seen, trained = [], []
    for shards_of_split in shards.values():
        rows = batches.Windows(shards_of_split, CONTEXT)
        for k in range(rows.available()):
            x, y = rows.read(np.array([k]))
            last = y[0, -1].item()  # the row's last token: a reply's end, or else padding (no target)
            row = [*x[0].tolist(), last if last != -1 else EOT]
            assert row[0] == EOT
            starts = [i for i, t in enumerate(row) if t == EOT] + [window]
            pieces = [row[a:b] for a, b in zip(starts, starts[1:]) if b > a + 1]
            seen += [tuple(p) for p in pieces]
            trained += [t for t in y[0].tolist() if t != -1]
    expected = [expected_pieces(m, window) for m in convs]
    assert sorted(seen) == sorted(tuple(p) for p in expected if p is not None)  # each kept one once, whole
    assert expected[-1] is None and sum(len(p) < len(chat.render(m, enc)) for p, m in zip(expected, convs) if p) >= 2
    replies = [t for p in expected if p for t, keep in zip(p, chat.trained(p)) if keep]
    assert sorted(trained) == sorted(replies)  # the loss counts the replies' tokens and nothing else
    assert "1 left out" in batches.BatchSource(shards["train"], CONTEXT, 1, seed=0).packed.note() + \
        batches.BatchSource(shards["val"], CONTEXT, 1, seed=0).packed.note()


def test_the_history_is_cropped_from_the_front_whole_exchanges_first():
    conversation = chat.Conversation(enc, context=48, system="Be brief.")
    head = [EOT, *chat.turn("system", enc.encode_ordinary("Be brief."))]
    exchanges = []  # what the history should hold, oldest first
    for i in range(5):
        asked = chat.turn("user", enc.encode_ordinary(f"The {i} river opens."))
        prompt, dropped = conversation.ask(f"The {i} river opens.", room=10)
        kept = max(k for k in range(len(exchanges) + 1)  # the most recent exchanges that fit in 48 - 10 tokens
                   if len(head) + sum(map(len, exchanges[len(exchanges) - k:])) + len(asked) + 1 <= 38)
        assert prompt == [*head, *(t for e in exchanges[len(exchanges) - kept:] for t in e), *asked, chat.ASSISTANT_START]
        assert dropped == len(exchanges) - kept
        exchanges = exchanges[len(exchanges) - kept:] + [asked + chat.turn("assistant", enc.encode_ordinary("Ok."))]
        conversation.answered(enc.encode_ordinary("Ok."))
    assert len(exchanges) < 5  # some were dropped: the test saw the cropping
    prompt, dropped = conversation.ask("word " * 60 + "end", room=10)  # too long alone: its end is kept
    assert prompt[:len(head)] == head and len(prompt) == 38 and dropped == len(exchanges)
    assert prompt[-3:] == [*enc.encode_ordinary(" end"), chat.USER_END, chat.ASSISTANT_START]
    conversation.reset()
    assert conversation.ask("Hi", room=10)[0] == [*head, *chat.turn("user", enc.encode_ordinary("Hi")), chat.ASSISTANT_START]


def test_a_chat_fine_tune_learns_the_replies_and_resumes_exactly(tuned, base, conversations, cache, tmp_path):
    losses = [r["val_loss"] for r in metrics(tuned) if "val_loss" in r]
    assert losses[0] > 8 and losses[-1] < 1.5  # the step-0 evaluation, then the fine-tuned replies
    best = torch.load(tuned / "model_best_val.pt", weights_only=True)
    assert best["config"]["vocab_size"] == chat.VOCAB_SIZE and best["init_from"] == str(base)
    flags = lambda save, steps, *more: tune_args(conversations, cache, save, base, "--max_steps", str(steps),
                                                 "--eval_interval", "1000", "--dropout", "0.1", *more)
    with one_torch_thread():
        assert T.main(flags(tmp_path / "whole", 6)) == 0
        assert T.main(flags(tmp_path / "halves", 3)) == 0
        assert T.main(flags(tmp_path / "halves", 6, "--resume")) == 0
    whole, halves = (torch.load(tmp_path / run / "latest.pt", weights_only=True) for run in ("whole", "halves"))
    assert halves["step"] == 6 and all(torch.equal(whole["model"][k], halves["model"][k]) for k in whole["model"])


def test_a_base_checkpoint_given_chat_is_refused_in_one_line(base, capsys):
    assert sample.main(["--chat", "--checkpoint", str(base), "--cpu"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: {base} was not fine-tuned on conversations (it has no turn tokens): fine-tune it "
                       'with train_gpt2.py --chat --init_from (README, "Chat"), or talk to it without --chat')


QUESTIONS = ["The quiet river follows the green garden.", "The old engine opens the warm letter."]


def test_piped_turns_each_get_a_reply_that_ends_and_reset_starts_again(tuned):
    lines = "\n".join([QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[1]]) + "\n"
    result = run_script("sample.py", "--chat", "--checkpoint", str(tuned / "model_best_val.pt"), "--cpu",
                        "--temperature", "0", "--max_tokens", "20", "--system", "Answer in a few words.", input=lines)
    assert result.returncode == 0, result.stderr
    exchanges = [block.splitlines() for block in result.stdout.strip().split("\n\n")]  # a transcript
    assert [said[0] for said in exchanges] == [f"> {line}" for line in lines.splitlines()]
    first, second, reset, again = (said[1] for said in exchanges)
    assert reset == "[the conversation starts again]" and first and second
    assert "[the reply was cut" not in result.stderr  # each reply ended with its end-of-turn token
    assert again.startswith("The ") and again.endswith(".")


def read_until(fd: int, wanted: bytes, timeout: float = 60) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return seen


def test_two_turns_at_a_terminal_each_end_and_ctrl_d_leaves(tuned):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(script_command("sample.py", "--chat", "--checkpoint", str(tuned / "model_best_val.pt"),
                                           "--cpu", "--temperature", "0", "--max_tokens", "20"),
                            env=child_env(), stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    try:
        shown = read_until(leader, b"> ")
        for question in QUESTIONS:
            os.write(leader, question.encode() + b"\n")
            shown += read_until(leader, b"\r\n> ")
        os.write(leader, b"\x04")  # Ctrl-D at the prompt
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)
    text = shown.decode("utf-8", "replace")
    turns = text.split("> ")[1:]
    assert len(turns) == 3 and all(t.startswith(q) for t, q in zip(turns, QUESTIONS))
    assert "[the reply was cut" not in text and all(t.strip().endswith(".") for t in turns[:2])


def test_the_transformers_export_renders_the_fine_tuning_tokens_and_its_replies_end_the_turn(tuned, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = run_script("export_hf.py", str(tuned / "model_best_val.pt"), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    tokens = lambda rendered: list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    odd = [{"role": "user", "content": "  two  spaces\n\nand 東京🙂 "}, {"role": "assistant", "content": "\nok "}]
    for messages in [*make_conversations(30, seed=5, exchanges=(1, 3)), odd]:
        assert tokens(tok.apply_chat_template(messages, tokenize=True)) == chat.render(messages, enc)
    asked = [{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": QUESTIONS[0]}]
    prompt = chat.render(asked, enc, add_generation_prompt=True)
    assert tokens(tok.apply_chat_template(asked, tokenize=True, add_generation_prompt=True)) == prompt
    ours, _ = checkpoint.load_model(str(tuned / "model_best_val.pt"))
    reply = chat.Reply(ours.eval().generate(prompt, 20, temperature=0, stop_at_eot=False))
    assert list(reply) and reply.ended
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert out == reply.tokens + [chat.ASSISTANT_END]  # the same reply, and generation stops at the end of its turn


def test_a_conversation_out_of_turn_and_an_unreachable_hub_are_one_line_each(tmp_path):
    wrong = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    path = write_conversations(tmp_path / "c.jsonl", [make_conversation(random.Random(0), 1), wrong])
    with pytest.raises(common.DataError, match=r"c.jsonl:2: field 'messages' is not a conversation: roles must be"):
        data.prepare(sources.DataSpec(dataset=str(path), data_cache=str(tmp_path), chat=True, val_split=0.5),
                     progress=False)
    offline = run_script("data.py", "--chat", "--dataset", "HuggingFaceTB/smol-smoltalk", "--subset", "",
                         "--data_cache", str(tmp_path))  # offline, as every child of the tests is
    lines = offline.stderr.strip().splitlines()
    assert offline.returncode == 1 and len(lines) == 1 and "pass --dataset PATH" in lines[0]
    assert lines[0].startswith("error: cannot reach the Hugging Face Hub for dataset 'HuggingFaceTB/smol-smoltalk'")
    mixture = run_script("data.py", "--chat", "--dataset", f"{path},openai/gsm8k:main,cais/mmlu:auxiliary_train",
                         "--data_cache", str(tmp_path))
    lines = mixture.stderr.strip().splitlines()
    assert mixture.returncode == 1 and len(lines) == 1 and "pass --dataset PATH" in lines[0]
    assert lines[0].startswith("error: cannot reach the Hugging Face Hub for datasets 'openai/gsm8k', 'cais/mmlu'")


def test_mmlu_and_gsm8k_rows_become_conversations_whose_reply_is_the_answer():
    question = {"question": "Which is a fruit? ", "choices": ["stone", "fig", "iron", "salt"], "answer": 1,
                "subject": ""}
    for row in (question, {"train": question}):  # the auxiliary_train configuration nests its rows
        messages = chat.mmlu_conversation(row)
        assert chat.problem(messages) is None and messages[1]["content"] == "B"
        assert messages[0]["content"].splitlines()[:3] == ["Which is a fruit?", "A. stone", "B. fig"]
    worked = {"question": "Ann has 3 bags of 4 figs. How many figs?", "answer": "3 * 4 = <<3*4=12>>12\n#### 12"}
    messages = chat.gsm8k_conversation(worked)
    assert chat.problem(messages) is None and messages[1]["content"] == "3 * 4 = 12\nThe answer is 12."
    gsm8k = sources.Source("openai/gsm8k", "main", "messages", None, chat=True)
    assert gsm8k.task == "openai/gsm8k" and sources.Source("openai/gsm8k", "main", "text", None).task is None
    with pytest.raises(common.DataError, match=r"^openai/gsm8k: a row chat.py cannot render as a conversation"):
        sources._text_of({"question": "no answer"}, gsm8k, "openai/gsm8k")


def test_a_hub_datasets_size_is_read_from_its_card_and_its_rows_from_parquet_as_datasets_streams_them(
        tmp_path, monkeypatch):
    """GSM8K's layout (a configuration's parquet files, the card's dataset_info) in a folder, streamed by `datasets`
    as it streams the Hub's copy."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": f"What is {i} + 1?", "answer": f"<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(7)]
    (tmp_path / "gsm8k" / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k" / "main" / "train-00000-of-00001.parquet")
    (tmp_path / "gsm8k" / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "dataset_info:\n- config_name: main\n  splits:\n  - name: train\n    num_examples: 7\n---\n")
    monkeypatch.setattr(sources, "_open_hub_stream", lambda source, skip: datasets.load_dataset(
        str(tmp_path / "gsm8k"), source.subset, split="train", streaming=True).skip(skip))
    gsm8k = sources.resolve_source(sources.DataSpec(dataset="openai/gsm8k:main", chat=True))
    assert sources._hub_rows(gsm8k) == 7
    replies = [messages[1]["content"] for messages, _ in sources.iter_records(gsm8k, skip=5)]
    assert replies == ["6\nThe answer is 6.", "7\nThe answer is 7."]


def test_a_mixture_spreads_each_source_through_the_whole_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Two local files and a Hub dataset (GSM8K's rows, served here) as one --dataset, sizes 30, 10 and 20."""
    a = write_conversations(tmp_path / "a.jsonl", make_conversations(30, seed=1))
    b = write_conversations(tmp_path / "b.jsonl", make_conversations(10, seed=2))
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(20)]

    class Stream(list):  # as datasets streams them, with the dataset card's split sizes
        info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=len(rows))})
    monkeypatch.setattr(sources, "_open_hub_stream", lambda source, skip: Stream(rows[skip:]))
    spec = sources.DataSpec(dataset=f"{a}, {b},openai/gsm8k:main", chat=True, data_cache=str(tmp_path / "cache"))
    source = sources.resolve_source(spec)
    assert [(p.name, p.subset) for p in source.parts] == [(str(a), None), (str(b), None), ("openai/gsm8k", "main")]
    assert sources.count_records(source, 1000) == 60 and sources.count_records(source, 7) == 7
    records = [messages for messages, _ in sources.iter_records(source)]
    of_part = [0 if m in make_conversations(30, seed=1) else 1 if m in make_conversations(10, seed=2) else 2
               for m in records]
    assert sorted(of_part) == [0] * 30 + [1] * 10 + [2] * 20
    for first in (6, 12, 30, 45):  # any opening stretch holds each part in proportion to its size
        for part, size in enumerate((30, 10, 20)):
            assert abs(of_part[:first].count(part) - first * size / 60) <= 1
    assert records[of_part.index(2)][1]["content"] == "0 + 1 = 1\nThe answer is 1."
    assert [m for m, _ in sources.iter_records(source, skip=37)] == records[37:]  # a resumed preparation goes on exactly
    manifest = shards.read_json(data.prepare(spec, progress=False) / "manifest.json")
    assert manifest["source"]["mixture"] == [str(a), str(b), "openai/gsm8k"] and manifest["documents"] == 60
    monkeypatch.setattr(Stream, "info", None)  # a card that gives no size: taken as large as the largest part
    sources._sizes.cache_clear()
    assert sources.count_records(source, 1000) == 30 + 10 + 30
    twice = sources.resolve_source(sources.DataSpec(dataset=f"{b},{b}", chat=True))  # named twice: read twice, in turn
    assert [m for m, _ in sources.iter_records(twice)] == [m for m in make_conversations(10, seed=2) for _ in range(2)]


def llama_cpp_chat(llm, text: str, prompt: list[int], n_tokens: int) -> tuple:
    """Run in llama.cpp's process (helpers.llama_cpp_process): its tokens for a rendered conversation and for a turn
    token typed as text, its first greedy tokens after `prompt`, and its end of generation."""
    return (llm.tokenize(text.encode(), add_bos=False, special=True),
            llm.tokenize(b"<|user_end|>", add_bos=False, special=False),
            list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, reset=True), n_tokens)), llm.token_eos())


def test_the_gguf_export_carries_the_turns_and_llama_cpp_renders_and_ends_the_reply(tuned, tmp_path):
    """As llama.cpp and LM Studio take it: the turn tokens as control tokens, the Jinja template in the file
    rendering (through jinja2, as they render it) to the text llama.cpp tokenizes to the fine-tuning's ids, and
    its greedy reply ours, ending at <|assistant_end|>, the file's end of generation."""
    gguf = pytest.importorskip("gguf")
    jinja2 = pytest.importorskip("jinja2")
    out = tmp_path / "gguf" / "chat.gguf"
    with llama_cpp_process() as llama:  # started first: its start-up beside the export's
        result = run_script("export_gguf.py", str(tuned / "model_best_val.pt"), str(out), "--type", "f32")
        assert result.returncode == 0, result.stderr
        reader = gguf.GGUFReader(out)
        field = lambda key: reader.fields[key].contents()
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        assert len(tokens) == chat.VOCAB_SIZE and {tokens[i]: i for i in chat.TURN_IDS} == chat.SPECIAL_TOKENS
        assert all(types[i] == gguf.TokenType.CONTROL for i in [EOT, *chat.TURN_IDS])
        assert types[EOT - 1] == gguf.TokenType.NORMAL
        assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.eot_token_id") == chat.ASSISTANT_END
        assert field("tokenizer.chat_template") == chat.JINJA_TEMPLATE
        asked = [{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": QUESTIONS[0]}]
        prompt = chat.render(asked, enc, add_generation_prompt=True)
        text = jinja2.Environment().from_string(field("tokenizer.chat_template")).render(messages=asked,
                                                                                         add_generation_prompt=True)
        ours, _ = checkpoint.load_model(str(tuned / "model_best_val.pt"))
        reply = chat.Reply(ours.eval().generate(prompt, 20, temperature=0, stop_at_eot=False))
        assert list(reply) and reply.ended
        loaded = llama.load(out, n_ctx=CONTEXT, n_threads=1)
        assert loaded == {"use_extra_bufts": False, "weight_buffers": ["CPU_Mapped"]}  # no AMX or repacked buffers
        rendered, typed, said, eos = llama.run(out, llama_cpp_chat, text, prompt, len(reply.tokens) + 1)
    assert rendered == prompt and typed == enc.encode_ordinary("<|user_end|>")
    assert said == reply.tokens + [chat.ASSISTANT_END] and eos == chat.ASSISTANT_END
    modelfile = (out.parent / "Modelfile").read_text()
    assert export_gguf.OLLAMA_CHAT_TEMPLATE in modelfile and 'PARAMETER stop "<|assistant_end|>"' in modelfile


class Oracle:
    """A stand-in model for bench_chat's scoring that does the task: finds the item the last question asks about
    and its price in the last list of the prompt, says it, then ends its turn (or, `ends=False`, runs on)."""

    def __init__(self, ends: bool):
        self.ends, self.config = ends, M.GPTConfig(block_size=256)

    def generate(self, prompt, max_tokens, **_):
        text = enc.decode([t for t in prompt if t < chat.GPT2_VOCAB])
        item = re.findall(r"(?:What does the|And the) (\w+)", text)[-1]
        price = re.search(rf"\b{item} (\d+)", text.rsplit("Prices: ", 1)[1]).group(1)
        tail = [chat.ASSISTANT_END] if self.ends else enc.encode_ordinary(" And so on.") * max_tokens
        yield from (enc.encode_ordinary(f"The {item} costs {price}.") + tail)[:max_tokens]


def test_bench_chats_questions_have_their_answer_in_the_list_and_its_scoring_counts_right_and_ended():
    import bench_chat
    rng = random.Random(0)
    held_out = [bench_chat.make_questions(rng) for _ in range(30)]
    for turns in held_out:
        listing = turns[0][0]
        for asked, said in turns:
            item, price = said.removeprefix("The ").removesuffix(".").split(" costs ")
            assert f" {item} {price}" in listing and item in asked
    assert all(chat.problem(bench_chat.make_conversation(rng)) is None for _ in range(30))
    scored = bench_chat.score(Oracle(ends=True), held_out, max_tokens=12)
    assert scored["right"] == scored["ended"] == 1.0 and scored["questions"] == sum(map(len, held_out)) > 30
    running_on = bench_chat.score(Oracle(ends=False), held_out, max_tokens=12)
    assert running_on["ended"] == 0.0 and running_on["right"] == 0.0  # "The tea costs 17. And so on." is not it


def chat_alone(*flags: str) -> list[str]:
    """`--chat` and only what the tiny model on the tests' conversations needs besides --chat's defaults."""
    return ["--chat", *flags, "--block_size", "48", "--batch_size", "4", "--eval_iters", "2", "--num_workers", "0",
            "--no-compile", "--device", "cpu"]


@pytest.fixture(scope="module")
def chat_alone_run(tmp_path_factory, base, conversations, cache):
    """`train_gpt2.py --chat` run where a pretraining run left its best checkpoint (checkpoints/), reading the
    tests' conversations mixed with a second file of them (the default, SmolTalk, is on the Hub) and 100 of them,
    so that one pass is short."""
    home = tmp_path_factory.mktemp("home")
    more = write_conversations(home / "more.jsonl", make_conversations(100, seed=3))
    (home / "checkpoints").mkdir()
    (home / "checkpoints" / "model_best_val.pt").write_bytes(base.read_bytes())
    with pytest.MonkeyPatch.context() as patch, one_torch_thread(), contextlib.redirect_stdout(io.StringIO()) as out:
        patch.chdir(home)
        code = T.main(chat_alone("--dataset", f"{conversations},{more}", "--sample_size", "100",
                                 "--data_cache", str(cache)))
    assert code == 0
    return home, out.getvalue()


def test_chat_alone_fine_tunes_the_best_checkpoint_for_one_pass_into_a_folder_of_its_own(chat_alone_run, base):
    home, out = chat_alone_run
    assert (home / "checkpoints" / "model_best_val.pt").read_bytes() == base.read_bytes()  # the base model stays
    latest = torch.load(home / "checkpoints" / "chat" / "latest.pt", weights_only=True)
    assert latest["init_from"] == F.CHAT_DEFAULTS["init_from"] == "checkpoints/model_best_val.pt"
    run = latest["run"]
    pretraining = F.parse_args([])
    assert (run["optimizer"], run["lr"]) == (F.DEFAULT_OPTIMIZER, pretraining.lr)  # pretraining's rates
    assert run["data"]["chat"] and run["data"]["sample_size"] == 100
    assert run["data"]["dataset"].endswith(f"conversations.jsonl,{home / 'more.jsonl'}")  # a mixture of the two
    steps, epochs = re.search(r"plan: ([\d,]+) steps = [\d,]+ tokens = ([\d.]+) epochs", out).groups()
    assert latest["step"] == int(steps.replace(",", "")) and float(epochs) == pytest.approx(1.0, abs=0.05)
    assert "tokens a parameter" not in out and "fresh data" not in out  # pretraining's advice, not a fine-tune's
    replies = re.findall(r"replies to (\d+) held-out conversations: (\d+)% end their turn", out)
    assert len(replies) >= 2 and all(int(n) > 0 for n, _ in replies)  # the step-0 evaluation and the last
    home_lines = out[out.index("to talk to it on your laptop:"):].splitlines()[1:]
    assert home_lines[0].startswith("  mkdir -p ./checkpoints/chat/ && scp ")
    assert home_lines[0].endswith(f"{home / 'checkpoints' / 'chat' / 'model_best_val.pt'} ./checkpoints/chat/")
    assert home_lines[1:4] == ["  python sample.py --chat --checkpoint ./checkpoints/chat/model_best_val.pt --cpu",
                               "  python export_gguf.py ./checkpoints/chat/model_best_val.pt exported-chat/model.gguf",
                               "  ollama create mychat -f exported-chat/Modelfile && ollama run mychat"]
    rows = [r for r in metrics(home / "checkpoints" / "chat") if "chat_ended" in r]
    assert len(rows) == len(replies) and all(0 <= r["chat_ended"] <= 1 for r in rows)


def test_chat_alone_without_a_base_model_or_the_hub_and_over_the_base_is_one_line_each(base, conversations, tmp_path,
                                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        F.parse_args(["--chat"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 2 and err[1].endswith("see --help for the flags")
    assert "checkpoints/model_best_val.pt is not there: train one first (python train_gpt2.py)" in err[0]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model_best_val.pt").write_bytes(base.read_bytes())
    offline = run_script("train_gpt2.py", *chat_alone(), cwd=tmp_path)  # SmolTalk, offline as the tests' children are
    lines = offline.stderr.strip().splitlines()
    assert offline.returncode == 1 and len(lines) == 1 and "HuggingFaceTB/smol-smoltalk" in lines[0]
    assert "pass --dataset PATH" in lines[0] and not (tmp_path / "checkpoints" / "chat").exists()
    over = run_script("train_gpt2.py", *chat_alone("--dataset", str(conversations), "--save_dir", "checkpoints"),
                      cwd=tmp_path)
    assert over.returncode == 1 and over.stderr.strip().splitlines()[-1].startswith("error: checkpoints holds an")
    assert (tmp_path / "checkpoints" / "model_best_val.pt").read_bytes() == base.read_bytes()


def test_chat_flags_given_win_and_plan_shows_the_fine_tune(base, conversations, tmp_path, capsys):
    args = F.parse_args(["--chat", "--init_from", str(base), "--lr", "1e-4", "--epochs", "2", "--save_dir", "mine"])
    assert (args.lr, args.epochs, args.save_dir, args.init_from) == (1e-4, 2.0, "mine", str(base))
    assert args.dataset == F.CHAT_DEFAULTS["dataset"] and (args.min_lr, args.warmup_steps) == (0.0, 0)
    assert F.parse_args(["--chat", "--init_from", str(base), "--optimizer", "adamw"]).optimizer == "adamw"
    assert T.main(chat_alone("--init_from", str(base), "--dataset", str(conversations), "--plan",
                             "--data_cache", str(tmp_path / "cache"))) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "epochs" in out and "tokens a parameter" not in out
    assert not (tmp_path / "cache").exists()  # --plan prepares nothing


def test_in_run_reply_scores_count_replies_that_end_and_short_answers_said_exactly():
    convs = [chat.render(m, enc) for m in make_conversations(12, seed=3, exchanges=(1, 2))]
    exchanges = chat.held_out(convs, context=CONTEXT, room=16, n=8)
    assert len(exchanges) == 8 and all(e.prompt[-1] == chat.ASSISTANT_START for e in exchanges)
    assert all(e.prompt + e.reply + [chat.ASSISTANT_END] == c[:len(e.prompt) + len(e.reply) + 1]
               for e, c in zip(exchanges, convs))

    class Parrot:  # says the held-out reply, then ends its turn, except for the first two exchanges
        training = False

        def __init__(self):
            self.calls = 0

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def generate(self, prompt, max_tokens, **_):
            exchange = exchanges[self.calls]
            self.calls += 1
            tail = [chat.ASSISTANT_END] if self.calls > 2 else [enc.encode_ordinary(" and")[0]] * max_tokens
            yield from (exchange.reply + tail)[:max_tokens]

    scores = chat.score_replies(Parrot(), exchanges, room=16)
    checkable = sum(e.checkable for e in exchanges)
    assert scores["replies"] == 8 and scores["ended"] == pytest.approx(6 / 8) and scores["checkable"] == checkable
    assert scores["right"] == pytest.approx(sum(e.checkable for e in exchanges[2:]) / checkable)


def test_plain_sampling_of_a_chat_model_says_how_to_talk_to_it(tuned):
    plain = run_script("sample.py", "--checkpoint", str(tuned / "model_best_val.pt"), "--cpu", "--max_tokens", "5",
                       "--prompt", "Hello")
    assert plain.returncode == 0 and "sample.py --chat talks to it in turns" in plain.stderr
