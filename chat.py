"""The conversation format: the turns' special tokens, a conversation rendered to token ids and which of them
fine-tuning trains, a conversation's history cropped to a context, and the same format as a Jinja chat template.

A conversation renders as (spaces added here for reading; none are in the tokens):

    <|endoftext|> <|system_start|> You are terse. <|system_end|>
    <|user_start|> What is 2 + 2? <|user_end|> <|assistant_start|> 4 <|assistant_end|>  <|user_start|> ...

<|endoftext|> opens it, as a new document opens in pretraining; the system turn is optional. The six turn
tokens take ids 50257-50262: GPT-2's 50,257 tokens are padded to 50,304 rows in the model (model.py), so a
pretrained checkpoint's shapes do not change, and a model that knows them says so by its vocab_size (50263).
Content is encoded with encode_ordinary, so text that merely spells a turn token stays text. Fine-tuning
trains the tokens the assistant says and its <|assistant_end|> (trained), nothing else.

data.py renders conversations into shards and packs them into rows, sample.py --chat talks in turns
(Conversation, Reply), export_hf.py writes JINJA_TEMPLATE and the tokens for transformers. HUB_TASKS renders
MMLU's and GSM8K's rows, which are questions with answers, as conversations. Only numpy and
common.py are imported: the tokenizer is passed in.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Iterator

import numpy as np

from common import EOT, CheckpointError

GPT2_VOCAB = 50257  # GPT-2's BPE tokens, <|endoftext|> (50256) included
SYSTEM_START, SYSTEM_END, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = range(GPT2_VOCAB, GPT2_VOCAB + 6)
VOCAB_SIZE = ASSISTANT_END + 1  # 50263: a chat model's vocabulary, inside the 50,304 rows (41 still spare)
SPECIAL_TOKENS = {"<|system_start|>": SYSTEM_START, "<|system_end|>": SYSTEM_END,
                  "<|user_start|>": USER_START, "<|user_end|>": USER_END,
                  "<|assistant_start|>": ASSISTANT_START, "<|assistant_end|>": ASSISTANT_END}
TURNS = {"system": (SYSTEM_START, SYSTEM_END), "user": (USER_START, USER_END),
         "assistant": (ASSISTANT_START, ASSISTANT_END)}
# Names this rendering in data caches (data.py): change it whenever render() changes, so old shards are not reused.
FORMAT = "gpt2-turns-1"

# render() as transformers' tokenizer.apply_chat_template (and llama.cpp) render it: the same tokens, as text
# that the tokenizer splits at the special tokens (tests/test_chat.py checks they agree). Literal spellings, so
# that any Jinja engine renders it; content that spells a turn token becomes that token there, never here.
JINJA_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system_start|>' + message['content'] + '<|system_end|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user_start|>' + message['content'] + '<|user_end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' -}}"
    "{%- else -%}{{- raise_exception('roles are system, user and assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}")


def jinja_template() -> str:
    """The chat template every export carries (transformers' tokenizer_config.json, a GGUF's tokenizer.chat_template)."""
    return JINJA_TEMPLATE


def knows_turns(config) -> bool:
    """Whether a model (its GPTConfig) was set up for conversations: its vocabulary holds the turn tokens."""
    return config.vocab_size == VOCAB_SIZE


def with_turns(config):
    """The GPTConfig with the turn tokens in its vocabulary (the rows are there already: only the loss and
    generation, which stop at vocab_size, start counting them)."""
    if config.vocab_size not in (GPT2_VOCAB, VOCAB_SIZE) or config.padded_vocab_size < VOCAB_SIZE:
        raise CheckpointError(f"--chat puts its turn tokens after GPT-2's {GPT2_VOCAB:,} tokens; these weights "
                              f"have a vocabulary of {config.vocab_size:,}")
    return dataclasses.replace(config, vocab_size=VOCAB_SIZE)


# ----------------------------------------------------------------------------------------------------
# Conversations to tokens


def problem(messages, training: bool = True) -> str | None:
    """What is wrong with a conversation (None: nothing): a list of {"role", "content"} messages, an optional
    system message first, then user and assistant in turn from the user; for training, at least one reply."""
    if not isinstance(messages, list) or not messages:
        return f"expected a list of messages, found {type(messages).__name__}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in TURNS or not isinstance(m.get("content"), str):
            return f"message {i} is not {{'role': 'system' | 'user' | 'assistant', 'content': text}}"
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if turns != ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2):
        return f"roles must be an optional system message, then user and assistant in turn: found {', '.join(roles)}"
    if training and len(turns) < 2:
        return "no assistant message: nothing to learn from"
    return None


def turn(role: str, ids: list[int]) -> list[int]:
    start, end = TURNS[role]
    return [start, *ids, end]


def render(messages: list[dict], enc, add_generation_prompt: bool = False) -> list[int]:
    """A conversation's token ids as fine-tuning sees them; with add_generation_prompt, followed by
    <|assistant_start|>, where a reply begins. JINJA_TEMPLATE renders the same."""
    ids = [EOT]
    for m in messages:
        ids += turn(m["role"], enc.encode_ordinary(m["content"]))
    return ids + [ASSISTANT_START] if add_generation_prompt else ids


def trained(ids: np.ndarray) -> np.ndarray:
    """Along the last axis, True for the tokens fine-tuning trains: those inside an assistant turn, its
    <|assistant_end|> included (so the model learns to end a reply), not <|assistant_start|> (the prompt puts it)."""
    ids = np.asarray(ids)
    starts, ends = ids == ASSISTANT_START, ids == ASSISTANT_END
    opened_before = np.cumsum(starts, axis=-1) - starts
    closed_before = np.cumsum(ends, axis=-1) - ends
    return opened_before > closed_before


# ----------------------------------------------------------------------------------------------------
# Hub datasets of questions and answers, as conversations (what data.py reads for --chat)

MC_LETTERS = "ABCD"


def mmlu_conversation(row: dict) -> list[dict]:
    """A cais/mmlu row (the auxiliary_train configuration nests it under "train") as a multiple-choice question
    whose reply is the right letter alone: short enough for the run's reply scores to check word for word."""
    row = row.get("train", row)
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(MC_LETTERS, row["choices"], strict=True))
    question = f"{row['question'].strip()}\n{choices}\nAnswer with the letter of the right choice."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": MC_LETTERS[row["answer"]]}]


