"""Project and user statistics, kept in Redis and updated by ordered deltas.

Every change to a project's (or user's) counts bumps `stats_seq` on its row in the same
transaction, so changes are numbered in commit order. The cached hash records the `seq` it
contains; a delta numbered `seq + 1` is folded in at once, an older one is ignored (it was already
counted: deltas are idempotent), a newer one waits in the hash until the gap fills. A full recount
reads the counts and `stats_seq` in one statement, i.e. one snapshot, and replaces the hash only if
it is newer than what the hash holds, so a recount can never drop or double a delta.

A cold recount first reserves the hash (a placeholder at seq -1 that reads as a miss): a delta
committed while the recount reads the database is then buffered in it instead of finding nothing
and being lost, and the recount's store folds it in. A recount never creates a hash that is
neither there nor reserved (it expired, or the organization was purged meanwhile): a delta may
have found nothing while it counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from cache import metrics
from cache.keys import AGGREGATE_TTL, org_generation, tenant_name
from cache.near import ByIdentity, NearCache
from cache.store import (MISSING, NEAR_MAX_AGE, VERSION_TTL, RedisCache, Unavailable, _token,
                         queue_evalsha)
from models import Comment, Project, Task, TaskStatus, User

STATUSES = [s.value for s in TaskStatus]
MAX_BUFFERED = 10_000
RESERVE_MS = 30_000  # how long a recount may take before its reservation lapses

# KEYS[1]: the organization's generation, KEYS[2]: the hash (both in the owner's slice of the
# organization). The hash records the generation it was built in (field `gen`); one of an older
# generation (the organization was purged) counts as missing. ARGV: token, version TTL, then per
# command.
_RESOLVE = """
local gen = redis.call('GET', KEYS[1])
if not gen then
  gen = ARGV[1]
  redis.call('SET', KEYS[1], gen, 'EX', ARGV[2])
end
local name = KEYS[2]
local current = redis.call('HGET', name, 'gen') == gen
"""

_READ = _RESOLVE + """
if not current then return {{}, -2, redis.call('TIME')[1]} end
local ttl = redis.call('TTL', name)
return {redis.call('HGETALL', name), ttl, redis.call('TIME')[1]}
"""

# ARGV[3]=placeholder ttl in ms. Reserve the hash for a recount unless it exists.
_RESERVE = _RESOLVE + """
if current then return 0 end
redis.call('DEL', name)
redis.call('HSET', name, 'seq', -1, 'gen', gen)
redis.call('PEXPIRE', name, ARGV[3])
return 1
"""

# ARGV[3]=seq, ARGV[4]=ttl, ARGV[5]=max buffered, ARGV[6..]=field, delta pairs.
_APPLY = _RESOLVE + """
if not current then return 'missing' end
local seq = tonumber(ARGV[3])
local have = tonumber(redis.call('HGET', name, 'seq'))
if seq <= have then return 'duplicate' end
local packed = table.concat(ARGV, ',', 6)
if seq > have + 1 then
  if redis.call('HLEN', name) > tonumber(ARGV[5]) then return 'overflow' end
  redis.call('HSET', name, 'd:' .. seq, packed)
  local known = tonumber(redis.call('HGET', name, 'known') or '0')
  if seq > known then redis.call('HSET', name, 'known', seq) end
  if redis.call('HEXISTS', name, 'gap_since') == 0 then
    redis.call('HSET', name, 'gap_since', redis.call('TIME')[1])
  end
  return 'buffered'
