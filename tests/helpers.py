"""What the tests share: generated corpora and HellaSwag items, the tiny model's flags, and how a test runs
one of the repository's scripts as a user would (offline, one thread)."""
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import pytest
import common
import sources
import tokenizer

REPO = Path(__file__).resolve().parent.parent

_ADJECTIVES = ["quiet", "bright", "small", "heavy", "green", "early", "clever", "warm", "old", "round"]
_NOUNS = ["river", "engine", "garden", "teacher", "window", "market", "signal", "forest", "letter", "bridge"]
_VERBS = ["follows", "builds", "finds", "crosses", "paints", "opens", "carries", "watches", "moves", "keeps"]
# Multi-byte characters, so tokenization and streaming meet UTF-8 sequences that span tokens.
_EXTRAS = ["café", "naïve", "東京", "🙂", "Zürich", "Ωmega"]


def make_document(rng: random.Random, sentences: int) -> str:
    """One document of simple, learnable sentences (a tiny grammar, so small models can fit it)."""
    out = []
    for _ in range(sentences):
        a1, a2 = rng.choice(_ADJECTIVES), rng.choice(_ADJECTIVES)
        n1, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
        s = f"The {a1} {n1} {rng.choice(_VERBS)} the {a2} {n2}."
        if rng.random() < 0.1:
            s += f" {rng.choice(_EXTRAS)}"
        out.append(s)
    return " ".join(out)


def make_corpus(n_docs: int = 60, seed: int = 0, sentences: tuple[int, int] = (5, 30)) -> list[str]:
    """Deterministic generated documents; the same arguments always give the same text."""
    rng = random.Random(seed)
    return [make_document(rng, rng.randint(*sentences)) for _ in range(n_docs)]


_SYSTEMS = ["Answer in a few words.", "You name the last thing said.", "Be brief 🙂"]


def make_exchange(rng: random.Random) -> tuple[str, str]:
    """A user message of the tiny grammar and its reply: the sentence's last noun, which a small model learns."""
    a1, a2, n1, n2 = rng.choice(_ADJECTIVES), rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_NOUNS)
    asked = f"The {a1} {n1} {rng.choice(_VERBS)} the {a2} {n2}." + (f" {rng.choice(_EXTRAS)}" if rng.random() < 0.1 else "")
    return asked, f"The {n2}."


def make_conversation(rng: random.Random, exchanges: int, system: bool = False) -> list[dict]:
    """Messages in OpenAI's and Hugging Face's chat format: an optional system message, then user and assistant."""
    messages = [{"role": "system", "content": rng.choice(_SYSTEMS)}] if system else []
    for _ in range(exchanges):
        asked, answer = make_exchange(rng)
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
    return messages


def make_conversations(n: int = 200, seed: int = 0, exchanges: tuple[int, int] = (1, 2)) -> list[list[dict]]:
    """Deterministic generated conversations, a third with a system message."""
    rng = random.Random(seed)
    return [make_conversation(rng, rng.randint(*exchanges), system=rng.random() < 1 / 3) for _ in range(n)]


def write_conversations(path: Path, conversations: list[list[dict]]) -> Path:
    """JSON lines with a `messages` field, as chat datasets ship."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations),
                    encoding="utf-8")
    return path


def write_txt_dir(directory: Path, docs: list[str]) -> Path:
    """One .txt file per document, as users lay out their own text."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:05d}.txt").write_text(doc, encoding="utf-8")
    return directory


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc, "id": len(doc)}) + "\n")
    return path


