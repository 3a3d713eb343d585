"""Batch-1 Llama decode with weights streamed from flash under a DRAM budget (digest §1.2-1.5).

Per token and layer, for each of the four kinds (see layout.py) with input x:
  active = { j : |x_j| > tau[layer, kind] }  (all channels in dense mode)
  y = sum_{j in active} x_j W_row[j]
computed as three dense GEMVs over arena memory, never a gather from a big tensor:
  hot cache slab (x scattered onto slots), preloaded rows, on-demand rows (read now).
Cross-layer preloading (§1.3): at the start of layer l the residual stream h predicts the
attention and MLP inputs of layer l+N as rmsnorm(h) * gamma_{l+N} (block inputs are dominated
by the residual stream); channels above that layer's threshold and not cached are read on a
thread pool into a ring of N+1 preload buffers while layers l..l+N-1 compute. The inputs of
o_proj and down_proj have no such predictor: their preload takes the uncached channels most
often active so far in the sequence (LFU counts); misses are read on demand.
Counters: bytes read, hit rate, preload precision/recall, stall time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mobile.activeflow.arena import BudgetExceeded, DramArena
from mobile.activeflow.cache import ChannelCache
from mobile.activeflow.layout import KINDS, FlashIndex
from mobile.activeflow.reader import FlashReader

RESIDUAL_PREDICTED = ("attn_in", "mlp_in")  # inputs predicted from the residual stream
PRELOAD_KINDS = ("attn_in", "o_in", "mlp_in", "down_in")

Observer = Callable[[int, str, np.ndarray], None]


@dataclass(frozen=True)
class EngineOptions:
    budget_bytes: int
    lookahead_layers: int = 2  # N in the paper
    preload_fraction: float = 0.6  # preload buffer per predicted kind, share of its channels
    ondemand_fraction: float = 0.25  # on-demand buffer per kind (larger misses go in chunks)
    io_threads: int = 2
    merge_gap_bytes: int = 64 << 10
    # On-demand reads stall compute and their misses are scattered; None = merge_gap_bytes.
    ondemand_merge_gap_bytes: int | None = None
    max_seq_len: int = 512
    direct: bool | None = None  # None: O_DIRECT where the filesystem allows
    bounce_bytes: int = 1 << 20  # per concurrent reader; O_DIRECT reads land here first


@dataclass
class Counters:
    active_channels: int = 0
    cache_hits: int = 0
    preload_hits: int = 0
    preloaded_channels: int = 0
    ondemand_channels: int = 0
    stall_s: float = 0.0
    tokens: int = 0
    token_s: list[float] = field(default_factory=list)

    def summary(self, read: dict) -> dict:
        act = max(self.active_channels, 1)
        return {
            "tokens": self.tokens,
            "hit_rate": self.cache_hits / act,
            "preload_share_of_active": self.preload_hits / act,
            "ondemand_share_of_active": self.ondemand_channels / act,
            "preload_precision": self.preload_hits / max(self.preloaded_channels, 1),
            "stall_s": self.stall_s,
            "bytes_read_per_token": read["bytes_read"] / max(self.tokens, 1),
            "mean_read_bytes": read["bytes_read"] / max(read["reads"], 1),
            "read_s": read["read_s"],
        }


@dataclass
class _Preload:
    channels: dict[str, np.ndarray]


def buffer_plan(index: FlashIndex, opt: EngineOptions) -> list[tuple[str, tuple[int, ...]]]:
    """Every non-cache arena buffer (name, fp32 shape); the bounce buffers come with the reader."""
    ext0 = {k: index.extents[(0, k)] for k in KINDS}
    plan = [(f"preload{i}.{k}", (math.ceil(opt.preload_fraction * ext0[k].channels),
                                 ext0[k].row_elems))
            for i in range(opt.lookahead_layers + 1) for k in PRELOAD_KINDS]
    plan += [(f"ondemand.{k}", (max(1, math.ceil(opt.ondemand_fraction * ext0[k].channels)),
                                ext0[k].row_elems)) for k in KINDS]
    return plan


def min_budget_bytes(index: FlashIndex, opt: EngineOptions) -> int:
    """Smallest budget that holds the buffers (4 KiB aligned) and no cache at all."""
    page = 4096
    buffers = sum(-(-(int(np.prod(s)) * 4) // page) * page for _, s in buffer_plan(index, opt))
    return buffers + (opt.io_threads + 1) * opt.bounce_bytes


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x.astype(np.float32) ** 2, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))).astype(np.float32) * gamma


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int32) << 16).view(np.float32)


class ActiveFlowEngine:
    def __init__(self, index: FlashIndex, options: EngineOptions,
                 thresholds: dict[tuple[int, str], float] | None = None) -> None:
        self.index, self.opt, self.cfg = index, options, index.config
        self.thresholds = thresholds  # None = dense (every channel active)
        self.arena = DramArena(options.budget_bytes)
        self.reader = FlashReader(index, self.arena, n_bounce=options.io_threads + 1,
                                  merge_gap_bytes=options.merge_gap_bytes, direct=options.direct,
                                  bounce_bytes=options.bounce_bytes)
        self._alloc_buffers()
        self._load_resident()
        self.pool = ThreadPoolExecutor(max(1, options.io_threads), thread_name_prefix="af-io")
        self.counters = Counters()
        self.observer: Observer | None = None
        cfg = self.cfg
        kv_shape = (cfg.num_layers, options.max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = np.zeros(kv_shape, np.float32)
        self.v_cache = np.zeros(kv_shape, np.float32)
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.int64)
                                             .astype(np.float32) / cfg.head_dim))
        self.inv_freq = inv_freq.astype(np.float32)
        self.pos = 0

    # -- set-up -------------------------------------------------------------------------------
    def _alloc_buffers(self) -> None:
        n_ring = self.opt.lookahead_layers + 1
        plan = dict(buffer_plan(self.index, self.opt))
        self.preload_rows = {k: [self.arena.alloc(f"preload{i}.{k}", plan[f"preload{i}.{k}"])
                                 for i in range(n_ring)] for k in PRELOAD_KINDS}
        self.ondemand_rows = {k: self.arena.alloc(f"ondemand.{k}", plan[f"ondemand.{k}"])
                              for k in KINDS}
        if self.arena.free_bytes < 0:
            raise BudgetExceeded("no room for the cache")
        share = min(1.0, self.arena.free_bytes / self.index.weight_bytes * 0.999)
        self.caches: dict[tuple[int, str], ChannelCache] = {}
        for (layer, kind), ext in self.index.extents.items():
            cap = min(ext.channels, int(share * ext.channels))
            rows = self.arena.alloc(f"cache{layer}.{kind}", (cap, ext.row_elems), align=64)
            self.caches[(layer, kind)] = ChannelCache(rows, ext.channels)
        self.cached_weight_bytes = sum(c.rows.nbytes for c in self.caches.values())

    def _load_resident(self) -> None:
        r, cfg = self.reader, self.cfg
        self.embed_bits = r.read_resident("model.embed_tokens.weight")  # bf16 bits [V, D]
        # lm_head (tied) runs every token over the whole vocabulary; an fp32 copy saves a
        # 28M-element conversion per token (resident, reported outside the budget).
        self.lm_head_f32 = bf16_bits_to_f32(self.embed_bits)
        self.final_norm = r.read_resident("model.norm.weight")
        self.attn_norm = [r.read_resident(f"model.layers.{i}.input_layernorm.weight")
                          for i in range(cfg.num_layers)]
        self.mlp_norm = [r.read_resident(f"model.layers.{i}.post_attention_layernorm.weight")
                         for i in range(cfg.num_layers)]

    @property
    def resident_bytes(self) -> int:
        """DRAM outside the budget: embedding (bf16), lm_head (fp32), norms, KV cache."""
        return (self.embed_bits.nbytes + self.lm_head_f32.nbytes
                + self.k_cache.nbytes + self.v_cache.nbytes
                + sum(a.nbytes for a in self.attn_norm + self.mlp_norm))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.reader.close()

    def reset(self) -> None:
        """New sequence: KV cache position 0, LFU counts restart (rows stay cached)."""
        self.pos = 0
        for c in self.caches.values():
            c.reset_counts()

    # -- sparse linear ------------------------------------------------------------------------
    def _active(self, layer: int, kind: str, x: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            return np.arange(x.size)
        return np.nonzero(np.abs(x) > self.thresholds[(layer, kind)])[0]

    def _predict(self, layer: int, h: np.ndarray) -> _Preload:
        """Uncached channels of `layer` worth reading ahead, per kind, sorted, within capacity.

        attn_in / mlp_in: predicted from the residual h as rmsnorm(h) * gamma_layer above the
        layer's threshold, most confident first. o_in / down_in have no such predictor: the
        uncached channels most often active so far in this sequence (LFU counts) go first.
        Dense mode: every uncached channel, one contiguous block first."""
        out = {}
        for kind in PRELOAD_KINDS:
            cache = self.caches[(layer, kind)]
            cap = self.preload_rows[kind][0].shape[0]
            cand = np.nonzero(cache.channel_slot < 0)[0]
            if self.thresholds is None:
                out[kind] = cand[:cap]
                continue
            if kind in RESIDUAL_PREDICTED:
                gamma = self.attn_norm[layer] if kind == "attn_in" else self.mlp_norm[layer]
                x_hat = np.abs(rms_norm(h, gamma, self.cfg.rms_norm_eps))
                cand = cand[x_hat[cand] > self.thresholds[(layer, kind)]]
                priority = x_hat[cand]
            else:
                priority = cache.counts[cand].astype(np.float32)
            if cand.size > cap:
                cand = np.sort(cand[np.argsort(-priority, kind="stable")[:cap]])
            out[kind] = cand
        return _Preload(out)

    def _submit_preload(self, layer: int, h: np.ndarray) -> Future:
        pred = self._predict(layer, h)
        slot = layer % (self.opt.lookahead_layers + 1)

        def work() -> _Preload:
            stored = {}
            for kind, ch in pred.channels.items():
                stored[kind] = self.reader.read_channels(
                    layer, kind, ch, self.preload_rows[kind][slot], keep_gaps=True) \
                    if ch.size else ch
            return _Preload(stored)

        return self.pool.submit(work)

    def _linear(self, layer: int, kind: str, x: np.ndarray, pre: _Preload | None) -> np.ndarray:
        """y = sum over active channels j of x_j * row_j, for (layer, kind)."""
        if self.observer is not None:
            self.observer(layer, kind, x)
        cache = self.caches[(layer, kind)]
        active = self._active(layer, kind, x)
        cache.counts[active] += 1
        ctr = self.counters
        ctr.active_channels += active.size
        y = np.zeros(self.index.extents[(layer, kind)].row_elems, np.float32)
        slots = cache.channel_slot[active]
        hit = slots >= 0
        ctr.cache_hits += int(hit.sum())
        if hit.any():
            x_slots = np.zeros(cache.n_used, np.float32)
            x_slots[slots[hit]] = x[active[hit]]
            y += x_slots @ cache.rows[: cache.n_used]
        missing = active[~hit]
        if pre is not None and kind in pre.channels and pre.channels[kind].size:
            pre_ch = pre.channels[kind]
            ctr.preloaded_channels += pre_ch.size
            pos = np.searchsorted(pre_ch, missing)
            pos_ok = np.minimum(pos, pre_ch.size - 1)
            found = pre_ch[pos_ok] == missing
            if found.any():
                rows = self.preload_rows[kind][layer % (self.opt.lookahead_layers + 1)]
                x_pre = np.zeros(pre_ch.size, np.float32)
                x_pre[pos_ok[found]] = x[missing[found]]
                y += x_pre @ rows[: pre_ch.size]
                ctr.preload_hits += int(found.sum())
                cache.admit(missing[found], rows[pos_ok[found]])
            missing = missing[~found]
        if missing.size:
            buf = self.ondemand_rows[kind]
            ctr.ondemand_channels += missing.size
            for c0 in range(0, missing.size, buf.shape[0]):
                chunk = missing[c0: c0 + buf.shape[0]]
                t0 = time.perf_counter()
                self.reader.read_channels(layer, kind, chunk, buf,
                                          merge_gap_bytes=self.opt.ondemand_merge_gap_bytes)
                ctr.stall_s += time.perf_counter() - t0
                y += x[chunk] @ buf[: chunk.size]
                cache.admit(chunk, buf[: chunk.size])
        return y

    # -- model --------------------------------------------------------------------------------
    def _rope(self, v: np.ndarray, pos: int) -> np.ndarray:
        freqs = np.float32(pos) * self.inv_freq
        emb = np.concatenate([freqs, freqs])
        cos, sin = np.cos(emb), np.sin(emb)
        half = v.shape[-1] // 2
        rotated = np.concatenate([-v[..., half:], v[..., :half]], axis=-1)
        return (v * cos + rotated * sin).astype(np.float32)

    def _attention(self, layer: int, x: np.ndarray, pre: _Preload | None) -> np.ndarray:
        cfg, pos = self.cfg, self.pos
        qkv = self._linear(layer, "attn_in", x, pre)
        q_out = cfg.num_heads * cfg.head_dim
        kv_out = cfg.num_kv_heads * cfg.head_dim
        q = self._rope(qkv[:q_out].reshape(cfg.num_heads, cfg.head_dim), pos)
        k = self._rope(qkv[q_out: q_out + kv_out].reshape(cfg.num_kv_heads, cfg.head_dim), pos)
        self.k_cache[layer, pos] = k
        self.v_cache[layer, pos] = qkv[q_out + kv_out:].reshape(cfg.num_kv_heads, cfg.head_dim)
        keys = self.k_cache[layer, : pos + 1]  # [T, Hkv, d]
        values = self.v_cache[layer, : pos + 1]
        group = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(cfg.num_kv_heads, group, cfg.head_dim)
        scores = np.einsum("hgd,thd->hgt", qg, keys) / np.float32(math.sqrt(cfg.head_dim))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = np.einsum("hgt,thd->hgd", probs, values).reshape(-1).astype(np.float32)
        return self._linear(layer, "o_in", attn, pre)

    def _mlp(self, layer: int, x: np.ndarray, pre: _Preload | None) -> np.ndarray:
        gu = self._linear(layer, "mlp_in", x, pre)
        inter = self.cfg.intermediate_size
        gate, up = gu[:inter], gu[inter:]
        act = (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        return self._linear(layer, "down_in", act, pre)

    def _wait(self, fut: Future) -> _Preload:
        t0 = time.perf_counter()
        pre = fut.result()
        self.counters.stall_s += time.perf_counter() - t0
        return pre

    def forward_token(self, token_id: int) -> np.ndarray:
        """Feed one token at the current position; returns fp32 logits [vocab]."""
        if self.pos >= self.opt.max_seq_len:
            raise ValueError("sequence longer than max_seq_len")
        t_start = time.perf_counter()
        cfg, n_ahead = self.cfg, self.opt.lookahead_layers
        self.reader.drop_cache()
        h = bf16_bits_to_f32(self.embed_bits[token_id])
        futures: dict[int, Future] = {}
        for layer in range(min(n_ahead, cfg.num_layers)):
            futures[layer] = self._submit_preload(layer, h)
        for layer in range(cfg.num_layers):
            if layer + n_ahead < cfg.num_layers and n_ahead > 0:
                futures[layer + n_ahead] = self._submit_preload(layer + n_ahead, h)
            pre = self._wait(futures.pop(layer)) if layer in futures else None
            h = h + self._attention(layer, rms_norm(h, self.attn_norm[layer], cfg.rms_norm_eps),
                                    pre)
            h = h + self._mlp(layer, rms_norm(h, self.mlp_norm[layer], cfg.rms_norm_eps), pre)
        logits = self._lm_head(rms_norm(h, self.final_norm, cfg.rms_norm_eps))
        self.pos += 1
        self.counters.tokens += 1
        self.counters.token_s.append(time.perf_counter() - t_start)
        return logits

    def _lm_head(self, h: np.ndarray) -> np.ndarray:
        return self.lm_head_f32 @ h

    def summary(self) -> dict:
        return {**self.counters.summary(self.reader.counters.snapshot()),
                "budget_bytes": self.opt.budget_bytes, "arena_used_bytes": self.arena.used_bytes,
                "cached_weight_bytes": self.cached_weight_bytes,
                "weight_bytes": self.index.weight_bytes,
                "resident_share": self.cached_weight_bytes / self.index.weight_bytes,
                "resident_bytes_outside_budget": self.resident_bytes,
                "o_direct": self.reader.direct}


def teacher_forced_scores(engine: ActiveFlowEngine, ids: Sequence[int]) -> tuple[float, list[int]]:
    """Feed ``ids`` one token at a time: (perplexity of each next id, in float64 from the
    logits; the argmax token at every position, for top-1 agreement between models)."""
    nll, top1 = [], []
    for i, token in enumerate(ids):
        logits = engine.forward_token(token).astype(np.float64)
        top1.append(int(np.argmax(logits)))
        if i + 1 < len(ids):
            peak = logits.max()
            nll.append(peak + np.log(np.exp(logits - peak).sum()) - logits[ids[i + 1]])
    return float(np.exp(np.mean(nll))), top1
