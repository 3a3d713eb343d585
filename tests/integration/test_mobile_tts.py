"""mobile.tts against the real gateway (two SmolLM2 workers): Best-of-N and beam search."""

from __future__ import annotations

from mobile.tts.beam import Beam, _extend, beam_search, evaluate_beam
from mobile.tts.best_of_n import evaluate
from mobile.tts.client import Endpoint
from mobile.tts.tasks import addition
from tests.integration.conftest import MODEL, Stack


def test_best_of_n_through_the_gateway_scores_prefixes_of_one_draw(stack: Stack) -> None:
    endpoint = Endpoint(stack.base_url, MODEL)
    tasks = addition(3, seed=5)
    r = evaluate(endpoint, tasks, (1, 4), ("likelihood", "vote", "verifier"), max_tokens=24,
                 progress=False, concurrency=3)
    assert r["count"] == 3 and len(r["tasks"]) == 3
    assert [row["question"] for row in r["tasks"]] == [t.question for t in tasks]
    for row in r["tasks"]:
        assert len(row["parsed"]) == 4 and all(0 < t <= 24 for t in row["tokens"])
        assert all(0.0 <= v <= 1.0 for v in row["verifier_scores"])
    # Tokens per task grow with N (prefixes), and the billing counter saw every sample.
    tok = r["generated_tokens_per_task"]
    assert tok[1] < tok[4] <= 4 * 24
    assert endpoint.completion_tokens >= 3 * tok[4]
    # At N = 1 every scorer picks the only candidate.
    assert len({r["accuracy"][s][1] for s in r["accuracy"]}) == 1


def test_beam_step_continues_the_partial_answer_through_the_gateway(stack: Stack) -> None:
    endpoint = Endpoint(stack.base_url, MODEL)
    partial = Beam("1. Red\n2.", -1.0, 4, False)
    grown, generated = _extend(endpoint, "List three colours, one per line.", partial, 2, 0.7, 8)
    assert len(grown) == 2 and generated == endpoint.completion_tokens > 0
    for beam in grown:  # continue_final_message: each child extends the partial text
        assert beam.text.startswith(partial.text) and len(beam.text) > len(partial.text)
        assert beam.tokens > partial.tokens and beam.logprob_sum <= partial.logprob_sum


def test_beam_search_counts_every_sampled_token(stack: Stack) -> None:
    endpoint = Endpoint(stack.base_url, MODEL)
    res = beam_search(endpoint, "List three colours, one per line.", width=2, expand=2,
                      max_steps=3, step_tokens=16)
    assert res.best.tokens > 0 and res.best.text and res.requests >= 1
    assert res.generated_tokens >= res.best.tokens
    assert endpoint.completion_tokens == res.generated_tokens


def test_evaluate_beam_counts_tasks_and_tokens(stack: Stack) -> None:
    endpoint = Endpoint(stack.base_url, MODEL)
    r = evaluate_beam(endpoint, addition(2, seed=7), width=2, expand=2, max_steps=2,
                      step_tokens=16, concurrency=2, progress=False)
    assert r["count"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
    assert r["generated_tokens_per_task"] > 0
    assert endpoint.completion_tokens == sum(row["tokens"] for row in r["tasks"])
