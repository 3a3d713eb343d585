"""Wave buffer: a device cache of clusters over the full KV in host memory (paper sec. 5).

The full cluster-sorted K/V of one layer's index lives in host memory (pinned when CUDA
exists, so copies can be asynchronous). The device keeps a cache of whole clusters in pages of
``page_tokens`` rows, ``capacity_pages`` pages per KV head, with least-recently-used
replacement per head (the official wave buffer's policy). A decode step asks for the rows of
its retrieval clusters: ``gather`` assembles them, cluster after cluster, in an execution
buffer on the device, hits copied from the cache (device to device), misses read from host
memory (host to device, on a side stream when CUDA exists), then admits the missed clusters
into the cache from the execution buffer (no second host read), evicting the least recently
used clusters that this step does not use.

Device-agnostic: with ``device="cpu"`` the same bookkeeping runs on CPU tensors (tests).
Accounting (``stats``): cluster hits/misses, rows, host-to-device bytes, evictions.
Python bookkeeping here is per cluster; the official code does it in a C++ thread pool,
overlapped with the other layers (left for later; see README).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kv_manager.retroinfer.wave_index import WaveIndex


@dataclass
class BufferStats:
    cluster_hits: int = 0
    cluster_misses: int = 0
    rows_hit: int = 0
    rows_missed: int = 0
    bytes_host_to_device: int = 0
    evictions: int = 0
    not_admitted: int = 0  # missed clusters larger than the whole cache

    @property
    def hit_rate(self) -> float:
        total = self.cluster_hits + self.cluster_misses
        return self.cluster_hits / total if total else 0.0


@dataclass
class ClusterBatch:
    """Rows of the requested clusters on the device: keys/values [H, M, d] (M = most rows of
    any head; the tail past ``lengths[h]`` is unspecified), ``ranges`` [H, n, 2] int32 start
    and end row of each requested cluster inside the batch."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    ranges: torch.Tensor
    ready: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Make the current stream wait for the host-to-device copies of this batch."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)


@dataclass
class _HeadCache:
    lru: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)  # id -> pages
    free_pages: list[int] = field(default_factory=list)


