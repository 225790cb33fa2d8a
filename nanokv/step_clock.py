"""Where a decode step's time goes: wall time per phase, summed over layers and steps.

The engine marks the end of each phase of a step (the model's projections, the eviction stage,
value norms, the arena write, attention, the policy's observation, the LM head) on its `clock`.
By default that clock is `STOPPED`, whose marks do nothing; `bench/step_phases.py` puts a
running `StepClock` there to measure what emission and each policy's bookkeeping cost inside a
real step (issue 11), where caches are as cold as the weight reads leave them, not in a loop of
their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StepClock:
    """Sums the wall time between consecutive marks under the name of the phase that ended.
    `sync` (e.g. `torch.cuda.synchronize`) runs before every reading, so that asynchronous
    devices are timed by when their work ended, not when it was queued."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.steps = 0
        self._last: float | None = None

    def start(self) -> None:
        """A step begins: the next mark times from here."""
        self._last = self._now()
        self.steps += 1

    def mark(self, phase: str) -> None:
        """`phase` ended now; the next phase starts."""
        now = self._now()
        if self._last is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def ms_per_step(self) -> dict[str, float]:
        """Phase -> milliseconds a step, over the steps since the clock was made."""
        return {phase: 1e3 * s / max(self.steps, 1) for phase, s in self.seconds.items()}

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()


class _Stopped(StepClock):
    """The engine's clock when nothing measures: its marks cost a method call."""

    def start(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass


STOPPED = _Stopped()
