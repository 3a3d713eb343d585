"""Completion-style long-context cases that SmolLM2-135M passes with dense attention.

Every prompt ends by starting the sentence to recall (DESIGN.md, "Fidelity"): question-form
prompts score ~0% even dense on this model, so they prove nothing about a sparse method.
Cases are deterministic in (task, target tokens, index); the needle depth sweeps 0-100%.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
# The framing of the usual passkey test (landmark attention, LongLoRA): the needle and the
# question on lines of their own. Without it SmolLM2 fails even dense at depths 0% and 100%.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there.\n\n")
VAR_DISTRACTORS = 6  # 10 scored 7/10 dense at 7K in probes; 6 scores 8/10
PROSE_SOURCES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GFDL-1.3",
                 "/usr/share/common-licenses/LGPL-2.1")


@dataclass(frozen=True)
class Case:
    task: str
    target_tokens: int
    index: int
    depth: float
    prompt: str
    answer: str

    def passed(self, completion: str) -> bool:
        return self.answer in completion


TokenCounter = Callable[[str], int]


def _depths(num_cases: int) -> list[float]:
    return [i / max(num_cases - 1, 1) for i in range(num_cases)]


def _fill_to(units: list[str], needle: str, depth: float, tail: str, target_tokens: int,
             count_tokens: TokenCounter) -> str:
    """Join haystack units around `needle` at `depth` so the prompt is ~target_tokens."""
    sample = units[:50]
    # Tokens per unit from the sample's real size (it was divided by 50 whatever the size,
    # which made one-unit haystacks start 50x too long and shrink for ~130 rounds).
    per_unit = max(count_tokens("".join(sample)) / len(sample), 1.0)
    budget = target_tokens - count_tokens(needle) - count_tokens(tail)
    count = max(int(budget / per_unit), 1)
    haystack = [units[i % len(units)] for i in range(count)]
    while count_tokens("".join(haystack) + needle + tail) > target_tokens and len(haystack) > 1:
        haystack = haystack[: max(int(len(haystack) * 0.97), 1)]
    at = round(depth * len(haystack))
    return "".join(haystack[:at]) + needle + "".join(haystack[at:]) + tail


def passkey(target_tokens: int, index: int, depth: float, count: TokenCounter) -> Case:
    rng = random.Random(f"passkey-{target_tokens}-{index}")
    key = str(rng.randint(10000, 99999))
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    tail = "\nWhat is the pass key? The pass key is"
    prompt = PASSKEY_INTRO + _fill_to([FILLER], needle, depth, tail,
                                      target_tokens - count(PASSKEY_INTRO), count)
    return Case("passkey", target_tokens, index, depth, prompt, key)


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _among_filler(lines: list[str]) -> list[str]:
    """Haystack units: `lines` spread evenly through 40 filler sentences.

    _fill_to cycles these units up to the length, so each line recurs about every 1K tokens.
    """
    units = [FILLER] * 40
    for position, line in enumerate(lines):
        units.insert((position + 1) * len(units) // (len(lines) + 1), line)
    return units


def variable_lookup(target_tokens: int, index: int, depth: float, count: TokenCounter) -> Case:
    """One-hop lookup: "VAR ABCDE = 12345." among VAR_DISTRACTORS other assignments.

    Chosen by dense probes (NOTES, "Fidelity"): a haystack of nothing but assignments scored
    1/5 at 4K, and distinct distractors spread once over the prompt 5/10; SmolLM2 returns a
    neighbour's value or a round number. Assignments on lines of their own among filler,
    recurring as in multi_key, score 8-9/10 at 2K-7K with 6 distractors (7/10 at 7K with 10).
    """
    rng = random.Random(f"var-{target_tokens}-{index}")
    target, value = _name(rng), str(rng.randint(10000, 99999))
    names = [name for name in dict.fromkeys(_name(rng) for _ in range(VAR_DISTRACTORS + 1))
             if name != target][:VAR_DISTRACTORS]
    lines = [f"\nVAR {name} = {rng.randint(10000, 99999)}.\n" for name in names]
    needle = f"\nVAR {target} = {value}.\n"
    prompt = _fill_to(_among_filler(lines), needle, depth, f"\nVAR {target} =", target_tokens,
                      count)
    return Case("variable_lookup", target_tokens, index, depth, prompt, value)


def multi_key(target_tokens: int, index: int, depth: float, count: TokenCounter) -> Case:
    rng = random.Random(f"multikey-{target_tokens}-{index}")
    keys = [rng.choice(["apple", "river", "candle", "violet", "falcon", "marble", "copper",
                        "meadow", "harbor", "lantern"]) + "-" + str(rng.randint(10, 99))
            for _ in range(rng.randint(4, 8))]
    keys = list(dict.fromkeys(keys))
    numbers = {key: str(rng.randint(1_000_000, 9_999_999)) for key in keys}
    asked = keys[rng.randrange(len(keys))]
    # The asked line sits at `depth`; the other keys are spread evenly through the filler.
    lines = [f"\nThe special magic number for {key} is: {numbers[key]}.\n" for key in keys
             if key != asked]
    units = _among_filler(lines)
    needle = f"\nThe special magic number for {asked} is: {numbers[asked]}.\n"
    tail = f"\nThe special magic number for {asked} is:"
    prompt = _fill_to(units, needle, depth, tail, target_tokens, count)
    return Case("multi_key", target_tokens, index, depth, prompt, numbers[asked])


def _prose_units() -> list[str]:
    text = " ".join(Path(p).read_text() for p in PROSE_SOURCES if Path(p).exists())
    sentences = [s.strip() + ". " for s in " ".join(text.split()).split(". ") if s.strip()]
    return sentences or [FILLER]


def needle_in_prose(target_tokens: int, index: int, depth: float, count: TokenCounter) -> Case:
    rng = random.Random(f"prose-{target_tokens}-{index}")
    word = rng.choice(["ORCHID", "TUNDRA", "COBALT", "PEBBLE", "SAFFRON", "GLACIER"])
    code = f"{word}-{rng.randint(1000, 9999)}"
    needle = f"\nThe secret code is {code}.\n"
    prompt = _fill_to(_prose_units(), needle, depth, "\nThe secret code is",
                      target_tokens, count)
    return Case("needle_prose", target_tokens, index, depth, prompt, code)


TASKS = {"passkey": passkey, "variable_lookup": variable_lookup, "multi_key": multi_key,
         "needle_prose": needle_in_prose}


def build_cases(task: str, target_tokens: int, num_cases: int,
                count_tokens: TokenCounter) -> list[Case]:
    make = TASKS[task]
    return [make(target_tokens, i, depth, count_tokens)
            for i, depth in enumerate(_depths(num_cases))]
