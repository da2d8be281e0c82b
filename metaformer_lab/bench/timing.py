"""Timing shared by the benchmarks: interleaved rounds, so that a shared machine's slow spells hit all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def time_rounds(runs: dict[str, Callable[[], object]], seconds: float, min_rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per pass of each run: one warm-up round, then rounds of every run in turn until `seconds` per run
    (and `min_rounds`) have passed. Interleaved so that a shared machine's slow and fast spells hit all alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    while min(map(len, times.values())) < min_rounds or time.perf_counter() - start < seconds * len(runs):
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    return times


@dataclass(frozen=True)
class Rate:
    """How fast one process runs one pipeline: the median of `repeats` timed passes over the same images, and the
    slowest and fastest pass (the spread)."""

    images_per_s: float
    ms_per_image: float
    repeats: int
    slowest_images_per_s: float
    fastest_images_per_s: float


def rate(times: list[float], images: int) -> Rate:
    """The median pass of `images` images as a rate, with the spread over passes."""
    median = statistics.median(times)
    return Rate(images / median, 1000 * median / images, len(times), images / max(times), images / min(times))
