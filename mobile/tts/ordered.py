"""Run a task set concurrently but collect results in task order, keeping what finished.

The worker may die part-way (an OOM kill on a shared host): the first failed task stops the
run, later ones are cancelled, and the rows before it are returned with the error, so a
benchmark can save them and continue later (`--top-up`). Because rows are read in task
order, what ran is always a prefix of the set.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Task = TypeVar("Task")


def run_in_task_order(tasks: Sequence[Task], run: Callable[[Task], dict | None],
                      concurrency: int = 1,
                      progress: Callable[[int, list[dict], float], str] | None = None,
                      ) -> tuple[list[dict], str | None]:
    """(rows of the tasks that ran, in order; the first failure or None). ``run`` returns
    None for a task it skipped (e.g. past a deadline); ``progress(done, rows, seconds)``
    gives the line printed to stderr after each task."""
    rows: list[dict] = []
    error = None
    started = time.monotonic()
    with ThreadPoolExecutor(max(concurrency, 1)) as pool:
        futures = [pool.submit(run, task) for task in tasks]
        for i, future in enumerate(futures):
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. the worker died: keep the prefix
                error = f"task {i}: {exc!r}"
                for later in futures[i + 1:]:
                    later.cancel()
                break
            if row is not None:
                rows.append(row)
            if progress is not None:
                line = progress(i + 1, rows, time.monotonic() - started)
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
    if progress is not None:
        print(file=sys.stderr)
    return rows, error
