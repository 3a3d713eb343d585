"""Prefix affinity: same prefix -> same worker, bounded by load; least outstanding unchanged."""

from __future__ import annotations

from server.affinity import CHUNK_CHARS, PrefixRecord, prefix_fingerprints, prompt_text
from server.metrics import GatewayMetrics
from server.router import WorkerPool

SYSTEM = "You are a careful assistant. " * 40  # ~1,200 chars: four whole chunks


def _pool(routing: str = "prefix_affinity", workers: int = 2,
          load_factor: float = 1.0) -> WorkerPool:
    pool = WorkerPool([f"http://w{i}" for i in range(workers)], GatewayMetrics(), routing,
                      load_factor)
    for worker in pool.workers:
        worker.healthy, worker.models = True, ["m"]
    return pool


def _chat(*turns: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": "user", "content": turn} for turn in turns]
    return prefix_fingerprints(prompt_text("chat", {"messages": messages}))


def test_fingerprints_cover_whole_chunks_and_chain() -> None:
    text = "a" * (3 * CHUNK_CHARS + 10)
    fingerprints = prefix_fingerprints(text)
    assert len(fingerprints) == 3
    assert prefix_fingerprints(text + "more")[:3] == fingerprints  # a longer prompt extends
    assert len(set(fingerprints)) == 3  # equal chunks, different prefixes


def test_record_counts_leading_matched_chunks_only() -> None:
    record = PrefixRecord()
    record.add([1, 2, 3])
    assert record.matched_chunks([1, 2, 9]) == 2
    assert record.matched_chunks([9, 2, 3]) == 0


def test_record_forgets_least_recently_used_beyond_capacity() -> None:
    record = PrefixRecord(capacity=3)
    record.add([1, 2, 3])
    record.add([1])  # 1 used again
    record.add([4])
    assert len(record) == 3 and record.matched_chunks([2]) == 0 and record.matched_chunks([1])


def test_a_conversation_stays_on_the_worker_holding_its_prefix() -> None:
    pool = _pool()
    first = pool.choose(model="m", fingerprints=_chat("tell me about chunk " * 20))
    for worker in pool.workers:
        worker.outstanding = 3  # balanced: affinity decides
    later = pool.choose(model="m", fingerprints=_chat("tell me about chunk " * 20, "and more"))
    assert later is first


def test_a_busier_worker_keeps_its_conversation_within_a_looser_bound() -> None:
    for busier, kept in ((1, True), (2, False)):  # the other worker is idle
        pool = _pool(load_factor=1.25)
        first = pool.choose(model="m", fingerprints=_chat("y" * 600))
        first.outstanding = busier  # bound: ceil(1.25 * (busier + 1) / 2) = 2
        assert (pool.choose(model="m", fingerprints=_chat("y" * 600)) is first) is kept


def test_the_load_bound_overrides_affinity() -> None:
    pool = _pool()
    first = pool.choose(model="m", fingerprints=_chat("x" * 600))
    first.outstanding = 1  # bound with 2 workers: ceil(1.0 * 2 / 2) = 1 -> no room
    assert pool.choose(model="m", fingerprints=_chat("x" * 600)) is not first


def test_no_known_prefix_goes_to_the_least_loaded() -> None:
    pool = _pool()
    pool.workers[0].outstanding = 2
    assert pool.choose(model="m", fingerprints=_chat("fresh " * 100)) is pool.workers[1]


def test_a_failed_worker_loses_its_record() -> None:
    pool = _pool()
    first = pool.choose(model="m", fingerprints=_chat("y" * 600))
    pool.mark_failed(first, "test")
    first.healthy = True  # back, restarted: its cache is empty
    pool.workers[0].outstanding = pool.workers[1].outstanding = 0
    other = next(w for w in pool.workers if w is not first)
    other.outstanding = 0
    first.outstanding = 1
    assert pool.choose(model="m", fingerprints=_chat("y" * 600)) is other


def test_least_outstanding_ignores_prefixes() -> None:
    pool = _pool("least_outstanding")
    pool.workers[0].outstanding = 1
    for _ in range(3):
        assert pool.choose(model="m", fingerprints=_chat("z" * 600)) is pool.workers[1]


def test_only_workers_serving_the_model_are_chosen() -> None:
    pool = _pool("least_outstanding")
    pool.workers[0].models = ["embed"]
    assert pool.choose(model="embed") is pool.workers[0]
    assert pool.choose(model="m") is pool.workers[1]
    assert pool.choose(model="other") is None
