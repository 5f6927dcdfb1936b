"""Per-organization lookup figures without a label per organization.

Counted in this process only (a dict and a Prometheus counter: no Redis write per request). The
busiest organizations get a label of their own, every other one is summed under `org="other"`, so
the sum over all labels is exact and the number of series stays bounded:

- at most `slots` organizations are labeled at a time (free slots are taken at once);
- every `window` seconds the counts of that window are ranked: an unlabeled organization busier
  than twice the quietest labeled one takes its slot (the quiet label just stops growing);
- at most `max_series` organizations are ever labeled in a process's life: past that, nobody is
  promoted any more (a restart starts over), and `other` keeps the exact rest.

With several processes each keeps its own slots; `sum by (org)` in Prometheus adds them up.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable

OTHER = "other"
SLOTS = 10
MAX_SERIES = 50
WINDOW = 60.0
MAX_TRACKED = 10_000  # distinct organizations ranked per window (the rest still count as other)


class TenantTally:
    def __init__(self, slots: int = SLOTS, max_series: int = MAX_SERIES, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots, self.max_series, self.window = slots, max_series, window
        self._clock = clock
        self._lock = threading.Lock()
        self.labeled: set[str] = set()
        self.ever: set[str] = set()
        self._recent: Counter[str] = Counter()
        self._window_ends = clock() + window

    def label_for(self, org_id: str, count: int = 1) -> str:
        """The label to count `count` lookups under (and note them for the next ranking)."""
        with self._lock:
            now = self._clock()
            if now >= self._window_ends:
                self._rerank()
                self._window_ends = now + self.window
            if org_id in self._recent or len(self._recent) < MAX_TRACKED:
                self._recent[org_id] += count
            if org_id in self.labeled:
                return org_id
            if len(self.labeled) < self.slots and len(self.ever) < self.max_series:
                self._label(org_id)
                return org_id
            return OTHER

    def _label(self, org_id: str) -> None:
        self.labeled.add(org_id)
        self.ever.add(org_id)

    def _rerank(self) -> None:
        recent, self._recent = self._recent, Counter()
        for org_id, count in recent.most_common(self.slots):
            if org_id in self.labeled or len(self.ever) >= self.max_series:
                continue
            if len(self.labeled) < self.slots:
                self._label(org_id)
                continue
            quietest = min(self.labeled, key=lambda o: recent.get(o, 0))
            if count > 2 * recent.get(quietest, 0):
                self.labeled.discard(quietest)
                self._label(org_id)


_tally = TenantTally()


def org_of(key_name: str) -> str | None:
    """The organization of a tenant key (`t:{o:<org>:<slice>}:...`), None for process-wide keys."""
    if key_name.startswith("t:{o:"):
        return key_name[5:].partition(":")[0]
    return None


_series: dict[tuple[str, bool], object] = {}  # (label, hit) -> its counter, found once


def count_lookup(org_id: str, hit: bool, count: int = 1) -> None:
    from cache import metrics

    if not _series:  # `other` is a series from the first lookup on, 0 until it counts
        for other_hit in (True, False):
            _series[OTHER, other_hit] = metrics.tenant_lookups.labels(
                OTHER, "hit" if other_hit else "miss")
    label = _tally.label_for(org_id, count)
    series = _series.get((label, hit))
    if series is None:
        series = _series[label, hit] = metrics.tenant_lookups.labels(label,
                                                                     "hit" if hit else "miss")
    series.inc(count)
