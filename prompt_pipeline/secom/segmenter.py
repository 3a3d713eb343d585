"""Who segments a conversation's open tail after a write: the served model first, TextTiling
when the model's answer does not parse (SeCom section 2.2, with the issue's fallback).

`mode="model_first"` tries the configured prompts in order, through the served model (the
gateway passes an async `complete(prompt, max_tokens) -> reply` that reaches a worker over
HTTP; this module knows nothing of HTTP):
- "batch": the paper's batch prompt over the tail's exchanges, numbered; its JSON lines must
  cover the tail exactly (`parse_batch_segments`);
- "incremental": the paper's Yes/No prompt, once per new exchange: does it continue the open
  segment? Any answer that is not a leading Yes/No fails the whole prompt.
A prompt that fails (reply does not parse, or the call itself failed) is recorded as a
fallback with its reason; when every prompt failed, TextTiling over the stored exchange
embeddings (`segment_tail`) decides. `mode="embedding"` runs TextTiling only, with no model
call. Either way a segment that reaches `max_exchanges` is closed, which bounds the tail and
with it the prompt a write sends.

The report says which segmenter decided and every fallback; the stage turns those into
Prometheus counters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from prompt_pipeline.secom.segmentation import (
    Segment,
    batch_prompt,
    cap_segments,
    incremental_prompt,
    parse_batch_segments,
    parse_continues,
    segment_tail,
)

Complete = Callable[[str, int], Awaitable[str]]  # (prompt, max_tokens) -> the model's reply
SegmenterMode = Literal["model_first", "embedding"]
PromptName = Literal["batch", "incremental"]
INCREMENTAL_MAX_TOKENS = 3  # "Yes" / "No" and a little room


@dataclass(frozen=True)
class Tail:
    """A conversation's open tail: the open segment and the exchanges stored after it."""

    start: int  # position of the tail's first exchange in the conversation
    texts: list[str]  # the tail's exchange texts, in order
    embeddings: np.ndarray  # [context + len(texts), dim]: `context` rows precede the tail
    context: int
    open_exchanges: int  # the first ones in `texts` already form the open segment

    @property
    def end(self) -> int:
        return self.start + len(self.texts)


@dataclass
class SegmentationReport:
    segments: list[Segment]  # relative to the tail's first exchange
    segmenter: str  # "batch_prompt", "incremental_prompt", "texttiling" or "trivial"
    model_calls: list[tuple[str, str]] = field(default_factory=list)  # (prompt, result)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)  # (prompt, reason)


@dataclass(frozen=True)
class TailSegmenter:
    mode: SegmenterMode = "model_first"
    prompts: tuple[PromptName, ...] = ("batch", "incremental")
    batch_max_tokens: int = 200
    max_exchanges: int = 24

    def tiling(self, tail: Tail) -> list[Segment]:
        return segment_tail(tail.embeddings, tail.context, max_exchanges=self.max_exchanges)

    async def segment(self, tail: Tail, complete: Complete | None) -> SegmentationReport:
        if len(tail.texts) <= 1:  # one exchange is one segment: nothing to ask
            return SegmentationReport([(0, len(tail.texts) - 1)] if tail.texts else [],
                                      "trivial")
        if self.mode == "embedding":
            return SegmentationReport(self.tiling(tail), "texttiling")
        report = SegmentationReport([], "texttiling")
        for prompt in self.prompts:
            if complete is None:
                report.fallbacks.append((prompt, "no_model_client"))
                continue
            try:
                segments = await (self._batch(tail, complete) if prompt == "batch"
                                  else self._incremental(tail, complete))
            except Exception:  # the worker failed, timed out, or none serves the model
                report.model_calls.append((prompt, "error"))
                report.fallbacks.append((prompt, "model_error"))
                continue
            report.model_calls.append((prompt, "parsed" if segments else "unparsed"))
            if segments is None:
                report.fallbacks.append((prompt, "unparsed"))
                continue
            report.segments = cap_segments(segments, self.max_exchanges)
            report.segmenter = f"{prompt}_prompt"
            return report
        report.segments = self.tiling(tail)
        return report

    async def _batch(self, tail: Tail, complete: Complete) -> list[Segment] | None:
        reply = await complete(batch_prompt(tail.texts), self.batch_max_tokens)
        return parse_batch_segments(reply, len(tail.texts))

    async def _incremental(self, tail: Tail, complete: Complete) -> list[Segment] | None:
        segments, start = [], 0
        for index in range(max(tail.open_exchanges, 1), len(tail.texts)):
            reply = await complete(incremental_prompt(tail.texts[start:index],
                                                      tail.texts[index]),
                                   INCREMENTAL_MAX_TOKENS)
            continues = parse_continues(reply)
            if continues is None:
                return None
            if not continues:
                segments.append((start, index - 1))
                start = index
        return [*segments, (start, len(tail.texts) - 1)]
