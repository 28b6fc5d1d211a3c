"""What every script here shares: one-line errors, number flags, files written atomically, the device.

Only the standard library is imported at the top (torch inside `pick_device`), so a script that needs
none of torch, such as `python data.py`, starts as quickly as before.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import io
import json
import os
import platform
import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

EOT = 50256  # GPT-2's <|endoftext|>: the separator after every document, and where generation stops
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


class UserError(Exception):
    """Something the user can fix (a path, a flag, a checkpoint, the network): printed as one line, exit 1."""


class DataError(UserError):
    """A problem with the data the user can fix (a path, a flag, the network)."""


class CheckpointError(UserError):
    """A checkpoint or weights directory the user pointed at that cannot be used."""


class SaveError(UserError):
    """A run's folder that could not be written (a full disk, the folder removed or replaced by a file)."""

    def __init__(self, path, error: BaseException):
        self.path = Path(path)
        super().__init__(f"cannot write {path} ({type(error).__name__}: {first_sentence(error)})")


def local_data_hint(chat: bool = False) -> str:
    """How to train from local files instead, ending each error of an unreachable Hub."""
    if chat:
        return ("to use your own conversations, pass --dataset PATH (.jsonl/.json/.parquet records of messages, a "
                "directory or a glob)")
    return "to use local text, pass --dataset PATH (a .txt/.jsonl/.json/.parquet file, a directory or a glob)"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), so every error stays one line."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def first_sentence(error: BaseException) -> str:
    """What an error says first, whole (torch's go on with advice of their own that a cut would leave half)."""
    return first_line(error, 10_000).split(". ")[0].rstrip(".")


# ----------------------------------------------------------------------------------------------------
# Output that outlives its reader


class _Forgiving(io.TextIOBase):
    """A text stream whose writes go on silently once its reader has gone (a closed pipe: EPIPE; the terminal
    of a dropped SSH session: EIO). Its file descriptor then points at /dev/null, so that the interpreter's
    own last flush at exit finds nothing to complain about either."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._forgiving(self._stream.write, text) or len(text)

    def flush(self) -> None:
        self._forgiving(self._stream.flush)

    def _forgiving(self, call, *args):
        try:
            return call(*args)
        except OSError:  # the reader has gone: nothing written from now on reaches anyone
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            with contextlib.suppress(OSError, ValueError):
                return call(*args)
        return None

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name):  # encoding, errors, buffer, ...: the stream's own
        return getattr(self._stream, name)


def forgive_gone_readers() -> None:
    """sys.stdout and sys.stderr as _Forgiving streams: a run whose terminal or pipe went away (an SSH
    connection dropped, `| tee log` stopped by the same Ctrl-C) goes on to save and stop, rather than dying
    at its next line of output."""
    import sys
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Forgiving):
            setattr(sys, name, _Forgiving(stream))


# ----------------------------------------------------------------------------------------------------
# Command lines


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line and a pointer to --help, instead of the whole usage block, and the
    closest flag or choice suggested for a mistyped one."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: see --help for the flags\n")

    def parse_args(self, args=None, namespace=None):
        # argparse's own, with the suggestion added to its message
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}{self._closest_flags(unknown)}")
        return parsed

    def _closest_flags(self, words: list[str]) -> str:
        """ (did you mean --batch_size?) for the unknown flags among `words` that resemble known ones."""
        known = [flag for action in self._actions for flag in action.option_strings]
        close = {}
        for flag in (word.split("=", 1)[0] for word in words if word.startswith("-")):
            close.update({flag: match for match in difflib.get_close_matches(flag, known, n=1)})
        if len(close) == 1:
            return f" (did you mean {next(iter(close.values()))}?)"
        return f" (did you mean {', '.join(f'{m} for {flag}' for flag, m in close.items())}?)" if close else ""

    def _check_value(self, action, value):
        # argparse's check of `choices` (it has no public hook), with the closest choice added; Python 3.14's
        # suggest_on_error says "maybe you meant", and then this adds nothing. The cutoff is above difflib's 0.6
        # so that "gpu" (0.67 like "cpu") is not taken for a typo of "cpu"; "cdua" (0.75) is one of "cuda".
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            matches = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=1, cutoff=0.7)
            if not matches or "maybe you meant" in e.message:
                raise
            raise argparse.ArgumentError(action, f"{e.message} (did you mean {matches[0]}?)") from None


def arg_type(cast, check, what: str):
    """An argparse `type=` for numbers: the value, or one line 'must be WHAT, not TEXT'."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
        if not check(value):  # also refuses nan, which fails every comparison
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    return parse


