"""Training and evaluation pairs: an instruction wrapped in a jailbreak template, labelled.

SecurityLingua's pairs are (extended = the jailbreak prompt, original = the bare request);
the official recipe aligns the two with spaCy lemmas to find which words of the prompt are
the request. Here we build the prompt ourselves, so the request's character spans are known
exactly and no alignment (nor its filtering) is needed: a word is "keep" iff it overlaps the
request (`token_classifier.words.words_overlapping`).

Held apart for evaluation: whole template families (`EVAL_FAMILIES`), the HarmBench goals
(AdvBench trains) and half of the benign lookalikes. Everything is drawn from one seeded
`random.Random`, so a seed gives the same data on every machine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from prompt_pipeline.securitylingua import sources
from prompt_pipeline.securitylingua.templates import (
    ALL_FAMILIES,
    BENIGN_WRAPPERS,
    family_templates,
)

EVAL_FAMILIES = ("dan", "fiction", "payload_splitting", "multilingual")
TRAIN_FAMILIES = tuple(family for family in ALL_FAMILIES if family not in EVAL_FAMILIES)
_SLOT = re.compile(r"\{(instruction|instruction_tail|leet|part1|part2)\}|\{\{|\}\}")
_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}


@dataclass(frozen=True)
class Sample:
    text: str
    instruction: str  # the underlying request; "" for an all-template prompt
    spans: tuple[tuple[int, int], ...]  # character spans of the request inside `text`
    family: str  # template family, "plain" (no wrapper), or "benign_wrapper"
    harmful: bool
    source: str  # advbench | harmbench | everyday | lookalike | none

    def to_json(self) -> dict:
        return asdict(self)


def render(template: str, instruction: str,
           rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """Fill the template's slots; returns the text and the request's character spans."""
    core = instruction.rstrip(" .?!")
    words = core.split()
    split_at = rng.randint(1, max(len(words) - 1, 1))
    fills = {
        "instruction": core,
        "instruction_tail": core[:1].lower() + core[1:],
        "leet": "".join(_LEET.get(ch, ch) if rng.random() < 0.5 else ch for ch in core),
        "part1": " ".join(words[:split_at]),
        "part2": " ".join(words[split_at:]),
    }
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    position = 0
    for match in _SLOT.finditer(template):
        pieces.append(template[position:match.start()])
        length += match.start() - position
        if match.group(0) in ("{{", "}}"):
            fill = match.group(0)[0]
        else:
            fill = fills[match.group(1)]
            if fill:
                spans.append((length, length + len(fill)))
        pieces.append(fill)
        length += len(fill)
        position = match.end()
    pieces.append(template[position:])
    return "".join(pieces), spans


def _wrapped(instruction: str, family: str, harmful: bool, source: str,
             rng: random.Random) -> Sample:
    templates = BENIGN_WRAPPERS if family == "benign_wrapper" else family_templates(family)
    text, spans = render(rng.choice(templates), instruction, rng)
    return Sample(text, instruction, tuple(spans), family, harmful, source)


def _stacked(instruction: str, families: Sequence[str], harmful: bool, source: str,
             rng: random.Random) -> Sample:
    """One or two other templates, with no request, before a wrapped request: long
    multi-part preambles like DAN's, built from the training families only."""
    preamble = "\n\n".join(
        render(rng.choice(family_templates(rng.choice(families))), "", rng)[0]
        for _ in range(rng.randint(1, 2)))
    inner = _wrapped(instruction, rng.choice(families), harmful, source, rng)
    offset = len(preamble) + 2
    spans = tuple((start + offset, end + offset) for start, end in inner.spans)
    return Sample(preamble + "\n\n" + inner.text, instruction, spans, "stacked", harmful,
                  source)


def _plain(instruction: str, harmful: bool, source: str) -> Sample:
    return Sample(instruction, instruction, ((0, len(instruction)),), "plain", harmful, source)


def _template_only(family: str, template: str) -> Sample:
    text, _ = render(template, "", random.Random(0))
    return Sample(text, "", (), family, False, "none")


def build_samples(families: Sequence[str], harmful: Sequence[str], harmful_source: str,
                  benign: Sequence[tuple[str, str]], seed: int, wraps_per_harmful: int,
                  wraps_per_benign: int, stacked_per_harmful: int = 0) -> list[Sample]:
    """Each harmful request plain once and wrapped `wraps_per_harmful` times in random
    families; each benign request plain once and wrapped `wraps_per_benign` times, half in
    ordinary wrappers and half in jailbreak templates; plus every template with no request.
    `stacked_per_harmful` adds long prompts: extra templates stacked before the wrapper."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for instruction in harmful:
        samples.append(_plain(instruction, True, harmful_source))
        for _ in range(wraps_per_harmful):
            samples.append(_wrapped(instruction, rng.choice(families), True, harmful_source,
                                    rng))
        for _ in range(stacked_per_harmful):
            samples.append(_stacked(instruction, families, True, harmful_source, rng))
    for instruction, source in benign:
        samples.append(_plain(instruction, False, source))
        for index in range(wraps_per_benign):
            family = "benign_wrapper" if index % 2 == 0 else rng.choice(families)
            samples.append(_wrapped(instruction, family, False, source, rng))
    for family in families:
        for template in family_templates(family):
            samples.append(_template_only(family, template))
    rng.shuffle(samples)
    return samples


def train_samples(seed: int = 42) -> list[Sample]:
    benign = [(text, "everyday") for text in sources.benign_everyday()]
    benign += [(text, "lookalike") for text in sources.lookalikes_train()]
    return build_samples(TRAIN_FAMILIES, sources.advbench(), "advbench", benign, seed,
                         wraps_per_harmful=3, wraps_per_benign=6, stacked_per_harmful=1)


def eval_samples(seed: int = 1234, families: Sequence[str] = EVAL_FAMILIES) -> list[Sample]:
    """Held-out families (default) with held-out goals: HarmBench and the eval lookalikes."""
    benign = [(text, "lookalike") for text in sources.lookalikes_eval()]
    return build_samples(families, sources.harmbench(), "harmbench", benign, seed,
                         wraps_per_harmful=2, wraps_per_benign=4)
