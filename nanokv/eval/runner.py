"""Runs a list of jobs (one case x policy x budget each), skipping finished ones, with a progress
line on stderr: a bar, the count, the current job, elapsed time and an estimate of what is left."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from nanokv.eval.results import ResultStore


@dataclass(frozen=True)
class Job:
    id: str  # the result row's id
    label: str  # shown on the progress line
    run: Callable[[], dict]  # returns the row's fields (the id is added)


def run_jobs(suite: str, jobs: list[Job], store: ResultStore, stream: TextIO | None = None) -> int:
    """Runs every job whose id is not in `store`, appending each row as it finishes. Returns
    the number of jobs run."""
    pending = [job for job in jobs if job.id not in store]
    progress = Progress(suite, len(jobs), len(jobs) - len(pending), stream or sys.stderr)
    for job in pending:
        progress.show(job.label)
        began = time.perf_counter()
        row = job.run()
        row.setdefault("seconds", round(time.perf_counter() - began, 3))
        store.add({"id": job.id, **row})
        progress.advance()
    progress.close()
    return len(pending)


class Progress:
    """`[niah] ######------ 12/60 snapkv b=0.05 ... 1:02 elapsed, ~3:10 left`."""

    width = 20

    def __init__(self, suite: str, total: int, done: int, stream: TextIO) -> None:
        self.suite, self.total, self.done, self.stream = suite, total, done, stream
        self.skipped = done
        self.began = time.perf_counter()
        self.tty = stream.isatty()

    def show(self, label: str) -> None:
        elapsed = time.perf_counter() - self.began
        ran = self.done - self.skipped
        left = "" if ran == 0 else f", ~{_clock(elapsed / ran * (self.total - self.done))} left"
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{self.suite}] {bar} {self.done}/{self.total} {label} {_clock(elapsed)}{left}"
        self.stream.write(f"\r\033[K{line}" if self.tty else line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        elapsed = _clock(time.perf_counter() - self.began)
        ran = self.done - self.skipped
        line = f"[{self.suite}] {self.done}/{self.total} done"
        line += f" ({ran} run, {self.skipped} resumed) in {elapsed}"
        self.stream.write(f"\r\033[K{line}\n" if self.tty else line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"
