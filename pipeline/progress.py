"""Progress of long work (one stage's Ray tasks): done/total, rate, ETA and elapsed time.

On a terminal: one live rich progress bar per stage, replaced by a summary line when the stage ends.
Elsewhere (CI, `ray job submit` logs, a pipe): a plain line on stdout when the count has changed since
the last line, at most one every `every` seconds (10), and the summary at the end; never the same line
twice, however often `update` is called with the same count.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """`update(done)` as work finishes, `close()` at the end.

    live: a rich bar (default: when stderr is a terminal); stream: where plain lines go (default
    stdout); clock: seconds, monotonic (tests pass their own)."""

    def __init__(self, label: str, total: int, unit: str = "models", every: float = 10.0,
                 live: bool | None = None, stream: TextIO | None = None, console=None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.stream, self.console = stream, console
        self.live = sys.stderr.isatty() if live is None else live
        self._printed: int | None = None  # the count of the last plain line
        self._printed_at = float("-inf")
        self._bar = self._start_bar() if self.live else None

    # -------------------------------------------------------------- terminal
    def _start_bar(self):
        from rich.console import Console
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(self.unit), TextColumn("{task.fields[rate]}"), TextColumn("ETA"),
                  TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                  console=self.console or Console(stderr=True), transient=True)
        self._task = bar.add_task(self.label, total=self.total, rate="")
        bar.start()
        return bar

    # -------------------------------------------------------------- both
    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ETA {eta}, "
                f"elapsed {_duration(self.clock() - self.start)}")

    def update(self, done: int) -> None:
        self.done = done
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=f"{self.rate():.2f}/s")
            return
        now = self.clock()
        if done != self._printed and now - self._printed_at >= self.every:
            self._print(self.line())
            self._printed, self._printed_at = done, now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elapsed = self.clock() - self.start
        summary = f"{self.label}: {self.done}/{self.total} {self.unit} in {_duration(elapsed)}"
        if self.live:
            from rich.console import Console

            (self.console or Console(stderr=True)).print(summary, highlight=False)
        else:
            self._print(summary)

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)
