"""SeCom segmentation: the model's answers parsed strictly, TextTiling over embeddings."""

from __future__ import annotations

import numpy as np

from prompt_pipeline.secom.segmentation import (
    batch_prompt,
    boundary_f1,
    parse_batch_segments,
    parse_continues,
    segment_by_embeddings,
)


def test_batch_prompt_numbers_every_exchange() -> None:
    prompt = batch_prompt(["[user]: a", "[user]: b"])
    assert "Exchange 0:\n[user]: a" in prompt and "Exchange 1:\n[user]: b" in prompt


def test_well_formed_json_lines_parse() -> None:
    reply = ('{"segment_id": 0, "start_exchange_number": 0, "end_exchange_number": 2}\n'
             '{"segment_id": 1, "start_exchange_number": 3, "end_exchange_number": 4}\n')
    assert parse_batch_segments(reply, 5) == [(0, 2), (3, 4)]


def test_segments_that_skip_overlap_or_fall_short_are_refused() -> None:
    line = '{{"start_exchange_number": {}, "end_exchange_number": {}}}'
    assert parse_batch_segments(line.format(0, 1) + "\n" + line.format(3, 4), 5) is None  # gap
    assert parse_batch_segments(line.format(0, 3) + "\n" + line.format(2, 4), 5) is None  # overlap
    assert parse_batch_segments(line.format(0, 2), 5) is None  # short
    assert parse_batch_segments("Sure! Here are the segments: 0-2, 3-4", 5) is None
    assert parse_batch_segments('{"start_exchange_number": "zero"}', 5) is None


def test_yes_no_answers_parse_and_anything_else_is_none() -> None:
    assert parse_continues(" Yes, it does.") is True
    assert parse_continues("no") is False
    assert parse_continues("Maybe") is None


def _topic_embeddings(lengths: list[int], dim: int = 32, noise: float = 0.3,
                      seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for _topic, length in enumerate(lengths):
        center = rng.normal(size=dim)
        rows += [center + noise * rng.normal(size=dim) for _ in range(length)]
    return np.asarray(rows)


def test_texttiling_finds_topic_boundaries() -> None:
    segments = segment_by_embeddings(_topic_embeddings([4, 5, 3, 6]))
    assert segments == [(0, 3), (4, 8), (9, 11), (12, 17)]


def test_one_topic_stays_one_segment() -> None:
    assert len(segment_by_embeddings(_topic_embeddings([10], noise=0.05))) <= 2


def test_segments_always_cover_every_exchange() -> None:
    for seed in range(5):
        segments = segment_by_embeddings(_topic_embeddings([3, 7, 2], seed=seed))
        assert segments[0][0] == 0 and segments[-1][1] == 11
        assert all(b[0] == a[1] + 1 for a, b in zip(segments, segments[1:], strict=False))


def test_boundary_f1() -> None:
    assert boundary_f1([(0, 3), (4, 8)], [(0, 3), (4, 8)]) == 1.0
    assert boundary_f1([(0, 8)], [(0, 3), (4, 8)]) == 0.0
