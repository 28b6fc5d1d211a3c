"""What chat fine-tuning buys a small model (BENCHMARKS.md, "Chat"): pretrain it on generated text, fine-tune it
with train_gpt2.py --chat on generated conversations whose answers can be checked, and score held-out questions
before and after, as sample.py --chat asks them.

    python bench_chat.py                          # about half an hour on a 2-core CPU
    python bench_chat.py --variant adamw="--optimizer adamw --lr 3e-4" --variant muon=""   # rates side by side
    python bench_chat.py --variant spread="--dataset {data}/echo.jsonl,{data}/prices.jsonl" \
        --variant one_after_the_other="--dataset {data}"                  # a mixture, two ways

The task is a lookup in a list the user gives: "Prices: fig 41, tea 17, corn 88. What does the tea cost?",
to which the answer is "The tea costs 17."; half the conversations ask a second question about the same list
("And the corn?"), which needs the history. Pretraining reads such lists followed by what some of their items
cost, as plain text, never a question: the model learns to copy a price from its context, fine-tuning only
the shape of a conversation (answer, then end the turn). Every list is drawn afresh, so the held-out questions
ask about lists no run has seen. A reply is right when it is the answer exactly; it ends on its own when the
model closes its turn (<|assistant_end|>) within --max_tokens. The base model, which has no turn tokens, is
scored on the same prompts (an <|endoftext|> ends its reply) and also on the question as plain text, the way a
base model is prompted (its first line is its answer). The runs are train_gpt2.py's, as a user starts them;
the commands are printed. Figures are printed, and with --json written.

A second kind of conversation, for mixtures: "Say back: fig, tea, corn." / "fig, tea, corn.". The fine-tunes read
prices.jsonl unless a variant's flags say otherwise ({data} is the folder holding both files); every model is also
scored by its loss on the replies of held-out conversations of each kind.
"""
from __future__ import annotations

import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import chat
from checkpoint import load_model
from common import EOT, ArgumentParser, atomic_write, positive_int
from tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent
# Each one GPT-2 token with its leading space, as is every price from 10 to 99.
ITEMS = ("apple pear fig plum lemon grape peach cherry onion bean corn nut rice egg cake bread milk tea salt cat dog "
         "fish bird horse lamp chair table cup book pen hat shoe coat ring bell drum boat car key rope sock bowl "
         "spoon").split()
# The model both runs train: small enough for a 2-core CPU (its 50,304-wide output layer is most of each step).
SHAPE = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "128"]


# ----------------------------------------------------------------------------------------------------
# The generated task: price lists, which pretraining reads as plain text and the questions ask about


def price_list(rng: random.Random) -> tuple[str, dict[str, int]]:
    """A list of three to six items, each with a price from 10 to 99, as the user writes it."""
    prices = {item: rng.randint(10, 99) for item in rng.sample(ITEMS, rng.randint(3, 6))}
    return "Prices: " + ", ".join(f"{item} {price}" for item, price in prices.items()) + ".", prices


def answer(prices: dict[str, int], item: str) -> str:
    return f"The {item} costs {prices[item]}."


def make_document(rng: random.Random) -> str:
    """A pretraining document, never a question: a few lists, each followed by what some of its items cost."""
    blocks = []
    for _ in range(rng.randint(2, 4)):
        listing, prices = price_list(rng)
        said = rng.sample(list(prices), rng.randint(1, len(prices)))
        blocks.append("\n".join([listing, *(answer(prices, item) for item in said)]))
    return "\n\n".join(blocks)


def make_questions(rng: random.Random) -> list[tuple[str, str]]:
    """One or two (question, answer) turns about a new list; the second refers back to it ("And the cup?")."""
    listing, prices = price_list(rng)
    first, second = rng.sample(list(prices), 2)
    turns = [(f"{listing} What does the {first} cost?", answer(prices, first))]
    if rng.random() < 0.5:
        turns.append((f"And the {second}?", answer(prices, second)))
    return turns


def make_conversation(rng: random.Random) -> list[dict]:
    return [m for asked, said in make_questions(rng)
            for m in ({"role": "user", "content": asked}, {"role": "assistant", "content": said})]


def make_echo(rng: random.Random) -> list[dict]:
    """The second kind: the user says a few items, the assistant says them back."""
    said = ", ".join(rng.sample(ITEMS, rng.randint(2, 5))) + "."
    return [{"role": "user", "content": f"Say back: {said}"}, {"role": "assistant", "content": said}]


