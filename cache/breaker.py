"""A circuit breaker for Redis: while it is open, requests skip Redis instead of each paying a
connection timeout. After `cooldown` one caller is let through as a probe; its success closes it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from cache import metrics

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._opened_at = 0.0
        metrics.breaker_open.set(0)  # a series from the start: "closed" is a value, not a gap

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        """May this call go to Redis? In HALF_OPEN exactly one caller (the probe) gets True."""
        if self._state == CLOSED:
            return True
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown:
                self._transition(HALF_OPEN)
                return True
            return False

    def record_success(self) -> bool:
        """Returns True when this success closed the breaker (the caller may owe a replay)."""
        if self._state == CLOSED:
            return False
        with self._lock:
            if self._state == CLOSED:
                return False
            self._transition(CLOSED)
            return True

    def record_failure(self) -> None:
        with self._lock:
            self._opened_at = self._clock()
            if self._state != OPEN:
                self._transition(OPEN)

    def _transition(self, state: str) -> None:
        log.warning("redis circuit breaker %s -> %s", self._state, state)
        self._state = state
        metrics.breaker_transitions.labels(state).inc()
        metrics.breaker_open.set(0 if state == CLOSED else 1)
