"""Settings read from the environment once, at process start, and passed explicitly from there."""

from __future__ import annotations

import math
import os
import secrets
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, TypeVar

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_DATABASE_URL = f"sqlite:///{PROJECT_ROOT / 'var' / 'taskcache.db'}"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
T = TypeVar("T", int, float)


def _redis_db(url: str, db: int) -> str:
    """The same Redis server as `url`, another logical database (the broker must not share the
    cache's keyspace: the cache may be purged or evicted, queues must not)."""
    base, _, tail = url.rpartition("/")
    if base.startswith("redis") and tail.isdigit():
        return f"{base}/{db}"
    return f"{url.rstrip('/')}/{db}"


class SettingError(ValueError):
    """A setting in the environment that cannot be used (its name and what it must be)."""


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Seed nodes of a Redis Cluster ("redis://h1:p1,redis://h2:p2"): when set, the cache, its L1
    # channel and the login rate limit use it instead of redis_url (which the broker may still use).
    redis_cluster_url: str | None = None
    celery_broker_url: str = _redis_db(DEFAULT_REDIS_URL, 1)
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    web_port: int = 8000
    flower_port: int = 5555
    flower_basic_auth: str | None = field(default=None, repr=False)
    # CACHE_ENABLED=0 turns both cache layers off: the benchmark's uncached baseline.
    cache_enabled: bool = True
    access_token_ttl: int = 900
    # Seconds a request waits for Redis before counting it as down.
    redis_socket_timeout: float = 0.25
    # How long a connection error keeps the breaker open before one probe is let through.
    breaker_cooldown: float = 2.0
    # Debounce window for coalesced aggregate recomputes.
    recompute_countdown: float = 0.2
    login_failures_per_minute: int = 10
    # Named in every answer's X-Instance header (unique per API server behind a balancer).
    instance_name: str = field(default_factory=socket.gethostname)
    # Where `make up` binds the API and Flower: loopback unless set (0.0.0.0 for every interface).
    bind_address: str = "127.0.0.1"
    # The user `make up` runs its children as when started by root ("root" keeps root).
    stack_user: str = "nobody"
    # Failed logins per client address per minute, over all emails (password spraying).
    login_failures_per_address: int = 30
    # Addresses/networks of reverse proxies whose X-Forwarded-For is believed; none by default.
    trusted_proxies: tuple[str, ...] = ()
    # Seconds a process keeps the counters every request touches (hit tally, busiest projects)
    # before writing them to Redis in one batch (0: on every request).
    counter_flush_interval: float = 1.0
    # Copies each API process keeps in its near cache (cache/near.py); 0 turns it off.
    near_cache_entries: int = 20_000
    # After a task write, store the new value of the task and of its project's first task-list
    # page (read back from the database after the bump) instead of leaving them to the next
    # reader's miss. CACHE_WARM_AFTER_WRITE=0 turns it off.
    warm_after_write: bool = True
    # A value read in the last part of its TTL (this fraction of it) is loaded again and stored
    # before it expires (cache/store.py `RedisCache._refresh`): a key read at least once in the
    # last quarter of its TTL is never missed for its TTL, for a load per three quarters of it
    # instead of one per TTL. CACHE_REFRESH_AHEAD=0 turns it off.
    cache_refresh_ahead: float = 0.25
    # GETs of the API's declared endpoints answered without Flask's dispatch (web/hot.py), the
    # same answers for less CPU. WEB_HOT_PATH=0 sends every request through Flask.
    web_hot_path: bool = True

    def with_overrides(self, **changes) -> "Settings":
        return replace(self, **changes)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    redis_url = env.get("REDIS_URL") or DEFAULT_REDIS_URL
    return Settings(
        database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        redis_url=redis_url,
        redis_cluster_url=env.get("REDIS_CLUSTER_URL") or None,
        celery_broker_url=env.get("CELERY_BROKER_URL") or _redis_db(redis_url, 1),
        secret_key=env.get("SECRET_KEY") or _dev_secret_key(),
        web_port=_number(env, "WEB_PORT", 8000, int, 1, 65535),
        flower_port=_number(env, "FLOWER_PORT", 5555, int, 1, 65535),
        flower_basic_auth=env.get("FLOWER_BASIC_AUTH") or None,
        cache_enabled=_flag(env.get("CACHE_ENABLED"), True),
        access_token_ttl=_number(env, "ACCESS_TOKEN_TTL", 900, int, 1),
        recompute_countdown=_number(env, "RECOMPUTE_COUNTDOWN", 0.2, float, 0),
        instance_name=env.get("INSTANCE_NAME") or _default_instance_name(env),
        bind_address=env.get("BIND_ADDRESS") or "127.0.0.1",
        stack_user=env.get("STACK_USER") if env.get("STACK_USER") is not None else "nobody",
        login_failures_per_address=_number(env, "LOGIN_FAILURES_PER_ADDRESS", 30, int, 1),
        trusted_proxies=tuple(p.strip() for p in (env.get("TRUSTED_PROXIES") or "").split(",")
                              if p.strip()),
        counter_flush_interval=_number(env, "COUNTER_FLUSH_INTERVAL", 1.0, float, 0),
        near_cache_entries=_number(env, "NEAR_CACHE_ENTRIES", 20_000, int, 0),
        warm_after_write=_flag(env.get("CACHE_WARM_AFTER_WRITE"), True),
        cache_refresh_ahead=_number(env, "CACHE_REFRESH_AHEAD", 0.25, float, 0, 1),
        web_hot_path=_flag(env.get("WEB_HOT_PATH"), True),
    )


def _number(env: Mapping[str, str], name: str, default: T, kind: Callable[[str], T],
            low: T | None = None, high: T | None = None) -> T:
    """A numeric setting, or the reason it is refused, naming it: an operator's typo stops the
    process at start, not later as a port that never binds or a cache that refreshes every read."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if (value is None or not math.isfinite(value)
            or (low is not None and value < low) or (high is not None and value > high)):
        wanted = "a whole number" if kind is int else "a number"
        span = (f" from {low} to {high}" if high is not None
                else f" of at least {low}" if low is not None else "")
        raise SettingError(f"{name}={raw!r}: give {wanted}{span}")
    return value


def _default_instance_name(env: Mapping[str, str]) -> str:
    return f"{socket.gethostname()}:{env.get('WEB_PORT') or 8000}"


def _dev_secret_key() -> str:
    """Without SECRET_KEY every process must still agree on one key (gunicorn workers, Celery),
    so a development key is kept in var/; production sets SECRET_KEY."""
    path = PROJECT_ROOT / "var" / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(48)
        try:
            with open(path, "x") as fh:
                fh.write(key)
        except FileExistsError:
            return path.read_text().strip()
        return key
