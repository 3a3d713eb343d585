"""mobile.tts: answer parsing, Best-of-N scorer choices, beam selection, task sets."""

import math
import re

import pytest

from mobile.tts.answers import parse_choice, parse_number
from mobile.tts.beam import Beam, select_beams
from mobile.tts.best_of_n import choose
from mobile.tts.scorers import Candidate, pick_by_vote, yes_probability
from mobile.tts.tasks import _ANIMALS, _COLORS, _TOOLS, addition, arithmetic, multiple_choice


@pytest.mark.parametrize("text,expected", [
    ("23 + 48 = 71, minus 7 is 64.", "64"),
    ("The result is 1,200.", "1200"),
    ("so -12", "-12"),
    ("4.0", "4"),
    ("no digits here", None),
])
def test_parse_number_takes_the_last_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is C.", "C"),
    ("B) blue", "B"),
    ("A is wrong, so D", "D"),
    ("Answer: (b)", "B"),
    ("I think a dog.", None),
])
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


# Fixture: four answers to "What is 6 * 7?". The single most likely one is wrong (41);
# three less confident ones agree on 42.
FIXTURE = [
    Candidate("6 * 7 = 41", (-0.05, -0.05, -0.05)),
    Candidate("6 times 7 is 42", (-0.4, -0.3, -0.5)),
    Candidate("It is 42.", (-0.3, -0.2)),
    Candidate("42", (-0.9,)),
]


def test_likelihood_scorer_picks_the_most_confident_candidate():
    assert choose(FIXTURE, "likelihood", "number") == 0


def test_vote_scorer_picks_the_majority_answer_and_its_most_likely_member():
    pick = choose(FIXTURE, "vote", "number")
    assert parse_number(FIXTURE[pick].text) == "42"
    assert pick == 2  # the most likely of the three 42s (mean -0.25 vs -0.4 and -0.9)


def test_vote_ties_go_to_the_more_likely_answer():
    cands = [Candidate("1", (-2.0,)), Candidate("2", (-0.1,))]
    assert pick_by_vote(cands, parse_number) == 1


def test_vote_ignores_unparsable_candidates_and_falls_back_to_likelihood():
    cands = [Candidate("no idea", (-0.01,)), Candidate("maybe", (-1.0,))]
    assert pick_by_vote(cands, parse_number) == 0
    cands = [Candidate("no idea", (-0.01,)), Candidate("7", (-3.0,))]
    assert pick_by_vote(cands, parse_number) == 1


def test_verifier_scorer_uses_the_given_scores():
    assert choose(FIXTURE, "verifier", "number", [0.1, 0.9, 0.3, 0.2]) == 1
    with pytest.raises(ValueError):
        choose(FIXTURE, "verifier", "number")


def test_yes_probability_normalises_over_yes_and_no():
    p = yes_probability({"Yes": math.log(0.6), " no": math.log(0.2), "Maybe": math.log(0.2)})
    assert p == pytest.approx(0.75)
    assert yes_probability({"Hmm": -0.1}) == 0.5


def test_select_beams_keeps_top_mean_logprob_without_duplicates():
    beams = [Beam("a\n", -1.0, 2, False), Beam("b\n", -0.2, 2, False),
             Beam("a\n", -0.4, 2, False), Beam("c", -3.0, 1, True)]
    kept = select_beams(beams, 2)
    assert [b.text for b in kept] == ["b\n", "a\n"]
    assert kept[1].logprob_sum == -0.4


def test_task_sets_are_seeded_and_answers_check_out():
    assert arithmetic(5, seed=3) == arithmetic(5, seed=3)
    for t in addition(10, seed=1):
        a, b = map(int, re.findall(r"\d+", t.question))
        assert t.answer == str(a + b)
    for t in arithmetic(20, seed=1):
        expr = t.question.removeprefix("What is ").split("?")[0]
        assert str(eval(expr)) == t.answer
    pools = {"color": _COLORS, "animal": _ANIMALS, "tool": _TOOLS}
    for t in multiple_choice(40, seed=2):
        options = dict(re.findall(r"([A-D])\) (\w+)", t.question))
        assert len(options) == 4
        if "largest" in t.question:
            assert int(options[t.answer]) == max(int(v) for v in options.values())
        else:
            pool = pools[re.search(r"is an? (\w+)\?", t.question).group(1)]
            assert [k for k, v in options.items() if v in pool] == [t.answer]
