"""Sizing Redis from live data (`flask --app web cache-size`), the strategy's formula:

    memory = average entry size x number of entries x 1.3 (overhead), then + growth headroom

Entry sizes are Redis's own `MEMORY USAGE` of sampled entries. The names are built from database
ids through cache/keys.py, as the auditor builds them (tasks/audit.plan): no KEYS, no SCAN. A
family with no sampled entry in the cache is sized from the encoded value the API would store plus
the per-key overhead measured on the entries that were found (marked `~`). Counts are database
counts times the entries each id has (lists: the first page of each common page size), i.e. the
cache holding everything it may hold; the share found cached now is shown beside them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import func, select

from cache import codec, keys
from models import AuthSession, Organization, Project, Task, User, utcnow
from tasks.audit import PAGE_SIZES, Check, StatsCheck, plan

OVERHEAD = 1.3
GROWTH = 1.0  # +100 %: the strategy's "4 GB for ~2 GB" recommendation
DEFAULT_KEY_OVERHEAD = 80  # bytes of a key beyond its value, until measured
MIB = 1024 * 1024

# Entries per database row of a kind, as tasks/audit.plan builds them.
ENTRIES = {
    "organization": ("organizations", 1), "project_list": ("organizations", 2 * len(PAGE_SIZES)),
    "member_list": ("organizations", len(PAGE_SIZES)), "project": ("projects", 1),
    "task_list": ("projects", len(PAGE_SIZES)), "project_stats": ("projects", 1),
    "task": ("tasks", 1), "comment_list": ("tasks", 1), "user": ("users", 1),
    "unread_count": ("users", 1), "user_stats": ("users", 1), "session": ("sessions", 1),
}
# Version keys: about one per organization family, two per project and task, four per user
# (user, tasks, notifications, stats owner) and one per live session.
VERSION_KEYS = {"organizations": 4, "projects": 2, "tasks": 2, "users": 4, "sessions": 1}


@dataclass
class Family:
    name: str
    sampled: int = 0
    found: list[int] = field(default_factory=list)  # MEMORY USAGE of the entries found
    encoded: list[int] = field(default_factory=list)  # encoded sizes of the entries not found
    count: int = 0

    @property
    def estimated(self) -> bool:
        return not self.found

    def entry_bytes(self, key_overhead: float) -> float | None:
        if self.found:
            return statistics.mean(self.found)
        if self.encoded:
            return statistics.mean(self.encoded) + key_overhead
        return None

    def memory(self, key_overhead: float, overhead: float = OVERHEAD) -> float:
        size = self.entry_bytes(key_overhead)
        return 0.0 if size is None else size * self.count * overhead


@dataclass
class Sizing:
    families: list[Family]
    key_overhead: float
    used_memory: int
    maxmemory: int
    overhead: float = OVERHEAD
    growth: float = GROWTH

    @property
    def total(self) -> float:
        return sum(f.memory(self.key_overhead, self.overhead) for f in self.families)

    @property
    def recommended(self) -> int:
        """total x (1 + growth), rounded up to a multiple of 64 MiB."""
        step = 64 * MIB
        return max(step, math.ceil(self.total * (1 + self.growth) / step) * step)


def database_counts(services) -> dict[str, int]:
    with services.db.session() as db:
        def count(model, *where) -> int:
            return int(db.scalar(select(func.count()).select_from(model).where(*where)) or 0)
        return {"organizations": count(Organization), "projects": count(Project),
                "tasks": count(Task), "users": count(User),
                "sessions": count(AuthSession, AuthSession.revoked_at.is_(None),
                                  AuthSession.expires_at > utcnow())}


def _stored_names(services, checks: list[Check], stats: list[StatsCheck]) -> list[str | None]:
    """Each candidate's name under the current version tokens (None: a version key is missing,
    so nothing is stored under it). Reads only: creates no token."""
    client = services.cache.client
    pipe = client.pipeline(transaction=False)
    for check in checks:
        pipe.mget(check.key.versions)
    for s in stats:
        pipe.get(keys.org_generation(s.org_id, s.owner_id))
    replies = services.cache.call("sizing", pipe.execute)
    names: list[str | None] = []
    # A value lives at its key's own name (stored with the tokens it is valid under); while a
    # version key is missing, nothing current is stored there.
    for check, tokens in zip(checks, replies):
        names.append(None if any(t is None for t in tokens) else check.key.name)
    for s, gen in zip(stats, replies[len(checks):]):
        names.append(None if gen is None else s.agg.name(s.org_id, s.owner_id))
    return names


def measure(services, sample: int = 100, progress: Callable[[int], None] = lambda n: None,
            growth: float = GROWTH, planned: tuple | None = None) -> Sizing:
    checks, stats = planned or plan(services, sample)
    names = _stored_names(services, checks, stats)
    families: dict[str, Family] = {}
    client = services.cache.client
    key_overheads: list[int] = []
    candidates = [(c.key.family, c, n) for c, n in zip(checks, names)] + [
        (f"{s.agg.kind}_stats", None, n) for s, n in zip(stats, names[len(checks):])]
    missing: list[tuple[Family, Check]] = []
    cached: list[Check] = []  # candidates found in Redis: their version keys exist too
    for start in range(0, len(candidates), 100):
        batch = candidates[start:start + 100]
        pipe = client.pipeline(transaction=False)
        for _, check, name in batch:
            if name:
                pipe.memory_usage(name, samples=0)
                # A value's length (strings), to learn the per-key overhead; stats are hashes.
                pipe.strlen(name) if check is not None else pipe.exists(name)
        replies = iter(services.cache.call("sizing", pipe.execute) if any(
            n for _, _, n in batch) else [])
        for family_name, check, name in batch:
            family = families.setdefault(family_name, Family(family_name))
            family.sampled += 1
            usage, length = (next(replies), next(replies)) if name else (None, None)
            if usage:
                family.found.append(int(usage))
                if check is not None:
                    cached.append(check)
                if check is not None and length:
                    key_overheads.append(int(usage) - int(length))
            elif check is not None:
                missing.append((family, check))
        progress(len(batch))
    # Not cached now: what the API would store (the same loader, the same codec).
    if missing:
        with services.db.session() as db:
            for family, check in missing:
                if family.found:
                    continue
                value = check.load(db)
                if value is not None:
                    family.encoded.append(len(codec.encode(value)))
    counts = database_counts(services)
    for family in families.values():
        kind, per = ENTRIES.get(family.name, (None, 0))
        family.count = counts.get(kind, 0) * per
    versions = Family("version keys")
    versions.count = sum(counts[k] * n for k, n in VERSION_KEYS.items())
    version_names = sorted({v for c in (cached or checks)[:200] for v in c.key.versions})[:100]
    if version_names:
        pipe = client.pipeline(transaction=False)
        for name in version_names:
            pipe.memory_usage(name, samples=0)
        versions.found = [int(u) for u in services.cache.call("sizing", pipe.execute) if u]
        versions.sampled = len(version_names)
    info = services.cache.call("sizing", lambda: client.info("memory"))
    ordered = sorted(families.values(), key=lambda f: f.name) + [versions]
    return Sizing(ordered, statistics.mean(key_overheads) if key_overheads
                  else DEFAULT_KEY_OVERHEAD, int(info.get("used_memory", 0)),
                  int(info.get("maxmemory", 0)), growth=growth)


def human(n: float) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def table(s: Sizing) -> str:
    head = ("family", "sampled", "cached", "entry", "entries", f"memory (x{s.overhead:g})")
    rows = []
    for f in s.families:
        size = f.entry_bytes(s.key_overhead)
        entry = "n/a" if size is None else ("~" if f.estimated else "") + human(size)
        cached = f"{len(f.found)}/{f.sampled}" if f.sampled else "-"
        rows.append((f.name, str(f.sampled), cached, entry, f"{f.count:,}",
                     human(f.memory(s.key_overhead, s.overhead))))
    rows.append(("total", "", "", "", f"{sum(f.count for f in s.families):,}", human(s.total)))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [line(head), line(tuple("-" * w for w in widths)), *map(line, rows[:-1]),
           line(tuple("-" * w for w in widths)), line(rows[-1]), ""]
    current = human(s.maxmemory) if s.maxmemory else "no limit"
    out.append(f"Redis now: {human(s.used_memory)} used, maxmemory {current}.")
    out.append(f"Recommended maxmemory: {human(s.recommended)} ({s.recommended} bytes) = "
               f"{human(s.total)} x {1 + s.growth:g} (growth headroom +{s.growth:.0%}), "
               f"rounded up to 64 MiB.")
    if any(f.estimated and f.encoded for f in s.families):
        out.append(f"~: no entry of the family was cached; sized from the encoded value plus the "
                   f"measured per-key overhead ({s.key_overhead:.0f} B).")
    return "\n".join(out)
