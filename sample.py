"""Talk to a trained GPT-2: continue a prompt, or each line typed, streaming the text as it is generated.

    python sample.py --interactive --stream --checkpoint ./checkpoints/model_best_val.pt --cpu --max_tokens 50
    python sample.py --prompt "The quiet river" --num_samples 3 --stream
    python sample.py --prompt story.txt --temperature 0          # a file's contents as the prompt, greedy
    printf 'first prompt\\nsecond prompt\\n' | python sample.py --interactive
    python sample.py --chat --checkpoint checkpoints/chat/model_best_val.pt --system "Answer briefly."

--checkpoint takes our .pt (best or latest), a save_pretrained directory (GPT-2, or our export) or, online,
a Hub name such as gpt2. The model and its generation are model.py's, the weights' layouts for fast
decoding on a CPU (and the probe behind --dtype auto there) cpu_decoding.py's; this file talks.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

import chat
import cpu_decoding
from checkpoint import describe, load_model
from common import EOT, ArgumentParser, UserError, arg_type, cuda_has_bf16, pick_device, positive_int
from model import GPT, PromptCache
from tokenizer import get_tokenizer, user_cache_dir

# Text files a --prompt naming a missing file most likely meant (so it is reported, not continued as text).
PROMPT_FILE_SUFFIXES = (".txt", ".md", ".text", ".prompt")


class SampleError(UserError):
    """A flag or file the user can fix."""


# ----------------------------------------------------------------------------------------------------
# Command line


temperature = arg_type(float, lambda v: v >= 0, "0 (greedy) or more")
probability = arg_type(float, lambda v: 0 < v <= 1, "in (0, 1]")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", default="./checkpoints/model_best_val.pt",
                   help="our .pt checkpoint, a save_pretrained directory, or a Hub name (default %(default)s)")
    p.add_argument("--interactive", action="store_true",
                   help="continue each line typed (or piped in) on its own, streamed; Ctrl-D, exit or quit ends")
    p.add_argument("--chat", action="store_true",
                   help="talk in turns to a model fine-tuned on conversations (train_gpt2.py --chat): each line typed "
                        "(or piped in) is your turn, the reply streams and ends on its own; /reset forgets the "
                        "conversation; Ctrl-D, exit or quit ends")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: the system message the conversation opens with")
    p.add_argument("--stream", action="store_true", help="print --prompt's continuation token by token (--interactive always does)")
    p.add_argument("--prompt", default=None,
                   help="text to continue, or the path of a file holding it (default: unconditional samples)")
    p.add_argument("--num_samples", type=positive_int, default=1,
                   help="continuations of --prompt (default %(default)s)")
    p.add_argument("--max_tokens", type=positive_int, default=200,
                   help="new tokens per continuation at most (default %(default)s)")
    # nanoGPT's defaults: 0.8 keeps samples varied but coherent; top-k 200 trims the long tail for 0.2 ms a
    # token, where top-p alone sorts the whole 50257-token distribution (about 4 ms, ~15% of a bf16 step).
    p.add_argument("--temperature", type=temperature, default=0.8, help="0 is greedy (default %(default)s)")
    p.add_argument("--top_k", type=positive_int, default=200,
                   help="sample among the k likeliest tokens (default %(default)s)")
    p.add_argument("--top_p", type=probability, default=None, help="nucleus sampling: the likeliest tokens "
                   "covering this probability (default off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: different each run)")
    p.add_argument("--ignore_eot", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: an NVIDIA GPU, else Apple's MPS, else the CPU (default %(default)s)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU and never touch CUDA (= --device cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "int8", "int4"], default="auto",
                   help="int8: int8 weights; int4: int4 weights in groups of 32, the output layer int8; both with "
                        "bf16 activations, CPU only. auto: on a CPU the fastest of the four there (measured once), "
                        "bfloat16 on CUDA, else float32 (default %(default)s)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cpu and args.device not in ("auto", "cpu"):
        p.error(f"--cpu and --device {args.device} contradict each other; pass one of them")
    if (args.interactive or args.chat) and args.prompt is not None:
        p.error(f"--{'chat' if args.chat else 'interactive'} reads prompts from the terminal (or piped input); "
                "leave out --prompt")
    if args.system is not None and not args.chat:
        p.error("--system opens a conversation: it needs --chat")
    return args


# ----------------------------------------------------------------------------------------------------
# Device, precision, model


def pick_dtype(name: str, device: torch.device, say=None) -> torch.dtype:
    """--dtype's precision. Decoding one token reads every weight once, so it is memory-bound: bf16 halves
    the bytes per token, int8 weights halve them again, int4 again (torch.int8 and torch.int4 stand for
    cpu_decoding.py's layouts, with bf16 activations); on a CPU auto takes whichever a probe found fastest
    on this CPU; say(line) is told when it could not (unprobed)."""
    if name in ("int8", "int4") and device.type != "cpu":
        raise SampleError(f"--dtype {name} runs on the CPU only; on {device.type} use --dtype bfloat16")
    if name == "int4" and not cpu_decoding.HAS_INT4:
        raise SampleError(f"--dtype int4 needs torch 2.6 or later (this is {torch.__version__}): pip install -U torch")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16() else torch.float32
    if device.type == "cpu":
        return cpu_decoding.fastest_layout(user_cache_dir(),  # cached beside the tokenizer's ranks
                                           note=lambda why: say(unprobed(why)) if say else None)
    return torch.float32  # MPS: bf16 needs macOS 14, fp32 works everywhere


def unprobed(why: str) -> str:
    """The note for --dtype auto that could not time the precisions on this CPU: float32 for now, why, and how to
    choose."""
    return (f"note: --dtype auto decodes in float32 this time: {why}; the next start times them again, or choose one: "
            "--dtype int4 (the fastest on most CPUs), int8 or bfloat16")


def load(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[GPT, dict]:
    """model.py's load_model, moved to the device and precision decoding runs in (on a CPU, laid out for
    its kernels: int8 or int4 quantized, bf16 packed for oneDNN where that is fast)."""
    model, info = load_model(spec)  # info["params"] counts before quantizing unties the head
    if device.type == "cpu":
        return cpu_decoding.to_layout(model, dtype), info
    return model.to(device=device, dtype=dtype).eval(), info


# ----------------------------------------------------------------------------------------------------
# Text in, text out


def read_prompt(value: str) -> str:
    """--prompt's text: the contents of the file it names, or else the text itself.

    A single word that looks like a path (./x, ~/x, /x, or a .txt/.md name) but names no file is an
    error rather than a prompt: it is far likelier a mistyped path than text to continue.
    """
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # too long or odd (a NUL) to be a path: plain text
        return value
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read the prompt file {path}: {e}") from None
    looks_like_path = value.startswith(("/", "./", "../", "~")) or path.suffix in PROMPT_FILE_SUFFIXES
    if looks_like_path and not any(c.isspace() for c in value):
        raise SampleError(f"no prompt file at {path}")
    return value


def encode_prompt(enc, text: str) -> list[int]:
    """Token ids to continue; an empty prompt starts a new document from <|endoftext|>, as GPT-2 samples do.

    A literal <|endoftext|> typed in a prompt is the separator token: the user wrote it on purpose. The chat
    turns' spellings stay text: only a conversation's rendering (chat.py) puts those tokens.
    """
    return enc.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=()) or [EOT]


def decode_stream(enc, tokens: Iterable[int]) -> Iterator[str]:
    """Text for each token as it comes; a UTF-8 character whose bytes span tokens comes out whole, once."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        text = decoder.decode(enc.decode_single_token_bytes(token))
        if text:
            yield text
    tail = decoder.decode(b"", final=True)  # bytes of a character the model never finished
    if tail:
        yield tail


