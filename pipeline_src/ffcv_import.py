"""Import ffcv without the numba compile its import costs in every process.

`ffcv.fields.rgb_image` fills a two-entry `numba.typed.Dict` at import time, which JIT-compiles the
typed dict's methods: 10 s per process on this machine, longer than a CPU-profile epoch, paid by
every training job. The dict (`IMAGE_MODES`) is only read from Python, so a plain dict does the
same job. Every module that needs ffcv calls `import_ffcv()` before its first ffcv import.
"""
from __future__ import annotations

import sys

import numba.typed


def import_ffcv() -> None:
    """Import ffcv with `numba.typed.Dict` standing in as `dict` for the duration of the import."""
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
