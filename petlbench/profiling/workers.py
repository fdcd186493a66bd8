"""Independent estimates in forked worker processes: the estimator is pure Python dispatch, one core each."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
MAX_AUTO_WORKERS = 4


def auto_workers(jobs: int) -> int:
    """`jobs` workers, or for 0 one per CPU core (at most MAX_AUTO_WORKERS)."""
    if jobs < 0:
        raise ValueError(f"jobs {jobs}: give 0 (one per core) or a positive number")
    return jobs if jobs > 0 else min(os.cpu_count() or 1, MAX_AUTO_WORKERS)


def fork_map(fn: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """`fn` over `items`, results in order as they come; forked workers when `workers` > 1 and fork exists
    (the workers inherit the imported modules and the frozen heap instead of re-importing), else in this process."""
    work = list(items)
    if workers > 1 and len(work) > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(min(workers, len(work))) as pool:
            yield from pool.imap(fn, work)
        return
    yield from map(fn, work)
