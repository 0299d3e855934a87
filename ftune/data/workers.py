"""Run a function over batches of records in worker processes, results in input order, memory bounded.

Tokenizing is pure Python and CPU-bound (chat templates, offsets, label checks), so threads would share one
core; worker processes each get a core. `datasets.Dataset.map(num_proc=...)` does the same over an Arrow
dataset, but it needs the whole source converted to Arrow first (a second copy on disk, and a schema that
mixed chat records rarely fit), keys its cache by hashing the Python function (which cannot see a changed
tokenizer file or template), and returns only rows, while ftune also needs each batch's statistics, duplicate
sketches and the first error of each kind, in record order. So this is a small ordered map of our own.
"""

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

MAX_DEFAULT_PROCS = 8
"""`data.num_proc=0` uses the cores available, at most this many (more rarely pays: reading the source and
writing rows stay in the main process)."""

IN_FLIGHT_PER_WORKER = 2
"""Batches submitted ahead per worker: enough to keep each busy, few enough that a lazy source is read only
as fast as it is tokenized (memory stays bounded)."""

_state = None
"""What every call in this worker needs (tokenizer, template, settings), set once when the worker starts."""


def resolve_num_proc(num_proc: int) -> int:
    """`data.num_proc`: the number given, or (0) the cores this process may run on, at most MAX_DEFAULT_PROCS."""
    if num_proc > 0:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    return min(cores or 1, MAX_DEFAULT_PROCS)


def map_ordered(fn: Callable, state: object, batches: Iterable, num_proc: int) -> Iterator:
    """Yield `fn(state, batch)` for each batch, in the order of `batches`.

    With `num_proc` > 1 (and more than one batch) the calls run in that many worker processes, each given
    `state` once when it starts; at most IN_FLIGHT_PER_WORKER batches per worker are pending at a time. With 1
    they run here, so both paths compute with the same functions and give the same results.
    """
    iterator = iter(batches)
    ahead = list(itertools.islice(iterator, 2))
    if num_proc <= 1 or len(ahead) < 2:  # one batch only: starting workers would cost more than they save
        for batch in itertools.chain(ahead, iterator):
            yield fn(state, batch)
        return
    # fork where there is one, as datasets' map does: workers start at once and inherit the loaded tokenizer
    # (spawn, elsewhere, pickles `state` to each worker instead)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_set_state, initargs=(state,)) as pool:
        pending = deque()
        for batch in itertools.chain(ahead, iterator):
            pending.append(pool.submit(_call, fn, batch))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _set_state(state: object) -> None:
    global _state
    _state = state


def _call(fn: Callable, batch: object) -> object:
    return fn(_state, batch)
