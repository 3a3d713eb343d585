"""The baseline ActiveFlow is compared with: llama.cpp-style mmap of the whole model, dense.

Same file, same numerics, same resident tensors as the engine; every projection is a dense
GEMV over an `np.memmap` view, so the OS pages weights in (and, under a memory limit, out)
on its own. Run it inside a memory cgroup to give it the same DRAM budget (see
benchmarks/mobile_activeflow.py): page-cache pages are charged to the cgroup in v1 and v2.
"""

from __future__ import annotations

import numpy as np

from mobile.activeflow.engine import ActiveFlowEngine, EngineOptions
from mobile.activeflow.layout import ROW_DTYPE, FlashIndex


class MmapDenseModel(ActiveFlowEngine):
    def __init__(self, index: FlashIndex, max_seq_len: int = 512) -> None:
        super().__init__(index, EngineOptions(budget_bytes=0, lookahead_layers=0, io_threads=0,
                                              max_seq_len=max_seq_len, bounce_bytes=0))
        mm = np.memmap(index.path, dtype=np.uint8, mode="r")
        self.views = {key: mm[e.offset: e.offset + e.nbytes].view(ROW_DTYPE)
                      .reshape(e.channels, e.row_elems) for key, e in index.extents.items()}

    def _alloc_buffers(self) -> None:  # no arena: the page cache is the only weight memory
        self.caches, self.cached_weight_bytes = {}, 0

    def _linear(self, layer: int, kind: str, x: np.ndarray, pre: object) -> np.ndarray:
        return x @ self.views[(layer, kind)]
