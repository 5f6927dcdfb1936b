"""A one-line progress indicator (no dependency): rewritten in place on a terminal, a line every
few seconds otherwise (CI logs)."""

from __future__ import annotations

import sys
import time


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _STARTED:5.0f}s] {message}", flush=True)


class Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done_n = 0
        self.started = time.monotonic()
        self.last = 0.0
        self.tty = sys.stdout.isatty()

    def advance(self, n: int) -> None:
        self.done_n += n
        now = time.monotonic()
        if now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self._show(end="\r" if self.tty else "\n")

    def _show(self, end: str) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done_n / elapsed if elapsed else 0.0
        pct = 100.0 * self.done_n / self.total
        line = (f"[bench] {self.label}: {self.done_n:,}/{self.total:,} rows ({pct:5.1f}%), "
                f"{rate:,.0f} rows/s, {elapsed:.0f} s")
        print(line.ljust(100), end=end, flush=True)

    def done(self) -> None:
        self._show(end="\n")
