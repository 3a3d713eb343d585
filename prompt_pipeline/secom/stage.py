"""SeCom as a gateway stage: recall before the request, remember after the response.

Opt-in per request: the request names a `user`, and the gateway puts the conversation id
(header `x-tessera-conversation` or body field `conversation_id`) into
``context.notes["conversation_id"]``. A key whose default is on (`opt_in_per_key`,
`default_opt_in`) uses memory for every request with a `user`, under conversation
"default" when none is named; `x-tessera-memory: off` opts one request out, and
`x-tessera-memory: recall` recalls without storing this exchange (a read-only question).
Recall injects the chosen units' original text into the system message; the user's messages
stay as sent.
After a completed answer, the exchange (the latest user message and the answer) is stored
under the request id, so a retried request is stored once; a failed or cancelled answer
stores nothing. Then the conversation's open tail is segmented: by the served model first
(`segmenter: model_first`; the gateway hands the stage a `complete` callable that reaches a
worker over HTTP, `use_model`), by TextTiling where the model's reply does not parse or the
call fails (counted by prompt and reason), or by TextTiling only (`segmenter: embedding`).
SQLite and MiniLM run in a worker thread, off the event loop; the model call is awaited
with no thread lock held. The exchange is stored at once; segmentations of one conversation
run one at a time in this process, so each asks the model about a tail no other write is
changing, and a burst of writes is segmented in fewer calls than it has writes.

A write carries the erase generation read when its request arrived: an erase
(`DELETE /v1/memory/...`) that comes before the write commits wins, and the write stores
nothing (`tessera_secom_writes_total{result="erased"}`).

The stage also answers the gateway's memory routes (`list_memory`, `erase_memory`): the
tenant is always derived from the caller's API key, so a user name or conversation id
guessed from another tenant reaches nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from prompt_pipeline.config import SecomSettings
from prompt_pipeline.errors import PipelineError
from prompt_pipeline.messages import user_text, with_system_note
from prompt_pipeline.secom.memory import ConversationMemory, RecallSettings
from prompt_pipeline.secom.retrieval import render_context
from prompt_pipeline.secom.segmenter import Complete, SegmentationReport, TailSegmenter
from prompt_pipeline.secom.store import (
    VALID_ID,
    ConversationErased,
    ConversationKey,
    SQLiteMemoryStore,
    tenant_of,
)
from prompt_pipeline.stage import RequestContext, ResponseOutcome

logger = logging.getLogger("tessera.secom")

CONVERSATION_NOTE = "conversation_id"
MEMORY_SWITCH_NOTE = "memory"  # "off": no memory; "recall": recall without storing
KEY_NOTE = "secom_key"
GENERATION_NOTE = "secom_generation"
DEFAULT_CONVERSATION = "default"
WRITE_LOCK_STRIPES = 64
# What the gateway hands over: (model, prompt, max_tokens, timeout_s) -> the reply's text.
ModelClient = Callable[[str, str, int, float], Awaitable[str]]


class SecomMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        # The gateway declares tessera_memory_units_retrieved (its dashboard plots it) and
        # hands it over with `use_units_histogram`; this unregistered one stands in until then.
        self.injected = Histogram("tessera_memory_units_retrieved", "SeCom memory units "
                                  "added to a request.", buckets=(0, 1, 2, 4, 8, 16, 32, 64),
                                  registry=None)
        self.writes = Counter("tessera_secom_writes", "Memory writes after a response, by "
                              "result.", ["result"], registry=registry)
        self.write_seconds = Histogram("tessera_secom_write_seconds", "Time of one memory "
                                       "write (store, segment, embed), off the request path.",
                                       registry=registry)
        self.segmentations = Counter("tessera_secom_segmentations", "Writes whose open tail "
                                     "was segmented, by the segmenter that decided.",
                                     ["segmenter"], registry=registry)
        self.segmentation_calls = Counter("tessera_secom_segmentation_model_calls",
                                          "Segmentation prompts sent to the served model, by "
                                          "prompt and result.", ["prompt", "result"],
                                          registry=registry)
        self.segmentation_fallbacks = Counter(
            "tessera_secom_segmentation_fallbacks", "Segmentation prompts that gave no usable "
            "answer, so the next prompt or TextTiling decided, by prompt and reason.",
            ["prompt", "reason"], registry=registry)

    def count_model_calls(self, report: SegmentationReport) -> None:
        for prompt, result in report.model_calls:
            self.segmentation_calls.labels(prompt, result).inc()
        for prompt, reason in report.fallbacks:
            self.segmentation_fallbacks.labels(prompt, reason).inc()

    def count_decision(self, report: SegmentationReport, current: bool) -> None:
        if not current:  # another writer moved the tail on: TextTiling redid it
            self.segmentation_fallbacks.labels("any", "tail_moved").inc()
        self.segmentations.labels(report.segmenter if current else "texttiling").inc()


class SecomStage:
    name = "secom"

    def __init__(self, memory: ConversationMemory, settings: SecomSettings | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.memory = memory
        self.settings = settings or SecomSettings()
        self.metrics = SecomMetrics(registry)
        self._model: ModelClient | None = None
        self._write_locks = [asyncio.Lock() for _ in range(WRITE_LOCK_STRIPES)]

    def use_units_histogram(self, histogram: Histogram) -> None:
        self.metrics.injected = histogram

    def use_model(self, client: ModelClient) -> None:
        """How segmentation reaches the served model (the gateway's HTTP client)."""
        self._model = client

    def _complete_for(self, request: Any) -> Complete | None:
        model = self.settings.segmenter_model or getattr(request, "model", None)
        client = self._model
        if client is None or not model:
            return None
        timeout_s = self.settings.segmenter_timeout_s

        async def complete(prompt: str, max_tokens: int) -> str:
            return await client(model, prompt, max_tokens, timeout_s)

        return complete

    def conversation_key(self, request: Any, context: RequestContext) -> ConversationKey | None:
        user = getattr(request, "user", None)
        if context.route != "chat" or not user or context.notes.get(MEMORY_SWITCH_NOTE) == "off":
            return None
        conversation = context.notes.get(CONVERSATION_NOTE)
        if not conversation:
            if not self.settings.opted_in_by_default(context.api_key):
                return None
            conversation = DEFAULT_CONVERSATION
        if not isinstance(user, str) or not VALID_ID.fullmatch(user):
            # Memory under a user the /v1/memory routes cannot name could not be erased.
            raise PipelineError(400, "With conversation memory, `user` must be 1 to 256 "
                                "printable characters without slashes.", param="user",
                                code="invalid_memory_id")
        return ConversationKey.for_request(context.api_key, str(user), str(conversation))

    async def __call__(self, request: Any, context: RequestContext) -> Any:
        key = self.conversation_key(request, context)
        if key is None:
            return request
        if context.notes.get(MEMORY_SWITCH_NOTE) != "recall":
            context.notes[KEY_NOTE] = key  # remember this exchange after the answer
            context.wants_outcome = True
        query = user_text(request.messages, "latest")
        if query:
            units, generation = await asyncio.to_thread(self.memory.recall_with_generation,
                                                        key, query)
        else:
            units, generation = [], await asyncio.to_thread(self.memory.generation, key)
        # Read as the request arrives: an erase after this point wins over this write.
        context.notes[GENERATION_NOTE] = generation
        context.notes["secom_units"] = len(units)
        self.metrics.injected.observe(len(units))
        if not units:
            return request
        return request.model_copy(
            update={"messages": with_system_note(request.messages, render_context(units))})

    async def after_response(self, request: Any, context: RequestContext,
                             outcome: ResponseOutcome) -> None:
        key = context.notes.get(KEY_NOTE)
        if key is None:
            return
        if not outcome.completed:
            self.metrics.writes.labels("not_completed").inc()
            return
        started = time.perf_counter()
        generation = context.notes.get(GENERATION_NOTE)
        try:
            stored = await self._write(request, context, outcome, key, generation)
        except ConversationErased:
            self.metrics.writes.labels("erased").inc()
            return
        except Exception:
            self.metrics.writes.labels("failed").inc()
            raise
        self.metrics.writes.labels("stored" if stored else "duplicate").inc()
        self.metrics.write_seconds.observe(time.perf_counter() - started)

    async def _write(self, request: Any, context: RequestContext, outcome: ResponseOutcome,
                     key: ConversationKey, generation: int | None) -> bool:
        memory = self.memory
        if not await asyncio.to_thread(memory.store_exchange, key, context.request_id,
                                       user_text(request.messages, "latest"), outcome.text,
                                       generation):
            return False
        # The exchange is committed (acknowledged) without waiting for segmentation. The
        # units follow, one write of this conversation at a time: a write that finds its
        # exchange already segmented by the one before it (a burst) asks nothing. A crash
        # from here on leaves an uncovered tail, which the next recall segments.
        stripe = zlib.crc32(f"{key.tenant}\0{key.user}\0{key.conversation}".encode())
        async with self._write_locks[stripe % WRITE_LOCK_STRIPES]:
            tail = await asyncio.to_thread(memory.open_tail, key)
            if len(tail.texts) == tail.open_exchanges:  # nothing left to segment
                if generation is not None and generation != await asyncio.to_thread(
                        memory.generation, key):
                    raise ConversationErased(key.conversation)  # erased since it was stored
                return True
            report = await memory.segment(tail, self._complete_for(request))
            self.metrics.count_model_calls(report)
            current = await asyncio.to_thread(memory.apply_tail, key, tail, report.segments,
                                              generation)
        self.metrics.count_decision(report, current)
        return True

    # --- the memory routes (GET/DELETE /v1/memory/...)
    async def list_memory(self, api_key: str | None, user: str,
                          conversation: str | None = None) -> dict[str, Any]:
        tenant = tenant_of(api_key)
        if conversation is None:
            summaries = await asyncio.to_thread(self.memory.store.conversation_summaries,
                                                tenant, user)
            return {"object": "list", "user": user, "data": [
                {"object": "memory.conversation", "conversation_id": s.conversation,
                 "exchanges": s.exchanges, "first_at": s.first_at, "last_at": s.last_at}
                for s in summaries]}
        key = ConversationKey(tenant, user, conversation)
        exchanges = await asyncio.to_thread(self.memory.store.exchanges, key)
        return {"object": "list", "user": user, "conversation_id": conversation, "data": [
            {"object": "memory.exchange", "position": e.position, "request_id": e.request_id,
             "user": e.user_text, "assistant": e.assistant_text, "created_at": e.created_at}
            for e in exchanges]}

    async def erase_memory(self, api_key: str | None, user: str,
                           conversation: str | None = None) -> int:
        return await asyncio.to_thread(self.memory.erase, tenant_of(api_key), user,
                                       conversation)


def build_secom_stage(settings: SecomSettings, registry: CollectorRegistry) -> SecomStage:
    from prompt_pipeline.secom.embeddings import SentenceEncoder

    encoder = SentenceEncoder(threads=settings.threads)
    compress = None
    if settings.compressor_dir is not None:
        from prompt_pipeline.token_classifier import TokenClassifier

        classifier = TokenClassifier.load(settings.compressor_dir)
        rate = settings.compression_rate

        def compress(text: str) -> str:
            return classifier.compress(text, rate=rate, force_digits=True).text

    def embed(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts)

    store = SQLiteMemoryStore(settings.resolved_db_path())
    recall = RecallSettings(settings.granularity, settings.method, settings.top_k,
                            settings.token_budget)
    segmenter = TailSegmenter(settings.segmenter, tuple(settings.segmenter_prompts),
                              settings.segmenter_max_tokens, settings.max_segment_exchanges)
    logger.info("secom memory at %s (%s units, %s retrieval, %s segmentation)", store.path,
                settings.granularity, settings.method, settings.segmenter)
    return SecomStage(ConversationMemory(store, embed, compress, recall, segmenter), settings,
                      registry)
