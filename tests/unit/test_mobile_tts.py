"""mobile.tts: answer parsing, Best-of-N scorer choices, beam selection, task sets."""

import math
import re

import pytest

from mobile.tts.answers import parse_choice, parse_number
from mobile.tts.beam import Beam, select_beams, summarise_beam
from mobile.tts.best_of_n import choose, score_task, summarise
from mobile.tts.scorers import Candidate, pick_by_vote, yes_probability
from mobile.tts.stats import mcnemar_exact, paired_bootstrap, wilson
from mobile.tts.tasks import (
    _ANIMALS,
    _COLORS,
    _TOOLS,
    Task,
    addition,
    arithmetic,
    multiple_choice,
)


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


# --- statistics (mobile.tts.stats) and per-task scoring (score_task / summarise) ---


def test_wilson_interval_matches_the_closed_form_and_stays_in_bounds():
    lo, hi = wilson(7, 15)
    # Wilson 95% for 7/15, worked by hand: centre 0.4735, half-width 0.2254.
    assert lo == pytest.approx(0.2484, abs=1e-3) and hi == pytest.approx(0.6993, abs=1e-3)
    assert wilson(0, 100)[0] == pytest.approx(0.0, abs=1e-12) and 0.03 < wilson(0, 100)[1] < 0.04
    assert wilson(100, 100)[1] == pytest.approx(1.0) and wilson(100, 100)[0] > 0.96
    # Narrower with more tasks at the same proportion.
    assert wilson(70, 150)[1] - wilson(70, 150)[0] < hi - lo


def test_mcnemar_counts_only_discordant_tasks():
    a = [True] * 10 + [False] * 5
    b = [True] * 10 + [True] * 5  # b wins 5 discordant tasks, a none: p = 2 / 2^5
    assert mcnemar_exact(a, b) == pytest.approx(2 / 32)
    assert mcnemar_exact(a, a) == 1.0
    # 6 vs 4 discordant: far from significant.
    a = [True] * 6 + [False] * 4
    b = [False] * 6 + [True] * 4
    assert mcnemar_exact(a, b) == pytest.approx(2 * sum(math.comb(10, i) for i in range(5)) / 1024)


def test_paired_bootstrap_ci_brackets_the_difference_and_excludes_zero_only_when_clear():
    a = [True] * 60 + [False] * 40
    b = [True] * 30 + [False] * 70  # a strictly dominates on 30 tasks
    diff, lo, hi = paired_bootstrap(a, b)
    assert diff == pytest.approx(0.3) and 0 < lo < 0.3 < hi
    same_marginals = [True, False] * 50
    diff, lo, hi = paired_bootstrap(same_marginals, same_marginals[::-1])
    assert diff == 0 and lo < 0 < hi
    with pytest.raises(ValueError):
        paired_bootstrap([True], [True, False])


def _task(answer: str) -> Task:
    return Task("What is 6 * 7?", answer, "number")


def test_score_task_scores_every_n_on_prefixes_of_the_same_draw():
    row = score_task(_task("42"), FIXTURE, (1, 2, 4), ("likelihood", "vote", "verifier"),
                     [0.1, 0.9, 0.3, 0.2])
    assert row["parsed"] == ["41", "42", "42", "42"]
    assert row["tokens"] == [3, 3, 2, 1]
    # N=1 sees only the wrong, confident first answer; vote needs N=4 to outvote it.
    assert row["correct"]["likelihood"] == {1: False, 2: False, 4: False}
    assert row["correct"]["vote"] == {1: False, 2: False, 4: True}
    assert row["correct"]["verifier"] == {1: False, 2: True, 4: True}


def test_summarise_accuracy_tokens_oracle_and_pairing():
    rows = [score_task(_task("42"), FIXTURE, (1, 4), ("likelihood", "vote")),
            score_task(_task("41"), FIXTURE, (1, 4), ("likelihood", "vote")),
            score_task(_task("7"), FIXTURE, (1, 4), ("likelihood", "vote"))]
    s = summarise(rows, (1, 4), ("likelihood", "vote"))
    assert s["count"] == 3
    assert s["accuracy"]["likelihood"] == {1: pytest.approx(1 / 3), 4: pytest.approx(1 / 3)}
    assert s["accuracy"]["vote"] == {1: pytest.approx(1 / 3), 4: pytest.approx(1 / 3)}
    assert s["generated_tokens_per_task"] == {1: 3, 4: 9}
    assert s["oracle_any_correct"] == pytest.approx(2 / 3)
    lo, hi = s["ci95"]["vote"][4]
    assert lo < 1 / 3 < hi
    # vote at N=4 fixes task "42" and breaks task "41": equal accuracy, two discordant tasks.
    assert s["vs_n1"]["vote"][4]["diff"] == 0 and s["vs_n1"]["vote"][4]["mcnemar_p"] == 1.0
    with pytest.raises(ValueError):
        summarise([], (1,), ("vote",))


def test_summarise_beam_counts_accuracy_tokens_and_requests():
    rows = [{"correct": True, "tokens": 100, "requests": 5},
            {"correct": False, "tokens": 300, "requests": 9}]
    s = summarise_beam(rows)
    assert s["count"] == 2 and s["accuracy"] == 0.5
    assert s["generated_tokens_per_task"] == 200 and s["requests_per_task"] == 7
    assert s["ci95"] == pytest.approx(list(wilson(1, 2)))
    with pytest.raises(ValueError):
        summarise_beam([])


def test_a_failed_task_stops_the_set_and_keeps_the_finished_prefix() -> None:
    from mobile.tts.ordered import run_in_task_order

    def run(task: int) -> dict | None:
        if task == 3:
            raise ConnectionError("worker gone")
        return None if task == 1 else {"task": task}  # task 1: skipped (past a deadline)

    rows, error = run_in_task_order(list(range(6)), run, concurrency=1)
    assert [row["task"] for row in rows] == [0, 2]
    assert error is not None and error.startswith("task 3:")
    rows, error = run_in_task_order([0, 2], run, concurrency=2)
    assert [row["task"] for row in rows] == [0, 2] and error is None
