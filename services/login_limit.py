"""Login throttling: every attempt takes a slot before its password is verified, and a successful
login gives its slot back, so the slots taken are the failures of the window.

Taking the slot is one atomic step (a Lua script; while Redis is unreachable, one conditional
UPDATE in the database), so parallel guesses cannot all pass a check before any of them counts:
at most `limit` passwords are verified per email, and per client address, per window."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import math
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy import case, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from cache.store import Unavailable
from models import LoginThrottle, utcnow
from services.context import Services
from services.errors import RateLimited
from services.uow import retry_on_deadlock

log = logging.getLogger(__name__)

WINDOW = 60  # seconds; a window starts at its first failure (fixed window per key)

password_checks = Counter("login_password_checks_total",
                          "Passwords verified by login (each one an attempt the limiter let in)")
throttled = Counter("login_throttled_total", "Logins refused before the password was verified",
                    ["limit"])
fallbacks = Counter("login_limiter_database_total",
                    "Login slots taken in the database because Redis was unreachable")

# KEYS: counters (the email's, then the address's); ARGV: their limits, then the window.
# Either counter at its limit refuses the attempt (and counts nothing); otherwise both count it.
_TAKE = """
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i]) then
    return {i, redis.call('PTTL', key)}
  end
end
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('EXPIRE', key, ARGV[#ARGV], 'NX')
end
return {0, 0}
"""

_GIVE_BACK = """
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
return 0
"""

# The database table only fills during Redis outages; every so many uses it drops ended windows.
_CLEANUP_EVERY = 200
_uses = itertools.count(1)


@dataclass(frozen=True)
class Slot:
    """An attempt let in: where it was counted, and under which keys."""

    store: str  # "redis" | "database"
    keys: tuple[str, ...]


def _key(kind: str, value: str) -> str:
    # One hash tag for every login counter: an attempt counts under its email's and its
    # address's counters in one script, which a Redis Cluster allows only within one slot.
    # Logins are rare next to reads, so that slot is never a hot one.
    return f"ratelimit:{{login}}:{kind}:" + hashlib.sha256(value.encode()).hexdigest()[:32]


def _limits(services: Services, email: str, address: str | None) -> list[tuple[str, str, int]]:
    """(label, key, limit) per counter the attempt goes to."""
    settings = services.settings
    limits = [("email", _key("email", email.lower()), settings.login_failures_per_minute)]
    if address:
        limits.append(("address", _key("addr", address), settings.login_failures_per_address))
    return limits


def take_slot(services: Services, *, email: str, address: str | None) -> Slot:
    """Count this attempt, or raise RateLimited (with Retry-After) without counting it."""
    limits = _limits(services, email, address)
    keys = tuple(key for _, key, _ in limits)
    try:
        refused, retry_after = _take_in_redis(services, limits)
        store = "redis"
    except Unavailable as exc:
        log.warning("login limiter: Redis unavailable (%s), counting in the database", exc)
        fallbacks.inc()
        refused, retry_after = _take_in_database(services, limits)
        store = "database"
    if refused is not None:
        throttled.labels(refused).inc()
        noun = "email" if refused == "email" else "client address"
        raise RateLimited(f"too many failed logins for this {noun}; try again later",
                          retry_after=retry_after)
    return Slot(store, keys)


def give_back(services: Services, slot: Slot, db: Session) -> None:
    """A successful login is not a failure: its slot is returned (in the database, within the
    login's own transaction `db`)."""
    if slot.store == "database":
        db.execute(update(LoginThrottle)
                   .where(LoginThrottle.key.in_(slot.keys), LoginThrottle.failures > 0)
                   .values(failures=LoginThrottle.failures - 1)
                   .execution_options(synchronize_session=False))
        return
    try:
        services.cache.call("login_limit", lambda: _script(services, "give_back", _GIVE_BACK)(
            keys=list(slot.keys)))
    except Unavailable as exc:
        log.warning("login limiter: could not give a slot back: %s", exc)


def _script(services: Services, name: str, source: str):
    scripts = services.extras.setdefault("login_limit_scripts", {})
    if name not in scripts:
        scripts[name] = services.redis.register_script(source)
    return scripts[name]


def _take_in_redis(services: Services, limits) -> tuple[str | None, int]:
    take = _script(services, "take", _TAKE)
    which, pttl = services.cache.call("login_limit", lambda: take(
        keys=[key for _, key, _ in limits], args=[limit for *_, limit in limits] + [WINDOW]))
    if not which:
        return None, 0
    return limits[int(which) - 1][0], max(1, math.ceil(int(pttl) / 1000)) if pttl > 0 else WINDOW


@retry_on_deadlock
def _take_in_database(services: Services, limits) -> tuple[str | None, int]:
    now = utcnow()
    window = dt.timedelta(seconds=WINDOW)
    keys = [key for _, key, _ in limits]
    with services.db.writers() as db:
        # The rows exist before they are counted under their row locks: concurrent first
        # attempts inserting the same key would deadlock on InnoDB's duplicate-key locks.
        # A new row's window ended a window ago, not now: a parallel attempt that read the clock
        # a moment before this one must still open the window (count 1) rather than count into
        # it, or the next attempt, whose clock is past `now`, would reset that count.
        db.execute(insert(LoginThrottle)
                   .prefix_with("OR IGNORE", dialect="sqlite")
                   .prefix_with("IGNORE", dialect="mysql").prefix_with("IGNORE", dialect="mariadb")
                   .values([{"key": key, "failures": 0, "window_ends": now - window}
                            for key in keys]))
        if next(_uses) % _CLEANUP_EVERY == 0:  # rows a window older than any new row's
            db.execute(delete(LoginThrottle).where(
                LoginThrottle.window_ends <= now - 2 * window, LoginThrottle.key.not_in(keys)))
        db.commit()
    with services.db.writers() as db:
        for label, key, limit in limits:  # always email before address: no lock cycles
            retry_after = _count_in_database(db, key, limit, now)
            if retry_after:
                db.rollback()  # an attempt refused by one counter counts in none
                return label, retry_after
        db.commit()
    return None, 0


def _count_in_database(db: Session, key: str, limit: int, now: dt.datetime) -> int:
    """Count an attempt under `key` and return 0, or return the seconds until its window ends.
    The UPDATE's condition is evaluated under the row lock, so concurrent attempts queue."""
    ended = LoginThrottle.window_ends <= now
    counted = db.execute(
        update(LoginThrottle)
        .where(LoginThrottle.key == key, or_(ended, LoginThrottle.failures < limit))
        .values(failures=case((ended, 1), else_=LoginThrottle.failures + 1),
                window_ends=case((ended, now + dt.timedelta(seconds=WINDOW)),
                                 else_=LoginThrottle.window_ends))
        .execution_options(synchronize_session=False)).rowcount
    if counted:
        return 0
    window_ends = db.scalar(select(LoginThrottle.window_ends).where(LoginThrottle.key == key))
    # A parallel attempt that read the clock after this one may have opened the window.
    return min(WINDOW, max(1, math.ceil((window_ends - now).total_seconds())))
