"""Where the time goes: seconds per named stage, summed across the threads that do the work.

test_net keeps one :class:`StageTimes` per slide (``STAGES``: reading and decoding, forward passes,
blending, threshold and RLE, objects, pictures, writing). Stages that run on helper threads
overlap others (a slide is read while the one before it is predicted; batches are blended while
the next batch runs), so the stages may add up to more than the slide's wall time.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, Mapping, TypeVar

__all__ = ["STAGES", "StageTimes", "sum_stages"]

T = TypeVar("T")

# test_net's stages, in the order a slide goes through them.
STAGES = ("read", "forward", "blend", "threshold_rle", "objects", "pictures", "write")


class StageTimes:
    """Seconds per stage; safe to add to from several threads."""

    def __init__(self) -> None:
        self._seconds: Dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the block as ``stage`` (added even when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def wrap(self, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn``, timed as ``stage`` on every call."""
        def timed(*args, **kwargs):
            with self(stage):
                return fn(*args, **kwargs)
        return timed

    def as_dict(self, digits: int = 3) -> Dict[str, float]:
        """The stages in :data:`STAGES` order (others after them), rounded."""
        with self._lock:
            names = [s for s in STAGES if s in self._seconds] + sorted(set(self._seconds) - set(STAGES))
            return {name: round(self._seconds[name], digits) for name in names}


def sum_stages(breakdowns: Iterable[Mapping[str, float]], digits: int = 3) -> Dict[str, float]:
    """The per-stage sums of several slides' breakdowns, in :data:`STAGES` order."""
    total: Dict[str, float] = {}
    for breakdown in breakdowns:
        for stage, seconds in breakdown.items():
            total[stage] = total.get(stage, 0.0) + float(seconds)
    names = [s for s in STAGES if s in total] + sorted(set(total) - set(STAGES))
    return {name: round(total[name], digits) for name in names}
