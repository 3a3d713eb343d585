"""Memory units at the three granularities SeCom compares: turn (one exchange), session (a
whole conversation), segment (a topical run of exchanges from `segmentation`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prompt_pipeline.secom.segmentation import Segment
from prompt_pipeline.secom.store import Exchange, MemoryUnit

Compress = Callable[[str], str]


def _unit(kind: str, exchanges: Sequence[Exchange], compress: Compress | None) -> MemoryUnit:
    text = "\n".join(exchange.text for exchange in exchanges)
    return MemoryUnit(kind, exchanges[0].position, exchanges[-1].position, text,
                      compress(text) if compress else text)


def turn_units(exchanges: Sequence[Exchange], compress: Compress | None = None) -> list[MemoryUnit]:
    return [_unit("turn", [exchange], compress) for exchange in exchanges]


def session_units(sessions: Sequence[Sequence[Exchange]],
                  compress: Compress | None = None) -> list[MemoryUnit]:
    return [_unit("session", session, compress) for session in sessions if session]


def segment_units(exchanges: Sequence[Exchange], segments: Sequence[Segment],
                  compress: Compress | None = None) -> list[MemoryUnit]:
    """``segments`` index into ``exchanges`` (inclusive first, last)."""
    return [_unit("segment", exchanges[first : last + 1], compress) for first, last in segments]
