"""Run one function in a fresh interpreter (spawned, so nothing of this process's memory or
threads carries over) and return its result: for peak-memory figures and for timings that must
not share an allocator."""

from __future__ import annotations

import multiprocessing
import queue


def _child(results, function, *arguments) -> None:
    results.put(function(*arguments))


def in_fresh_process(function, *arguments):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, function, *arguments))
    process.start()
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queue.Empty:  # still working, unless it died
            if not process.is_alive():
                raise RuntimeError(f"{function.__name__} failed in its process") from None
    process.join()
    return result
