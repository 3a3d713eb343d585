"""Split a conversation's exchanges into topical segments (SeCom section 2.2).

Two segmenters:
- the paper's, through the served model: the batch prompt numbers the exchanges and asks for
  segments as JSON lines; the incremental prompt asks, for one new exchange, whether it
  continues the last segment (Yes/No). The parsers return None on anything malformed;
- an embedding segmenter in TextTiling's manner (Hearst 1997), over MiniLM embeddings of the
  exchanges: a gap score per boundary (cosine of the mean embeddings of the `window`
  exchanges on each side), a depth score per gap (how far it dips below the peaks around it),
  and a boundary where the depth exceeds mean + `cutoff` x std of the depths.
The gateway takes the model's answer when it parses and the embedding segmenter otherwise,
counting each fallback. Segments are inclusive (first, last) exchange positions that cover
every exchange in order.
"""

from __future__ import annotations

import json
import re

import numpy as np

Segment = tuple[int, int]

BATCH_PROMPT = """# Instruction
Below is a conversation between a user and an assistant, split into numbered exchanges.
Group the exchanges into topically coherent segments: consecutive exchanges about the same
topic belong to one segment. Every exchange belongs to exactly one segment.

# Output format
One JSON object per line, for each segment in order:
{{"segment_id": 0, "start_exchange_number": 0, "end_exchange_number": 2, "num_exchanges": 3}}

# Conversation
{exchanges}

# Segments
"""

INCREMENTAL_PROMPT = """# Last segment of the conversation
{segment}

# New exchange
{exchange}

Does the new exchange continue the topic of the last segment? Answer Yes or No.
Answer:"""


def render_exchanges(texts: list[str]) -> str:
    return "\n\n".join(f"Exchange {number}:\n{text}" for number, text in enumerate(texts))


def batch_prompt(texts: list[str]) -> str:
    return BATCH_PROMPT.format(exchanges=render_exchanges(texts))


def parse_batch_segments(reply: str, num_exchanges: int) -> list[Segment] | None:
    """Segments from the model's JSON lines, or None unless they cover 0..n-1 in order."""
    segments = []
    for line in reply.splitlines():
        line = line.strip().rstrip(",")
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
            segments.append((int(item["start_exchange_number"]),
                             int(item["end_exchange_number"])))
        except (ValueError, KeyError, TypeError):
            return None
    expected_start = 0
    for first, last in segments:
        if first != expected_start or last < first:
            return None
        expected_start = last + 1
    return segments if segments and expected_start == num_exchanges else None


def incremental_prompt(segment_texts: list[str], exchange_text: str) -> str:
    return INCREMENTAL_PROMPT.format(segment="\n\n".join(segment_texts), exchange=exchange_text)


def parse_continues(reply: str) -> bool | None:
    """True for Yes, False for No, None for anything else."""
    match = re.match(r"\s*(yes|no)\b", reply, re.IGNORECASE)
    return None if match is None else match.group(1).lower() == "yes"


def gap_scores(embeddings: np.ndarray, window: int = 2) -> np.ndarray:
    """Float ``[n - 1]``: similarity across each gap (between exchange i and i + 1)."""
    normed = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-9)
    scores = []
    for gap in range(1, len(normed)):
        left = normed[max(gap - window, 0) : gap].mean(axis=0)
        right = normed[gap : gap + window].mean(axis=0)
        scores.append(float(left @ right / max(np.linalg.norm(left) * np.linalg.norm(right),
                                               1e-9)))
    return np.asarray(scores)


def depth_scores(gaps: np.ndarray) -> np.ndarray:
    """How deep each gap's similarity dips below the highest points on its two sides."""
    depths = np.zeros_like(gaps)
    for index, value in enumerate(gaps):
        left_peak = gaps[: index + 1].max()
        right_peak = gaps[index:].max()
        depths[index] = (left_peak - value) + (right_peak - value)
    return depths


def segment_by_embeddings(embeddings: np.ndarray, window: int = 2, cutoff: float = 0.5,
                          min_depth: float = 0.1) -> list[Segment]:
    """TextTiling over exchange embeddings ``[n, dim]``; boundaries where the depth score
    exceeds mean + cutoff x std and ``min_depth`` (an absolute floor in cosine units, so a
    one-topic conversation is not cut at its noise), at local maxima of depth only."""
    count = len(embeddings)
    if count < 2:
        return [(0, count - 1)] if count else []
    depths = depth_scores(gap_scores(embeddings, window))
    threshold = max(depths.mean() + cutoff * depths.std(), min_depth)
    boundaries = [gap + 1 for gap in range(len(depths))
                  if depths[gap] > threshold and depths[gap] > 0
                  and depths[gap] >= depths[max(gap - 1, 0)]
                  and depths[gap] >= depths[min(gap + 1, len(depths) - 1)]]
    starts = [0, *boundaries]
    ends = [*(b - 1 for b in boundaries), count - 1]
    return list(zip(starts, ends, strict=True))


def segment_tail(embeddings: np.ndarray, context: int, window: int = 2, cutoff: float = 0.5,
                 min_depth: float = 0.1, max_exchanges: int = 24,
                 settle: int = 2) -> list[Segment]:
    """Segments of a conversation's open tail, the rows ``embeddings[context:]`` (the open
    segment and the exchanges after it); the ``context`` rows before it, from the closed
    segment, give the first gaps their left window. TextTiling runs over these rows only,
    so a write costs what its tail holds, not the conversation. A segment that reaches
    ``max_exchanges`` is closed there, which bounds the tail. Segments are relative to the
    tail's first row; the last one stays open.

    A boundary is taken only once ``settle`` exchanges follow it: the newest gap's depth is
    measured against one side only, and taking such boundaries at once cut too early
    (boundary F1 0.51 vs 0.69 with settle = 2 = window, against 0.67 for TextTiling over
    the whole session; 20 generated sessions, `benchmarks/secom_segmentation.py`)."""
    count = len(embeddings) - context
    if count <= 0:
        return []
    spans = segment_by_embeddings(embeddings, window, cutoff, min_depth)
    starts = [0, *(first - context for first, _ in spans[1:]
                   if context < first <= len(embeddings) - settle)]
    ends = [*(start - 1 for start in starts[1:]), count - 1]
    return cap_segments(list(zip(starts, ends, strict=True)), max_exchanges)


def cap_segments(segments: list[Segment], max_exchanges: int) -> list[Segment]:
    """``segments`` with each one longer than ``max_exchanges`` cut into pieces that long."""
    out = []
    for first, last in segments:
        while last - first + 1 > max_exchanges:
            out.append((first, first + max_exchanges - 1))
            first += max_exchanges
        out.append((first, last))
    return out


def boundary_f1(predicted: list[Segment], truth: list[Segment]) -> float:
    """F1 of segment boundaries (starts after the first), exact positions."""
    found = {first for first, _ in predicted[1:]}
    real = {first for first, _ in truth[1:]}
    if not found and not real:
        return 1.0
    hits = len(found & real)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(found), hits / len(real)
    return 2 * precision * recall / (precision + recall)