def gsm8k_conversation(row: dict) -> list[dict]:
    """An openai/gsm8k row as a question whose reply works the problem step by step. Its calculator notes
    (<<48/2=24>>, which the text repeats right after) are dropped, as this model has no tool to call, and the
    closing "#### 72" reads "The answer is 72."."""
    work, _, final = re.sub(r"<<[^>]*>>", "", row["answer"]).rpartition("####")
    return [{"role": "user", "content": row["question"].strip()},
            {"role": "assistant", "content": f"{work.strip()}\nThe answer is {final.strip()}."}]


# Hub datasets whose rows are rendered as conversations by these functions rather than read from a messages field.
# Their names are a part of the cache's key (sources.Source.identity): change it whenever a function changes.
HUB_TASKS = {"cais/mmlu": (mmlu_conversation, "mmlu-1"), "openai/gsm8k": (gsm8k_conversation, "gsm8k-1")}


# ----------------------------------------------------------------------------------------------------
# Talking: the history, and a reply as it streams


class Conversation:
    """The conversation so far as token ids: <|endoftext|> and the system turn, then each exchange (a user
    turn and the reply). Ids rather than text, so a reply is never tokenized again differently."""

    def __init__(self, enc, context: int, system: str | None = None):
        self.enc, self.context = enc, context
        self.head = [EOT] + (turn("system", enc.encode_ordinary(system)) if system else [])
        if len(self.head) >= context // 2:
            raise ValueError(f"the system message is {len(self.head) - 3:,} tokens; the model's context is "
                             f"{context:,}, and half of it is for the conversation")
        self.exchanges: list[list[int]] = []
        self.asked: list[int] = []  # the user turn waiting for its reply

    def reset(self) -> None:
        self.exchanges, self.asked = [], []

    def ask(self, text: str, room: int) -> tuple[list[int], int]:
        """The ids a reply to `text` is generated from, at most context - room of them, and how many earlier
        exchanges were left out to fit: the oldest whole exchanges go first, then (a message too long by itself)
        the start of this one."""
        budget = self.context - room - len(self.head) - 3  # its turn tokens and <|assistant_start|>
        content = self.enc.encode_ordinary(text)[-max(1, budget):]
        self.asked = turn("user", content)
        kept, used = len(self.exchanges), len(self.asked) + 1
        while kept and used + len(self.exchanges[kept - 1]) <= self.context - room - len(self.head):
            used += len(self.exchanges[kept - 1])
            kept -= 1
        dropped, self.exchanges = kept, self.exchanges[kept:]
        return [*self.head, *(t for e in self.exchanges for t in e), *self.asked, ASSISTANT_START], dropped

    def answered(self, reply: list[int]) -> None:
        """The reply's tokens close the exchange, ended with <|assistant_end|> even if it was cut short."""
        self.exchanges.append([*self.asked, *turn("assistant", reply)])
        self.asked = []


