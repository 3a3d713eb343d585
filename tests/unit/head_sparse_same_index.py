"""The per-head Triton path against the torch reference on the index the Triton path itself
estimated (a helper for the kernel tests; no ``test_`` prefix, so not collected).

Why not compare ``head_sparse_prefill_triton`` with ``head_sparse_prefill_ref`` directly: each
estimates its own index, and vertical-slash keeps the top-k columns and diagonals. On random
inputs the k-th and (k+1)-th scores can be 1e-8 apart or equal (the two failing seeds of the
H200 run of 2026-12-02 had gaps of 1.5e-8 and 0.0 at the cut; passing seeds >= 4.9e-6). The
Triton estimate (tf32 tensor cores, slash sums by atomic adds in any order) and the reference
(float32 copies, IEEE products) may then keep different keys, and since every row of random V
is a weighted mean with a small norm, one different key moves a row by up to ~0.4 relative.
That is a tie, not a kernel error. The estimate has its own tests (scores within float
tolerance of the torch estimator); the kernel is checked here on the very index it ran, and
``index_differences`` bounds how far that index is from the reference's own (0 where both
run the same torch estimator, on CPU; a few tie entries on the GPU), so an estimate fed the
wrong rows, positions or prompt length still fails.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from attention_backends.kernels import head_sparse_triton
from attention_backends.kernels.head_sparse_ref import head_sparse_prefill_ref, sequence_chunks


@contextmanager
def recorded_indexes() -> Iterator[list]:
    """The ``HeadsIndex`` of every sequence the Triton path estimates inside the block, in
    call order (the real estimator runs; its results are kept)."""
    indexes: list = []
    estimate = head_sparse_triton.estimate_index

    def recording(*args, **kwargs):
        index = estimate(*args, **kwargs)
        indexes.append(index)
        return index

    head_sparse_triton.estimate_index = recording
    try:
        yield indexes
    finally:
        head_sparse_triton.estimate_index = estimate


def reference_on_indexes(args: tuple, indexes: list) -> torch.Tensor:
    """``head_sparse_prefill_ref``'s output (float64) for ``sparse_prefill``-style ``args``,
    with sequence ``s`` attending through ``indexes[s]`` (sequences without rows skipped)
    instead of an index of its own."""
    query = args[0]
    expected = torch.full(query.shape, float("nan"), dtype=torch.float64, device=query.device)
    return head_sparse_prefill_ref(*args, out=expected, indexes=indexes)


def index_differences(args: tuple, indexes: list) -> int:
    """Entries (columns, diagonals, full rows, blocks) in which ``indexes`` differ from the
    indexes the reference builds for the same ``args`` from float32 copies."""
    query, key_cache, _, block_table, query_start_loc, seq_lens, prompt_lens, layer, scale = args
    chunks = sequence_chunks(query, key_cache, block_table, query_start_loc, seq_lens,
                             prompt_lens, scale)
    differing = 0
    for (_, _, _, chunk), used in zip(chunks, indexes, strict=True):
        own = layer.build_index(chunk)
        differing += sum(int((getattr(own, name) != getattr(used, name)).sum())
                         for name in ("columns", "diagonals", "full_rows", "blocks"))
    return differing
