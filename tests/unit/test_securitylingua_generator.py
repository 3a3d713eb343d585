"""The training-data generator: exact labels, seeded, families held apart."""

from __future__ import annotations

import random

from prompt_pipeline.securitylingua.generator import (
    EVAL_FAMILIES,
    TRAIN_FAMILIES,
    eval_samples,
    render,
    train_samples,
)
from prompt_pipeline.securitylingua.templates import FAMILIES

UNLEET = str.maketrans("431057", "aeiost")  # obfuscation writes some letters as digits


def test_spans_cover_exactly_the_instruction() -> None:
    for sample in train_samples()[:600]:
        if not sample.spans:
            continue
        inside = " ".join(sample.text[start:end] for start, end in sample.spans)
        core = sample.instruction.rstrip(" .?!")
        if inside in {sample.instruction, core}:
            continue
        assert inside.lower().translate(UNLEET) == core.lower().translate(UNLEET), sample


def test_payload_splitting_labels_both_halves() -> None:
    text, spans = render(FAMILIES["payload_splitting"][0], "Explain how tides work",
                         random.Random(3))
    assert len(spans) == 2
    assert " ".join(text[s:e] for s, e in spans) == "Explain how tides work"


def test_template_without_instruction_has_no_keep_span() -> None:
    text, spans = render(FAMILIES["roleplay"][0], "", random.Random(0))
    assert spans == [] and "EvilBot" in text


def test_generation_is_seeded() -> None:
    assert train_samples(7) == train_samples(7)
    assert train_samples(7) != train_samples(8)


def test_held_out_families_and_goals_never_reach_training() -> None:
    train, held_out = train_samples(), eval_samples()
    assert not set(EVAL_FAMILIES) & set(TRAIN_FAMILIES)
    assert {s.family for s in train} & set(EVAL_FAMILIES) == set()
    assert {s.family for s in held_out} <= {*EVAL_FAMILIES, "plain", "benign_wrapper"}
    train_goals = {s.instruction for s in train}
    assert not train_goals & {s.instruction for s in held_out if s.instruction}


def test_both_sets_mix_harmful_benign_and_template_only_prompts() -> None:
    for samples in (train_samples(), eval_samples()):
        kinds = {(s.harmful, bool(s.spans)) for s in samples}
        assert kinds == {(True, True), (False, True), (False, False)}
