"""The near cache: each API process's copies of the values it reads most (sessions, projects,
tasks, list pages, statistics), served with no Redis round trip and kept coherent by Redis itself.

Redis tells the process when a key changes: one RESP3 connection per Redis master with
`CLIENT TRACKING ON BCAST` on the prefixes of values (`t:`, `g:`) and of version keys (`v:`). Every
write, bump, expiry or eviction of such a key reaches every process as an invalidation message, and
a copy is kept under the names of every key it was read from (its value and its version keys).

Three rules keep it correct:
- Before a request trusts a copy it drains what has arrived on the tracking connections (`begin`).
  Redis writes an invalidation to the tracking connections before (BCAST: in the same event-loop
  pass as) the reply to the write that caused it, so on one host the message is in this process's
  socket buffer before the writer's answer can reach a client: read-your-writes holds across
  processes and instances, and a logout ends a token everywhere at once.
- A copy read before an invalidation of one of its keys is never kept (`put` checks the keys
  invalidated since the read began: the stale-set race of ARCHITECTURE.md, here per process).
- Copies are trusted only while every tracking connection answered a heartbeat within
  `trust_window` seconds (shorter than the request timeout a writer waits for Redis before it gives
  up and owes an invalidation): a paused or unreachable Redis turns the near cache off instead of
  letting it serve what a write may have changed. A lost connection clears every copy.

Bounded per process by entries and by bytes (least recently used first); `stats()` reports both.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import select
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import hiredis
import redis

from cache import metrics

log = logging.getLogger(__name__)

PREFIXES = ("t:", "v:", "g:")
MISSING: Any = object()
# What a copy costs beyond its value and key names (its entry, index set slots, LRU links),
# checked against tracemalloc in tests/test_cache_near.py.
ENTRY_OVERHEAD = 600


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc's poll, recv and send, called without releasing the GIL (ctypes.PyDLL). None of
    these calls waits (no timeout, MSG_DONTWAIT), so letting go of the GIL buys nothing; under
    gunicorn's threads it cost the caller a hand-over and the wait to get the GIL back, while it
    held the near cache's lock (BENCHMARKS.md)."""
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.poll.argtypes = [ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int]
    libc.poll.restype = ctypes.c_int
    libc.recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.recv.restype = ctypes.c_ssize_t
    libc.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    libc.send.restype = ctypes.c_ssize_t
    return libc


_PING = b"*1\r\n$4\r\nPING\r\n"
_CHUNK = 64 << 10


@dataclass(slots=True)
class _Copy:
    value: Any
    keys: tuple[str, ...]
    expires: float
    size: int


class _Tracker:
    """One tracking connection (to one Redis master) and its heartbeat. redis-py opens it
    (HELLO 3, AUTH, SELECT); after that its bytes are read and written here, through libc
    without releasing the GIL, and parsed by hiredis: a drain holds the near cache's lock, and
    redis-py's reads gave up the GIL several times per drain (see `_libc`)."""

    def __init__(self, kwargs: dict) -> None:
        self.address = f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.conn = redis.Connection(protocol=3, socket_timeout=1.0, **kwargs)
        self.last_pong = 0.0
        self.pings_waiting = 0
        self._pollfd: _PollFd | None = None
        self._reader = hiredis.Reader()
        self._chunk = ctypes.create_string_buffer(_CHUNK)
        self._on_invalidate: Callable[[list], None] = lambda message: None
        self._tracking = False

    def open(self, on_invalidate: Callable[[list], None]) -> None:
        self.conn.connect()
        self._pollfd = _PollFd(self.conn._sock.fileno(),
                               select.POLLIN | select.POLLERR | select.POLLHUP, 0)
        self._on_invalidate = on_invalidate
        prefixes = [arg for prefix in PREFIXES for arg in ("PREFIX", prefix)]
        # Its OK is read here too: an invalidation right behind it stays for the next drain.
        self.conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", *prefixes)
        deadline = time.monotonic() + 1.0
        while not self._tracking:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no answer to CLIENT TRACKING")
            select.select([self.fileno()], [], [], left)
            self.drain()
        self.last_pong = time.monotonic()

    def ping(self) -> None:
        sent = _libc().send(self.fileno(), _PING, len(_PING),
                            socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        if sent != len(_PING):  # 14 bytes that do not fit: Redis has not read for a long while
            raise redis.ConnectionError("tracking connection: a ping could not be sent")
        self.pings_waiting += 1

    def pending(self) -> bool:
        """Something arrived on the socket. A drain reads until nothing complete is left, so
        whatever it leaves half-read in the parser's buffer makes the socket readable again when
        the rest arrives: a poll of the socket (a microsecond) is enough between drains."""
        if self._pollfd is None:
            raise redis.ConnectionError("tracking connection closed")
        # -1 (a signal, say): a drain finds out what is there
        return _libc().poll(ctypes.byref(self._pollfd), 1, 0) != 0

    def drain(self) -> None:
        """Read everything that has arrived, without waiting (invalidations go to the handler)."""
        self._receive()
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, hiredis.PushNotification):
                if reply and reply[0] == b"invalidate":
                    self._on_invalidate(reply)
            elif isinstance(reply, hiredis.ReplyError):
                refused = "" if self._tracking else "CLIENT TRACKING refused: "
                raise redis.ConnectionError(f"tracking connection: {refused}{reply}")
            elif reply == b"PONG" and self.pings_waiting:
                self.pings_waiting -= 1
                self.last_pong = time.monotonic()
            elif reply == b"OK":
                self._tracking = True

    def _receive(self) -> None:
        libc, fd, chunk = _libc(), self.fileno(), self._chunk
        while True:
            size = libc.recv(fd, chunk, _CHUNK, socket.MSG_DONTWAIT)
            if size > 0:
                self._reader.feed(ctypes.string_at(chunk, size))
                if size < _CHUNK:
                    return  # the socket is empty; what comes next makes it readable again
                continue
            if size == 0:
                raise redis.ConnectionError("tracking connection closed by Redis")
            error = ctypes.get_errno()
            if error in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            if error != errno.EINTR:
                raise redis.ConnectionError(f"tracking connection: {os.strerror(error)}")

    def fileno(self) -> int:
        if self._pollfd is None or self.conn._sock is None:
            raise redis.ConnectionError("tracking connection closed")
        return self._pollfd.fd

    def close(self) -> None:
        self._pollfd = None
        try:
            self.conn.disconnect()
        except Exception:  # noqa: BLE001 - closing a connection that may be broken already
            pass


