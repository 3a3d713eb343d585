"""The gateway stage: extract the intention, add it to the system message, leave the user's
messages byte-identical (SecurityLingua, section 3 of the paper: inference).

Only chat requests are annotated; a text completion has no system message and passes
through unchanged. Per request: text of the latest user turn (or all user turns), text
parts only (an image part is not text to classify); the extractor keeps words with
P(keep) > threshold; the intention is added to the first system message (one is created
when there is none) through the configured template. In block mode a harm classifier judges
the intention, and a flagged request is refused before any worker sees it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

from prompt_pipeline.config import SecurityLinguaSettings
from prompt_pipeline.errors import PipelineError, PipelineResponse
from prompt_pipeline.messages import user_text, with_system_note
from prompt_pipeline.securitylingua.artifacts import (
    DEFAULT_EXTRACTOR_DIR,
    DEFAULT_HARM_CLASSIFIER,
)
from prompt_pipeline.stage import RequestContext
from prompt_pipeline.token_classifier import TokenClassifier
from prompt_pipeline.token_classifier.classifier import bf16_is_native

logger = logging.getLogger("tessera.securitylingua")
TOKEN_BUCKETS = (0, 25, 50, 75, 100, 150, 200, 300, 500, 1000)


@dataclass
class SecurityLinguaMetrics:
    tokens_added: Histogram
    blocked: Counter
    flagged: Counter | None  # the gateway's tessera_securitylingua_flagged_total

    @classmethod
    def create(cls, registry: CollectorRegistry, flagged: Counter | None) -> SecurityLinguaMetrics:
        return cls(
            Histogram("tessera_securitylingua_tokens_added", "Encoder word pieces added to "
                      "the system message per annotated request.", buckets=TOKEN_BUCKETS,
                      registry=registry),
            Counter("tessera_securitylingua_blocked", "Requests refused in block mode.",
                    registry=registry),
            flagged,
        )


class SecurityLinguaStage:
    name = "securitylingua"

    def __init__(self, extractor: TokenClassifier, settings: SecurityLinguaSettings,
                 metrics: SecurityLinguaMetrics, harm: Any | None = None) -> None:
        if settings.mode == "block" and harm is None:
            raise ValueError("block mode needs a harm classifier")
        self.extractor = extractor
        self.settings = settings
        self.metrics = metrics
        self.harm = harm

    def extract(self, text: str) -> str:
        compression = self.extractor.compress(text, threshold=self.settings.threshold)
        words = compression.keep.nonzero()[0]
        keep = compression.keep
        if len(words) > self.settings.max_intention_words:
            # Cap what is *added* (the prompt itself was classified whole).
            keep = keep.copy()
            keep[words[self.settings.max_intention_words:]] = False
        return compression.words.join(keep.tolist())

    async def __call__(self, request: Any, context: RequestContext) -> Any:
        if not self.settings.enabled or context.route != "chat":
            return request
        text = user_text(request.messages, self.settings.turns)
        if not text:
            context.notes["securitylingua"] = {"intention": None, "reason": "no user text"}
            return request
        started = time.perf_counter()
        intention = await asyncio.to_thread(self.extract, text)
        harm_probability = None
        if self.settings.mode == "block" and intention:
            harm_probability = await asyncio.to_thread(self.harm.probability, intention)
        context.notes["securitylingua"] = {
            "intention": intention, "harm_probability": harm_probability,
            "extract_ms": round((time.perf_counter() - started) * 1e3, 2)}
        if harm_probability is not None and harm_probability >= self.settings.block_threshold:
            self.metrics.blocked.inc()
            logger.info("blocked request_id=%s harm=%.2f", context.request_id, harm_probability)
            self._refuse(request, context)
        if not intention:
            return request  # all template, no request: nothing to reveal
        note = self.settings.system_template.replace("{intention}", intention)
        self.metrics.tokens_added.observe(len(self.extractor.tokenizer.encode(note).ids))
        if self.metrics.flagged is not None:
            self.metrics.flagged.inc()
        return request.model_copy(update={"messages": with_system_note(request.messages, note)})

    def _refuse(self, request: Any, context: RequestContext) -> None:
        if self.settings.block_response == "error":
            raise PipelineError(400, "The request was refused by this server's content "
                                "policy.", code="content_policy_violation")
        raise refusal_response(request, context, self.settings.refusal_message)


def refusal_response(request: Any, context: RequestContext, message: str) -> PipelineResponse:
    """A chat completion (or its SSE chunks) that carries the refusal, as a model would."""
    ident, created = f"chatcmpl-{context.request_id}", int(time.time())
    body = {"id": ident, "object": "chat.completion", "created": created,
            "model": request.model, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": message},
                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    chunks = None
    if request.stream:
        base = {"id": ident, "object": "chat.completion.chunk", "created": created,
                "model": request.model}
        chunks = [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": message},
                                  "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
    return PipelineResponse(body, chunks)


def extractor_precision(quantize: str) -> str | None:
    """The `TokenClassifier.load` quantize argument for a `quantize` setting."""
    if quantize == "auto":
        return "bf16" if bf16_is_native() else None
    return None if quantize == "none" else quantize


def build_securitylingua_stage(settings: SecurityLinguaSettings, registry: CollectorRegistry,
                               flagged: Counter | None) -> SecurityLinguaStage:
    """Loads the extractor (and, in block mode, the harm classifier) from local files."""
    torch.set_num_threads(settings.threads)
    extractor = TokenClassifier.load(settings.artifact_dir or DEFAULT_EXTRACTOR_DIR,
                                     extractor_precision(settings.quantize),
                                     settings.max_chunk_tokens)
    harm = None
    if settings.mode == "block":
        from prompt_pipeline.securitylingua.harm import load_harm_classifier

        harm = load_harm_classifier(settings.harm_classifier or DEFAULT_HARM_CLASSIFIER)
    return SecurityLinguaStage(extractor, settings, SecurityLinguaMetrics.create(registry, flagged),
                               harm)
