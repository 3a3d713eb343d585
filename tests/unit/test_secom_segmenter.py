"""Who segments the open tail: the served model first (the paper's batch prompt, then its
Yes/No prompt), TextTiling when no reply parses; every fallback reported with its reason."""

from __future__ import annotations

import numpy as np

from prompt_pipeline.secom.segmentation import segment_by_embeddings, segment_tail
from prompt_pipeline.secom.segmenter import Tail, TailSegmenter

# Two topics, three exchanges each: TextTiling cuts between them.
VECTORS = np.asarray([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3, dtype=np.float32)
TAIL = Tail(start=10, texts=[f"[user]: e{i}" for i in range(6)], embeddings=VECTORS,
            context=0, open_exchanges=5)


class Model:
    """Answers each prompt kind with a fixed reply, and records what it was asked."""

    def __init__(self, batch: str = "", yes_no: str = "", fail: bool = False) -> None:
        self.batch, self.yes_no, self.fail = batch, yes_no, fail
        self.prompts: list[str] = []

    async def __call__(self, prompt: str, max_tokens: int) -> str:
        self.prompts.append(prompt)
        if self.fail:
            raise ConnectionError("worker down")
        return self.batch if "Group the exchanges" in prompt else self.yes_no


async def test_a_batch_reply_that_parses_decides() -> None:
    line = '{{"start_exchange_number": {}, "end_exchange_number": {}}}'
    model = Model(batch=f"{line.format(0, 1)}\n{line.format(2, 5)}")
    report = await TailSegmenter().segment(TAIL, model)
    assert report.segments == [(0, 1), (2, 5)] and report.segmenter == "batch_prompt"
    assert report.fallbacks == [] and report.model_calls == [("batch", "parsed")]


async def test_an_unparsed_batch_reply_falls_back_to_the_yes_no_prompt() -> None:
    model = Model(batch="Exchange 0: [user]: e0 ...", yes_no="No, it is new.")
    report = await TailSegmenter().segment(TAIL, model)
    # The open segment is exchanges 0-4; the model says the new one (5) starts a topic.
    assert report.segments == [(0, 4), (5, 5)] and report.segmenter == "incremental_prompt"
    assert report.fallbacks == [("batch", "unparsed")]
    assert "Answer Yes or No" in model.prompts[1]


async def test_when_no_reply_parses_texttiling_decides_and_each_fallback_is_counted() -> None:
    model = Model(batch="I think so.", yes_no="Maybe.")
    report = await TailSegmenter().segment(TAIL, model)
    assert report.segmenter == "texttiling"
    assert report.segments == segment_tail(VECTORS, 0)
    assert report.fallbacks == [("batch", "unparsed"), ("incremental", "unparsed")]


async def test_a_failed_model_call_is_a_model_error_fallback() -> None:
    report = await TailSegmenter(prompts=("batch",)).segment(TAIL, Model(fail=True))
    assert report.segmenter == "texttiling"
    assert report.fallbacks == [("batch", "model_error")]
    assert report.model_calls == [("batch", "error")]


async def test_without_a_model_client_the_fallback_says_so() -> None:
    report = await TailSegmenter(prompts=("batch",)).segment(TAIL, None)
    assert report.fallbacks == [("batch", "no_model_client")]


async def test_embedding_mode_never_asks_the_model() -> None:
    model = Model()
    report = await TailSegmenter(mode="embedding").segment(TAIL, model)
    assert model.prompts == [] and report.segmenter == "texttiling" and report.fallbacks == []


async def test_a_single_exchange_needs_no_segmenter() -> None:
    model = Model()
    one = Tail(start=0, texts=["[user]: hi"], embeddings=VECTORS[:1], context=0,
               open_exchanges=0)
    report = await TailSegmenter().segment(one, model)
    assert report.segments == [(0, 0)] and model.prompts == []


async def test_a_model_segment_longer_than_the_cap_is_closed_at_the_cap() -> None:
    model = Model(batch='{"start_exchange_number": 0, "end_exchange_number": 5}')
    report = await TailSegmenter(max_exchanges=4).segment(TAIL, model)
    assert report.segments == [(0, 3), (4, 5)]


def test_a_tail_boundary_waits_until_its_right_window_has_arrived() -> None:
    # The topic changes at exchange 3; with only one exchange after it, the boundary is
    # not taken yet (its depth is measured against one side only).
    assert segment_tail(VECTORS[:4], 0) == [(0, 3)]
    assert segment_tail(VECTORS[:5], 0) == [(0, 2), (3, 4)]
    assert segment_tail(VECTORS, 0) == segment_by_embeddings(VECTORS)


def test_context_rows_are_never_cut_and_segments_are_relative_to_the_tail() -> None:
    # Rows 0-1 are context (closed already); the tail is rows 2-5.
    assert segment_tail(VECTORS, 2) == [(0, 0), (1, 3)]
