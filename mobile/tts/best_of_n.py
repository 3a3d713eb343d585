"""Best-of-N over a task set: sample N_max once per task, evaluate every N <= N_max on prefixes.

Prefixes of one sample of N_max answers are N-sample draws from the same distribution, so
the accuracy-vs-N curve costs one N_max request per task. Compute per answer = N x the mean
generated tokens of the candidates used. Tasks run `concurrency` at a time so the server
batches their samples (one task's 16 samples alone leave a CPU worker's batch half empty).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from mobile.tts.answers import PARSERS
from mobile.tts.client import Endpoint
from mobile.tts.ordered import run_in_task_order
from mobile.tts.scorers import Candidate, pick_by_likelihood, pick_by_scores, pick_by_vote
from mobile.tts.stats import compare, wilson
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


def score_task(task: Task, cands: Sequence[Candidate], ns: Sequence[int],
               scorers: Sequence[str], verifier_scores: Sequence[float] | None = None) -> dict:
    """One task's row: parsed answers, tokens per candidate, correct[scorer][N] on prefixes."""
    parsed = [PARSERS[task.kind](c.text) for c in cands]
    correct = {s: {n: parsed[choose(cands[:n], s, task.kind,
                                    verifier_scores[:n] if verifier_scores else None)]
                   == task.answer for n in ns} for s in scorers}
    return {"question": task.question, "answer": task.answer, "parsed": parsed,
            "tokens": [len(c.token_logprobs) for c in cands], "correct": correct,
            "verifier_scores": list(verifier_scores) if verifier_scores else None,
            "first_sample": cands[0].text}


def _run_task(endpoint: Endpoint, task: Task, ns: Sequence[int], scorers: Sequence[str],
              temperature: float, max_tokens: int, deadline: float | None) -> dict | None:
    if deadline is not None and time.monotonic() > deadline:
        return None  # out of generation budget: the task is not run, and not counted
    cands = endpoint.sample(task.question, max(ns), temperature, max_tokens)
    ver = None
    if "verifier" in scorers:  # concurrent requests: the server batches them
        with ThreadPoolExecutor(len(cands)) as pool:
            ver = list(pool.map(lambda c, q=task.question: endpoint.verify(q, c.text), cands))
    return score_task(task, cands, ns, scorers, ver)


def summarise(rows: Sequence[dict], ns: Sequence[int], scorers: Sequence[str]) -> dict:
    """Accuracy with Wilson 95% CIs, tokens per task, oracle, and each N paired vs N = 1."""
    k = len(rows)
    if k == 0:
        raise ValueError("no tasks finished")
    out: dict = {"count": k, "accuracy": {}, "ci95": {}, "vs_n1": {}}
    for s in scorers:
        hits = {n: sum(r["correct"][s][n] for r in rows) for n in ns}
        out["accuracy"][s] = {n: hits[n] / k for n in ns}
        out["ci95"][s] = {n: list(wilson(hits[n], k)) for n in ns}
        first = [r["correct"][s][min(ns)] for r in rows]
        out["vs_n1"][s] = {n: compare([r["correct"][s][n] for r in rows], first)
                           for n in ns if n != min(ns)}
    out["generated_tokens_per_task"] = {n: sum(sum(r["tokens"][:n]) for r in rows) / k
                                        for n in ns}
    oracle = sum(r["answer"] in r["parsed"] for r in rows)
    out["oracle_any_correct"] = oracle / k
    out["oracle_ci95"] = list(wilson(oracle, k))
    return out


def evaluate(endpoint: Endpoint, tasks: Sequence[Task], ns: Sequence[int],
             scorers: Sequence[str], temperature: float = 0.7, max_tokens: int = 160,
             progress: bool = True, concurrency: int = 1,
             deadline: float | None = None) -> dict:
    """Accuracy and mean generated tokens per (scorer, N); one request of max(ns) per task.

    Tasks not started by `deadline` (time.monotonic()) are skipped; `count` says how many ran.
    A failed request stops the run: the rows before it are returned with `error` set.
    """
    started = time.monotonic()

    def run(task: Task) -> dict | None:
        return _run_task(endpoint, task, ns, scorers, temperature, max_tokens, deadline)

    def line(done: int, rows: list[dict], seconds: float) -> str:
        correct = {s: sum(r["correct"][s][max(ns)] for r in rows) for s in scorers}
        return (f"[tts] task {done}/{len(tasks)} ran {len(rows)} "
                f"correct@N={max(ns)}: {correct} {seconds:.0f} s")

    rows, error = run_in_task_order(tasks, run, concurrency, line if progress else None)
    summary = summarise(rows, ns, scorers) if rows else {"count": 0}
    return {**summary, "seconds": time.monotonic() - started, "tasks": rows, "error": error}
