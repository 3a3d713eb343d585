"""Per-key concurrency slots: who releases a slot, and when (server/key_slots.py)."""

from __future__ import annotations

import pytest
from fastapi.responses import JSONResponse, StreamingResponse

from server.errors import OpenAIError
from server.key_slots import KeySlots


def stream() -> StreamingResponse:
    return StreamingResponse(iter(["data: [DONE]\n\n"]), media_type="text/event-stream")


def test_a_plain_answer_releases_its_slot_when_the_block_ends() -> None:
    slots = KeySlots(limit=1)
    with slots.hold("k") as slot:
        assert slots.in_flight["k"] == 1
        slot.follow(JSONResponse({}))
    assert slots.in_flight["k"] == 0


def test_a_stream_keeps_its_slot_until_the_relay_releases_it() -> None:
    slots = KeySlots(limit=1)
    with slots.hold("k") as slot:
        slot.follow(stream())
    assert slots.in_flight["k"] == 1
    with pytest.raises(OpenAIError) as refused:
        with slots.hold("k"):
            pass
    assert refused.value.status_code == 429
    slot.release()
    slot.release()  # the relay and a late error path may both release: counted once
    assert slots.in_flight["k"] == 0


def test_an_error_releases_the_slot_even_after_a_stream_was_handed_over() -> None:
    slots = KeySlots(limit=1)
    with pytest.raises(RuntimeError), slots.hold(None) as slot:
        slot.follow(stream())
        raise RuntimeError("client left")
    assert slots.in_flight["-"] == 0


def test_keys_have_separate_slots_and_zero_means_unlimited() -> None:
    slots = KeySlots(limit=1)
    with slots.hold("a"), slots.hold("b"):
        assert slots.in_flight == {"a": 1, "b": 1}
    unlimited = KeySlots(limit=0)
    with unlimited.hold("a"), unlimited.hold("a"):
        assert unlimited.in_flight["a"] == 2
