"""One error convention for every stage: library code raises `InputError`, entry points use `run_main`.

A bad params file, a missing or corrupt input, an unreachable tracking store or a full disk is the
user's to fix, so it ends the stage with one message on stderr that names the file or key and what
to do, exit status 2, and no traceback. Anything else is a bug and keeps its traceback (status 1).
"""
from __future__ import annotations

import atexit
import errno
import gc
import sys
from typing import Callable

INPUT_ERROR = 2  # exit status: bad input or environment; the message says what to fix
DIVERGED = 3  # exit status: training diverged (non-finite loss)


class InputError(Exception):
    """Base of every error the user fixes (params, data, checkpoint, tracking, loader, disk)."""

    exit_status = INPUT_ERROR


def os_error_message(exc: OSError) -> str:
    """`<file>: <reason>; <what to do>` for an OSError, which often carries no path of its own."""
    where = exc.filename if exc.filename is not None else "(no file named)"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    hints = {
        errno.ENOSPC: "free some space (or point paths.* at a larger disk) and re-run: the stage resumes",
        errno.EDQUOT: "free some space within your quota and re-run: the stage resumes",
        errno.EACCES: "make it readable/writable for this user, or point the params at another folder",
        errno.EROFS: "point the params at a writable folder",
        errno.ENOENT: "check the path in the params file or run the stage that writes it first",
    }
    hint = hints.get(exc.errno, "fix the file or folder named and re-run")
    return f"{where}: {reason}; {hint}"


def run_main(stage: str, body: Callable[[], object]) -> int:
    """Run a stage's body (its int result is the exit status, anything else means 0); known input and
    environment errors become one stderr line and their status."""
    # At exit the interpreter's last garbage collection walks every object torch, numba and MLflow
    # made: 1.3-1.5 s a process (bench/README.md). Frozen objects are skipped; the OS frees them.
    atexit.unregister(gc.freeze)  # once, however many stages a process runs (the tests)
    atexit.register(gc.freeze)
    try:
        result = body()
        return result if isinstance(result, int) else 0
    except InputError as exc:
        message = str(exc)
        status = exc.exit_status
    except OSError as exc:  # disk full, permissions, missing file: the environment, not the code
        message = os_error_message(exc)
        status = INPUT_ERROR
    except UnicodeDecodeError as exc:
        message = f"a file is not valid UTF-8 text ({exc}); replace it or re-run the stage that writes it"
        status = INPUT_ERROR
    print(f"{stage}: error: {message}", file=sys.stderr, flush=True)
    return status

