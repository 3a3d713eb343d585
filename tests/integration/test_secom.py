"""SeCom through real gateways in front of the shared vLLM workers, memory in a real SQLite
file: a fact from an earlier request reaches a later request's prompt (read back from
vLLM's own prompt tokens, not from the model's answer), streamed answers are stored once
complete, segmentation asks the served model after the answer and falls back to TextTiling
(counted) where SmolLM2's reply does not parse, an erase wins over a write in flight, and a
gateway SIGKILLed during a burst of writes loses no acknowledged turn and stores none twice
after a restart."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.launcher import free_port, wait_for_health
from tests.integration.conftest import MODEL, Stack, _start_gateway

pytestmark = pytest.mark.integration


@dataclass
class MemoryGateway:
    url: str
    process: subprocess.Popen
    db: Path
    config: Path
    log: Path


def start(stack: Stack, run_dir: Path, name: str, port: int | None = None,
          **secom: object) -> MemoryGateway:
    db = run_dir / f"{name}.sqlite3"
    config = run_dir / f"{name}.yaml"
    config.write_text(json.dumps({"pipeline": {"stages": ["secom"],
                                               "secom": {"db_path": str(db), **secom}}}))
    port = port or free_port()
    log = run_dir / f"{name}.log"
    process = _start_gateway([w.url for w in stack.workers], port, log,
                             ["--config", str(config)])
    url = f"http://127.0.0.1:{port}"
    wait_for_health(url, process, timeout_s=120)
    return MemoryGateway(url, process, db, config, log)


def stop(gateway: MemoryGateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secom")


@pytest.fixture(scope="module")
def memory_gateway(stack: Stack, run_dir: Path) -> Iterator[MemoryGateway]:
    gateway = start(stack, run_dir, "recall")
    try:
        yield gateway
    finally:
        stop(gateway)
        print(gateway.log.read_text()[-3000:])


def chat(url: str, content: str, user: str, conversation: str | None, *,
         request_id: str | None = None, timeout: float = 120, **extra) -> httpx.Response:
    headers = {}
    if conversation is not None:
        headers["x-tessera-conversation"] = conversation
    if request_id is not None:
        headers["x-request-id"] = request_id
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 6, "temperature": 0, "user": user, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=timeout)


def exchanges(url: str, user: str, conversation: str) -> list[dict]:
    response = httpx.get(f"{url}/v1/memory/{user}/{conversation}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def wait_for_exchanges(url: str, user: str, conversation: str, count: int) -> list[dict]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = exchanges(url, user, conversation)
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{count} exchanges not stored within 60 s: {found}")


def prompt_text(response: httpx.Response) -> str:
    """The prompt vLLM ran, rebuilt from its prompt tokens (prompt_logprobs)."""
    assert response.status_code == 200, response.text
    tokens = response.json()["prompt_logprobs"]
    return "".join(next(iter(entry.values()))["decoded_token"] for entry in tokens if entry)


def test_an_earlier_fact_is_recalled_into_a_later_prompt(memory_gateway: MemoryGateway) -> None:
    url = memory_gateway.url
    fact = chat(url, "My dog is called Biscuit and she loves the beach.", "alice", "c1")
    assert fact.status_code == 200, fact.text
    stored = wait_for_exchanges(url, "alice", "c1", 1)
    answer = fact.json()["choices"][0]["message"]["content"]
    assert stored[0]["user"] == "My dog is called Biscuit and she loves the beach."
    assert stored[0]["assistant"] == answer  # what the client got, stored after the answer

    question = "What is my dog called?"
    recalled = prompt_text(chat(url, question, "alice", "c1", prompt_logprobs=0))
    assert "Biscuit" in recalled and "earlier conversation" in recalled
    for user, conversation, headers in (("bob", "c1", {}), ("alice", "c2", {})):
        other = prompt_text(chat(url, question, user, conversation, prompt_logprobs=0))
        assert "Biscuit" not in other, (user, conversation, headers)
    # The question itself was stored too (after its answer), once.
    assert len(wait_for_exchanges(url, "alice", "c1", 2)) == 2


def test_a_streamed_answer_is_stored_once_complete(memory_gateway: MemoryGateway) -> None:
    url = memory_gateway.url
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      headers={"x-tessera-conversation": "s1"},
                      json={"model": MODEL, "stream": True, "max_tokens": 8,
                            "temperature": 0, "user": "carol",
                            "messages": [{"role": "user", "content": "I live in Lisbon."}]},
                      ) as response:
        assert response.status_code == 200
        parts = []
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                parts.append(delta.get("content") or "")
    stored = wait_for_exchanges(url, "carol", "s1", 1)
    assert [(e["user"], e["assistant"]) for e in stored] == [("I live in Lisbon.",
                                                              "".join(parts))]


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label set: value} of one Prometheus metric in an exposition text."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name):
            labels, _, value = line[len(name):].rpartition(" ")
            values[labels] = float(value)
    return values


def wait_for_metric(url: str, name: str, total: float, timeout_s: float = 180) -> str:
    """The gateway's /metrics once the values of ``name`` add up to ``total``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        if sum(metric_values(metrics, name).values()) >= total:
            return metrics
        time.sleep(0.3)
    raise AssertionError(f"{name} did not reach {total} within {timeout_s} s")


