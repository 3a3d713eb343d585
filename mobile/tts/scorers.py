"""Choosing one of N sampled answers (digest §2.5, Best-of-N).

Scorers (each returns the chosen candidate's index):
  likelihood   the model's own mean token log-probability (length-normalised; sum favours
               short answers)
  vote         majority vote over parsed answers (self-consistency); ties go to the answer
               whose candidates have the higher total mean log-probability; unparsable
               candidates do not vote
  verifier     the highest P(Yes) from a verifier prompt (scores computed by the caller)
The paper scores with a separate reward model (Skywork-1.5B-PRM); a verifier prompt to the
same small model is the no-extra-weights stand-in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    text: str
    token_logprobs: tuple[float, ...]

    @property
    def mean_logprob(self) -> float:
        if not self.token_logprobs:
            return -math.inf
        return sum(self.token_logprobs) / len(self.token_logprobs)


def pick_by_likelihood(candidates: Sequence[Candidate]) -> int:
    return max(range(len(candidates)), key=lambda i: candidates[i].mean_logprob)


def pick_by_vote(candidates: Sequence[Candidate], parse: Callable[[str], str | None]) -> int:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(candidates):
        answer = parse(c.text)
        if answer is not None:
            groups[answer].append(i)
    if not groups:
        return pick_by_likelihood(candidates)

    def strength(answer: str) -> tuple[int, float]:
        members = groups[answer]
        return len(members), sum(math.exp(candidates[i].mean_logprob) for i in members)

    best = max(groups, key=strength)
    return max(groups[best], key=lambda i: candidates[i].mean_logprob)


def pick_by_scores(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: scores[i])


def yes_probability(top_logprobs: dict[str, float]) -> float:
    """P(Yes) / (P(Yes) + P(No)) from a first-token top-logprob map; 0.5 if neither appears."""
    yes = sum(math.exp(lp) for tok, lp in top_logprobs.items() if tok.strip().lower() == "yes")
    no = sum(math.exp(lp) for tok, lp in top_logprobs.items() if tok.strip().lower() == "no")
    return 0.5 if yes + no == 0 else yes / (yes + no)
