"""One writer per output folder: a prepare per data dir, a training per run dir.

The lock is `<dir>/.lock`, held with `flock` (so the kernel frees it when its holder dies, even by
SIGKILL: a stale file left by a dead pid is simply taken over) and holding the holder's pid and host
for the message a second job gets. It is deleted on release.
"""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline_src.errors import InputError

LOCK_NAME = ".lock"


class LockedError(InputError):
    """Another live process is writing the same folder."""


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().split()
    except OSError:
        return "another process"
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else "another process"


@contextmanager
def dir_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `<folder>/.lock` for the block; raise LockedError naming the holder if a live one has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"{folder} is in use by {_holder(lock)} (lock file {lock}); wait for that job to finish, "
                "or stop it: the lock is freed when it exits"
            ) from None
        try:  # the holder before us may have deleted the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
