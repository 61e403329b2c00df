"""The epoch half of every draw key, readable from the loader's compiled code.

numba freezes arrays captured in closures, so compiled ops read (seed, epoch) from a fixed buffer
by its address, and the loader updates that buffer before each epoch.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from ffcv.utils import cast_int_to_byte_ptr


class EpochState:
    """(seed, epoch) in a buffer whose address compiled ops read; `set_epoch` before each epoch."""

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.buffer = np.array([seed, 0], dtype=np.int64)
        self.address = self.buffer.ctypes.data

    @property
    def seed(self) -> int:
        return int(self.buffer[0])

    @property
    def epoch(self) -> int:
        return int(self.buffer[1])

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.buffer[1] = epoch



@njit(cache=True)
def read_state(address):
    """(seed, epoch) from the EpochState buffer at `address`; cached, unlike a closure over the address.

    Call it as read_state(np.int64(address)) from compiled code: an int captured by a closure is
    typed as a literal, and its value (the address) would be a new signature, compiled, per process.
    """
    view = carray(cast_int_to_byte_ptr(address), 16).view(np.int64)
    return view[0], view[1]
