"""Progress of long work: done/total, rate and ETA, on a terminal (rich) and in logs (plain lines)."""

from __future__ import annotations

import sys
import time

from rich.console import Console

console = Console(stderr=True)


class Progress:
    """`update(done)`; prints a plain line at most every `every` seconds when not on a terminal
    (Ray job logs), and a live rich line on a terminal."""

    def __init__(self, label: str, total: int, unit: str = "models", every: float = 5.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.done = 0
        self.live = sys.stderr.isatty()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ETA {eta_s}"

    def update(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.live:
            console.print(self.line(), end="\r", highlight=False)
        elif now - self.last_print >= self.every or done >= self.total:
            print(self.line(), flush=True)
            self.last_print = now

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        if self.live:
            console.print(" " * 100, end="\r")
        print(f"{self.label}: {self.done}/{self.total} {self.unit} in {elapsed:.1f}s", flush=True)