def write_data(folder: Path, documents: int, conversations: int) -> tuple[Path, Path]:
    """The pretraining text, and the fine-tuning conversations of each kind in a folder of their own (JSON lines)."""
    rng = random.Random(1)
    text, convs = folder / "pretraining.jsonl", folder / "conversations" / "prices.jsonl"
    convs.parent.mkdir(parents=True, exist_ok=True)
    for path, records in ((text, ({"text": make_document(rng)} for _ in range(documents))),
                          (convs, ({"messages": make_conversation(rng)} for _ in range(conversations))),
                          (convs.parent / "echo.jsonl", ({"messages": make_echo(rng)} for _ in range(conversations)))):
        with atomic_write(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return text, convs


# ----------------------------------------------------------------------------------------------------
# Scoring, as sample.py --chat talks (greedy)


def score(model, held_out: list, max_tokens: int, plain: bool = False) -> dict:
    """The share of held-out questions answered exactly right, and of replies that ended on their own: with
    <|assistant_end|> (`ended`), or with any end (`stopped`: also <|endoftext|>, or in plain text a new line)."""
    enc, context = get_tokenizer(), model.config.block_size
    right = ended = stopped = total = 0
    for turns in held_out:
        conversation, lines = chat.Conversation(enc, context), [EOT]
        for asked, expected in turns:
            if plain:  # a base model's way: the questions and its answers as plain text, a line each
                lines += enc.encode_ordinary(asked + "\n")
                prompt = lines[-(context - max_tokens):]
            else:
                prompt, _ = conversation.ask(asked, max_tokens)
            reply = chat.Reply(model.generate(prompt, max_tokens, temperature=0, stop_at_eot=False))
            text = enc.decode(list(reply))
            if plain:
                text, newline, _ = text.partition("\n")
                lines += enc.encode_ordinary(text + "\n")
            else:
                conversation.answered(reply.tokens)
            total += 1
            right += text.strip() == expected
            ended += reply.ended
            stopped += reply.end is not None or (plain and newline == "\n")
    return {"right": right / total, "ended": ended / total, "stopped": stopped / total, "questions": total}


def reply_loss(model, conversations: list[list[dict]]) -> float:
    """The mean loss on the tokens fine-tuning trains (the replies and their <|assistant_end|>), token-weighted."""
    enc, total, count = get_tokenizer(), 0.0, 0
    for messages in conversations:
        ids = torch.tensor(chat.render(messages, enc)[:model.config.block_size + 1])
        targets = torch.where(torch.from_numpy(chat.trained(ids.numpy()))[1:], ids[1:], -1)
        _, losses = model(ids[None, :-1], targets[None], per_token=True)
        total, count = total + losses.sum().item(), count + int((targets != -1).sum())
    return total / count


# ----------------------------------------------------------------------------------------------------
# The runs


def train(save_dir: Path, flags: list[str]) -> float | None:
    """train_gpt2.py with these flags, as a user runs it; its seconds (None: a finished run there is reused)."""
    if (save_dir / "latest.pt").exists():
        print(f"using the run in {save_dir} (delete it to train again)")
        return None
    command = [sys.executable, str(REPO / "train_gpt2.py"), *flags, "--save_dir", str(save_dir)]
    print("$ python train_gpt2.py " + " ".join(command[2:]), flush=True)  # as typed in the repository
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: the run failed:\n{result.stderr[-3000:]}")
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith(("conversations:", "summary:"))))
    return time.monotonic() - started


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise ValueError(f"must be NAME=FLAGS, not {text!r}")
    return name, shlex.split(flags)


def with_folder(flags: list[str], conversations: Path) -> list[str]:
    """A variant's flags with {data} the folder of the conversation files."""
    return [flag.replace("{data}", str(conversations)) for flag in flags]


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=REPO / "runs" / "chat", help="data, runs and checkpoints")
    p.add_argument("--pretrain_steps", type=positive_int, default=600)
    p.add_argument("--documents", type=positive_int, default=4000, help="pretraining documents")
    p.add_argument("--conversations", type=positive_int, default=4000, help="fine-tuning conversations")
    p.add_argument("--questions", type=positive_int, default=200, help="held-out conversations scored")
    p.add_argument("--max_tokens", type=positive_int, default=24, help="tokens a reply may take")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=FLAGS",
                   help="a fine-tune with these flags besides --chat's defaults, repeatable (default: one, the "
                        "defaults alone); each is trained from the same base and scored on the same questions")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    text, convs = write_data(args.folder / "data", args.documents, args.conversations)
    run = ["--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--eval_interval", "100",
           "--eval_iters", "5", "--data_cache", str(args.folder / "cache")]
    base = args.folder / "base"
    seconds = {"pretrain": train(base, ["--dataset", str(text), *SHAPE, "--max_steps", str(args.pretrain_steps),
                                        "--warmup_steps", "50", *run])}
    variants = dict(args.variant) or {"defaults": []}
    for name, flags in variants.items():
        seconds[name] = train(args.folder / f"tuned-{name}", ["--chat", "--init_from", str(base / "model_best_val.pt"),
                                                               "--dataset", str(convs), *run,
                                                               *with_folder(flags, convs.parent)])
    rng = random.Random(12345)
    held_out = [make_questions(rng) for _ in range(args.questions)]
    kinds = {"prices": [make_conversation(rng) for _ in range(args.questions)],
             "echo": [make_echo(rng) for _ in range(args.questions)]}
    with torch.inference_mode():
        base_model = load_model(str(base / "model_best_val.pt"))[0].eval()
        figures = {"base, chat prompt": score(base_model, held_out, args.max_tokens),
                   "base, plain text": score(base_model, held_out, args.max_tokens, plain=True)}
        for name in variants:
            tuned, info = load_model(str(args.folder / f"tuned-{name}" / "model_best_val.pt"))
            figures[f"fine-tuned {name}"] = score(tuned.eval(), held_out, args.max_tokens) | {
                "val_loss": info["val_loss"], **{f"{kind} loss": reply_loss(tuned, c) for kind, c in kinds.items()}}
    print(f"{'model':<32}{'right':>8}{'ended (<|assistant_end|>)':>28}{'stopped (any end)':>20}{'val loss':>10}"
          f"{'prices loss':>13}{'echo loss':>11}")
    for name, f in figures.items():
        losses = "".join(f"{f[key]:>{width}.4f}" for key, width in (("val_loss", 10), ("prices loss", 13),
                                                                     ("echo loss", 11)) if key in f)
        print(f"{name:<32}{f['right']:>8.1%}{f['ended']:>28.1%}{f['stopped']:>20.1%}{losses}")
    print(f"{figures['base, chat prompt']['questions']} held-out questions; seconds: {seconds}")
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps({"figures": figures, "seconds": seconds, "flags": vars(args)}, default=str,
                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