@dataclass(frozen=True)
class Sampling:
    """How each continuation is drawn (the flags of those names)."""
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    ignore_eot: bool
    generator: torch.Generator

    @classmethod
    def from_args(cls, args: argparse.Namespace, generator: torch.Generator) -> "Sampling":
        return cls(args.max_tokens, args.temperature, args.top_k, args.top_p, args.ignore_eot, generator)


def continue_text(model: GPT, enc, prompt: str, how: Sampling, stream: bool) -> None:
    """Print the prompt and the model's continuation of it, piece by piece as generated when streaming."""
    tokens = model.generate(encode_prompt(enc, prompt), how.max_tokens, temperature=how.temperature,
                            top_k=how.top_k, top_p=how.top_p, generator=how.generator,
                            stop_at_eot=not how.ignore_eot)
    pieces = decode_stream(enc, tokens)
    if not stream:
        print(prompt + "".join(pieces), flush=True)
        return
    print(prompt, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print(flush=True)


# ----------------------------------------------------------------------------------------------------
# The two ways to run


def typed_lines(terminal: bool) -> Iterator[str]:
    """Non-empty lines until end of input, `exit` or `quit`; on a terminal after a "> " prompt."""
    while True:
        try:
            line = input("> ") if terminal else sys.stdin.readline()
        except EOFError:  # Ctrl-D at the prompt
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh one, as a shell does
            if not terminal:
                raise
            print()
            continue
        if not terminal and not line:  # end of piped input
            return
        line = line.rstrip("\r\n")
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line


@contextlib.contextmanager
def stoppable(terminal: bool):
    """On a terminal, Ctrl-C stops what is being generated, not the program; with piped input no one is at a
    prompt, so Ctrl-C ends the run."""
    try:
        yield
    except KeyboardInterrupt:
        if not terminal:
            raise
        print("\n[stopped]", flush=True)


def interactive(model: GPT, enc, how: Sampling) -> None:
    """Continue each line typed, streamed; on a terminal Ctrl-C stops a continuation, not the program."""
    terminal = sys.stdin.isatty()
    for line in typed_lines(terminal):
        with stoppable(terminal):
            continue_text(model, enc, line, how, stream=True)


RESET = "/reset"  # typed as a turn, forgets the conversation


def talk(model: GPT, enc, how: Sampling, system: str | None) -> None:
    """--chat: each line is the user's turn, the reply streams until the model ends its turn; the history is
    kept, cropped from the front (whole exchanges first) to the model's context. On a terminal Ctrl-C stops a
    reply (what was said of it stays in the history), not the program."""
    terminal, context = sys.stdin.isatty(), model.config.block_size
    try:
        conversation = chat.Conversation(enc, context, system)
    except ValueError as e:
        raise SampleError(f"--system: {e}") from None
    room = min(how.max_tokens, context // 2)  # tokens kept free for the reply when the history is cropped
    kept = PromptCache()  # the history already run: each turn feeds only what follows it
    for line in typed_lines(terminal):
        if not terminal:  # piped: the user's turns in the output too, so that it reads as a transcript
            print(f"> {line}", flush=True)
        if line.strip() == RESET:
            conversation.reset()
            print("[the conversation starts again]", flush=True)
            if not terminal:
                print(flush=True)
            continue
        prompt, dropped = conversation.ask(line, room)
        if dropped:
            print(f"[{dropped} earlier exchange(s) no longer fit in the model's context of {context} tokens]",
                  file=sys.stderr, flush=True)
        limit = min(how.max_tokens, context - len(prompt))  # never past the context: the window never slides
        reply = chat.Reply(model.generate(prompt, limit, temperature=how.temperature, top_k=how.top_k,
                                          top_p=how.top_p, generator=how.generator, stop_at_eot=False,
                                          reuse=kept))
        with stoppable(terminal):
            for piece in decode_stream(enc, reply):
                print(piece, end="", flush=True)
            print(flush=True)
            if reply.end is None:
                print(f"[the reply was cut at {limit} tokens (--max_tokens, or the context's end)]",
                      file=sys.stderr, flush=True)
        if not terminal:
            print(flush=True)  # an empty line between exchanges
        conversation.answered(reply.tokens)


def samples(model: GPT, enc, how: Sampling, prompt: str, count: int, stream: bool) -> None:
    """The prompt (empty: unconditional) continued --num_samples times."""
    for i in range(count):
        if i:
            print("---------------")
        continue_text(model, enc, prompt, how, stream=stream)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh random seed: each run samples differently
    else:
        generator.manual_seed(seed)
    return generator


def run(args: argparse.Namespace) -> None:
    prompt = read_prompt(args.prompt) if args.prompt is not None else ""  # a bad file fails before loading
    device = pick_device("cpu" if args.cpu else args.device)
    notes = []  # said once the model is there, after the line saying what runs where
    dtype = pick_dtype(args.dtype, device, say=notes.append)
    model, info = load(args.checkpoint, device, dtype)
    enc = get_tokenizer()
    print("\n".join([describe(model, info, device, dtype), *notes]), file=sys.stderr, flush=True)
    how = Sampling.from_args(args, make_generator(args.seed, device))
    if args.chat:
        if not chat.knows_turns(model.config):
            raise SampleError(f"{args.checkpoint} was not fine-tuned on conversations (it has no turn tokens): "
                              "fine-tune it with train_gpt2.py --chat --init_from (README, \"Chat\"), or talk to it "
                              "without --chat")
        talk(model, enc, how, args.system)
        return
    if chat.knows_turns(model.config):
        print(f"note: {args.checkpoint} was fine-tuned on conversations: sample.py --chat talks to it in turns "
              "(plain sampling prints its turn tokens, <|user_start|> and the like, as text)", file=sys.stderr,
              flush=True)
    if args.interactive:
        interactive(model, enc, how)
    else:
        samples(model, enc, how, prompt, args.num_samples, args.stream)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(errors="replace")  # a console without UTF-8 shows '?' rather than crashing
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's status for a run ended by Ctrl-C, without a traceback
    except BrokenPipeError:  # the reader left (| head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
