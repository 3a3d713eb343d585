"""Random GPU-layout decode inputs shared by the interpreter test and
tests/gpu/test_retroinfer_gpu.py."""

from __future__ import annotations

import torch

# The decode step's inputs, in the order decode_ref.decode_step_ref and the Triton decode
# step take them.
DECODE_STEP_KEYS = ("query", "centroids", "value_sums", "sizes", "offsets", "keys", "values",
                    "steady_ranges")


def step_args(case: dict) -> list:
    return [case[key] for key in DECODE_STEP_KEYS]


def decode_case(
    rows: int,
    groups: int,
    dim: int,
    clusters: int,
    steady: int,
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_cluster: int = 40,
) -> dict:
    """Rows with random cluster sizes (some empty), keys/values laid out cluster after
    cluster, then ``steady`` steady-zone rows; centroids/value sums from the member rows."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, max_cluster, (rows, clusters), generator=generator)
    sizes[:, 0] = 0  # always at least one empty cluster
    offsets = torch.nn.functional.pad(sizes.cumsum(1), (1, 0))
    width = int(offsets[:, -1].max()) + steady
    keys = torch.randn(rows, width, dim, generator=generator)
    values = torch.randn(rows, width, dim, generator=generator)
    # Cluster of every clustered row (steady rows get a dummy id past the last cluster).
    owner = torch.searchsorted(
        offsets[:, 1:].contiguous(), torch.arange(width).expand(rows, -1).contiguous(), right=True
    )
    index = owner.unsqueeze(-1).expand(-1, -1, dim)
    key_sums = torch.zeros(rows, clusters + 1, dim).scatter_add_(1, index, keys)[:, :clusters]
    value_sums = torch.zeros(rows, clusters + 1, dim).scatter_add_(1, index, values)
    value_sums = value_sums[:, :clusters].contiguous()
    centroids = (key_sums / sizes.clamp(min=1).unsqueeze(-1)).contiguous()
    steady_ranges = torch.stack([offsets[:, -1], offsets[:, -1] + steady], dim=-1)
    steady_ranges = steady_ranges.unsqueeze(1).to(torch.int32)
    query = torch.randn(rows, groups, dim, generator=generator) * 2
    tensors = {
        "query": query,
        "centroids": centroids,
        "value_sums": value_sums,
        "sizes": sizes.to(torch.int32),
        "offsets": offsets.to(torch.int32),
        "keys": keys,
        "values": values,
        "steady_ranges": steady_ranges,
    }
    # Value sums stay float32 (the GPU layout keeps them so: sums of ~16 values).
    return {
        name: (t.to(dtype) if t.is_floating_point() and name != "value_sums" else t).to(device)
        for name, t in tensors.items()
    }


def assert_rows_close(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Per (row, head) bound: a wrong row cannot hide behind a good global maximum."""
    got, expected = got.float().cpu(), expected.float().cpu()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got)), "-inf pattern differs"
    error = (got - expected).where(finite, 0).abs()
    scale = expected.where(finite, 0).abs()
    if error.dim() > 2:
        error, scale = error.amax(-1), scale.amax(-1)
    bad = torch.nonzero(error > atol + rtol * scale).tolist()
    assert not bad, f"rows {bad[:5]}: max error {float(error.max()):.3e}"
