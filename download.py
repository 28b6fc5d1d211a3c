"""Files of a Hugging Face Hub repository downloaded into a folder that every run of the machine shares, readable
as their bytes arrive.

huggingface_hub's hf_hub_download keeps a file behind a temporary `.incomplete` of its own until all of it is
there, so nothing can be read before the end; and when a request fails, it raises an error that says "no such
file". Here a file is fetched with HTTP Range requests on huggingface_hub's own session, address and headers
(HF_ENDPOINT and HF_TOKEN honoured, redirects followed) and appended in place, under a lock of its own: the file
is always the first bytes of the Hub's, so its length is where the next try, run or process goes on, and every
byte written can be read at once. A second process that wants the same file waits for the lock and reads what
the first writes; the kernel lets a killed process's lock go.

A request that fails for the network or the server (`retryable`) is tried again from where the file stopped,
RETRY_WAIT_S apart; a try that brought bytes starts the count again. What still fails is a DataError naming the
Hub and the way on.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, TypeVar

from common import DataError, first_line, hub_endpoint, network_errors
from shards import PreparationStopped

RETRY_WAIT_S = (5.0, 10.0, 20.0)  # before the 2nd, 3rd and 4th try of a request that failed and brought nothing
FOLLOW_S = 0.2  # how often a process waiting for another's download of a file tries its lock again
T = TypeVar("T")


def retryable(error: BaseException) -> bool:
    """Whether a request's error is the network's or the server's, worth trying again: a connection refused,
    reset or timed out (httpx's errors are no OSError), a 5xx, 408 or 429; not an answer such as 404 or 401,
    nor HF_HUB_OFFLINE."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status in (408, 429) or status >= 500
    return isinstance(error, network_errors())


def retrying(call: Callable[[], T], what: str, stop: threading.Event, progress: Callable[[], int] = lambda: 0) -> T:
    """call(), tried again after each retryable error (a rise in progress() since the last try starts the count
    again); what is not retryable is raised at once, DataError once RETRY_WAIT_S are spent, PreparationStopped if `stop` is
    set while waiting."""
    tries, reached = 0, progress()
    while True:
        try:
            return call()
        except Exception as e:
            if not retryable(e):
                raise
            tries, reached = (1, progress()) if progress() > reached else (tries + 1, reached)
            if tries > len(RETRY_WAIT_S):
                raise DataError(f"{what} from the Hugging Face Hub at {hub_endpoint()} failed {tries} times in a row "
                                f"({type(e).__name__}: {first_line(e)}); what was downloaded is kept: run the same "
                                "command again to continue") from None
            if stop.wait(RETRY_WAIT_S[tries - 1]):
                raise PreparationStopped from None


class Download:
    """The first `want` bytes of a file of a Hub dataset, into `folder / filename`, on a thread of its own (a
    daemon: an error elsewhere never waits for it). `length` is how many are there, readable, at any moment;
    `error` is what stopped it; cancel() stops it between two pieces, keeping what it wrote."""

    def __init__(self, repo_id: str, filename: str, folder: Path, want: int):
        self.repo_id, self.filename, self.want = repo_id, filename, want
        self.path = folder / filename
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"downloading {filename}")
        self._thread.start()

    @property
    def length(self) -> int:
        try:
            return min(self.path.stat().st_size, self.want)
        except FileNotFoundError:
            return 0

    def cancel(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            self._fetch()
        except PreparationStopped:
            pass
        except BaseException as e:  # read by the owner (fineweb.prepare), which raises it
            self.error = e

    def _fetch(self) -> None:
        from filelock import FileLock, Timeout
        lock = FileLock(self.path.parent / f".{self.filename}.lock")
        while self.length < self.want:
            if self._stop.is_set():
                raise PreparationStopped
            try:
                lock.acquire(timeout=FOLLOW_S)
            except Timeout:
                continue  # another process downloads it: its bytes are read as they come
            try:
                if self.length >= self.want:  # another process finished it while this one waited for the lock
                    return
                with open(self.path, "ab") as f:  # appended to what an earlier try, run or process left
                    retrying(lambda: self._receive(f), f"downloading {self.filename} of {self.repo_id}", self._stop,
                             f.tell)
            finally:
                lock.release()

    def _receive(self, f) -> None:
        """The bytes from f's end up to `want`, appended from one GET with a Range; ConnectionError if the answer
        ends before them."""
        from huggingface_hub import constants, get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
        start = f.tell()
        # identity: the offsets are the file's own bytes, never those of a compressed answer
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{self.want - 1}", "Accept-Encoding": "identity"}
        url = hf_hub_url(self.repo_id, self.filename, repo_type="dataset")
        with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                  follow_redirects=True) as response:
            hf_raise_for_status(response)
            skip = 0 if response.status_code == 206 else start  # a server that ignores ranges sends it all again
            for chunk in response.iter_bytes():
                if self._stop.is_set():
                    raise PreparationStopped
                chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                self._append(f, chunk[:self.want - f.tell()])
                if f.tell() >= self.want:
                    return
        raise ConnectionError(f"the answer ended at byte {f.tell():,} of {self.want:,}")

    def _append(self, f, chunk: bytes) -> None:
        try:
            f.write(chunk)
            f.flush()  # readable by the training (and other processes) before its length says it is there
        except OSError as e:
            raise DataError(f"cannot write {self.path} ({e.strerror or e}); what was downloaded is kept: make room "
                            "and run the same command again") from None
