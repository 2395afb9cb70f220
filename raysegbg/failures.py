"""Turn the failures users cannot fix by reading a traceback into one line that says what to do.

Ray's memory monitor kills a worker when its node's memory passes a threshold (95 % by
default); Ray Train then reports the failure as a multi-page chain of exceptions whose only
useful part is one sentence deep inside it ("Memory on the node ... was 21.3GB / 23.5GB
(0.906), which exceeds the memory usage threshold of 0.9"). `explain` finds that sentence in the
chain and says what it means and what to change.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from raysegbg.errors import RaysegbgError

_OOM_MARKERS = ("OutOfMemoryError", "running low on memory", "killed by the memory monitor")
# Ray 2.60: "... was 1.72GB used / 23.54GB limit (0.073)", "threshold of 1263810176B (5.0% of
# 25276203008B limit)", "Selected to kill: (Task: ..., task name=TrainController.__init__, ...,
# actual memory used=0.04GB, ...)"; older releases: "was 21.3GB / 23.5GB ... threshold of 0.95"
_USAGE = re.compile(r"was ([\d.]+)\s*GB(?: used)?\s*/\s*([\d.]+)\s*GB")
_THRESHOLD = re.compile(r"\(([\d.]+)% of \d+B limit\)|memory usage threshold of ([\d.]+)")
_VICTIM = re.compile(r"task name=([\w.]+).*?actual memory used=([\d.]+)\s*GB")


def _chain_text(exc: BaseException) -> str:
    """Every message in the exception's cause/context chain (Ray nests the real cause)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def explain(exc: BaseException, what: str = "the run") -> RaysegbgError | None:
    """A one-line error for a failure with a known cause (memory pressure), else None."""
    text = _chain_text(exc)
    if not any(marker in text for marker in _OOM_MARKERS):
        return None
    usage = _USAGE.search(text)
    limit = _THRESHOLD.search(text)
    victim = _VICTIM.search(text)
    measured = ""
    if usage:
        measured = (
            f": the node used {float(usage.group(1)):.2f} GB of {float(usage.group(2)):.2f} GB"
        )
        if limit:
            share = float(limit.group(1)) / 100 if limit.group(1) else float(limit.group(2))
            measured += f", above Ray's limit of {share:.0%}"
    killed = "a process"
    if victim:  # the task or actor Ray chose, and what it held
        killed = f"{victim.group(1).split('.')[0]} ({float(victim.group(2)):.2f} GB)"
    return RaysegbgError(
        f"{what} stopped: Ray killed {killed} because the node ran out of memory{measured}; "
        "lower train.batch_size or data.crop_size, run fewer scaling.workers per node, "
        "or use a node with more memory"
    )


# Set by the command line (`raysegbg.cli.main`): a library caller's process is never ended here.
EXIT_IF_LOCAL_HEAD_DIES = False


def head_processes(parent: int | None = None) -> dict[int, str]:
    """The children of `parent` (this process) named gcs_server or raylet: the Ray head it
    started (Linux /proc; {} elsewhere)."""
    parent = os.getpid() if parent is None else parent
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid, rest = stat.read_text().split(" (", 1)
            name, fields = rest.rsplit(") ", 1)
            if int(fields.split()[1]) == parent and name in ("gcs_server", "raylet"):
                found[int(pid)] = name
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed child stays listed until Ray reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def watch_local_head(poll_s: float = 1.0) -> None:
    """When this process started its own Ray, end it with one line as soon as Ray's head
    processes (gcs_server, raylet) die, e.g. to the kernel's OOM killer. Without this, Ray's
    driver waits 60 s for the GCS and then exits with a C++ log line, or hangs in a Ray call."""
    if not EXIT_IF_LOCAL_HEAD_DIES:
        return
    import ray

    head = head_processes()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            gone = sorted({name for pid, name in head.items() if not _alive(pid)})
            if not gone:
                continue
            if not ray.is_initialized():  # ray.shutdown() disconnects first, then stops them
                return
            print(
                f"error: this run's local Ray stopped ({', '.join(gone)} died: killed for memory? "
                "see `dmesg`); run the same command again to resume from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            os._exit(3)

    if head:
        threading.Thread(target=watch, name="raysegbg-head-watch", daemon=True).start()


@contextlib.contextmanager
def on_sigterm(handler: Callable[[Any], None]) -> Iterator[None]:
    """While inside, SIGTERM (`kill`, a scheduler) calls `handler(previous)` (`previous`: the
    handler it replaced, e.g. Ray's, which aborts the driver); restored on exit. Only the main
    thread may set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handler(previous))
    previous = previous or signal.SIG_DFL  # None: set outside Python
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
