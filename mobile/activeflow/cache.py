"""Contextual hot-channel cache (digest §1.5): per-tensor LFU over channels, counts per sequence.

A newly read active channel takes a free slot, or evicts the least-used cached channel if its
own count is higher. Rows live in an arena slab [capacity, row_elems]; `channel_slot` is the
hash map channel -> slot (a dense array: channel ids are small integers).
"""

from __future__ import annotations

import numpy as np


class ChannelCache:
    def __init__(self, rows: np.ndarray, channels: int) -> None:
        self.rows = rows  # [capacity, row_elems], arena memory
        self.capacity = rows.shape[0]
        self.slot_channel = np.full(self.capacity, -1, dtype=np.int64)
        self.channel_slot = np.full(channels, -1, dtype=np.int64)
        self.counts = np.zeros(channels, dtype=np.int64)
        self.n_used = 0

    def reset_counts(self) -> None:
        """New sequence: contextual counts restart, cached rows stay."""
        self.counts[:] = 0

    def admit(self, channels: np.ndarray, rows: np.ndarray) -> None:
        """Offer uncached `channels` (rows[i] holds channel i); highest counts go in first."""
        if self.capacity == 0 or channels.size == 0:
            return
        order = np.argsort(-self.counts[channels], kind="stable")
        take = min(self.capacity - self.n_used, order.size)
        if take:
            slots = np.arange(self.n_used, self.n_used + take)
            self._place(slots, channels[order[:take]], rows[order[:take]])
            self.n_used += take
        rest = order[take:]
        if rest.size == 0:
            return
        cached_counts = self.counts[self.slot_channel]
        victims = np.argsort(cached_counts, kind="stable")[: rest.size]
        rest = rest[: victims.size]
        # New counts descend, victim counts ascend: the swaps that help form a prefix.
        swap = self.counts[channels[rest]] > cached_counts[victims]
        k = int(swap.sum())
        if k:
            self.channel_slot[self.slot_channel[victims[:k]]] = -1
            self._place(victims[:k], channels[rest[:k]], rows[rest[:k]])

    def _place(self, slots: np.ndarray, channels: np.ndarray, rows: np.ndarray) -> None:
        self.rows[slots] = rows
        self.slot_channel[slots] = channels
        self.channel_slot[channels] = slots
