"""Per-API-key concurrency slots: how many requests one key may have in flight at once.

A plain answer is finished when its route handler returns, but a streamed one outlives the
handler, so its slot is released by whoever finishes last: the handler for plain responses
(or on any error), the stream relay for streams. ``KeySlots.hold`` keeps that rule in one
place for every forwarded route.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.responses import Response

from server.errors import OpenAIError

STREAM_MEDIA_TYPE = "text/event-stream"


class HeldSlot:
    """One taken slot. ``release`` is idempotent; ``follow`` hands it to a streamed
    response (whose relay calls ``release`` at the stream's end) or releases it now."""

    def __init__(self, in_flight: Counter[str], key: str) -> None:
        self._in_flight = in_flight
        self._key = key
        self._released = False
        self.handed_to_stream = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._in_flight[self._key] -= 1

    def follow(self, response: Response) -> Response:
        if response.media_type == STREAM_MEDIA_TYPE:
            self.handed_to_stream = True
        else:
            self.release()
        return response


class KeySlots:
    """``limit`` concurrent requests per API key (0: unlimited); requests without a key
    share the ``-`` bucket."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight: Counter[str] = Counter()

    @contextmanager
    def hold(self, api_key: str | None) -> Iterator[HeldSlot]:
        """Take a slot for the block; a 429 when the key is at its limit. On an exception,
        or when the block ends without handing the slot to a stream, it is released."""
        key = api_key or "-"
        if self.limit and self.in_flight[key] >= self.limit:
            raise OpenAIError(429, f"Too many concurrent requests for this key (limit "
                              f"{self.limit}).", type="rate_limit_error",
                              code="concurrency_limit_exceeded")
        self.in_flight[key] += 1
        slot = HeldSlot(self.in_flight, key)
        try:
            yield slot
        except BaseException:
            slot.release()
            raise
        if not slot.handed_to_stream:
            slot.release()
