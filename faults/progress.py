"""Progress on one line: rewritten in place on a terminal, a line every few seconds otherwise (CI
logs): the fault, the phase, and the load's counters as they move."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[faults {time.monotonic() - _STARTED:5.0f}s] {message}", flush=True)


class Progress:
    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.tty = sys.stdout.isatty()
        self.phase_name = ""
        self.phase_started = time.monotonic()
        self.last = 0.0

    def phase(self, name: str, ledger) -> None:
        if self.tty:
            print(flush=True)
        self.phase_name = name
        self.phase_started = time.monotonic()
        self.last = 0.0
        self.show(ledger, force=True)

    def show(self, ledger, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.25 if self.tty else 5.0):
            return
        self.last = now
        c = ledger.counters
        line = (f"[faults {now - _STARTED:5.0f}s] {self.fault}: {self.phase_name} "
                f"{now - self.phase_started:4.0f}s | writes {c.writes_acked}/{c.writes_sent} "
                f"acked, {c.writes_unanswered} unanswered | reads {c.reads} | 5xx {c.status_5xx}")
        print(line.ljust(118), end="\r" if self.tty else "\n", flush=True)

    def wait(self, seconds: float, ledger) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.show(ledger)
            time.sleep(0.1)

    def during(self, fn: Callable[[], dict], ledger) -> dict:
        """Run `fn` (the fault) in a thread, showing the load meanwhile."""
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        while thread.is_alive():
            self.show(ledger)
            thread.join(0.1)
        if "error" in box:
            raise box["error"]
        return box["result"]

    def finish(self, row) -> None:
        if self.tty:
            print(flush=True)
        verdict = "PASS" if row.passed else "FAIL"
        log(f"{self.fault}: {verdict} | acked {row.writes_acked}, lost {row.lost}, 5xx "
            f"{row.status_5xx}, stale {row.stale} over {row.api_processes} API processes, "
            f"converged {'in %.1f s' % row.converge_s if row.converge_s is not None else 'NO'}, "
            f"processes: {row.processes}")
        for problem in row.problems:
            log(f"  problem: {problem}")
        for example in row.examples[:6]:
            log(f"  e.g. {example[:300]}")