def worker_requests_running(stack: Stack) -> float:
    return sum(sum(metric_values(httpx.get(f"{w.url}/metrics", timeout=10).text,
                                 "vllm:num_requests_running").values())
               for w in stack.workers)


def worker_requests_finished(stack: Stack) -> float:
    """Requests the generative vLLM workers finished, from their own /metrics."""
    return sum(sum(metric_values(httpx.get(f"{w.url}/metrics", timeout=10).text,
                                 "vllm:request_success_total").values())
               for w in stack.workers)


def test_segmentation_asks_the_served_model_and_counts_the_fallback(
    stack: Stack, run_dir: Path,
) -> None:
    gateway = start(stack, run_dir, "segmenter", segmenter="model_first",
                    segmenter_prompts=["batch"], segmenter_max_tokens=48)
    try:
        before = worker_requests_finished(stack)
        talk = ["My dog is called Biscuit.", "She loves the beach.",
                "I booked a flight to Lisbon in June."]
        for number, content in enumerate(talk):
            assert chat(gateway.url, content, "erin", "seg").status_code == 200
            # Each write's segmentation (after the answer) ends before the next request, so
            # no recall catches an unsegmented tail up first.
            metrics = wait_for_metric(gateway.url, "tessera_secom_segmentations_total",
                                      number + 1)
        decided = metric_values(metrics, "tessera_secom_segmentations_total")
        calls = metric_values(metrics, "tessera_secom_segmentation_model_calls_total")
        fallbacks = metric_values(metrics, "tessera_secom_segmentation_fallbacks_total")
        print(f"segmenters: {decided}\nmodel calls: {calls}\nfallbacks: {fallbacks}")
        # The first exchange is one segment; each later write asked the model once.
        assert decided.get('{segmenter="trivial"}') == 1
        asked = sum(calls.values())
        assert asked == len(talk) - 1
        assert worker_requests_finished(stack) - before >= len(talk) + asked  # vLLM ran them
        unparsed = calls.get('{prompt="batch",result="unparsed"}', 0)
        assert unparsed >= 1, "SmolLM2 parsed every batch prompt: no fallback to show"
        assert fallbacks.get('{prompt="batch",reason="unparsed"}') == unparsed
        assert decided.get('{segmenter="texttiling"}') == unparsed
        units = sqlite3.connect(gateway.db).execute(
            "SELECT first_exchange, last_exchange FROM units ORDER BY first_exchange").fetchall()
        assert units[0][0] == 0 and units[-1][1] == len(talk) - 1  # every exchange covered
    finally:
        stop(gateway)
        print(gateway.log.read_text()[-3000:])


