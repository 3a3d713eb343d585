"""A minimal OpenAI-compatible chat client (httpx): n samples with per-token log-probs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import httpx

from mobile.tts.scorers import Candidate, yes_probability


@dataclass
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (the gateway) or a worker's URL + /v1
    model: str
    timeout_s: float = 300.0
    completion_tokens: int = 0  # generated tokens billed so far: the compute axis
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def chat(self, prompt: str, n: int, temperature: float, max_tokens: int,
             top_logprobs: int = 0) -> list[dict]:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "n": n, "temperature": temperature, "max_tokens": max_tokens,
                "logprobs": True}
        if top_logprobs:
            body["top_logprobs"] = top_logprobs
        r = httpx.post(f"{self.base_url.rstrip('/')}/chat/completions", json=body,
                       timeout=self.timeout_s)
        r.raise_for_status()
        data = r.json()
        self.bill(data.get("usage", {}).get("completion_tokens", 0))
        return data["choices"]

    def bill(self, tokens: int) -> None:
        with self._lock:  # requests run on threads (verifier prompts, concurrent tasks)
            self.completion_tokens += tokens

    def sample(self, prompt: str, n: int, temperature: float = 0.7,
               max_tokens: int = 128) -> list[Candidate]:
        choices = self.chat(prompt, n, temperature, max_tokens)
        out = []
        for ch in choices:
            content = (ch.get("logprobs") or {}).get("content") or []
            out.append(Candidate(ch["message"]["content"] or "",
                                 tuple(t["logprob"] for t in content)))
        return out

    def verify(self, question: str, answer: str) -> float:
        """P(Yes) that `answer` is correct, from the same model's first-token log-probs."""
        prompt = (f"Question: {question}\nProposed answer: {answer}\n"
                  "Is the proposed answer correct? Reply with Yes or No.")
        choice = self.chat(prompt, 1, 0.0, 1, top_logprobs=10)[0]
        content = (choice.get("logprobs") or {}).get("content") or []
        if not content:
            return 0.5
        return yes_probability({t["token"]: t["logprob"] for t in content[0]["top_logprobs"]})