class ByIdentity:
    """What was derived from a value (its JSON, its parsed form), kept by the value's identity
    while the value is served again: the near cache hands every request the same object, and
    copies are never changed in place (requests share them). An entry holds its value, so the
    id cannot be reused by another object while the entry is here. Bounded: cleared when full
    (values read from Redis are new objects each time, and fill it without being seen again)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._found: dict[int, tuple[Any, Any]] = {}

    def get(self, value: Any) -> Any:
        found = self._found.get(id(value))
        return found[1] if found is not None and found[0] is value else MISSING

    def put(self, value: Any, derived: Any) -> None:
        if len(self._found) >= self.size:
            self._found.clear()
        self._found[id(value)] = (value, derived)


_LEAVES = frozenset({str, int, float, bool, type(None), bytes})


def deep_size(value: Any) -> int:
    """Bytes of a decoded value (dicts, lists, strings, numbers; objects by their slots), counted
    once per copy when it is kept: what the byte budget bounds. Every copy taken from Redis pays
    it, so a container of leaves only is summed in C (map), not one call per leaf: a 20-task
    list page took 204 us, 44 now."""
    kind = type(value)
    if kind is dict:
        values = value.values()
        size = sys.getsizeof(value) + sum(map(sys.getsizeof, value))
        if _LEAVES.issuperset(map(type, values)):
            return size + sum(map(sys.getsizeof, values))
        return size + sum(map(deep_size, values))
    if kind is list or kind is tuple:
        if _LEAVES.issuperset(map(type, value)):
            return sys.getsizeof(value) + sum(map(sys.getsizeof, value))
        return sys.getsizeof(value) + sum(map(deep_size, value))
    if kind in _LEAVES:
        return sys.getsizeof(value)
    slots = getattr(kind, "__slots__", None)
    if slots:
        return sys.getsizeof(value) + sum(deep_size(getattr(value, slot, None))
                                          for slot in slots)
    return sys.getsizeof(value)


def tracking_nodes(client, refresh: bool = True) -> list[dict]:
    """Connection arguments of every master of the cache's Redis (one on a single Redis);
    `refresh`: ask the cluster for its slot map first, instead of the client's current view."""
    from redis.cluster import RedisCluster

    keep = ("host", "port", "db", "username", "password", "socket_connect_timeout")
    if isinstance(client, RedisCluster):
        if refresh:
            client.nodes_manager.initialize()
        nodes = [node.redis_connection.connection_pool.connection_kwargs
                 for node in client.get_primaries()]
    else:
        nodes = [client.connection_pool.connection_kwargs]
    return [{k: v for k, v in node.items() if k in keep and v is not None} for node in nodes]


