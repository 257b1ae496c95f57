"""Who else is running: a lock on a live sampler checkpoint, and a watch on the process that
started a job.

* Two runs that share a results folder (two clones of the repository with the same absolute
  ``results_dir``, or a command started by hand beside the workflow) would otherwise both
  resume and rewrite one checkpoint. :func:`exclusive_lock` holds a POSIX record lock on a
  ``.lock`` file beside it for the whole run; the kernel (or the NFS lock manager) drops it
  when the process ends, however it ends, so a killed run never leaves a stale lock.
* A job whose Snakemake was killed (SIGKILL, a lost terminal) would run on as an orphan,
  still writing its checkpoint. The workflow exports ``BAYESTUNE_WATCH_PID`` (its own process,
  the job shell's parent) and :func:`watch_parent` stops the job once that process is gone.
"""

from __future__ import annotations

import _thread
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bayestune.errors import RunFailedError

log = logging.getLogger(__name__)

WATCH_ENV = "BAYESTUNE_WATCH_PID"
WATCH_SECONDS = 2.0  # how often the watched process is looked for
PARENT_GONE = threading.Event()  # set just before the watch interrupts the main thread


class BusyError(RunFailedError):
    """Another live process holds the lock on a file this run would write."""


def lock_path(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    return target.with_name(target.name + ".lock")


@contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold the lock on ``path`` (a checkpoint) while the block runs; raise :class:`BusyError`
    naming the other run when it is held. The lock file is removed on the way out."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise BusyError(f"{what} {path} is in use by another run ({holder}); wait for it "
                            "to end or stop it: two runs on one checkpoint would overwrite "
                            "each other's chain. Two clones of the repository need different "
                            "results_dir folders") from None
        # The previous holder may have removed the file between our open and our lock: then
        # we hold a lock on a file nobody else can find, so start over.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "cwd": os.getcwd(), "since": time.ctime()}).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"process {record['pid']} on {record['host']}, started in {record['cwd']} at "
                f"{record['since']}")
    except (OSError, ValueError, KeyError):
        return "a process that left no record"


# --- the process that started this job ------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc), None when there is no such process;
    with the pid it identifies one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def watch_parent(environ: dict[str, str] | None = None) -> int | None:
    """With ``BAYESTUNE_WATCH_PID`` set, stop this process (KeyboardInterrupt in the main
    thread, then a hard exit if it does not end) once that process is gone, at once if it is
    gone already (its Snakemake was killed while this job started). Returns the pid watched
    (None: nothing to watch, or no /proc to watch it by)."""
    text = (environ if environ is not None else os.environ).get(WATCH_ENV, "")
    if not text.strip().isdigit() or not Path("/proc/self/stat").is_file():
        return None
    pid = int(text)
    if pid == os.getpid():
        return None
    started = _start_time(pid)
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL)):
        # A job started in the background by a shell inherits SIGINT ignored, and
        # interrupt_main() then does nothing; the watch needs Python's own handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        while started is not None and _start_time(pid) == started:
            time.sleep(WATCH_SECONDS)
        log.error("the process that started this job (pid %d, e.g. Snakemake) is gone; "
                  "stopping so that no orphan keeps writing", pid)
        PARENT_GONE.set()
        _thread.interrupt_main()
        time.sleep(60)  # stuck in a long native call: leave the hard way
        os._exit(130)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
    return pid
