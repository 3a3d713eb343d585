"""Step-level beam search (digest §2.5): extend each beam by one step, score, keep the top k.

A step is text up to a newline. The continuation of an unfinished assistant message uses
vLLM's chat extension `continue_final_message` (OpenAI's API has no equivalent), so this
needs a vLLM-backed endpoint such as tessera's gateway. Scores: the mean token log-prob of
the whole partial answer (the paper uses a process reward model; none is served here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import httpx

from mobile.tts.answers import PARSERS
from mobile.tts.client import Endpoint
from mobile.tts.ordered import run_in_task_order
from mobile.tts.stats import wilson
from mobile.tts.tasks import Task


@dataclass(frozen=True)
class Beam:
    text: str
    logprob_sum: float
    tokens: int
    finished: bool

    @property
    def score(self) -> float:
        return self.logprob_sum / max(self.tokens, 1)


def select_beams(beams: list[Beam], width: int) -> list[Beam]:
    """Top `width` by mean log-prob; duplicates (same text) count once."""
    unique: dict[str, Beam] = {}
    for b in beams:
        if b.text not in unique or b.score > unique[b.text].score:
            unique[b.text] = b
    return sorted(unique.values(), key=lambda b: b.score, reverse=True)[:width]


@dataclass(frozen=True)
class BeamResult:
    best: Beam
    generated_tokens: int  # every continuation sampled, kept or pruned: the compute axis
    requests: int


def _extend(endpoint: Endpoint, question: str, beam: Beam, expand: int, temperature: float,
            step_tokens: int) -> tuple[list[Beam], int]:
    messages = [{"role": "user", "content": question}]
    if beam.text:
        messages.append({"role": "assistant", "content": beam.text})
    body = {"model": endpoint.model, "messages": messages, "n": expand,
            "temperature": temperature, "max_tokens": step_tokens, "logprobs": True,
            "stop": ["\n"], "add_generation_prompt": not beam.text,
            "continue_final_message": bool(beam.text)}
    r = httpx.post(f"{endpoint.base_url.rstrip('/')}/chat/completions", json=body,
                   timeout=endpoint.timeout_s)
    r.raise_for_status()
    data = r.json()
    generated = data.get("usage", {}).get("completion_tokens", 0)
    endpoint.bill(generated)
    out = []
    for ch in data["choices"]:
        lps = [t["logprob"] for t in ((ch.get("logprobs") or {}).get("content") or [])]
        step = ch["message"]["content"] or ""
        # Stopped on "\n" -> more steps to come; stopped on EOS or length -> done.
        more = ch.get("stop_reason") == "\n" and ch.get("finish_reason") == "stop"
        out.append(Beam(beam.text + step + ("\n" if more else ""), beam.logprob_sum + sum(lps),
                        beam.tokens + len(lps), not more))
    return out, generated


def beam_search(endpoint: Endpoint, question: str, width: int = 4, expand: int = 2,
                max_steps: int = 8, temperature: float = 0.7, step_tokens: int = 64,
                max_tokens: int = 160) -> BeamResult:
    """Each step samples `expand` continuations of every live beam (the first step samples
    width x expand from the empty answer, so the beam starts full), concurrently so the
    server batches them: a step costs up to width x expand samples, like Best-of-N at that N.
    A beam that reaches `max_tokens` (Best-of-N's per-answer cap) stops growing."""
    beams = [Beam("", 0.0, 0, False)]
    generated = requests = 0
    for step in range(max_steps):
        live = [b for b in beams if not b.finished]
        grown = [b for b in beams if b.finished]
        fan = width * expand if step == 0 else expand
        with ThreadPoolExecutor(max(len(live), 1)) as pool:
            for new, used in pool.map(
                    lambda b, fan=fan: _extend(endpoint, question, b, fan, temperature,
                                      min(step_tokens, max_tokens - b.tokens)), live):
                grown += [b if b.tokens < max_tokens else replace(b, finished=True)
                          for b in new]
                generated += used
        requests += len(live)
        beams = select_beams(grown, width)
        if all(b.finished for b in beams):
            break
    return BeamResult(max(beams, key=lambda b: b.score), generated, requests)


def evaluate_beam(endpoint: Endpoint, tasks: Sequence[Task], width: int = 4, expand: int = 2,
                  max_steps: int = 8, step_tokens: int = 64, temperature: float = 0.7,
                  max_tokens: int = 160, concurrency: int = 1,
                  deadline: float | None = None, progress: bool = True) -> dict:
    """Accuracy (Wilson 95% CI) and generated tokens per task of beam search on a task set;
    tasks not started by `deadline` (time.monotonic()) are skipped and not counted."""

    def run(task: Task) -> dict | None:
        if deadline is not None and time.monotonic() > deadline:
            return None
        res = beam_search(endpoint, task.question, width, expand, max_steps, temperature,
                          step_tokens, max_tokens)
        parsed = PARSERS[task.kind](res.best.text)
        return {"question": task.question, "answer": task.answer, "parsed": parsed,
                "correct": parsed == task.answer, "tokens": res.generated_tokens,
                "requests": res.requests, "best": res.best.text}

    def line(done: int, rows: list[dict], seconds: float) -> str:
        return (f"[beam] task {done}/{len(tasks)} ran {len(rows)} correct "
                f"{sum(r['correct'] for r in rows)} {seconds:.0f} s")

    started = time.monotonic()
    rows, error = run_in_task_order(tasks, run, concurrency, line if progress else None)
    return {"width": width, "expand": expand, "max_steps": max_steps,
            "step_tokens": step_tokens, "max_tokens": max_tokens,
            **(summarise_beam(rows) if rows else {"count": 0}),
            "seconds": time.monotonic() - started, "tasks": rows, "error": error}


def summarise_beam(rows: Sequence[dict]) -> dict:
    """Accuracy with its Wilson 95% CI, generated tokens and requests per task."""
    k = len(rows)
    if k == 0:
        raise ValueError("no tasks finished")
    hits = sum(r["correct"] for r in rows)
    return {"count": k, "accuracy": hits / k, "ci95": list(wilson(hits, k)),
            "generated_tokens_per_task": sum(r["tokens"] for r in rows) / k,
            "requests_per_task": sum(r["requests"] for r in rows) / k}
