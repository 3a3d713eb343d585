"""SeCom's key labels (the rule teacher), the stage built from `pipeline:` config, and the
gateway's reading of an answer's outcome (plain and streamed)."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from prompt_pipeline.config import PipelineSettings, build_stages
from prompt_pipeline.secom.key_labels import document_frequency, keep_spans
from prompt_pipeline.secom.stage import SecomStage
from prompt_pipeline.stage import ResponseOutcome
from server.outcome import StreamFollower, outcome_of_json


def test_the_rule_keeps_content_words_and_drops_boilerplate() -> None:
    texts = [f"[user]: topic {n}\n[assistant]: That sounds good." for n in range(10)]
    text = "[user]: My dog is called Biscuit, she is 3.\n[assistant]: That sounds good."
    df = document_frequency([*texts, text])
    kept = [text[a:b] for a, b in keep_spans(text, df, max_df=0.15)]
    assert kept == ["dog", "called", "Biscuit", "3"]


def test_the_secom_stage_is_built_from_pipeline_config(tmp_path: Path) -> None:
    settings = PipelineSettings(stages=["secom"],
                                secom={"db_path": tmp_path / "m.sqlite3",
                                       "opt_in_per_key": {"sk-a": True}})
    [guarded] = build_stages(settings, CollectorRegistry())
    assert isinstance(guarded.stage, SecomStage) and hasattr(guarded, "after_response")
    assert guarded.stage.settings.opted_in_by_default("sk-a")
    assert not guarded.stage.settings.opted_in_by_default("sk-b")
    assert (tmp_path / "m.sqlite3").exists()


def _events(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n".encode()
                    for e in events)


def test_stream_outcomes() -> None:
    chunk = {"choices": [{"index": 0, "text": "Par", "finish_reason": None}]}
    end = {"choices": [{"index": 0, "text": "is", "finish_reason": "length"}]}
    other = {"choices": [{"index": 1, "text": "Rome", "finish_reason": "stop"}]}
    follower = StreamFollower("completions")
    follower.feed(_events(chunk, other))
    follower.feed(_events(end, "[DONE]"))
    assert follower.outcome(relayed_to_end=True) == ResponseOutcome("Paris", True, "length")
    assert not follower.outcome(relayed_to_end=False).completed  # the client left
    broken = StreamFollower("chat")
    broken.feed(_events({"error": {"message": "worker died"}}, "[DONE]"))
    assert not broken.outcome(True).completed
    unfinished = StreamFollower("chat")
    unfinished.feed(_events({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}))
    assert not unfinished.outcome(True).completed  # no finish reason, no [DONE]


def test_json_outcomes() -> None:
    body = json.dumps({"choices": [{"message": {"content": "Paris"},
                                    "finish_reason": "stop"}]}).encode()
    assert outcome_of_json("chat", 200, body) == ResponseOutcome("Paris", True, "stop")
    assert not outcome_of_json("chat", 502, body).completed
    assert not outcome_of_json("chat", 200, b"not json").completed
