"""Best-of-N over a task set: sample N_max once per task, evaluate every N <= N_max on prefixes.

Prefixes of one sample of N_max answers are N-sample draws from the same distribution, so
the accuracy-vs-N curve costs one N_max request per task. Compute per answer = N x the mean
generated tokens of the candidates used.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from mobile.tts.answers import PARSERS
from mobile.tts.client import Endpoint
from mobile.tts.scorers import Candidate, pick_by_likelihood, pick_by_scores, pick_by_vote
from mobile.tts.tasks import Task

SCORERS = ("likelihood", "vote", "verifier")


def choose(candidates: Sequence[Candidate], scorer: str, kind: str,
           verifier_scores: Sequence[float] | None = None) -> int:
    if scorer == "likelihood":
        return pick_by_likelihood(candidates)
    if scorer == "vote":
        return pick_by_vote(candidates, PARSERS[kind])
    if scorer == "verifier":
        if verifier_scores is None:
            raise ValueError("verifier scorer needs verifier_scores")
        return pick_by_scores(verifier_scores)
    raise ValueError(f"unknown scorer {scorer}")


def evaluate(endpoint: Endpoint, tasks: Sequence[Task], ns: Sequence[int],
             scorers: Sequence[str], temperature: float = 0.7, max_tokens: int = 160,
             progress: bool = True) -> dict:
    """Accuracy and mean generated tokens per (scorer, N); one request of max(ns) per task."""
    n_max = max(ns)
    correct = {(s, n): 0 for s in scorers for n in ns}
    tokens = {n: 0.0 for n in ns}
    rows = []
    for t_i, task in enumerate(tasks):
        cands = endpoint.sample(task.question, n_max, temperature, max_tokens)
        ver = None
        if "verifier" in scorers:  # concurrent requests: the server batches them
            with ThreadPoolExecutor(len(cands)) as pool:
                ver = list(pool.map(lambda c, q=task.question: endpoint.verify(q, c.text), cands))
        parsed = [PARSERS[task.kind](c.text) for c in cands]
        for n in ns:
            tokens[n] += sum(len(c.token_logprobs) for c in cands[:n])
            for s in scorers:
                pick = choose(cands[:n], s, task.kind, ver[:n] if ver else None)
                correct[(s, n)] += parsed[pick] == task.answer
        rows.append({"question": task.question, "answer": task.answer, "parsed": parsed,
                     "first_sample": cands[0].text})
        if progress:
            done = {s: correct[(s, n_max)] for s in scorers}
            print(f"\r[tts] task {t_i + 1}/{len(tasks)} correct@N={n_max}: {done}", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    k = len(tasks)
    return {
        "accuracy": {s: {n: correct[(s, n)] / k for n in ns} for s in scorers},
        "generated_tokens_per_task": {n: tokens[n] / k for n in ns},
        "oracle_any_correct": sum(r["answer"] in r["parsed"] for r in rows) / k,
        "tasks": rows,
    }
