"""Instruments for the cache tests: a raw client on the private test Redis (never the shared one),
counters of SQL statements and Redis round trips, and a TCP proxy that can cut one app off Redis
while the server keeps its data."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

import redis
from redis.connection import AbstractConnection
from sqlalchemy import event

from cache import keys


def raw(services) -> redis.Redis:
    """A client of the same private Redis (db 0), or Redis Cluster, the app under test uses."""
    from services.context import redis_client

    return redis_client(services.settings, socket_timeout=5, socket_connect_timeout=5)


def current_tokens(r: redis.Redis, key: keys.Key) -> str:
    tokens = [r.get(v) for v in key.versions]
    assert all(tokens), f"no version tokens for {key.name}"
    return ".".join(t.decode() for t in tokens)


def stored_names(r: redis.Redis, key: keys.Key) -> list[str]:
    """The names holding a value of `key` (of any version: one name, the value carries them)."""
    return [key.name] if r.exists(key.name) else []


def current_value_name(r: redis.Redis, key: keys.Key) -> str:
    """The name the next lookup of `key` reads (its value, at the current version tokens)."""
    assert current_blob(r, key) is not None, f"no current value for {key.name}"
    return key.name


def current_blob(r: redis.Redis, key: keys.Key) -> bytes | None:
    """The stored blob of `key` if it was stored under the current version tokens."""
    from cache.store import unwrap

    return unwrap(r.get(key.name), current_tokens(r, key))


def ttl_of(r: redis.Redis, key: keys.Key) -> int:
    return r.ttl(current_value_name(r, key))


@dataclass
class SqlCounter:
    statements: list[str] = field(default_factory=list)

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)


@contextlib.contextmanager
def count_sql(services):
    counter = SqlCounter()
    event.listen(services.db.engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(services.db.engine, "before_cursor_execute", counter)


@dataclass
class RoundTrips:
    """Requests sent to Redis by this thread: one per command, one per pipeline."""

    port: int
    thread: int = field(default_factory=threading.get_ident)
    count: int = 0
    commands: list[str] = field(default_factory=list)


def redis_port(services) -> int | set[int]:
    """The port of the app's Redis (of a cluster: every node's)."""
    client = services.redis
    if hasattr(client, "get_nodes"):
        return {node.port for node in client.get_nodes()}
    return client.connection_pool.connection_kwargs["port"]


@contextlib.contextmanager
def count_round_trips(services):
    """Counts `send_packed_command` on connections to the app's Redis port, from this thread
    only (the L1 subscriber thread and other tests' threads are not counted)."""
    port = redis_port(services)
    trips = RoundTrips(port)
    original = AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        mine = getattr(self, "port", None)
        if (mine in port if isinstance(port, set) else mine == port) \
                and threading.get_ident() == trips.thread:
            trips.count += 1
            first = command[0] if isinstance(command, list) else command
            trips.commands.append(bytes(first)[:60].decode(errors="replace"))
        return original(self, command, check_health)

    AbstractConnection.send_packed_command = counting
    try:
        yield trips
    finally:
        AbstractConnection.send_packed_command = original


class TcpProxy:
    """127.0.0.1:<port> forwarding to a Redis. `cut()` drops every connection and refuses new
    ones (the app sees Redis down while the server keeps its data); `heal()` forwards again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            if not self._open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# A value served from a cache: this process's near copy (HIT-L1) or Redis (HIT-L2).
CACHED = ("HIT-L1", "HIT-L2")
