"""The shared Redis cache (L2): versioned read-through with single-flight loads, a circuit breaker
and invalidations that survive an outage.

A lookup is one round trip: a Lua script reads the key's version tokens (creating a fresh random
token where one is missing, so a lost or evicted version key can never bring an old value back) and
the value, which carries the tokens it was stored under; a value stored under other tokens is a
miss. A miss then loads under a short single-flight lock and stores only if the tokens are still
those the lookup saw *before* the load (a compare-and-set): a reader that loaded before a write can
never store its old value after it. Every script names all the keys it touches in KEYS, all in one
hash slot (cache/keys.py), so the same scripts run on a single Redis and on a Redis Cluster.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

import redis
from redis.cluster import ClusterPipeline

from cache import codec, metrics, tenants
from cache.breaker import CircuitBreaker
from cache.near import MISSING, NearCache
from cache.keys import Key, hash_tag, org_generations

log = logging.getLogger(__name__)

T = TypeVar("T")

# X-Cache values
HIT_L1, HIT_L2, MISS, STALE, BYPASS = "HIT-L1", "HIT-L2", "MISS", "STALE", "BYPASS"

VERSION_TTL = 86_400
# A sliding TTL (a session's) is extended at most this often; its near copies live as long.
SLIDE_STEP = 30
# The longest a near copy lives without being read from Redis again: the safety net for an
# invalidation Redis could not send (tracking is what keeps copies correct).
NEAR_MAX_AGE = 60.0
# How long "event applied" markers stop a second application of the same event's bumps. The
# second one normally comes within seconds (the web applies after commit and hands an event it
# could not finish to a worker); one arriving later (a redelivery after the 300 s visibility
# timeout, a sweep re-send after a long broker outage) only bumps again: its values are retired
# once more (a miss each), never served stale. One marker per write event, kept for a day
# (VERSION_TTL), was the cache's key count growing for a day under steady writes; kept 600 s for
# every event, it was still nine keys in ten under steady writes (the soaks in RELIABILITY.md):
# only events handed on get one now.
EVENT_MARKER_TTL = 600
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)

# KEYS: the version keys, then the value. ARGV: token seed, version TTL, sliding TTL (0: none),
# slide step. Returns {tokens, value or false, the value's PTTL (refresh ahead of expiry)}. The
# stored value is `<tokens>|<blob>`. A sliding value's TTL is extended only once it has run down
# by the slide step: a write (and the near caches' invalidation it causes) at most once per step,
# not one per request.
_LOOKUP = """
local n = #KEYS - 1
local parts = {}
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if not v then
    v = ARGV[1] .. i
    redis.call('SET', KEYS[i], v, 'EX', ARGV[2])
  end
  parts[i] = v
