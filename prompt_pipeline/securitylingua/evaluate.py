"""Extraction quality: how well the kept words match the underlying request.

- word-level precision / recall / F1 of "keep", micro-averaged over all words of all prompts
  (the issue's token-F1; words, not pieces, because words are what the intention is made of);
- recoverable: share of prompts with a request whose intention keeps >= 80% of the request's
  words (RECOVERABLE_RECALL); a reader (or a harm classifier) then sees the request;
- template-only prompts: share of their words wrongly kept (ideally 0: no intention).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from prompt_pipeline.securitylingua.generator import Sample
from prompt_pipeline.token_classifier import TokenClassifier
from prompt_pipeline.token_classifier.words import words_overlapping

RECOVERABLE_RECALL = 0.8


def _prf(true_positive: int, predicted: int, actual: int) -> dict[str, float]:
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def extraction_metrics(classifier: TokenClassifier, samples: Sequence[Sample],
                       threshold: float = 0.5) -> dict[str, Any]:
    totals: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(7, dtype=np.int64))
    for sample in samples:
        compression = classifier.compress(sample.text, threshold=threshold)
        labels = np.asarray(words_overlapping(compression.words, sample.spans), dtype=bool)
        kept = compression.keep
        true_positive = int((kept & labels).sum())
        recall = true_positive / labels.sum() if labels.sum() else 0.0
        row = np.array([true_positive, kept.sum(), labels.sum(),
                        int(labels.any()), int(labels.any() and recall >= RECOVERABLE_RECALL),
                        len(labels), 1])
        for key in ("all", f"family:{sample.family}",
                    f"kind:{'harmful' if sample.harmful else 'benign'}"):
            totals[key] += row
        if not labels.any():
            totals["template_only"] += row
    result: dict[str, Any] = {}
    for key, row_total in sorted(totals.items()):
        tp, predicted, actual, with_request, recovered, words, prompts = row_total.tolist()
        entry: dict[str, Any] = _prf(int(tp), int(predicted), int(actual))
        entry["prompts"] = int(prompts)
        entry["prompts_with_request"] = int(with_request)
        entry["recoverable_share"] = recovered / with_request if with_request else None
        entry["kept_word_share"] = predicted / words if words else 0.0
        result[key] = entry
    return result
