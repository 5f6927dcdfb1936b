"""The shared Redis cache (L2): versioned read-through with single-flight loads, a circuit breaker
and invalidations that survive an outage.

A lookup is one round trip: a Lua script reads the key's version tokens (creating a fresh random
token where one is missing, so a lost or evicted version key can never bring an old value back),
builds the stored name from them and reads it. A miss then loads under a short single-flight lock
and stores under the name the lookup returned, i.e. under the versions seen *before* the load.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

import redis

from cache import codec, metrics
from cache.breaker import CircuitBreaker
from cache.keys import Key, org_generation

log = logging.getLogger(__name__)

T = TypeVar("T")
MISSING: Any = object()

# X-Cache values
HIT_L1, HIT_L2, MISS, STALE, BYPASS = "HIT-L1", "HIT-L2", "MISS", "STALE", "BYPASS"

VERSION_TTL = 86_400
# How long "event applied" markers stop a second application of the same event's bumps. The
# second one normally comes within seconds (the web applies after commit, the worker from the
# outbox); one arriving later (a redelivery after the 300 s visibility timeout, a sweep re-send
# after a long broker outage) only bumps again: its values are retired once more (a miss each),
# never served stale. One marker per write event: kept for a day (VERSION_TTL) they were the
# cache's key count growing for a day under steady writes (the soak in RELIABILITY.md).
EVENT_MARKER_TTL = 600
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)

_LOOKUP = """
local parts = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if not v then
    v = ARGV[2] .. i
    redis.call('SET', k, v, 'EX', ARGV[3])
  end
  parts[i] = v
