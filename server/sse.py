"""Cutting a server-sent-event byte stream into whole events.

An SSE event ends with a blank line (`\\n\\n`, or `\\r\\n\\r\\n` from servers that use CRLF);
a network chunk may end anywhere, even inside a UTF-8 character. Relaying only whole events
lets the gateway end a broken stream with an error event the client can still parse.
"""

from __future__ import annotations


class EventSplitter:
    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events now available (b"" if none), each with its blank line."""
        data = self._pending + chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        self._pending = data[end:]
        return data[:end]

    def rest(self) -> bytes:
        """Whatever followed the last complete event."""
        rest, self._pending = self._pending, b""
        return rest