positive_int = arg_type(int, lambda v: v > 0, "a positive integer")
non_negative_int = arg_type(int, lambda v: v >= 0, "0 or more")
positive_float = arg_type(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = arg_type(float, lambda v: 0 <= v < float("inf"), "0 or more")
open_fraction = arg_type(float, lambda v: 0 < v < 1, "strictly between 0 and 1")
dropout_rate = arg_type(float, lambda v: 0 <= v < 1, "in [0, 1)")


# ----------------------------------------------------------------------------------------------------
# Devices


class UnusableGPU(UserError):
    """The machine has an NVIDIA GPU this torch cannot use: two lines, what is wrong and the fix."""


def pick_device(name: str = "auto", index: int = 0):
    """The torch.device for `--device NAME`; "cpu" never queries CUDA, so it is never initialised.

    "auto" takes CUDA, else Apple's MPS, else the CPU; but where the machine has an NVIDIA GPU that torch
    cannot use (a CPU-only build, or one for a newer CUDA than the driver's), UnusableGPU rather than a
    quiet run on the CPU. `index` is the GPU of this process (LOCAL_RANK).
    """
    import torch
    if name == "cpu":
        return torch.device("cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = next((kind for kind, ok in available.items() if ok), "cpu")
        gpu = nvidia_gpu() if name == "cpu" else None
        if gpu is not None:
            raise UnusableGPU(unusable_gpu_message(gpu, torch.__version__, torch.version.cuda))
    elif not available[name]:
        hint = "check nvidia-smi, or that torch is a CUDA build" if name == "cuda" else "it needs Apple silicon"
        raise UserError(f"--device {name}: this machine has none visible to PyTorch ({hint}); "
                        "use --device cpu")
    return torch.device(f"cuda:{index}" if name == "cuda" else name)


# PyTorch's CUDA wheel indexes (download.pytorch.org/whl/cuXXX), oldest first; aarch64 wheels are in cu128 and later.
CUDA_WHEEL_INDEXES = ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")


def nvidia_gpu() -> str | None:
    """The name of this machine's first NVIDIA GPU as `nvidia-smi -L` gives it ("an NVIDIA GPU" when only
    the driver's /proc entry says there is one), or None; within seconds either way."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout
        match = re.search(r"^GPU \d+: (.+?)(?: \(UUID|$)", listing, re.MULTILINE)
        if match:
            return match.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return "an NVIDIA GPU" if Path("/proc/driver/nvidia/version").exists() else None


def driver_cuda_version() -> str | None:
    """The newest CUDA the driver supports, from nvidia-smi's header ("CUDA Version: 12.4"), or None."""
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", header)
    return match.group(1) if match else None


def unusable_gpu_message(gpu: str, torch_version: str, torch_cuda: str | None) -> str:
    """What is wrong and the fix, a line each: the wheel index for the driver's CUDA, on any platform."""
    driver = driver_cuda_version()
    as_number = lambda v: tuple(map(int, v.split(".")))
    fitting = [v for v in CUDA_WHEEL_INDEXES if driver is None or as_number(v) <= as_number(driver)]
    index = "cu" + (fitting[-1] if fitting and driver else "12.8").replace(".", "")
    if torch_cuda is None:
        why = "plain pip install torch gives one on aarch64" if platform.machine() == "aarch64" else "a +cpu wheel"
        reason = f"it is a CPU-only build ({why})"
    elif driver and as_number(torch_cuda) > as_number(driver):
        reason = f"it is built for CUDA {torch_cuda} and the driver supports CUDA {driver} at most"
    else:
        reason = f"it is built for CUDA {torch_cuda} but sees no device (is the driver loaded? try nvidia-smi)"
    return (f"this machine has {gpu} but torch {torch_version} cannot use it: {reason}\n"
            f"fix: pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/{index} "
            f"(CUDA wheels for {platform.machine()}); or pass --device cpu to run on the CPU on purpose")


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 bf16 or AMX on x86, the BF16 ISA on Arm).

    Only then can bf16 weights be packed for it; elsewhere bf16 runs on aten's own kernels.
    ONEDNN_MAX_CPU_ISA=AVX2 turns it off (checked on torch 2.14.1).
    """
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: absent in builds without oneDNN
        return False


def cuda_has_bf16() -> bool:
    """Native bf16 only: older GPUs (V100, T4) emulate it, slower than fp16 with loss scaling."""
    import torch
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.5 has no such argument, and counts only native support
        return torch.cuda.is_bf16_supported()


# ----------------------------------------------------------------------------------------------------
# The network


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline(datasets: bool = False) -> bool:
    """Whether the Hugging Face libraries are told to stay offline: HF_HUB_OFFLINE, and for `datasets`
    also HF_DATASETS_OFFLINE (huggingface_hub reads only the first)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in names)