end
local name = ARGV[1] .. '@' .. table.concat(parts, '.')
local value = redis.call('GET', name)
if value and ARGV[4] ~= '0' then redis.call('EXPIRE', name, ARGV[4]) end
-- Hit/miss tally of all processes for /health/cache, in hourly buckets.
redis.call('HINCRBY', ARGV[5], value and 'hits' or 'misses', 1)
redis.call('EXPIRE', ARGV[5], 7200)
return {name, value}
"""

# Become the loader of a missed value, unless another loader stored it since our lookup (then
# return it): a reader whose lookup missed just before a loader stored must not load again.
_ACQUIRE = """
local value = redis.call('GET', KEYS[1])
if value then return {value, 0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Bump version keys unless this event was applied already (the web process applies it after
# commit, the worker again from the outbox: whichever comes second changes nothing).
_BUMP = """
if ARGV[3] ~= '' and redis.call('SET', ARGV[3], '1', 'NX', 'EX', ARGV[4]) == false then
  return 0
end
for i, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1] .. i, 'EX', ARGV[2]) end
return 1
"""


class SideRead(Protocol):
    """A read of another shape than a Key's (e.g. a statistics hash) that can share a lookup's
    round trip. `reply` stays MISSING unless the round trip succeeded."""

    reply: Any

    def queue(self, pipe: redis.client.Pipeline) -> int:
        """Queue the read (its reply first) and return how many commands were queued."""

    def load_scripts(self, client: redis.Redis) -> None:
        """Load the scripts the read runs (after a Redis restart lost them)."""


class Unavailable(Exception):
    """Redis is down, slow or the breaker is open: the caller serves from the database."""


@dataclass(slots=True)
class Lookup:
    key: Key
    stored_name: str | None  # where a loaded value goes; None when Redis could not be asked
    value: Any = MISSING

    @property
    def hit(self) -> bool:
        return self.value is not MISSING


def tally_key(hours_ago: int = 0) -> str:
    return f"cache:tally:{int(time.time() // 3600) - hours_ago}"


def _token() -> str:
    return os.urandom(6).hex()


class RedisCache:
    enabled = True

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker, *,
                 lock_ttl_ms: int = 10_000, max_wait: float = 2.0) -> None:
        self.client = client
        self.breaker = breaker
        self.lock_ttl_ms = lock_ttl_ms
        self.max_wait = max_wait
        self._lookup = client.register_script(_LOOKUP)
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
            self._bump(keys=[org_generation(o) for o in sorted(owed)],
                       args=[_token(), VERSION_TTL, ""])
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

    def lookup_many(self, keys: Sequence[Key], side: Sequence["SideRead"] = ()) -> list[Lookup]:
        """Look up several keys in one round trip (e.g. the session and the entity of a request),
        with `side` reads of other shapes (a statistics hash) in the same round trip."""
        if self._owed_purges and not self._settle_owed_purges():
            return [Lookup(key, None) for key in keys]

        def run() -> list:
            # EVALSHA in a plain pipeline: one round trip. (A Script registered on a pipeline
            # costs a SCRIPT EXISTS round trip on every execute.) A restarted Redis has lost
            # the script: load it and go again.
            for attempt in (1, 2):
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.evalsha(self._lookup.sha, len(key.versions), *key.versions, key.name,
                                 _token(), VERSION_TTL, key.ttl if key.sliding else 0, tally)
                counts = [read.queue(pipe) for read in side]
                try:
                    replies = pipe.execute()
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    self.client.script_load(_LOOKUP)
                    for read in side:
                        read.load_scripts(self.client)
                    continue
                at = len(keys)
                for read, count in zip(side, counts):
                    read.reply = replies[at]
                    at += count
                return replies[:len(keys)]

        tally = tally_key()
        try:
            replies = self.call("get", run)
        except Unavailable:
            return [Lookup(key, None) for key in keys]
        found = []
        for key, (name, raw) in zip(keys, replies):
            lookup = Lookup(key, name.decode() if isinstance(name, bytes) else name)
            if raw is not None:
                lookup.value = codec.decode(raw)
                metrics.hits.labels("redis", key.family).inc()
            else:
                metrics.misses.labels("redis", key.family).inc()
            found.append(lookup)
        return found

    def store(self, lookup: Lookup, value: Any) -> None:
        if lookup.stored_name is None:
            return
        blob = codec.encode(value)
        try:
            self.call("set", lambda: self.client.set(lookup.stored_name, blob, ex=lookup.key.ttl))
        except Unavailable:
            pass

    def read_through(self, key: Key, load: Callable[[], T],
                     lookup: Lookup | None = None) -> tuple[T, str]:
        """The cached value of `key`, or `load()` stored for the next reader. Concurrent misses
        on one key load once: the others wait (bounded) for the first loader's value."""
        lookup = lookup or self.lookup(key)
        if lookup.hit:
            return lookup.value, HIT_L2
        if lookup.stored_name is None:
            return load(), BYPASS
        lock = f"lock:{lookup.stored_name}"
        token = _token()
        try:
            raw, leader = self.call("lock", lambda: self._acquire(
                keys=[lookup.stored_name, lock], args=[token, self.lock_ttl_ms]))
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

    def _wait_for(self, lookup: Lookup, lock: str) -> Any:
        deadline = time.monotonic() + self.max_wait
        delay = 0.002
        name = lookup.stored_name
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                raw, locked = self.call("get", lambda: self._get_and_exists(name, lock))
            except Unavailable:
                return MISSING
            if raw is not None:
                return codec.decode(raw)
            if not locked:  # the leader failed, or its value went to a retired version
                return MISSING
        return MISSING

    def _get_and_exists(self, name: str, lock: str) -> tuple[bytes | None, int]:
        # The lock first: a leader stores before it unlocks, so once the lock is seen gone the
        # GET after it sees the value (the other order can miss both and load a second time).
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
                   source: str = "web", event_id: str | None = None) -> bool:
        """Retire every value stored under these versions. Returns False when Redis could not
        be reached; the organizations are then purged as soon as it answers again."""
        versions = sorted(set(versions))
        if not versions:
            return True
        marker = f"applied:{event_id}" if event_id else ""
        try:
            applied = self.call("invalidate", lambda: self._bump(
                keys=versions, args=[_token(), VERSION_TTL, marker, EVENT_MARKER_TTL]))
        except Unavailable:
            with self._owed_lock:
                self._owed_purges.update(org_ids)
            return False
        if applied:
            metrics.invalidations.labels(family, source).inc(len(versions))
        return True

    def purge_organization(self, org_id: str) -> bool:
        return self.invalidate([org_generation(org_id)], org_ids=[org_id], family="organization",
                               source="purge")

    def ping(self) -> bool:
        try:
            return bool(self.call("ping", self.client.ping))
        except Unavailable:
            return False


class DisabledCache(RedisCache):
    """CACHE_ENABLED=0: every read goes to the database (the benchmark's baseline)."""

    enabled = False

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker) -> None:
        super().__init__(client, breaker)

    def lookup_many(self, keys: Sequence[Key], side: Sequence[SideRead] = ()) -> list[Lookup]:
        return [Lookup(key, None) for key in keys]

    def invalidate(self, versions, *, org_ids, family, source="web", event_id=None) -> bool:
        return True
