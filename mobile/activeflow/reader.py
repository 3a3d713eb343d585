"""Reads active channel rows from the flash file with `os.preadv`, into arena memory only.

Runs of wanted channels are merged when the unwanted gap between them costs fewer bytes than
`merge_gap_bytes`: on this disk a 4 KiB random read runs at ~0.03 GB/s and a 1 MiB read at
~1.4 GB/s (shared/research/mobile_and_others.md §1.9), so reading a 64 KiB gap is cheaper
than a second request, the same reason the paper needs >64 KB chunks on phone flash.

Page cache: the file is opened with O_DIRECT when the filesystem allows it (ext4 here does),
so no read is served from, or leaves anything in, the page cache; O_DIRECT needs 4 KiB
aligned offsets, lengths and buffers, so each read lands in an aligned bounce buffer (carved
from the arena) and the wanted rows are copied out. Where O_DIRECT fails the reader falls
back to buffered reads and `drop_cache()` calls posix_fadvise(POSIX_FADV_DONTNEED) on the
whole file (the engine calls it once per token), so every token still reads from the device.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from mobile.activeflow.arena import DramArena
from mobile.activeflow.layout import ALIGN, FlashIndex

BOUNCE_BYTES = 1 << 20


@dataclass
class ReadCounters:
    bytes_read: int = 0  # bytes requested from the device, alignment and gaps included
    useful_bytes: int = 0  # bytes of wanted rows
    reads: int = 0
    read_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, device_bytes: int, useful: int, reads: int, seconds: float) -> None:
        with self.lock:
            self.bytes_read += device_bytes
            self.useful_bytes += useful
            self.reads += reads
            self.read_s += seconds

    def snapshot(self) -> dict:
        return {"bytes_read": self.bytes_read, "useful_bytes": self.useful_bytes,
                "reads": self.reads, "read_s": self.read_s}


def merge_runs(channels: np.ndarray, row_bytes: int, merge_gap_bytes: int) -> list[tuple[int, int]]:
    """Sorted channel ids -> [start, stop) runs; gaps of <= merge_gap_bytes are read through."""
    if channels.size == 0:
        return []
    max_gap = max(merge_gap_bytes // row_bytes, 0)
    breaks = np.nonzero(np.diff(channels) > max_gap + 1)[0]
    starts = np.concatenate([channels[:1], channels[breaks + 1]])
    stops = np.concatenate([channels[breaks], channels[-1:]]) + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def probe_o_direct(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    import mmap

    buf = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


class FlashReader:
    def __init__(self, index: FlashIndex, arena: DramArena, n_bounce: int,
                 merge_gap_bytes: int = 64 << 10, direct: bool | None = None,
                 bounce_bytes: int = BOUNCE_BYTES) -> None:
        self.index, self.arena, self.merge_gap_bytes = index, arena, merge_gap_bytes
        path = str(index.path)
        self.direct = probe_o_direct(path) if direct is None else direct
        self.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        self.counters = ReadCounters()
        # One bounce buffer per concurrent reader, from the arena: they hold weight bytes too.
        self._bounces: queue.Queue[np.ndarray] = queue.Queue()
        for i in range(n_bounce):
            self._bounces.put(arena.alloc(f"bounce{i}", (bounce_bytes,), np.uint8))
        self.bounce_bytes = bounce_bytes

    def close(self) -> None:
        os.close(self.fd)

    def drop_cache(self) -> None:
        """Buffered mode only: evict the file's pages so the next token reads the device."""
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read_channels(self, layer: int, kind: str, channels: np.ndarray, dest: np.ndarray,
                      keep_gaps: bool = False, merge_gap_bytes: int | None = None) -> np.ndarray:
        """Copy rows `channels` (sorted, unique) of (layer, kind) into dest, in id order.

        keep_gaps: also keep the unrequested rows that gap merging read anyway, while dest has
        room for them and every requested row still to come (a preload then also holds the
        neighbours of its predictions, which mispredictions often are). Returns the channel
        ids now in dest[:k], sorted."""
        if not self.arena.contains(dest):
            raise ValueError("read destination is outside the DRAM arena")
        if channels.size > dest.shape[0]:
            raise ValueError(f"{channels.size} rows requested, destination holds {dest.shape[0]}")
        ext = self.index.extents[(layer, kind)]
        rb = ext.row_bytes
        bounce = self._bounces.get()
        t0 = time.perf_counter()
        device_bytes = reads = 0
        stored: list[np.ndarray] = []
        try:
            max_rows = (self.bounce_bytes - 2 * ALIGN) // rb
            if max_rows < 1:
                raise ValueError(f"bounce buffer too small for {rb}-byte rows")
            written = 0
            gap = self.merge_gap_bytes if merge_gap_bytes is None else merge_gap_bytes
            for start, stop in merge_runs(channels, rb, gap):
                for c0 in range(start, stop, max_rows):
                    c1 = min(c0 + max_rows, stop)
                    lo = ext.offset + c0 * rb
                    hi = ext.offset + c1 * rb
                    a_lo, a_hi = lo // ALIGN * ALIGN, -(-hi // ALIGN) * ALIGN
                    got = os.preadv(self.fd, [memoryview(bounce[: a_hi - a_lo])], a_lo)
                    if got < hi - a_lo:
                        raise OSError(f"short read {got} < {hi - a_lo} at {a_lo}")
                    device_bytes, reads = device_bytes + (a_hi - a_lo), reads + 1
                    rows = bounce[lo - a_lo: hi - a_lo].view(dest.dtype).reshape(c1 - c0, -1)
                    still_wanted = int(np.count_nonzero(channels >= c1))
                    if keep_gaps and written + (c1 - c0) + still_wanted <= dest.shape[0]:
                        dest[written: written + c1 - c0] = rows
                        stored.append(np.arange(c0, c1))
                        written += c1 - c0
                    else:
                        wanted = channels[(channels >= c0) & (channels < c1)]
                        dest[written: written + wanted.size] = rows[wanted - c0]
                        stored.append(wanted)
                        written += wanted.size
        finally:
            self._bounces.put(bounce)
        self.counters.add(device_bytes, channels.size * rb, reads, time.perf_counter() - t0)
        return np.concatenate(stored) if stored else channels[:0]

    def read_resident(self, name: str) -> np.ndarray:
        """A resident tensor (embedding, norms), read once at start-up, outside the budget.

        bf16 tensors come back as their int16 bit patterns (numpy has no bf16)."""
        offset, shape, dtype = self.index.resident[name]
        np_dtype = np.int16 if dtype == "bfloat16" else np.float32
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        with open(self.index.path, "rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(nbytes), dtype=np_dtype).reshape(shape).copy()
