"""Step-level beam search (digest §2.5): extend each beam by one step, score, keep the top k.

A step is text up to a newline. The continuation of an unfinished assistant message uses
vLLM's chat extension `continue_final_message` (OpenAI's API has no equivalent), so this
needs a vLLM-backed endpoint such as tessera's gateway. Scores: the mean token log-prob of
the whole partial answer (the paper uses a process reward model; none is served here).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from mobile.tts.client import Endpoint


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


def _extend(endpoint: Endpoint, question: str, beam: Beam, expand: int, temperature: float,
            step_tokens: int) -> list[Beam]:
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
    endpoint.completion_tokens += data.get("usage", {}).get("completion_tokens", 0)
    out = []
    for ch in data["choices"]:
        lps = [t["logprob"] for t in ((ch.get("logprobs") or {}).get("content") or [])]
        step = ch["message"]["content"] or ""
        # Stopped on "\n" -> more steps to come; stopped on EOS or length -> done.
        more = ch.get("stop_reason") == "\n" and ch.get("finish_reason") == "stop"
        out.append(Beam(beam.text + step + ("\n" if more else ""), beam.logprob_sum + sum(lps),
                        beam.tokens + len(lps), not more))
    return out


def beam_search(endpoint: Endpoint, question: str, width: int = 4, expand: int = 2,
                max_steps: int = 8, temperature: float = 0.7, step_tokens: int = 64) -> Beam:
    beams = [Beam("", 0.0, 0, False)]
    for _ in range(max_steps):
        grown = [b for b in beams if b.finished]
        for b in beams:
            if not b.finished:
                grown += _extend(endpoint, question, b, expand, temperature, step_tokens)
        beams = select_beams(grown, width)
        if all(b.finished for b in beams):
            break
    return max(beams, key=lambda b: b.score)
