"""The DRAM budget: one anonymous mapping of exactly `budget_bytes` holding every streamed weight.

All weight bytes the engine holds (hot cache, preload buffers, on-demand buffer, the O_DIRECT
bounce buffer) are carved from this arena at start-up; the reader refuses to write anywhere
else (`contains`), so "the budget is never exceeded" is a property of the addresses, not a
promise. Allocation is a bump pointer: the engine sizes everything once.
"""

from __future__ import annotations

import mmap

import numpy as np


class BudgetExceeded(MemoryError):
    pass


class DramArena:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self._map = mmap.mmap(-1, max(self.budget_bytes, 1))
        self._base = np.frombuffer(self._map, dtype=np.uint8)
        self._addr = self._base.ctypes.data
        self.used_bytes = 0
        self.allocations: list[tuple[str, int]] = []

    def alloc(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type = np.float32,
              align: int = 4096) -> np.ndarray:
        """A zeroed array view inside the arena; raises BudgetExceeded past the budget."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        start = -(-self.used_bytes // align) * align
        if start + nbytes > self.budget_bytes:
            raise BudgetExceeded(
                f"{name}: {nbytes} B at {start} exceeds budget {self.budget_bytes} B")
        self.used_bytes = start + nbytes
        self.allocations.append((name, nbytes))
        return self._base[start:start + nbytes].view(dtype).reshape(shape)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def contains(self, view: np.ndarray) -> bool:
        """True iff every byte of `view` lies inside the arena's mapping."""
        lo = view.ctypes.data
        return self._addr <= lo and lo + view.nbytes <= self._addr + self.budget_bytes
