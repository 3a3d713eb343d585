"""Seeded task sets with checkable answers: arithmetic and multiple choice."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    question: str
    answer: str
    kind: str  # "number" or "choice"


def arithmetic(count: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 12)
        form = rng.choice(["{a} + {b} - {c}", "{a} + {b} * {c}", "({a} - {c}) * {c}"])
        expr = form.format(a=a, b=b, c=c)
        tasks.append(Task(f"What is {expr}? Think step by step, then give the final number.",
                          str(eval(expr)), "number"))  # noqa: S307 - our own template
    return tasks


def addition(count: int, seed: int = 0) -> list[Task]:
    """Two-operand sums under 100: within reach of a 135M model (3-operand sets are not)."""
    rng = random.Random(seed + 2)
    tasks = []
    for _ in range(count):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        tasks.append(Task(f"What is {a} + {b}? Give the final number.", str(a + b), "number"))
    return tasks


_ANIMALS = ["dog", "cat", "horse", "eagle", "salmon", "rabbit"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]
_TOOLS = ["hammer", "wrench", "saw", "drill", "chisel", "pliers"]


def multiple_choice(count: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed + 1)
    tasks = []
    for _ in range(count):
        letters = "ABCD"
        if rng.random() < 0.5:
            nums = rng.sample(range(1, 100), 4)
            correct = nums.index(max(nums))
            options = [str(n) for n in nums]
            stem = "Which option is the largest number?"
        else:
            target, pool = rng.choice([("color", _COLORS), ("animal", _ANIMALS),
                                       ("tool", _TOOLS)])
            others = [p for p in (_COLORS, _ANIMALS, _TOOLS) if p is not pool]
            options = [rng.choice(pool)] + [rng.choice(rng.choice(others)) for _ in range(3)]
            rng.shuffle(options)
            correct = next(i for i, o in enumerate(options) if o in pool)
            stem = f"Which option is a {target}?"
        body = " ".join(f"{letters[i]}) {o}" for i, o in enumerate(options))
        tasks.append(Task(f"{stem} {body}. Answer with the letter.", letters[correct], "choice"))
    return tasks


TASK_SETS = {"arithmetic": arithmetic, "addition": addition, "choice": multiple_choice}
