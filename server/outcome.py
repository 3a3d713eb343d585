"""What the after-response hooks learn about an answer: its text, and whether it completed.

A plain answer is read from the JSON the client got. A streamed answer is followed event by
event as it is relayed (never buffered: each event goes to the client before it is parsed);
it is complete only when choice 0 ended with a finish reason, the `[DONE]` event arrived and
no error event came. A client that leaves mid-stream, or a worker that fails, gives an
incomplete outcome, and memory stores nothing for it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from prompt_pipeline.stage import ResponseOutcome


def outcome_of_json(route: str, status: int, body: bytes) -> ResponseOutcome:
    if status != 200:
        return ResponseOutcome("", completed=False)
    try:
        choice = json.loads(body)["choices"][0]
        text = choice["message"]["content"] if route == "chat" else choice["text"]
        finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError):
        return ResponseOutcome("", completed=False)
    return ResponseOutcome(text or "", completed=finish is not None, finish_reason=finish)


class StreamFollower:
    """Accumulates choice 0's text from relayed SSE events."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.done = False
        self.failed = False

    def feed(self, events: bytes) -> None:
        for line in events.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                self.failed = True
                continue
            if not isinstance(event, dict) or "error" in event:
                self.failed = True
                continue
            for choice in event.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                if self.route == "chat":
                    piece = (choice.get("delta") or {}).get("content")
                else:
                    piece = choice.get("text")
                if isinstance(piece, str):
                    self.parts.append(piece)
                if choice.get("finish_reason") is not None:
                    self.finish_reason = choice["finish_reason"]

    def outcome(self, relayed_to_end: bool) -> ResponseOutcome:
        completed = (relayed_to_end and self.done and not self.failed
                     and self.finish_reason is not None)
        return ResponseOutcome("".join(self.parts), completed, self.finish_reason)


async def follow_stream(body: AsyncIterator[bytes], follower: StreamFollower,
                        on_end: Callable[[ResponseOutcome], None]) -> AsyncIterator[bytes]:
    """Relay ``body`` unchanged; once it ends (or is abandoned) hand the outcome to
    ``on_end``. Each chunk is yielded before it is parsed, so following costs no latency."""
    relayed_to_end = False
    try:
        async for chunk in body:
            yield chunk
            follower.feed(chunk)
        relayed_to_end = True
    finally:
        on_end(follower.outcome(relayed_to_end))