class WaveBuffer:
    """Cache of one layer's clusters (all KV heads of one sequence)."""

    def __init__(
        self,
        index: WaveIndex,
        device: str | torch.device,
        capacity_pages: int,
        page_tokens: int = 8,
    ) -> None:
        self.device = torch.device(device)
        self.page_tokens = page_tokens
        self.capacity_pages = capacity_pages
        pin = self.device.type == "cuda"
        self.host_keys = index.keys.to("cpu").contiguous()
        self.host_values = index.values.to("cpu").contiguous()
        if pin:
            self.host_keys = self.host_keys.pin_memory()
            self.host_values = self.host_values.pin_memory()
        self.offsets = index.offsets.to("cpu")
        heads, _, dim = self.host_keys.shape
        rows = capacity_pages * page_tokens
        self.cache_keys = torch.empty(
            heads, rows, dim, dtype=self.host_keys.dtype, device=self.device
        )
        self.cache_values = torch.empty_like(self.cache_keys)
        self.heads = [_HeadCache(free_pages=list(range(capacity_pages))) for _ in range(heads)]
        self.stream = torch.cuda.Stream(self.device) if pin else None
        # Pinned staging rows reused across steps (a fresh pin per step costs a second host
        # copy), the event after which the last step's copies out of them are done, and the
        # event after which the last admission's cache writes are done.
        self._stage_keys: torch.Tensor | None = None
        self._stage_values: torch.Tensor | None = None
        self._staged: torch.cuda.Event | None = None
        self._admitted: torch.cuda.Event | None = None
        self.stats = BufferStats()

    @property
    def row_bytes(self) -> int:
        """Bytes of one K row plus one V row."""
        return 2 * self.host_keys.shape[-1] * self.host_keys.element_size()

    def cached_clusters(self, head: int) -> list[int]:
        """Cluster ids cached for ``head``, least recently used first."""
        return list(self.heads[head].lru)

    def gather(self, cluster_ids: torch.Tensor) -> ClusterBatch:
        """Rows of clusters ``cluster_ids`` [H, n] (distinct per head) on the device."""
        ids = cluster_ids.to("cpu").tolist()
        heads, rows_per_head = len(ids), self.host_keys.shape[1]
        counts = torch.tensor(ids).reshape(heads, -1)
        sizes = (self.offsets[:, 1:] - self.offsets[:, :-1]).gather(1, counts)  # [H, n]
        ends = sizes.cumsum(1)
        width = max(int(ends[:, -1].max()) if ends.numel() else 0, 1)
        ranges = torch.stack([ends - sizes, ends], dim=-1).to(torch.int32)
        starts_list, sizes_list = (ends - sizes).tolist(), sizes.tolist()
        cache_rows = self.cache_keys.shape[1]
        # Per-row copy plans as (first source row, count, first destination row) runs.
        hit_runs: list[tuple[int, int, int]] = []
        miss_runs: list[tuple[int, int, int]] = []
        missed: list[list[tuple[int, int, int]]] = []  # per head: (cluster, start, size)
        for h, head_ids in enumerate(ids):
            cache, head_missed = self.heads[h], []
            for slot, cluster in enumerate(head_ids):
                size, start = sizes_list[h][slot], starts_list[h][slot] + h * width
                pages = cache.lru.get(cluster)
                if pages is not None:
                    cache.lru.move_to_end(cluster)
                    for number, page in enumerate(pages):
                        count = min(self.page_tokens, size - number * self.page_tokens)
                        hit_runs.append(
                            (
                                h * cache_rows + page * self.page_tokens,
                                count,
                                start + number * self.page_tokens,
                            )
                        )
                    self.stats.cluster_hits += 1
                    self.stats.rows_hit += size
                else:
                    first = int(self.offsets[h, cluster]) + h * rows_per_head
                    miss_runs.append((first, size, start))
                    head_missed.append((cluster, start - h * width, size))
                    self.stats.cluster_misses += 1
                    self.stats.rows_missed += size
            missed.append(head_missed)
        dim = self.host_keys.shape[-1]
        keys = torch.empty(heads * width, dim, dtype=self.cache_keys.dtype, device=self.device)
        values = torch.empty_like(keys)
        if hit_runs:
            if self._admitted is not None:  # the cache rows read here may be fresh admissions
                torch.cuda.current_stream(self.device).wait_event(self._admitted)
            src, dst = _expand_runs(hit_runs)
            src, dst = src.to(self.device), dst.to(self.device)
            keys.index_copy_(0, dst, self.cache_keys.view(-1, dim).index_select(0, src))
            values.index_copy_(0, dst, self.cache_values.view(-1, dim).index_select(0, src))
        ready = self._copy_misses(miss_runs, keys, values)
        batch = ClusterBatch(
            keys=keys.view(heads, width, dim),
            values=values.view(heads, width, dim),
            lengths=ends[:, -1].to(torch.int32)
            if ends.numel()
            else torch.zeros(heads, dtype=torch.int32),
            ranges=ranges.to(self.device),
            ready=ready,
        )
        self._admit(missed, batch, ids)
        return batch

    def _copy_misses(
        self, miss_runs: list[tuple[int, int, int]], keys: torch.Tensor, values: torch.Tensor
    ) -> torch.cuda.Event | None:
        if not miss_runs:
            return None
        src, dst = _expand_runs(miss_runs)
        dim = self.host_keys.shape[-1]
        self.stats.bytes_host_to_device += len(src) * self.row_bytes
        if self.stream is None:
            keys.index_copy_(0, dst, self.host_keys.view(-1, dim).index_select(0, src))
            values.index_copy_(0, dst, self.host_values.view(-1, dim).index_select(0, src))
            return None
        # Gather into pinned staging rows so the copy runs asynchronously on the side stream;
        # the caller overlaps it with work that needs none of these rows (steady zone,
        # estimation).
        staged_k, staged_v = self._staging(len(src))
        torch.index_select(self.host_keys.view(-1, dim), 0, src, out=staged_k)
        torch.index_select(self.host_values.view(-1, dim), 0, src, out=staged_v)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst_device = dst.pin_memory().to(self.device, non_blocking=True)
            keys.index_copy_(0, dst_device, staged_k.to(self.device, non_blocking=True))
            values.index_copy_(0, dst_device, staged_v.to(self.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self._staged = ready
        for tensor in (keys, values):
            tensor.record_stream(self.stream)
        return ready

    def _staging(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pinned staging rows, free to overwrite (the previous step's copies are done)."""
        if self._staged is not None:
            self._staged.synchronize()
        if self._stage_keys is None or self._stage_keys.shape[0] < rows:
            shape = (
                max(rows, 2 * (0 if self._stage_keys is None else len(self._stage_keys))),
                self.host_keys.shape[-1],
            )
            self._stage_keys = torch.empty(shape, dtype=self.host_keys.dtype, pin_memory=True)
            self._stage_values = torch.empty(shape, dtype=self.host_keys.dtype, pin_memory=True)
        assert self._stage_values is not None
        return self._stage_keys[:rows], self._stage_values[:rows]

    def _admit(
        self, missed: list[list[tuple[int, int, int]]], batch: ClusterBatch, ids: list[list[int]]
    ) -> None:
        """Copy this step's missed clusters into the cache, evicting least recently used
        clusters that this step did not use."""
        runs: list[tuple[int, int, int]] = []  # (execution-buffer row, count, cache row)
        width = batch.keys.shape[1]
        cache_rows = self.cache_keys.shape[1]
        for h, head_missed in enumerate(missed):
            cache, in_use = self.heads[h], set(ids[h])
            for cluster, start, size in head_missed:
                pages = -(-size // self.page_tokens)
                if pages > self.capacity_pages:
                    self.stats.not_admitted += 1
                    continue
                # Clusters used this step were moved to the back (hits) or are not cached
                # yet (misses), so the front holds the least recently used evictable ones.
                while len(cache.free_pages) < pages and cache.lru:
                    victim = next(iter(cache.lru))
                    if victim in in_use:
                        break
                    cache.free_pages.extend(cache.lru.pop(victim))
                    self.stats.evictions += 1
                if len(cache.free_pages) < pages:
                    self.stats.not_admitted += 1
                    continue
                taken = [cache.free_pages.pop() for _ in range(pages)]
                cache.lru[cluster] = taken
                for number, page in enumerate(taken):
                    count = min(self.page_tokens, size - number * self.page_tokens)
                    runs.append(
                        (
                            h * width + start + number * self.page_tokens,
                            count,
                            h * cache_rows + page * self.page_tokens,
                        )
                    )
        if not runs:
            return
        src, dst = _expand_runs(runs)
        src, dst = src.to(self.device), dst.to(self.device)
        dim = self.cache_keys.shape[-1]
        # Admission reads the execution buffer, so it must follow the miss copies.
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._copy_rows(batch, src, dst, dim)
                # Not batch.ready: attention need not wait for admission (both only read
                # the execution buffer); the next step's cache reads wait for this instead.
                self._admitted = torch.cuda.Event()
                self._admitted.record(self.stream)
        else:
            self._copy_rows(batch, src, dst, dim)

    def _copy_rows(
        self, batch: ClusterBatch, src: torch.Tensor, dst: torch.Tensor, dim: int
    ) -> None:
        self.cache_keys.view(-1, dim).index_copy_(
            0, dst, batch.keys.reshape(-1, dim).index_select(0, src)
        )
        self.cache_values.view(-1, dim).index_copy_(
            0, dst, batch.values.reshape(-1, dim).index_select(0, src)
        )


def _expand_runs(runs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of runs (source start, count, destination start): two int64 tensors."""
    table = torch.tensor(runs, dtype=torch.int64)
    counts = table[:, 1]
    total = int(counts.sum())
    run_start = counts.cumsum(0) - counts
    within = torch.arange(total) - torch.repeat_interleave(run_start, counts)
    return (
        torch.repeat_interleave(table[:, 0], counts) + within,
        torch.repeat_interleave(table[:, 2], counts) + within,
    )