def make_items(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped items of generated text; contexts of 1 to 5 sentences, some past 32 tokens."""
    rng = random.Random(seed)
    items = [{"ind": i, "activity_label": "generated", "ctx": make_document(rng, rng.randint(1, 5)),
              "endings": [make_document(rng, 1)[:rng.randint(8, 40)] for _ in range(4)], "label": rng.randrange(4)}
             for i in range(n)]
    items[-1]["endings"][2] = make_document(rng, 6)  # alone longer than the window: cut too
    return items


def write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


# A model small enough that a training step takes milliseconds on a CPU (the 50304-wide
# output layer dominates, so the width stays tiny).
TINY_MODEL_ARGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32"]


def child_env(**extra: str) -> dict:
    """The environment of every child process a test starts: offline (the Hub is out of reach here, and
    must never be asked), unbuffered, one thread (the tests run side by side on two cores), the caches of
    conftest's away_from_the_users_folders; then `extra`."""
    # PYTHONPATH: `python -c CODE` imports the repository's modules from any folder (a test's own, never this one).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def script_command(script: str, *args: str, torchrun_ranks: int = 0) -> list[str]:
    """The command line of one of the repository's scripts (under torchrun with that many ranks, if any)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(torchrun_ranks)] if torchrun_ranks else [sys.executable]
    return [*launcher, str(REPO / script), *args]


def run_script(script: str, *args: str, timeout: float = 300, env: dict | None = None,
               input: str | None = None, cwd: Path | None = None,
               torchrun_ranks: int = 0) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, offline, and capture its output: in `cwd` (by default
    the test process's own folder, never the repository, whose checkpoints/ may hold a user's run), in a process
    of its own, forked from a zygote that has imported torch (tests/zygote.py) unless the run needs a fresh interpreter
    (torchrun, or an environment that torch or Python read as they start)."""
    return run_command(script_command(script, *args, torchrun_ranks=torchrun_ranks), timeout, env, input, cwd,
                       fresh=bool(torchrun_ranks))


def run_command(command: list[str], timeout: float = 300, env: dict | None = None, input: str | None = None,
                cwd: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """run_script's way for a command line of this interpreter (a script, or -c CODE), `fresh` for one that
    must start a new interpreter."""
    cwd = cwd or Path.cwd()
    if fresh or any(name.startswith(FRESH_INTERPRETER) for name in env or {}):
        return subprocess.run(command, cwd=cwd, env=child_env(**(env or {})), capture_output=True, text=True,
                              timeout=timeout, input=input)
    return _ZYGOTE.run(command, cwd, child_env(**(env or {})), input, timeout)


# Variables read when the interpreter or torch starts, which a zygote's child would not see.
FRESH_INTERPRETER = ("PYTHON", "OMP_", "MKL_", "KMP_", "TORCH", "PYTORCH", "CUDA", "LD_")


class Zygote:
    """tests/zygote.py, started at this test process's first script run and asked for one run at a time."""

    def __init__(self):
        self.proc, self.lock = None, threading.Lock()

    def run(self, command: list[str], cwd, env: dict, input: str | None, timeout: float) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory() as folder:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "zygote.py")], cwd=REPO,
                                             env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            files = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
            files["stdin"].write_text(input or "", encoding="utf-8")
            for name in ("stdout", "stderr"):
                files[name].touch()
            request = {"argv": command[1:], "env": env, "cwd": str(cwd), "timeout": timeout,
                       **{name: str(path) for name, path in files.items()}}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            code = json.loads(self.proc.stdout.readline())["returncode"]
            out, err = (files[name].read_text(encoding="utf-8", errors="replace") for name in ("stdout", "stderr"))
        if code is None:
            raise subprocess.TimeoutExpired(command, timeout, out, err)
        return subprocess.CompletedProcess(command, code, out, err)


_ZYGOTE = Zygote()