class Reply:
    """The tokens of a reply as generated, up to the token that ends it (not yielded): <|assistant_end|>, or
    any other turn token or <|endoftext|>. `end` is that token afterwards, None if the reply was cut short."""

    def __init__(self, tokens: Iterable[int]):
        self.source, self.tokens, self.end = tokens, [], None

    def __iter__(self) -> Iterator[int]:
        try:
            for token in self.source:
                if token == EOT or token in TURN_IDS:
                    self.end = token
                    return
                self.tokens.append(token)
                yield token
        finally:
            getattr(self.source, "close", lambda: None)()  # a generator stopped early frees its cache now

    @property
    def ended(self) -> bool:
        """Whether the model ended its turn as fine-tuning taught it to."""
        return self.end == ASSISTANT_END


TURN_IDS = frozenset(SPECIAL_TOKENS.values())


# ----------------------------------------------------------------------------------------------------
# What fine-tuning taught: greedy replies to held-out conversations

# A reply this short is an answer that can be checked: right when the model says exactly it (longer replies,
# free text, are scored by the loss alone).
CHECKABLE_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Exchange:
    """A held-out conversation's last exchange: the conversation up to the reply (its <|assistant_start|>
    last), and the reply it holds."""
    prompt: list[int]
    reply: list[int]  # without its <|assistant_end|>

    @property
    def checkable(self) -> bool:
        return len(self.reply) <= CHECKABLE_TOKENS


def last_exchange(ids: np.ndarray) -> Exchange | None:
    """The last exchange of one rendered conversation (None if its last reply is unfinished)."""
    ids = np.asarray(ids).tolist()
    if ASSISTANT_START not in ids:
        return None
    start = len(ids) - 1 - ids[::-1].index(ASSISTANT_START)
    if ASSISTANT_END not in ids[start:]:
        return None
    return Exchange(ids[:start + 1], ids[start + 1:ids.index(ASSISTANT_END, start)])


def held_out(conversations: Iterable[np.ndarray], context: int, room: int, n: int) -> list[Exchange]:
    """Up to n last exchanges whose prompt leaves `room` tokens for the reply in the model's context."""
    out = []
    for ids in conversations:
        exchange = last_exchange(ids)
        if exchange is not None and len(exchange.prompt) + room <= context:
            out.append(exchange)
        if len(out) == n:
            break
    return out


def score_replies(model, exchanges: list[Exchange], room: int) -> dict:
    """The model's greedy replies to the exchanges, as sample.py --chat would give them: the share that end
    their turn (<|assistant_end|> within `room` tokens), and of the checkable ones the share said exactly."""
    ended = right = checkable = 0
    was_training = model.training
    model.eval()
    try:
        for exchange in exchanges:
            reply = Reply(model.generate(exchange.prompt, room, temperature=0, stop_at_eot=False))
            said = list(reply)
            ended += reply.ended
            if exchange.checkable:
                checkable += 1
                right += reply.ended and said == exchange.reply
    finally:
        model.train(was_training)
    n = max(1, len(exchanges))
    return {"replies": len(exchanges), "ended": ended / n, "checkable": checkable,
            "right": right / checkable if checkable else None}