def test_an_erase_wins_over_a_write_in_flight(stack: Stack, run_dir: Path) -> None:
    """A request's answer arrived; its write waits on the served model (segmentation, a long
    reply, seen running in vLLM's own metrics); the conversation is erased meanwhile.
    Nothing of it may come back."""
    gateway = start(stack, run_dir, "erase", segmenter="model_first",
                    segmenter_prompts=["batch"], segmenter_max_tokens=400)
    marker = "passport-QX81773"
    try:
        assert chat(gateway.url, "My dog is called Biscuit.", "fay", "e1").status_code == 200
        wait_for_metric(gateway.url, "tessera_secom_writes_total", 1)
        assert chat(gateway.url, f"My {marker}.", "fay", "e1").status_code == 200
        deadline = time.monotonic() + 60
        while worker_requests_running(stack) < 1:  # the answer is done: this is the write's
            assert time.monotonic() < deadline, "the segmentation call never ran"
            time.sleep(0.05)
        erased = httpx.delete(f"{gateway.url}/v1/memory/fay/e1", timeout=30)
        assert erased.json()["exchanges_deleted"] == 2
        # Until both writes have ended, one way or another.
        metrics = wait_for_metric(gateway.url, "tessera_secom_writes_total", 2)
        writes = metric_values(metrics, "tessera_secom_writes_total")
        print(f"writes: {writes}")
        assert writes.get('{result="erased"}') == 1
        calls = metric_values(metrics, "tessera_secom_segmentation_model_calls_total")
        assert sum(calls.values()) == 1  # the model answered, after the erase
        assert exchanges(gateway.url, "fay", "e1") == []
        with sqlite3.connect(gateway.db) as db:
            assert db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 0
        on_disk = b"".join(p.read_bytes() for p in gateway.db.parent.glob("erase.sqlite3*"))
        assert marker.encode() not in on_disk
    finally:
        stop(gateway)
        print(gateway.log.read_text()[-3000:])


def test_sigkill_during_a_burst_of_writes_loses_no_acknowledged_turn(
    stack: Stack, run_dir: Path,
) -> None:
    gateway = start(stack, run_dir, "durability")
    port = int(gateway.url.rsplit(":", 1)[1])
    ids = [f"burst-{n:03d}" for n in range(40)]
    acknowledged: set[str] = set()

    def send(request_id: str) -> None:
        try:  # the kill breaks some of these: that is the point
            chat(gateway.url, f"Fact number {request_id}: the code is {request_id[::-1]}.",
                 "dave", "k1", request_id=request_id, max_tokens=1, timeout=60)
        except httpx.HTTPError:
            pass

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, request_id) for request_id in ids]
        # Acknowledged = visible through the memory route (committed): kill once some are.
        deadline = time.monotonic() + 120
        while len(acknowledged) < 8 and time.monotonic() < deadline:
            acknowledged |= {e["request_id"] for e in exchanges(gateway.url, "dave", "k1")}
            time.sleep(0.05)
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait()
        for future in futures:
            future.result()
    assert len(acknowledged) >= 8, "the burst was too slow to be interrupted"

    with sqlite3.connect(gateway.db) as db:  # the file itself survived the kill
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    restarted = start(stack, run_dir, "durability", port=port)
    try:
        after = exchanges(restarted.url, "dave", "k1")
        stored_ids = [e["request_id"] for e in after]
        assert acknowledged <= set(stored_ids)
        assert len(stored_ids) == len(set(stored_ids))
        assert [e["position"] for e in after] == list(range(len(after)))
        print(f"acknowledged before the kill: {len(acknowledged)}, stored after restart: "
              f"{len(stored_ids)} of {len(ids)}")
        assert len(stored_ids) < len(ids), "the kill came after the burst: nothing tested"
        # Clients retry everything (same request ids): still each turn once, all present.
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(send, ids))
        final = wait_for_exchanges(restarted.url, "dave", "k1", len(ids))
        assert sorted(e["request_id"] for e in final) == ids
    finally:
        stop(restarted)
        print(restarted.log.read_text()[-3000:])