def start_script(script: str, *args: str, env: dict | None = None, cwd: Path | None = None,
                 **popen) -> subprocess.Popen:
    """Start one of the repository's scripts in the background (to signal or kill it), output captured."""
    return subprocess.Popen(script_command(script, *args), cwd=cwd or Path.cwd(), env=child_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> bool:
    """Whether predicate() comes true within `timeout` seconds (checked every 10 ms, sleeping between);
    False at once if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def train_args(corpus_dir, data_cache, save_dir, *extra) -> list[str]:
    """train_gpt2.py's flags for the tiny model on a generated corpus, on the CPU, with `extra` last."""
    return ["--dataset", str(corpus_dir), "--data_cache", str(data_cache), "--save_dir", str(save_dir),
            *TINY_MODEL_ARGS, "--batch_size", "8", "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2",
            "--val_split", "0.1", "--num_workers", "0", "--no-amp", "--no-compile", "--device", "cpu", *extra]


def prepared_data(argv: list[str]) -> Path:
    """The prepared data a train_gpt2.py run with these flags used (a file's runs may share a data cache, each
    with data of its own)."""
    import data
    import train_gpt2
    return data.prepared(sources.DataSpec.from_args(train_gpt2.parse_args(argv)))


def metrics(save_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass  # no access log in the test output


@contextlib.contextmanager
def serving(directory: Path, name: str, monkeypatch, module, attribute: str):
    """`directory` over HTTP on this machine, with module.attribute (a download's address) pointed at its
    file `name`; the environment variable of that name and any proxy unset for the test."""
    for variable in (attribute, "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    server = HTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=partial(server.serve_forever, poll_interval=0.01), daemon=True).start()  # quick to shut down
    monkeypatch.setattr(module, attribute, f"http://127.0.0.1:{server.server_port}/{name}")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside the block: a tiny model's many small ops spend more time with two threads
    waiting for each other (in OpenMP barriers) than computing, most of all on cores shared with other tests."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Cut:
    """A HubStandIn fault: the answer's first `after` bytes, then the connection dropped; with `gone`, the stand-in
    stops answering at all (connections refused) from then on."""
    after: int
    gone: bool = False


@dataclass(frozen=True)
class Hold:
    """A HubStandIn fault: the answer's first `after` bytes, then nothing until `until` is set."""
    after: int
    until: threading.Event


class HubStandIn:
    """A stand-in for the Hugging Face Hub on 127.0.0.1 (huggingface_hub follows HF_ENDPOINT there): each
    repository's file list under `/api/datasets/{repo}/tree/{revision}` and its files under
    `/datasets/{repo}/resolve/{revision}/{file}`, answered as the Hub answers them (a commit and an ETag; 404 with
    the Hub's error codes; byte ranges, for a resumed download).

    Faults: `faults[name]` (a file's name, or LISTING for the file list) is a list of what its next requests get,
    one each: an HTTP status code, a Cut or a Hold; once it is empty they are answered as they should be.
    `bytes_per_s` throttles all the answers' bytes together, as one link would. Records: `served`, (name,
    time.monotonic()) as each answer ends whole; `asked`, (name, first byte) for each request of a file; `sent`,
    the bytes of each file sent.
    """

    LISTING = "(file list)"

    def __init__(self, repos: dict[str, Path], faults: dict[str, list] | None = None, bytes_per_s: float | None = None):
        import collections
        import hashlib
        import re
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        stand_in = self
        self.faults = {name: list(answers) for name, answers in (faults or {}).items()}
        self.served: list[tuple[str, float]] = []
        self.asked: list[tuple[str, int]] = []
        self.sent: collections.Counter = collections.Counter()
        self.gone = False  # after a Cut(gone=True): every connection dropped, new ones refused
        self._lock, self._free_at = threading.Lock(), 0.0  # the throttled link: when it is free again
        etags: dict[tuple, str] = {}

        def etag(path: Path) -> str:
            key = (path, path.stat().st_size, path.stat().st_mtime_ns)
            if key not in etags:
                etags[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            return etags[key]

        def fault(name: str):
            with stand_in._lock:
                answers = stand_in.faults.get(name)
                return answers.pop(0) if answers else None

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the Hub: a dropped connection is then an error, not an end

            def log_message(self, *args):
                pass

            def _refuse(self, status: int, code: str | None = None) -> None:
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def handle_one_request(self):
                if stand_in.gone:  # a connection kept open from before the stand-in went
                    self.close_connection = True
                    return
                super().handle_one_request()

            def do_GET(self):
                listing = re.match(r"^/api/datasets/([^/]+/[^/?]+)/tree/[^/?]+", self.path)
                if listing:
                    return self._listing(repos.get(listing[1]))
                path = self._file()
                if path is not None:
                    self._send(path, head=False)

            def do_HEAD(self):
                path = self._file()
                if path is not None:
                    self._send(path, head=True)

            def _listing(self, folder: Path | None) -> None:
                answer = fault(HubStandIn.LISTING)
                if isinstance(answer, int):
                    return self._refuse(answer)
                if folder is None:
                    return self._refuse(404, "RepoNotFound")
                body = json.dumps([{"type": "file", "path": f.name, "size": f.stat().st_size, "oid": "0" * 40}
                                   for f in sorted(folder.iterdir()) if f.is_file()]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self) -> Path | None:
                match = re.match(r"^/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", self.path)
                repo = repos.get(match[1]) if match else None
                path = repo / match[2] if repo else None
                if path is None or not path.is_file():
                    self._refuse(404, "EntryNotFound" if repo else "RepoNotFound")
                    return None
                return path

            def _send(self, path: Path, head: bool) -> None:
                size = path.stat().st_size
                ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                start = int(ranged[1]) if ranged else 0
                end = min(size, int(ranged[2]) + 1) if ranged and ranged[2] else size
                answer = None if head else fault(path.name)
                if isinstance(answer, int):
                    return self._refuse(answer)
                if not head:
                    with stand_in._lock:
                        stand_in.asked.append((path.name, start))
                self.send_response(206 if ranged else 200)
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", f'"{etag(path)}"')
                self.send_header("Content-Length", str(end - start))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                if head:
                    return
                try:
                    self._body(path, start, end, answer)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed, or stopped reading
                    return

            def _body(self, path: Path, start: int, end: int, answer) -> None:
                stop_at = min(end, start + answer.after) if answer is not None else end
                with open(path, "rb") as f:
                    f.seek(start)
                    at = start
                    while at < stop_at:
                        piece = f.read(min(1 << 16, stop_at - at))
                        stand_in._throttle(len(piece))
                        self.wfile.write(piece)
                        at += len(piece)
                        with stand_in._lock:
                            stand_in.sent[path.name] += len(piece)
                    if isinstance(answer, Hold):
                        self.wfile.flush()
                        answer.until.wait(300)
                        return self._body(path, at, end, None)
                if isinstance(answer, Cut):
                    self.close_connection = True
                    self.connection.shutdown(2)  # dropped mid-answer, as a failing server or link drops it
                    if answer.gone:
                        stand_in.gone = True
                        threading.Thread(target=stand_in.close, daemon=True).start()
                    return
                stand_in.served.append((path.name, time.monotonic()))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.bytes_per_s = bytes_per_s
        threading.Thread(target=partial(self.server.serve_forever, poll_interval=0.01), daemon=True).start()

    def _throttle(self, nbytes: int) -> None:
        """Waits for the link's turn to send nbytes at bytes_per_s, shared by every answer under way."""
        if not self.bytes_per_s:
            return
        with self._lock:
            self._free_at = max(time.monotonic(), self._free_at) + nbytes / self.bytes_per_s
            sent_by = self._free_at
        time.sleep(max(0.0, sent_by - time.monotonic()))

    def env(self) -> dict:
        """A child's environment that reaches this stand-in, and nothing else, as the Hub; an answer a test holds
        back (Hold) is waited for, rather than tried again once huggingface_hub's 10 s read timeout passes."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DOWNLOAD_TIMEOUT": "300", "HTTPS_PROXY": "", "HTTP_PROXY": "", "https_proxy": "",
                "http_proxy": ""}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_pretokenized(directory: Path, prefix: str, documents: list[str], shard_tokens: int,
                       val_documents: int) -> list[list[int]]:
    """llm.c's FineWeb layout from generated documents: `{prefix}_val_000000.bin` holds the first val_documents,
    then `{prefix}_train_000001.bin` ... shard_tokens each (documents cross shards), an <|endoftext|> before every
    document. The training documents' tokens, each with its <|endoftext|>."""
    import numpy as np
    from shards import write_shard
    enc = tokenizer.get_tokenizer()
    docs = [[common.EOT, *enc.encode_ordinary(text)] for text in documents]
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / f"{prefix}_val_000000.bin", [np.array([t for d in docs[:val_documents] for t in d])])
    stream = np.array([t for d in docs[val_documents:] for t in d])
    for i, start in enumerate(range(0, len(stream), shard_tokens)):
        write_shard(directory / f"{prefix}_train_{i + 1:06d}.bin", [stream[start:start + shard_tokens]])
    return docs[val_documents:]


@contextlib.contextmanager
def llama_cpp_process():
    """llama.cpp in a child process for a test (export_gguf.LlamaCppProcess): a crash in it fails the test in one
    line naming the signal and the file, rather than taking pytest-xdist's worker with it."""
    import export_gguf
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -r requirements-dev.txt)")
    with export_gguf.LlamaCppProcess() as llama:
        llama.start()  # its seconds of start-up beside the test's own work
        try:
            yield llama
        except export_gguf.LlamaCppCrashed as e:
            pytest.fail(str(e), pytrace=False)