class NearCache:
    def __init__(self, client, *, max_entries: int = 20_000, max_bytes: int = 32 << 20,
                 heartbeat: float = 0.05, trust_window: float = 0.15, retry: float = 0.5,
                 recent: int = 65_536) -> None:
        self._client = client
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.heartbeat = heartbeat
        self.trust_window = trust_window
        self._retry = retry
        self._recent_cap = recent
        self._lock = threading.RLock()
        self._copies: OrderedDict[str, _Copy] = OrderedDict()
        self._holders: dict[str, set[str]] = {}  # a Redis key -> the copies read from it
        self._bytes = 0
        self._seq = 0  # invalidations received
        self._recent: OrderedDict[str, int] = OrderedDict()  # key -> seq of its last invalidation
        self._floor = 0  # reads that began before this seq may have missed an invalidation
        self._trackers: list[_Tracker] = []
        self._connected = False
        self._draining = False  # a drain has read from a socket what it may not have applied yet
        self._probe_failed = float("-inf")
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="near-cache-tracking", daemon=True)

    # -- the request's side -------------------------------------------------------------------
    def begin(self) -> int | None:
        """Apply what Redis has sent, then return a ticket for this read (None: do not trust or
        keep copies now)."""
        return self._quiet_ticket() or self._ticket_after_drain()

    def _quiet_ticket(self) -> int | None:
        """The ticket without the lock, when nothing has arrived and no drain is under way (most
        reads). The lock is what gunicorn's threads queued on: one of them preempted while holding
        it made the others give up the GIL and wait, a hand-over each (BENCHMARKS.md). The order
        matters: the sockets are empty first, then no drain is running, so whatever arrived
        before this read either is still unread (not empty) or was read by a drain that has
        since applied it."""
        try:
            if not (self._connected and self._trusted()):
                return None
            if any(tracker.pending() for tracker in self._trackers) or self._draining:
                return None
        except (redis.RedisError, OSError):
            return None  # the locked path finds out and says so
        return self._seq or None  # 0 (nothing received yet): the locked path answers

    def _ticket_after_drain(self) -> int | None:
        with self._lock:
            if not self._connected:
                return None
            try:
                if not self._trusted():
                    # The heartbeat thread has not run lately (a busy process on busy cores):
                    # this request pings itself. Its PONG follows every invalidation Redis sent
                    # before it, so the wait is also a barrier. No answer in time: not trusted,
                    # and no request waits for another probe until `retry` has passed (a paused
                    # Redis must not cost every request the wait).
                    if time.monotonic() - self._probe_failed < self._retry:
                        return None
                    metrics.near_probes.inc()
                    if not self._probe():
                        self._probe_failed = time.monotonic()
                        return None
                for tracker in self._trackers:
                    if tracker.pending():
                        self._drain(tracker)
            except (redis.RedisError, OSError) as exc:
                self._lose(f"tracking connection failed: {exc}")
                return None
            return self._seq if self._trusted() else None

    def _probe(self) -> bool:
        deadline = time.monotonic() + self.trust_window
        for tracker in self._trackers:
            tracker.ping()
        for tracker in self._trackers:
            while tracker.pings_waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if tracker.pending() or select.select([tracker.fileno()], [], [], left)[0]:
                    self._drain(tracker)
        return True

    def _drain(self, tracker: _Tracker) -> None:
        """Under the lock: read and apply what arrived on `tracker`, flagged for lock-free readers
        (`_quiet_ticket`) while bytes read from the socket may not be applied yet."""
        self._draining = True
        try:
            tracker.drain()
        finally:
            self._draining = False

    def get(self, name: str, ticket: int | None) -> Any:
        return self.get_each((name,), ticket)[0]

    def get_each(self, names: Iterable[str], ticket: int | None) -> list[Any]:
        """The copy of each of `names`, MISSING where there is none (one lock for a request's
        keys)."""
        if ticket is None:
            return [MISSING for _ in names]
        # Without the lock (see `_quiet_ticket`): each dict call below is atomic under the GIL,
        # and an invalidation applied before this read's ticket has already dropped its copies.
        found = []
        copies, now = self._copies, time.monotonic()
        for name in names:
            copy = copies.get(name)
            if copy is not None and copy.expires <= now:
                self._expire(name, copy)
                copy = None
            if copy is None:
                found.append(MISSING)
                continue
            try:
                copies.move_to_end(name)
            except KeyError:
                pass  # dropped since the get: invalidated after this read began, or evicted
            found.append(copy.value)
        return found

    def _expire(self, name: str, copy: _Copy) -> None:
        with self._lock:
            if self._copies.get(name) is copy:
                self._drop(name)

    def put(self, name: str, value: Any, keys: Iterable[str], ticket: int | None, *,
            max_age: float) -> bool:
        """Keep `value` (read from Redis keys `keys` after `begin()` gave `ticket`), unless one of
        those keys was invalidated since: the read may have seen the old value."""
        if ticket is None:
            return False
        keys = tuple(keys)
        size = deep_size(value) + sum(sys.getsizeof(key) for key in (name, *keys))
        with self._lock:
            if not self._connected or ticket < self._floor:
                return False
            if any(self._recent.get(key, -1) > ticket for key in keys):
                return False
            self._drop(name)
            copy = _Copy(value, keys, time.monotonic() + max_age, size + ENTRY_OVERHEAD)
            self._copies[name] = copy
            self._bytes += copy.size
            for key in keys:
                self._holders.setdefault(key, set()).add(name)
            while self._copies and (len(self._copies) > self.max_entries
                                    or self._bytes > self.max_bytes):
                # popitem, not next(iter()): a lock-free reader may reorder the dict meanwhile
                self._forget(*self._copies.popitem(last=False))
            return True

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._copies), "bytes": self._bytes,
                    "connected": self._connected, "trusted": self._trusted(),
                    "invalidations": self._seq}

    def clear(self) -> None:
        with self._lock:
            self._reset()

    # -- invalidation ---------------------------------------------------------------------------
    def _on_invalidate(self, message: list) -> None:
        keys = message[1] if len(message) > 1 else None
        if keys is None:  # FLUSHALL / FLUSHDB
            self._reset()
            return
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else key
            self._seq += 1
            self._recent[key] = self._seq
            self._recent.move_to_end(key)
            for name in self._holders.pop(key, ()):
                self._drop(name)
        while len(self._recent) > self._recent_cap:
            _, seq = self._recent.popitem(last=False)
            self._floor = max(self._floor, seq)
        metrics.near_invalidations.inc(len(keys))

    def _drop(self, name: str) -> None:
        copy = self._copies.pop(name, None)
        if copy is not None:
            self._forget(name, copy)

    def _forget(self, name: str, copy: _Copy) -> None:
        """What a copy taken out of `_copies` leaves: its bytes and its key's holders."""
        self._bytes -= copy.size
        for key in copy.keys:
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(name)
                if not holders:
                    del self._holders[key]

    def _reset(self) -> None:
        """Forget every copy, and every read in flight (it may have missed a message)."""
        self._copies.clear()
        self._holders.clear()
        self._recent.clear()
        self._bytes = 0
        self._seq += 1
        self._floor = self._seq

    def _trusted(self) -> bool:
        if not self._connected:
            return False
        oldest = min((t.last_pong for t in self._trackers), default=0.0)
        return time.monotonic() - oldest < self.trust_window

    def _lose(self, reason: str) -> None:
        if self._connected and reason != "stopped":
            log.warning("near cache off until tracking is back: %s", reason)
        self._connected = False
        self._reset()

    # -- the tracking thread ------------------------------------------------------------------
    def start(self) -> "NearCache":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._track()
            except (redis.RedisError, OSError, ValueError) as exc:
                log.debug("near cache tracking lost: %s", exc)
            except Exception:  # noqa: BLE001 - the thread must outlive any surprise
                log.exception("near cache tracking failed")
            with self._lock:
                self._lose("stopped" if self._stop.is_set() else "tracking connection lost")
                for tracker in self._trackers:
                    tracker.close()
                self._trackers = []
            self.ready.clear()
            self._stop.wait(self._retry)

    def connect(self) -> tuple[list[dict], list[_Tracker]]:
        """Open the tracking connections (the tracking thread does, and reconnects)."""
        nodes = tracking_nodes(self._client)
        trackers = [_Tracker(node) for node in nodes]
        with self._lock:
            self._trackers = trackers
            for tracker in trackers:
                tracker.open(self._on_invalidate)
            self._reset()
            self._connected = True
        return nodes, trackers

    def _track(self) -> None:
        nodes, trackers = self.connect()
        self.ready.set()
        topology_checked = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                if not self._connected:
                    raise redis.ConnectionError("a request found the tracking connection broken")
                for tracker in trackers:
                    tracker.ping()
            deadline = time.monotonic() + self.heartbeat
            while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                readable, _, _ = select.select([t.fileno() for t in trackers], [], [], left)
                if readable:
                    with self._lock:
                        for tracker in trackers:
                            self._drain(tracker)
            if time.monotonic() - topology_checked > 1.0:
                topology_checked = time.monotonic()
                self._report()
                if len(trackers) > 1 and tracking_nodes(self._client, refresh=False) != nodes:
                    raise redis.ConnectionError("the cluster's masters changed")  # a failover

    def _report(self) -> None:
        with self._lock:
            entries, size = len(self._copies), self._bytes
        metrics.near_entries.set(entries)
        metrics.near_bytes.set(size)