@functools.lru_cache(maxsize=1)
def network_errors() -> tuple[type[BaseException], ...]:
    """What the Hugging Face libraries raise when the network fails: OSError (requests', and most of datasets' and
    fsspec's), huggingface_hub's HTTP errors, httpx's and httpx2's (huggingface_hub 1.x and 2.x: a ConnectError is
    no OSError) and aiohttp's (fsspec's streaming)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for module, name in (("huggingface_hub.errors", "HfHubHTTPError"), ("httpx", "HTTPError"), ("httpx2", "HTTPError"),
                         ("aiohttp", "ClientError")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def check_hub_reachable(seconds: float, datasets: bool = False) -> None:
    """check_reachable for the Hub, skipped in offline mode (which fails at once by itself)."""
    if not hub_offline(datasets):
        check_reachable(hub_endpoint(), seconds)


def check_reachable(url: str, seconds: float) -> None:
    """Raises ConnectionError or TimeoutError within `seconds` when the host of `url` cannot be reached.

    Downloaders retry for long before giving up; this answers first. Behind a proxy a direct
    connection proves nothing, so it then returns at once.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    parts = urlsplit(url)
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    failure: list[OSError] = []

    def probe():
        try:
            socket.create_connection(address, timeout=seconds).close()
        except OSError as e:
            failure.append(e)

    # A thread, because name resolution has no timeout of its own.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer from {address[0]} in {seconds:.0f} s")
    if failure:
        raise ConnectionError(f"{address[0]}: {failure[0]}")


# ----------------------------------------------------------------------------------------------------
# Files written atomically


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success it replaces `path`, on an exception it is removed.

    A kill at any moment leaves either the old file or the new one, plus at worst a temporary that
    clean_temporaries() recognises by its name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _WRITING.add(tmp)
    try:
        yield tmp
        # The mode a new file gets: a library that writes through a temporary of its own (safetensors does)
        # leaves its 0600 on the file
        os.chmod(tmp, 0o666 & ~umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data must be on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _WRITING.discard(tmp)


_WRITING: set[Path] = set()  # the temporaries atomic_write has open in this process (any thread)


def write_json(path, obj) -> None:
    """`obj` as indented JSON at `path`, written atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def remove_own_temporaries() -> list[str]:
    """Removes the temporaries this process is writing, for an exit that will not finish them (a second
    Ctrl-C); their names, as removed."""
    removed = []
    for tmp in list(_WRITING):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(str(tmp))
    return removed


def umask() -> int:
    """This process's umask: from /proc (Linux) where it can be read without changing it, which setting it to
    read it would do for a moment, for every thread."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_temporaries(directory) -> int:
    """Removes the temporaries atomic_write left in `directory` when its process was killed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_file() and not _process_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0 checks existence only
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
