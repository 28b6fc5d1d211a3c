"""Starts the repository's scripts for the tests faster than a new interpreter does: this process imports torch
once (about 3.5 s of every run's start on a 2-core CPU, most of it torch._dynamo, which torch.optim imports), then
forks a child for each script. The child runs the script as __main__ with its own argv, environment, working
directory and files for stdin, stdout and stderr, and ends as any Python process ends (atexit, threads joined, a
traceback and exit 1 on an uncaught exception): only the imports are shared.

Requests come on stdin, one JSON object a line; for each, one line back: {"returncode": N} (-N for a signal) or
{"returncode": null} when its timeout killed it. helpers.run_script is the one client.
"""
import io
import json
import os
import runpy
import signal
import sys
import time

import torch  # noqa: F401  (the imports every child shares)
import torch._dynamo  # noqa: F401


def run_child(request: dict) -> None:
    """In the forked child: become the script's process, then run it; never returns to the request loop."""
    for fd, (path, flags) in enumerate([(request["stdin"], os.O_RDONLY), (request["stdout"], os.O_WRONLY),
                                        (request["stderr"], os.O_WRONLY)]):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    streams = [io.TextIOWrapper(io.FileIO(fd, "r" if fd == 0 else "w", closefd=False), encoding="utf-8",
                                errors="backslashreplace" if fd == 2 else "strict", write_through=True)
               for fd in range(3)]
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if request["argv"][0] == "-c":  # python -c CODE ARGS...: the code in __main__, from the working directory
        sys.argv, sys.path[0] = ["-c", *request["argv"][2:]], ""
        exec(compile(request["argv"][1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = request["argv"]
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)


def wait(pid: int, timeout: float) -> int | None:
    """The child's return code as subprocess gives it, or None after killing it at its timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            run_child(request)  # ends the child: its SystemExit or exception unwinds this loop too
        replies.write(json.dumps({"returncode": wait(pid, request["timeout"])}) + "\n")


if __name__ == "__main__":
    main()