end
local tokens = table.concat(parts, '.')
local stored = redis.call('GET', KEYS[n + 1])
if stored and string.sub(stored, 1, #tokens + 1) == tokens .. '|' then
  if ARGV[3] ~= '0' and redis.call('TTL', KEYS[n + 1]) < tonumber(ARGV[3]) - tonumber(ARGV[4]) then
    redis.call('EXPIRE', KEYS[n + 1], ARGV[3])
  end
  return {tokens, string.sub(stored, #tokens + 2), redis.call('PTTL', KEYS[n + 1])}
end
return {tokens, false}
"""

# KEYS: the version keys, then the value. ARGV: the tokens the loader's lookup saw, blob, TTL.
# Stores only while those are still the current tokens (a write since the lookup retired them).
_STORE = """
local n = #KEYS - 1
local parts = {}
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if not v then return 0 end
  parts[i] = v
end
if table.concat(parts, '.') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[n + 1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
return 1
"""

# Become the loader of a missed value, unless another loader stored it since our lookup (then
# return it): a reader whose lookup missed just before a loader stored must not load again.
# KEYS: the value, the lock. ARGV: lock token, lock TTL (ms), the tokens the lookup saw.
_ACQUIRE = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, #ARGV[3] + 1) == ARGV[3] .. '|' then
  return {string.sub(value, #ARGV[3] + 2), 0}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Bump version keys unless this event was applied already (the web process applies it after
# commit, the worker again from the outbox: whichever comes second changes nothing), and store with
# them the values a write's warm-up loaded before: in one script, so no reader finds such a key
# retired and not yet stored again. A value is stored only if its version tokens were, before the
# bumps, those its warm-up expects (no other writer bumped since it looked them up before loading);
# it gets the tokens they have after the bumps.
# KEYS: the version keys of one hash slot, that slot's marker of the event (or none), then per
# value of the slot its version keys and its key.
# ARGV: token seed, version TTL, '1' when a marker is given, the marker's TTL, the number of version
# keys, then per value: its number of version keys, the tokens expected, its blob, its TTL.
# Returns {1, the tokens it replaced..., then per value 1 if stored} ({0} if already applied): a
# warm-up not stored here checks the replaced tokens against those it saw (UnitOfWork.warm).
_BUMP = """
local n = tonumber(ARGV[5])
local at = n + 1
if ARGV[3] == '1' then
  at = at + 1
  if redis.call('SET', KEYS[n + 1], '1', 'NX', 'EX', ARGV[4]) == false then return {0} end
end
local values = {}
for arg = 6, #ARGV, 4 do
  local m, parts = tonumber(ARGV[arg]), {}
  for i = 1, m do parts[i] = redis.call('GET', KEYS[at + i - 1]) or '' end
  values[#values + 1] = {at, m, table.concat(parts, '.') == ARGV[arg + 1], arg}
  at = at + m + 1
end
local reply = {1}
for i = 1, n do
  reply[i + 1] = redis.call('SET', KEYS[i], ARGV[1] .. i, 'EX', ARGV[2], 'GET')
end
for _, v in ipairs(values) do
  local first, m, current, arg = v[1], v[2], v[3], v[4]
  if current then
    local parts = {}
    for i = 1, m do parts[i] = redis.call('GET', KEYS[first + i - 1]) end
    redis.call('SET', KEYS[first + m], table.concat(parts, '.') .. '|' .. ARGV[arg + 2],
               'EX', ARGV[arg + 3])
  end
  reply[#reply + 1] = current and 1 or 0
end
return reply
"""


@dataclass
class WarmStore:
    """A value a write's warm-up loaded, to be stored with the write's bumps (see _BUMP)."""

    key: Key
    tokens: str  # what its version tokens must be just before the bumps
    blob: bytes


class Bumped:
    """What a write's bumps did to each version key: the token before its first bump and after
    its last. A warm-up that read the tokens before loading stores its value under the new
    tokens only if the old ones are what it read: no other write bumped in between, so every
    write its load missed bumps later and retires it."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str | None, str]] = {}
        self.to_store: list[WarmStore] = []  # stored by the next bumps (`RedisCache.invalidate`)
        self.stored: set[str] = set()  # names of the values those bumps stored

    def store_with_next_bumps(self, key: Key, tokens: str, value: Any) -> None:
        self.to_store.append(WarmStore(key, tokens, codec.encode(value)))

    def record(self, version: str, old: str | None, new: str) -> None:
        earlier = self._tokens.get(version)
        if earlier is not None and old != earlier[1]:
            old = None  # another writer bumped between two of ours: nothing can be checked
        elif earlier is not None:
            old = earlier[0]
        self._tokens[version] = (old, new)

    def replace(self, versions: Sequence[str], tokens: str, named: set[str]) -> str | None:
        """The tokens a value read under `tokens` (of `versions`) gets after these bumps; None
        when a version the write named was not bumped, or was bumped by another writer since
        `tokens` was read."""
        parts = tokens.split(".")
        for i, version in enumerate(versions):
            if version in self._tokens:
                old, new = self._tokens[version]
                if old is None or old != parts[i]:
                    return None
                parts[i] = new
            elif version in named:
                return None  # Redis failed that bump
        return ".".join(parts)


def unwrap(stored: bytes | None, tokens: str) -> bytes | None:
    """The blob of a stored value if it was stored under `tokens`, else None (retired)."""
    prefix = tokens.encode() + b"|"
    if stored is not None and stored.startswith(prefix):
        return stored[len(prefix):]
    return None


def queue_evalsha(pipe, sha: str, keys: Sequence[str], args: Sequence) -> None:
    """EVALSHA on a pipeline, plain or cluster; all `keys` share a slot. redis-py 8.1's
    ClusterPipeline refuses `.evalsha()` (redis/redis-py#2914, allowed upstream by #4206), and
    routes the generic command by asking a node COMMAND GETKEYS first, a round trip per script;
    so a cluster pipeline is told the node serving the keys' slot from the client's slot map."""
    if isinstance(pipe, ClusterPipeline):
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args,
                             target_nodes=pipe.get_node_from_key(keys[0]))
    else:
        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)


def event_marker(tag: str, event_id: str) -> str:
    """Applied-once marker of an event's bump in one hash slot."""
    return f"applied:{tag}:{event_id}"


class SideCommand(Protocol):
    """A command of another shape than a Key's that rides on another call's round trip: a
    statistics read on a lookup's, an event's deltas on its bumps'. `reply` stays MISSING unless
    the round trip succeeded."""

    reply: Any

    def queue(self, pipe: redis.client.Pipeline) -> int:
        """Queue the command (its reply first) and return how many commands were queued."""

    def load_scripts(self, client: redis.Redis) -> None:
        """Load the scripts the command runs (after a Redis restart lost them)."""


class Unavailable(Exception):
    """Redis is down, slow or the breaker is open: the caller serves from the database."""


@dataclass(slots=True)
class Lookup:
    key: Key
    tokens: str | None  # the versions seen; None when Redis could not be asked
    value: Any = MISSING
    layer: str = "redis"  # where the value came from: "l1" (the near cache) or "redis"
    stored: bool = False  # a value was stored under `tokens` (they were still current)
    expires: float | None = None  # when the value expires in Redis (time.monotonic()), if known

    @property
    def hit(self) -> bool:
        return self.value is not MISSING


def tally_key(hours_ago: int = 0) -> str:
    return f"cache:tally:{int(time.time() // 3600) - hours_ago}"


TALLY_TTL = 7200


class BatchedCounters:
    """Counters that every request touches (the hit tally, the busiest projects), kept in this
    process and written to Redis at most once per `interval` seconds, riding on a round trip the
    request makes anyway. On a Redis Cluster a key incremented by every request of every process
    would make its shard hot; batched, each process sends one increment per counter per interval.
    A failed flush drops its counts (they are statistics, not data). Increments are appended to
    a deque (atomic, no lock: gunicorn's threads queued on the lock that was here) and summed by
    the flush."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._flushing = threading.Lock()
        self._pending: deque[tuple[bool, str, str, float, int]] = deque()  # (hash?, key, ...)
        self._last = time.monotonic()

    def hincr(self, key: str, field: str, ttl: int, by: int = 1) -> None:
        self._pending.append((True, key, field, by, ttl))

    def zincr(self, key: str, member: str, ttl: int, by: float = 1) -> None:
        self._pending.append((False, key, member, by, ttl))

    def due(self) -> bool:
        """Something is waiting and the interval has passed (a request served without a round
        trip then makes one for the counters: at most one per interval per process)."""
        return bool(self._pending) and time.monotonic() - self._last >= self.interval

    def queue_flush(self, pipe, force: bool = False) -> int:
        """Queue the pending increments on `pipe` when the interval has passed (or `force`);
        returns how many commands were queued. A flush under way in another thread: none."""
        now = time.monotonic()
        if not (force or now - self._last >= self.interval) or not self._pending:
            return 0
        if not self._flushing.acquire(blocking=False):
            return 0
        try:
            self._last = now
            hashes: dict[tuple[str, str], float] = {}
            zsets: dict[tuple[str, str], float] = {}
            ttls: dict[str, int] = {}
            for is_hash, key, field, by, ttl in metrics.drain(self._pending):
                sums = hashes if is_hash else zsets
                sums[key, field] = sums.get((key, field), 0) + by
                ttls[key] = ttl
        finally:
            self._flushing.release()
        for (key, field), by in hashes.items():
            pipe.hincrby(key, field, by)
        for (key, member), by in zsets.items():
            pipe.zincrby(key, by, member)
        for key, ttl in ttls.items():
            pipe.expire(key, ttl)
        return len(hashes) + len(zsets) + len(ttls)


class Refreshes:
    """Refreshes ahead of expiry, run off the request's thread: one thread per process, made
    when first needed (and again in a forked child, which has none), at most one refresh per key
    and `limit` waiting."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._due: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0
        self._stopped = False

    def start(self, name: str, refresh: Callable[[], None]) -> None:
        with self._lock:
            if self._stopped or name in self._due or len(self._due) >= self.limit:
                return
            self._due.add(name)
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="cache-refresh")
                self._pid = os.getpid()
            executor = self._executor
        executor.submit(self._run, name, refresh)

    def _run(self, name: str, refresh: Callable[[], None]) -> None:
        try:
            refresh()
        finally:
            with self._lock:
                self._due.discard(name)

    def wait(self, timeout: float = 10.0) -> bool:
        """True once no refresh is due."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._due:
                    return True
            time.sleep(0.005)
        return False

    def stop(self) -> None:
        """Finish the refreshes under way and start no more (before the database goes)."""
        with self._lock:
            executor, self._executor, self._stopped = self._executor, None, True
        if executor is not None and self._pid == os.getpid():
            executor.shutdown(wait=True)


def _near_age(key: Key) -> float:
    """How long a near copy of `key` may live: a sliding value's until its TTL is due to be
    extended in Redis again (a copy read for longer would let the session lapse there)."""
    return float(min(key.ttl, SLIDE_STEP if key.sliding else NEAR_MAX_AGE))


def _token() -> str:
    return os.urandom(6).hex()


class RedisCache:
    enabled = True

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker, *,
                 lock_ttl_ms: int = 10_000, max_wait: float = 2.0,
                 counter_interval: float = 1.0, refresh_ahead: float = 0.0) -> None:
        self.client = client
        self.breaker = breaker
        self.lock_ttl_ms = lock_ttl_ms
        self.max_wait = max_wait
        self.refresh_ahead = refresh_ahead
        self.refreshes = Refreshes()
        self.counters = BatchedCounters(counter_interval)
        self.near: NearCache | None = None  # attached by build_services for the API's processes
        self._lookup = client.register_script(_LOOKUP)
        self._store = client.register_script(_STORE)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._bump = client.register_script(_BUMP)
        # Organizations whose invalidation failed while Redis was unreachable: their generation
        # is replaced as soon as Redis answers again, before this process serves from it.
        self._owed_purges: set[str] = set()
        self._owed_lock = threading.Lock()

    # -- guarded access ---------------------------------------------------------------------
    def call(self, operation: str, fn: Callable[[], T]) -> T:
        if not self.breaker.allow():
            raise Unavailable("circuit open")
        started = time.perf_counter()
        try:
            result = fn()
        except TRANSIENT as exc:
            self.breaker.record_failure()
            metrics.errors.labels(operation).inc()
            raise Unavailable(str(exc)) from exc
        except redis.RedisError as exc:
            metrics.errors.labels(operation).inc()
            log.warning("redis %s failed: %s", operation, exc)
            # An error reply means Redis answered: a half-open breaker must close, or it would
            # refuse every later call (only its probe may pass, and the probe never succeeds).
            if self.breaker.record_success():
                self._pay_owed_purges()
            raise Unavailable(str(exc)) from exc
        finally:
            metrics.duration.labels(operation, "redis").observe(time.perf_counter() - started)
        if self.breaker.record_success():
            self._pay_owed_purges()
        return result

    def _pay_owed_purges(self) -> None:
        with self._owed_lock:
            owed, self._owed_purges = self._owed_purges, set()
        if not owed:
            return
        try:
            self._bump_per_slot([g for org_id in sorted(owed) for g in org_generations(org_id)])
            log.warning("purged %d organizations whose invalidations failed during an outage",
                        len(owed))
        except redis.RedisError:
            with self._owed_lock:
                self._owed_purges |= owed
            self.breaker.record_failure()

    def _settle_owed_purges(self) -> bool:
        """Nothing is read from Redis while an invalidation this process owes is unpaid."""
        try:
            self.call("replay", self._pay_owed_purges)
        except Unavailable:
            return False
        return not self._owed_purges

    # -- reads --------------------------------------------------------------------------------
    def lookup(self, key: Key) -> Lookup:
        return self.lookup_many([key])[0]

    def lookup_many(self, keys: Sequence[Key], side: Sequence["SideCommand"] = (),
                    counted: bool = True) -> list[Lookup]:
        """Look up several keys in one round trip (e.g. the session and the entity of a request),
        with `side` reads of other shapes (a statistics hash) in the same round trip. What this
        process's near cache holds is served from it; only the rest goes to Redis. `counted`
        False: not a reader's lookup (a warm-up after a write), left out of the hit and miss
        metrics, the tenants' counts and the hourly tally."""
        if self._owed_purges and not self._settle_owed_purges():
            return [Lookup(key, None) for key in keys]
        ticket = self.near.begin() if self.near and counted else None
        near: list[Lookup | None] = [None] * len(keys)
        if ticket is not None:
            near = self._lookup_near(keys, ticket)
            side = [read for read in side
                    if not (getattr(read, "from_near", None) and read.from_near(self.near, ticket))]
            if all(found is not None for found in near) and not side:
                if self.counters.due():
                    self.flush_counters()
                self._count(near)
                return near
        remote = [key for key, found in zip(keys, near) if found is None]
        fetched = iter(self._lookup_redis(remote, side, ticket))
        found = [lookup if lookup is not None else next(fetched) for lookup in near]
        if counted:
            self._count(found)
        return found

    def held(self, key: Key) -> Any:
        """This process's near copy of `key`'s value, MISSING where it holds none it may trust
        now: no round trip, and not a reader's lookup (not counted). A writer's hint, which its
        row locks check."""
        if not self.enabled or self.near is None or self._owed_purges:
            return MISSING
        ticket = self.near.begin()
        kept = self.near.get(key.name, ticket)
        return MISSING if kept is MISSING else kept.value

    def _lookup_near(self, keys: Sequence[Key], ticket: int) -> list[Lookup | None]:
        """Each key's copy in this process's near cache, or None where it has none."""
        return [None if kept is MISSING
                else Lookup(kept.key, kept.tokens, kept.value, "l1", expires=kept.expires)
                for kept in self.near.get_each([key.name for key in keys], ticket)]

    def _lookup_redis(self, keys: Sequence[Key], side: Sequence["SideCommand"],
                      ticket: int | None) -> list[Lookup]:
        """`keys` and `side` reads from Redis in one round trip; what it finds is kept near."""
        def run() -> list:
            # EVALSHA in a plain pipeline: one round trip (on a cluster, one per shard touched,
            # sent together). A Script registered on a pipeline costs a SCRIPT EXISTS round trip
            # on every execute. A restarted Redis, or a replica promoted by a failover, has not
            # got the script: load it and go again.
            for attempt in (1, 2):
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    queue_evalsha(pipe, self._lookup.sha, [*key.versions, key.name],
                                  [_token(), VERSION_TTL, key.ttl if key.sliding else 0,
                                   SLIDE_STEP])
                counts = [read.queue(pipe) for read in side]
                if attempt == 1:
                    self.counters.queue_flush(pipe)
                try:
                    replies = pipe.execute()
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    self._load_scripts()
                    for read in side:
                        read.load_scripts(self.client)
                    continue
                at = len(keys)
                for read, count in zip(side, counts):
                    read.reply = replies[at]
                    at += count
                return replies[:len(keys)]

        try:
            replies = self.call("get", run)
        except Unavailable:
            return [Lookup(key, None) for key in keys]
        found, now = [], time.monotonic()
        for key, (tokens, raw, *pttl) in zip(keys, replies):
            lookup = Lookup(key, tokens.decode() if isinstance(tokens, bytes) else tokens)
            if raw is not None:
                lookup.value = codec.decode(raw)
                lookup.expires = now + pttl[0] / 1000 if pttl and pttl[0] > 0 else None
                if ticket is not None:
                    self.near.put(key.name, lookup, (*key.versions, key.name), ticket,
                                  max_age=_near_age(key))
            found.append(lookup)
        if ticket is not None:
            for read in side:
                keep = getattr(read, "keep_near", None)
                if keep:
                    keep(self.near, ticket)
        return found

    def _count(self, found: Sequence[Lookup]) -> None:
        hits = metrics.lookups.add_all(
            (lookup.layer, lookup.key.family, lookup.value is not MISSING,
             tenants.org_of(lookup.key.name)) for lookup in found)
        # Hit/miss tally of all processes for /health/cache, in hourly buckets.
        tally = tally_key()
        if hits:
            self.counters.hincr(tally, "hits", TALLY_TTL, by=hits)
        if len(found) > hits:
            self.counters.hincr(tally, "misses", TALLY_TTL, by=len(found) - hits)

    def _load_scripts(self) -> None:
        """SCRIPT LOAD (on a cluster: on every master) of what a pipeline runs by EVALSHA."""
        self.client.script_load(_LOOKUP)

    def flush_counters(self) -> None:
        """Write this process's pending counters now (e.g. before reporting them)."""
        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            if self.counters.queue_flush(pipe, force=True):
                pipe.execute()
        try:
            self.call("counters", run)
        except Unavailable:
            pass

    def store(self, lookup: Lookup, value: Any) -> bool:
        """Store `value` if the tokens `lookup` saw are still current; True if it was stored."""
        if lookup.tokens is None:
            return False
        blob = codec.encode(value)
        key = lookup.key
        try:
            lookup.stored = bool(self.call("set", lambda: self._store(
                keys=[*key.versions, key.name], args=[lookup.tokens, blob, key.ttl])))
        except Unavailable:
            pass
        return lookup.stored

    @staticmethod
    def _lock_name(lookup: Lookup) -> str:
        # Per version: a loader of retired versions never holds up a reader of the current ones.
        return f"lock:{lookup.key.name}@{lookup.tokens}"

    def read_through(self, key: Key, load: Callable[[], T],
                     lookup: Lookup | None = None) -> tuple[T, str]:
        """The cached value of `key`, or `load()` stored for the next reader. Concurrent misses
        on one key load once: the others wait (bounded) for the first loader's value."""
        lookup = lookup or self.lookup(key)
        if lookup.hit:
            if self._due_for_refresh(lookup):
                self.refreshes.start(key.name, lambda: self._refresh(lookup, load))
            return lookup.value, HIT_L1 if lookup.layer == "l1" else HIT_L2
        if lookup.tokens is None:
            return load(), BYPASS
        lock = self._lock_name(lookup)
        token = _token()
        try:
            raw, leader = self.call("lock", lambda: self._acquire(
                keys=[key.name, lock], args=[token, self.lock_ttl_ms, lookup.tokens]))
        except Unavailable:
            return load(), BYPASS
        if raw is not None:
            metrics.singleflight_waits.labels(key.family, "served").inc()
            return codec.decode(raw), HIT_L2
        if leader:
            try:
                value = load()
                self.store(lookup, value)
            finally:
                self._unlock(lock, token)
            return value, MISS
        waited = self._wait_for(lookup, lock)
        if waited is not MISSING:
            metrics.singleflight_waits.labels(key.family, "served").inc()
            return waited, HIT_L2
        metrics.singleflight_waits.labels(key.family, "gave_up").inc()
        value = load()
        self.store(lookup, value)
        return value, MISS

    def _due_for_refresh(self, lookup: Lookup) -> bool:
        """The value is in the last part of its TTL (`refresh_ahead`, a fraction of it): a
        value read that late is loaded again before it expires, so that its readers never meet
        the expiry. A sliding value (a session's) never gets there: its lookups extend it."""
        return (self.refresh_ahead > 0 and lookup.expires is not None
                and lookup.expires - time.monotonic() < lookup.key.ttl * self.refresh_ahead)

    def _refresh(self, lookup: Lookup, load: Callable[[], Any]) -> None:
        """Load `lookup`'s value again and store it with a whole TTL, under the tokens the
        lookup saw: a write since then retired them, and its value is not stored (as a miss's
        load: see `store`). One process of all does it per version (a lock left to expire: a
        process that has not yet seen the new value in Redis asks again and finds it taken)."""
        key = lookup.key
        try:
            if not self.call("lock", lambda: self.client.set(
                    f"refresh:{key.name}@{lookup.tokens}", "1", nx=True, px=self.lock_ttl_ms)):
                return
            stored = self.store(Lookup(key, lookup.tokens), load())
            outcome = "stored" if stored else "superseded"
        except Unavailable:
            outcome = "failed"
        except Exception as exc:  # a refresh that fails is the expiry it tried to spare
            log.warning("refresh ahead of %s failed: %s", key.family, exc)
            outcome = "failed"
        metrics.refreshed.labels(key.family, outcome).inc()

    def _wait_for(self, lookup: Lookup, lock: str) -> Any:
        deadline = time.monotonic() + self.max_wait
        delay = 0.002
        name = lookup.key.name
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                stored, locked = self.call("get", lambda: self._get_and_exists(name, lock))
            except Unavailable:
                return MISSING
            raw = unwrap(stored, lookup.tokens)
            if raw is not None:
                return codec.decode(raw)
            if not locked:  # the leader failed, or its value went to a retired version
                return MISSING
        return MISSING

    def _get_and_exists(self, name: str, lock: str) -> tuple[bytes | None, int]:
        # The lock first: a leader stores before it unlocks, so once the lock is seen gone the
        # GET after it sees the value (the other order can miss both and load a second time).
        # Value and lock share a slot: on a cluster the pipeline is still one round trip.
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(lock)
        pipe.get(name)
        locked, raw = pipe.execute()
        return raw, locked

    def _unlock(self, lock: str, token: str) -> None:
        try:
            self.call("unlock", lambda: self._release(keys=[lock], args=[token]))
        except Unavailable:
            pass

    # -- invalidation -------------------------------------------------------------------------
    def invalidate(self, versions: Iterable[str], *, org_ids: Iterable[str], family: str,
                   source: str = "web", event_id: str | None = None,
                   bumped: Bumped | None = None, side: Sequence[SideCommand] = ()) -> bool:
        """Retire every value stored under these versions. Returns False when Redis could not
        be reached; the organizations are then purged as soon as it answers again. `bumped`
        collects each version's token before and after (see `Bumped`). `side`: commands sent
        after the bumps in the same round trip (an event's deltas), each with its own reply:
        one that fails leaves its reply MISSING and fails nothing else."""
        versions = sorted(set(versions))
        if not versions and not side:
            return True
        try:
            applied = self.call("invalidate",
                                lambda: self._bump_per_slot(versions, event_id, bumped, side))
        except Unavailable:
            if versions:
                with self._owed_lock:
                    self._owed_purges.update(org_ids)
            return not versions
        if applied:
            metrics.invalidations.labels(family, source).inc(len(versions))
        return True

    def send(self, operation: str, commands: Sequence[SideCommand]) -> None:
        """`commands` in a round trip of their own, each given its reply (see `invalidate`'s
        `side`). Raises Unavailable when Redis is."""
        self.call(operation, lambda: self._bump_per_slot((), side=commands))

    def _bump_per_slot(self, versions: Sequence[str], event_id: str | None = None,
                       bumped: Bumped | None = None, side: Sequence[SideCommand] = ()) -> bool:
        """Replace the tokens of `versions`: one script per hash slot (an event's versions span
        the slices of its entities; a purge, every slice), each with that slot's applied-once
        marker of the event, all in one pipeline, with `side` after them (or alone: `send`).
        True if any slot applied it."""
        by_slot: dict[str, list[str]] = {}
        for version in versions:
            by_slot.setdefault(hash_tag(version), []).append(version)
        values: dict[str, list[WarmStore]] = {}
        if bumped is not None and event_id is None:
            for value in bumped.to_store:
                values.setdefault(hash_tag(value.key.name), []).append(value)
                by_slot.setdefault(hash_tag(value.key.name), [])
            bumped.to_store = []  # tried once: a value not stored here is the caller's to store
        token = _token()
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for tag, names in by_slot.items():
                marked = [*names, event_marker(tag, event_id)] if event_id else names
                stores = values.get(tag, ())
                queue_evalsha(
                    pipe, self._bump.sha,
                    [*marked, *(k for v in stores for k in (*v.key.versions, v.key.name))],
                    [token, VERSION_TTL, "1" if event_id else "0", EVENT_MARKER_TTL, len(names),
                     *(a for v in stores for a in (len(v.key.versions), v.tokens, v.blob,
                                                   v.key.ttl))])
            counts = [command.queue(pipe) for command in side]
            replies = pipe.execute(raise_on_error=False)
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                if attempt == 2:
                    raise next(r for r in replies if isinstance(r, redis.exceptions.NoScriptError))
                self.client.script_load(_BUMP)
                for command in side:
                    command.load_scripts(self.client)
                continue
            bumps, at = replies[:len(by_slot)], len(by_slot)
            for command, count in zip(side, counts):
                if isinstance(replies[at], Exception):
                    metrics.errors.labels("side").inc()
                    log.warning("redis %s failed: %s", type(command).__name__, replies[at])
                else:
                    command.reply = replies[at]
                at += count
            error = next((reply for reply in bumps if isinstance(reply, Exception)), None)
            if error is not None:
                raise error
            for (tag, names), reply in zip(by_slot.items(), bumps):
                if bumped is not None and int(reply[0]):
                    for i, (name, old) in enumerate(zip(names, reply[1:]), start=1):
                        bumped.record(name, old.decode() if isinstance(old, bytes) else old,
                                      f"{token}{i}")
                    for value, done in zip(values.get(tag, ()), reply[1 + len(names):]):
                        if int(done):
                            bumped.stored.add(value.key.name)
            return any(int(reply[0]) for names, reply in zip(by_slot.values(), bumps) if names)
        raise AssertionError("unreachable")

    def mark_applied(self, versions: Iterable[str], event_id: str) -> None:
        """Leave the applied-once markers `invalidate(..., event_id=...)` would have left, for
        an event whose bumps were applied without them and which is handed on to be applied
        again. Best effort: without them the second application only retires the values once
        more."""
        tags = {hash_tag(version) for version in versions}

        def mark():
            pipe = self.client.pipeline(transaction=False)
            for tag in tags:
                pipe.set(event_marker(tag, event_id), "1", nx=True, ex=EVENT_MARKER_TTL)
            pipe.execute()
        try:
            self.call("invalidate", mark)
        except Unavailable:
            pass

    def purge_organization(self, org_id: str) -> bool:
        return self.invalidate(org_generations(org_id), org_ids=[org_id], family="organization",
                               source="purge")

    def ping(self) -> bool:
        try:
            return bool(self.call("ping", self.client.ping))
        except Unavailable:
            return False


class DisabledCache(RedisCache):
    """CACHE_ENABLED=0: every read goes to the database (the benchmark's baseline)."""

    enabled = False

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker, **options) -> None:
        super().__init__(client, breaker, **options)

    def lookup_many(self, keys: Sequence[Key], side: Sequence[SideCommand] = (),
                    counted: bool = True) -> list[Lookup]:
        return [Lookup(key, None) for key in keys]

    def invalidate(self, versions, *, org_ids, family, source="web", event_id=None,
                   bumped=None, side=()) -> bool:
        return True