end
local function apply(p)
  local f = {}
  for x in string.gmatch(p, '([^,]+)') do f[#f + 1] = x end
  for i = 1, #f, 2 do redis.call('HINCRBY', name, f[i], tonumber(f[i + 1])) end
end
apply(packed)
local n = seq
while true do
  local nxt = redis.call('HGET', name, 'd:' .. (n + 1))
  if not nxt then break end
  apply(nxt)
  redis.call('HDEL', name, 'd:' .. (n + 1))
  n = n + 1
end
local now = redis.call('TIME')
-- computed_at: when the value last caught up with a change, by a delta as much as by a recount.
redis.call('HSET', name, 'seq', n, 'computed_at', now[1] .. '.' .. string.format('%06d', now[2]))
-- Progress was made: a gap that remains is timed from now.
if tonumber(redis.call('HGET', name, 'known') or '0') > n then
  redis.call('HSET', name, 'gap_since', redis.call('TIME')[1])
else
  redis.call('HDEL', name, 'gap_since')
end
return 'applied'
"""

# ARGV[3]=seq, ARGV[4]=ttl, ARGV[5]=computed_at, ARGV[6..]=field, value pairs.
_REPLACE = _RESOLVE + """
local seq = tonumber(ARGV[3])
if not current then return 'missing' end
local old = redis.call('HGETALL', name)
local have = -1
local buffered = {}
local drift = 0
local prev = {}
for i = 1, #old, 2 do
  local f, v = old[i], old[i + 1]
  if f == 'seq' then have = tonumber(v)
  elseif string.sub(f, 1, 2) == 'd:' then buffered[tonumber(string.sub(f, 3))] = v
  else prev[f] = v end
end
if have > seq then return 'older' end
if have == seq then
  for i = 6, #ARGV, 2 do
    if prev[ARGV[i]] ~= ARGV[i + 1] then drift = 1 end
  end
  if drift == 0 then
    redis.call('HSET', name, 'computed_at', ARGV[5])
    redis.call('EXPIRE', name, ARGV[4])
    return 'same'
  end
end
redis.call('DEL', name)
local fields = {'seq', seq, 'computed_at', ARGV[5], 'gen', gen}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', name, unpack(fields))
local n = seq
local known = 0
for s, p in pairs(buffered) do
  if s > n then redis.call('HSET', name, 'd:' .. s, p) end
  if s > known then known = s end
end
if known > n then
  redis.call('HSET', name, 'known', known, 'gap_since', redis.call('TIME')[1])
end
while true do
  local nxt = redis.call('HGET', name, 'd:' .. (n + 1))
  if not nxt then break end
  local f = {}
  for x in string.gmatch(nxt, '([^,]+)') do f[#f + 1] = x end
  for i = 1, #f, 2 do redis.call('HINCRBY', name, f[i], tonumber(f[i + 1])) end
  redis.call('HDEL', name, 'd:' .. (n + 1))
  n = n + 1
end
redis.call('HSET', name, 'seq', n)
if known <= n then redis.call('HDEL', name, 'known', 'gap_since') end
redis.call('EXPIRE', name, ARGV[4])
if have == seq then return 'drift' end
return 'replaced'
"""


def _reserved(flat: list) -> bool:
    """A hash reserved by a recount in progress (seq -1) reads as a miss."""
    return bool(flat) and b"seq" in flat[::2] and flat[flat.index(b"seq") + 1] == b"-1"


@dataclass(frozen=True)
class Aggregate:
    """One kind of statistics: how to name it, count it from the database, and present it."""

    kind: str  # "project" | "user"
    fields: tuple[str, ...]
    count: Callable[[Session, str], tuple[int, dict[str, int]] | None]
    present: Callable[[str, dict[str, int]], dict]
    # A change that finds these statistics uncached has them recounted (coalesced), so that no
    # request counts them. False: the change leaves them uncached ("unread"), and their first
    # read counts them (see USER_STATS).
    recount_when_uncached: bool = True

    def name(self, org_id: str, owner_id: str) -> str:
        return tenant_name(org_id, owner_id, "stats", self.kind, owner_id)


def _count_project(session: Session, project_id: str) -> tuple[int, dict[str, int]] | None:
    # One statement, hence one snapshot: the counts are exactly those of changes 1..stats_seq.
    comments = (select(func.count()).select_from(Comment)
                .where(Comment.project_id == Project.id).scalar_subquery())
    columns = [func.coalesce(func.sum(case((Task.status == s, 1), else_=0)), 0) for s in STATUSES]
    row = session.execute(
        select(Project.stats_seq, comments, *columns)
        .select_from(Project).outerjoin(Task, Task.project_id == Project.id)
        .where(Project.id == project_id).group_by(Project.id, Project.stats_seq)
    ).first()
    if row is None:
        return None
    seq, n_comments, *by_status = row
    counts = dict(zip(STATUSES, (int(v) for v in by_status)))
    counts["comments"] = int(n_comments)
    return int(seq), counts


def _count_user(session: Session, user_id: str) -> tuple[int, dict[str, int]] | None:
    columns = [func.coalesce(func.sum(case((Task.status == s, 1), else_=0)), 0) for s in STATUSES]
    row = session.execute(
        select(User.stats_seq, *columns).select_from(User)
        .outerjoin(Task, Task.assignee_id == User.id)
        .where(User.id == user_id).group_by(User.id, User.stats_seq)
    ).first()
    if row is None:
        return None
    seq, *by_status = row
    return int(seq), dict(zip(STATUSES, (int(v) for v in by_status)))


def _present_project(project_id: str, c: dict[str, int]) -> dict:
    by_status = {s: c.get(s, 0) for s in STATUSES}
    return {
        "project_id": project_id,
        "total_tasks": sum(by_status.values()),
        "completed_tasks": by_status["COMPLETED"],
        "open_tasks": by_status["TODO"],
        "tasks_by_status": by_status,
        "total_comments": c.get("comments", 0),
    }


def _present_user(user_id: str, c: dict[str, int]) -> dict:
    by_status = {s: c.get(s, 0) for s in STATUSES}
    return {
        "user_id": user_id,
        "assigned_tasks": sum(by_status.values()),
        "completed_tasks": by_status["COMPLETED"],
        "open_tasks": by_status["TODO"],
    }


PROJECT_STATS = Aggregate("project", (*STATUSES, "comments"), _count_project, _present_project)
# A member's statistics are one indexed count, and most are never read: a recount of each after
# a change to them was a Celery task per write of the benchmark's mix (the worker's, Flower's and
# MariaDB's CPU: BENCHMARKS.md). Read ones stay cached: a read near their TTL refreshes them.
USER_STATS = Aggregate("user", tuple(STATUSES), _count_user, _present_user,
                       recount_when_uncached=False)
AGGREGATES = {a.kind: a for a in (PROJECT_STATS, USER_STATS)}


@dataclass(frozen=True)
class Delta:
    """A numbered change to one aggregate, carried by a domain event."""

    kind: str
    org_id: str
    owner_id: str
    seq: int
    changes: dict[str, int]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "org_id": self.org_id, "owner_id": self.owner_id,
                "seq": self.seq, "changes": self.changes}

    @classmethod
    def from_dict(cls, data: dict) -> "Delta":
        return cls(data["kind"], data["org_id"], data["owner_id"], int(data["seq"]),
                   {k: int(v) for k, v in data["changes"].items()})


@dataclass
class Snapshot:
    stats: dict
    seq: int
    computed_at: float
    stale: bool
    ttl: int
    stalled: float = 0.0  # seconds a gap has stood without progress (0 when not stale)
    layer: str = "redis"  # "l1": served from the near cache


@dataclass
class StatsRead:
    """A statistics read that can ride on another lookup's round trip (a SideCommand)."""

    store: "AggregateStore"
    agg: Aggregate
    org_id: str
    owner_id: str
    also: Callable[[redis.client.Pipeline | None], None] | None = None
    reply: Any = MISSING
    layer: str = "redis"  # "l1" once served from the near cache

    @property
    def name(self) -> str:
        return self.agg.name(self.org_id, self.owner_id)

    def from_near(self, near: "NearCache", ticket: int | None) -> bool:
        """Serve the reply from the near cache, aged by the time since it was read (its TTL and
        Redis' clock move on), or return False."""
        kept = near.get(self.name, ticket)
        if kept is MISSING:
            return False
        (flat, ttl, now), read_at = kept
        age = int(time.monotonic() - read_at)
        self.reply = [flat, ttl - age if ttl >= 0 else ttl, int(now) + age]
        self.layer = "l1"
        if self.also:
            self.also(None)
        return True

    def keep_near(self, near: "NearCache", ticket: int | None) -> None:
        """Keep a hit for the next reads of this process (a miss or a reservation is not kept)."""
        if self.reply is MISSING or self.layer != "redis":
            return
        flat, ttl, _ = self.reply
        if not flat or _reserved(flat) or ttl < 0:
            return
        keys, _ = self.store._args(self.agg, self.org_id, self.owner_id)
        near.put(self.name, (self.reply, time.monotonic()), keys, ticket,
                 max_age=min(float(ttl), NEAR_MAX_AGE))

    def queue(self, pipe: redis.client.Pipeline) -> int:
        keys, args = self.store._args(self.agg, self.org_id, self.owner_id)
        before = len(pipe)
        # EVALSHA in a plain pipeline (a Script called on a pipeline costs a SCRIPT EXISTS round
        # trip); a restarted Redis has lost the script: load_scripts, then go again.
        queue_evalsha(pipe, self.store._read.sha, keys, args)
        if self.also:
            self.also(pipe)
        return len(pipe) - before

    def load_scripts(self, client: redis.Redis) -> None:
        client.script_load(_READ)

    def snapshot(self) -> Snapshot | None:
        return self.store.parse(self.agg, self.owner_id, self.reply, org_id=self.org_id,
                                layer=self.layer)


_parsed = ByIdentity(256)


def _parse_hash(agg: Aggregate, owner_id: str, flat: list) -> tuple:
    """(presented stats, seq, computed_at, stale, gap_since or None) of a stats hash."""
    raw = {(k.decode() if isinstance(k, bytes) else k): v for k, v in zip(flat[::2], flat[1::2])}
    counts = {f: int(raw.get(f, 0)) for f in agg.fields}
    seq = int(raw.get("seq", 0))
    gap_since = raw.get("gap_since")
    return (agg.present(owner_id, counts), seq, float(raw.get("computed_at", 0)),
            int(raw.get("known", 0)) > seq, None if gap_since is None else float(gap_since))


class AggregateStore:
    def __init__(self, cache: RedisCache) -> None:
        self.cache = cache
        client = cache.client
        self._read = client.register_script(_READ)
        self._reserve = client.register_script(_RESERVE)
        self._apply = client.register_script(_APPLY)
        self._replace = client.register_script(_REPLACE)

    def _args(self, agg: Aggregate, org_id: str, owner_id: str) -> tuple[list, list]:
        return ([org_generation(org_id, owner_id), agg.name(org_id, owner_id)],
                [_token(), VERSION_TTL])

    def read(self, agg: Aggregate, org_id: str, owner_id: str,
             also: Callable[[redis.client.Pipeline], None] | None = None, *,
             counted: bool = True) -> Snapshot | None:
        """The cached statistics, or None on a miss. Raises Unavailable when Redis is.
        `also(pipe)` queues more commands for the same round trip (their replies are dropped).
        `counted=False`: an inspection, left out of the hit/miss metrics."""
        if not self.cache.enabled:
            return None
        read = self.side_read(agg, org_id, owner_id, also)
        near = self.cache.near
        ticket = near.begin() if near and counted else None
        if ticket is not None and read.from_near(near, ticket):
            if self.cache.counters.due():
                self.cache.flush_counters()
            return read.snapshot()

        self.cache.send("get", [read])
        if read.reply is MISSING:
            raise Unavailable("the statistics read failed")
        if ticket is not None:
            read.keep_near(near, ticket)
        return self.parse(agg, owner_id, read.reply, org_id=org_id, counted=counted)

    def side_read(self, agg: Aggregate, org_id: str, owner_id: str,
                  also: Callable[[redis.client.Pipeline], None] | None = None) -> "StatsRead":
        """The same read, to be made in another lookup's round trip (see RedisCache.lookup_many)."""
        return StatsRead(self, agg, org_id, owner_id, also)

    def parse(self, agg: Aggregate, owner_id: str, reply: Any, *, org_id: str | None = None,
              counted: bool = True, layer: str = "redis") -> Snapshot | None:
        """`counted=False`: an inspection (the auditor's), not a request: no hit/miss metric."""
        flat, ttl, now = reply
        if _reserved(flat):
            flat = []  # reserved by a recount in progress: a miss
        if counted:
            family = f"{agg.kind}_stats"
            metrics.lookups.add(layer, family, bool(flat), org_id)
        if not flat:
            return None
        # A near copy's hash is the same object at each read: parsed once (12 us of a warm
        # stats read when parsed every time).
        parsed = _parsed.get(flat)
        if parsed is MISSING or parsed[0] != (agg.kind, owner_id):
            parsed = ((agg.kind, owner_id), *_parse_hash(agg, owner_id, flat))
            _parsed.put(flat, parsed)
        _, stats, seq, computed_at, stale, gap_since = parsed
        since = float(now) if gap_since is None else gap_since
        stalled = max(0.0, float(now) - since) if stale else 0.0
        return Snapshot(stats, seq, computed_at, stale=stale, ttl=int(ttl), stalled=stalled,
                        layer=layer)

    def apply(self, delta: Delta, source: str) -> str:
        """Fold one delta in, in a round trip of its own (see `DeltaWrite` for one that rides
        on another's)."""
        write = self.delta_write(delta, source)
        try:
            self.cache.send("delta", [write])
        except Unavailable:
            pass
        return write.outcome()

    def delta_write(self, delta: Delta, source: str) -> "DeltaWrite":
        return DeltaWrite(self, delta, source)

    def reserve(self, agg: Aggregate, org_id: str, owner_id: str) -> None:
        """Before a recount reads the database: deltas committed meanwhile wait in the hash."""
        keys, args = self._args(agg, org_id, owner_id)
        try:
            self.cache.call("reserve", lambda: self._reserve(
                keys=keys, args=[*args, RESERVE_MS]))
        except Unavailable:
            pass

    def replace(self, agg: Aggregate, org_id: str, owner_id: str, seq: int,
                counts: dict[str, int]) -> str:
        keys, args = self._args(agg, org_id, owner_id)
        pairs = [x for f in agg.fields for x in (f, str(int(counts.get(f, 0))))]
        outcome = self.cache.call("recount", lambda: self._replace(
            keys=keys, args=[*args, seq, AGGREGATE_TTL, f"{time.time():.6f}", *pairs]))
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "drift":
            metrics.aggregate_drift.labels(agg.kind).inc()
        return outcome

    def recount(self, session: Session, agg: Aggregate, org_id: str, owner_id: str,
                reason: str) -> dict | None:
        """Count from the database and store. Returns the presented stats (None: owner gone)."""
        if self.cache.enabled:
            self.reserve(agg, org_id, owner_id)
        counted = agg.count(session, owner_id)
        if counted is None:
            return None
        seq, counts = counted
        metrics.aggregate_recomputes.labels(agg.kind, reason).inc()
        if not self.cache.enabled:
            return agg.present(owner_id, counts)
        try:
            self.replace(agg, org_id, owner_id, seq, counts)
        except Unavailable:
            pass
        return agg.present(owner_id, counts)


@dataclass
class DeltaWrite:
    """A delta folded into its aggregate by a command that can ride on another call's round
    trip (a SideCommand: an event's deltas go with its bumps, cache.store.invalidate)."""

    store: AggregateStore
    delta: Delta
    source: str
    reply: Any = MISSING
    _outcome: str | None = None

    def queue(self, pipe: redis.client.Pipeline) -> int:
        delta = self.delta
        keys, args = self.store._args(AGGREGATES[delta.kind], delta.org_id, delta.owner_id)
        pairs = [x for f, v in sorted(delta.changes.items()) if v for x in (f, v)]
        if not pairs:
            pairs = ["seq", 0]  # a numbered change that moves no count still advances seq
        queue_evalsha(pipe, self.store._apply.sha, keys,
                      [*args, delta.seq, AGGREGATE_TTL, MAX_BUFFERED, *pairs])
        return 1

    def load_scripts(self, client: redis.Redis) -> None:
        client.script_load(_APPLY)

    def outcome(self) -> str:
        """"applied", "duplicate", "buffered", "overflow", "missing" (uncached: to recount),
        "unread" (uncached, and left so: `Aggregate.recount_when_uncached`), or "unavailable"
        when the round trip failed; counted (once) when it is known."""
        if self.reply is MISSING:
            return "unavailable"
        if self._outcome is None:
            outcome = self.reply.decode() if isinstance(self.reply, bytes) else self.reply
            if outcome == "missing" and not AGGREGATES[self.delta.kind].recount_when_uncached:
                outcome = "unread"
            metrics.aggregate_deltas.labels(self.delta.kind, outcome, self.source).inc()
            self._outcome = outcome
        return self._outcome
