"""The faults, each injected into a running stack under load. Each returns what it did (for the
table) and blocks until the fault is over (the component restarted or resumed)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil
import redis
from sqlalchemy import text

from bench.stack import Stack
from faults.env import Environment, process_tree

RESTART_WAIT = 60.0  # how long a killed process may take to be back (the supervisor's job)


@dataclass
class Context:
    env: Environment
    stack: Stack
    log: Callable[[str], None]


@dataclass(frozen=True)
class Fault:
    name: str
    title: str
    inject: Callable[[Context], dict]
    backends: tuple[str, ...] = ("mariadb", "sqlite")


def cache_restart(ctx: Context) -> dict:
    """SIGKILL (no persistence: it comes back empty), 2 s down, same port."""
    ctx.env.cache.kill()
    time.sleep(2.0)
    ctx.env.cache.restart()
    return {"detail": "cache redis-server SIGKILLed, restarted empty after 2 s"}


def cache_pause(ctx: Context, seconds: float = 5.0) -> dict:
    pid = ctx.env.cache.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    return {"detail": f"cache redis-server SIGSTOP for {seconds:g} s, then SIGCONT"}


def broker_down(seconds: float) -> Callable[[Context], dict]:
    def inject(ctx: Context) -> dict:
        ctx.env.broker.kill()
        time.sleep(seconds)
        ctx.env.broker.restart()
        return {"detail": f"broker redis-server SIGKILLed, restarted empty after {seconds:g} s "
                          "(queued messages lost with it)"}
    return inject


def wait_for_new(ctx: Context, role: str, old: set[int], timeout: float = RESTART_WAIT) -> bool:
    """True once a process of `role` that is not one of `old` runs under the supervisor."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = process_tree(ctx.stack.process.pid)
        if not tree.supervisor_alive:
            return False
        if set(tree.pids(role)) - old:
            return True
        time.sleep(0.2)
    return False


def worker_pool_sigkill(ctx: Context, rounds: int = 10) -> dict:
    """SIGKILL a Celery pool process (the ones running tasks) `rounds` times, each time once the
    worker has replaced the previous one: tasks in flight die with it (acks_late redelivers)."""
    killed, back = 0, 0
    for _ in range(rounds):
        tree = process_tree(ctx.stack.process.pid)
        pool = tree.pids("worker-pool")
        if not pool:
            break
        victim = _busiest(pool)
        os.kill(victim, signal.SIGKILL)
        killed += 1
        if wait_for_new(ctx, "worker-pool", set(pool)):
            back += 1
        time.sleep(0.5)
    return {"detail": f"{killed} Celery pool processes SIGKILLed, {back} replaced by the worker"}


def worker_sigkill(ctx: Context, rounds: int = 10) -> dict:
    """SIGKILL the Celery worker itself (`celery worker`, the supervisor's child) `rounds` times,
    each time once the supervisor has started a new one; its pool processes lose their parent."""
    killed, back = 0, 0
    for _ in range(rounds):
        tree = process_tree(ctx.stack.process.pid)
        main = tree.pids("worker")
        if not main:
            break
        os.kill(main[0], signal.SIGKILL)
        killed += 1
        if not wait_for_new(ctx, "worker", set(main)):
            break
        back += 1
        time.sleep(1.0)
    return {"detail": f"celery worker SIGKILLed {killed} times, restarted {back} times"}


def beat_kill(ctx: Context) -> dict:
    tree = process_tree(ctx.stack.process.pid)
    beat = tree.pids("beat")
    if not beat:
        return {"detail": "no beat process to kill"}
    os.kill(beat[0], signal.SIGKILL)
    back = wait_for_new(ctx, "beat", set(beat))
    return {"detail": "beat SIGKILLed; " + ("restarted by the supervisor" if back else
                                            f"not running again within {RESTART_WAIT:.0f} s")}


def _busiest(pids: list[int]) -> int:
    def cpu(pid: int) -> float:
        try:
            return psutil.Process(pid).cpu_times().user
        except psutil.NoSuchProcess:
            return -1.0
    return max(pids, key=cpu)


def mariadb_kill_connections(ctx: Context, seconds: float = 10.0) -> dict:
    """`KILL CONNECTION` on the stack's connections to its database, every 0.5 s for `seconds`:
    each round those inside a transaction or running a statement, every fourth round all of them
    (idle pooled connections too)."""
    admin = ctx.env.admin
    ctx.env.engine.dispose()  # the harness's own pooled connections are not the stack's
    killed, in_trx, rounds = 0, 0, 0
    deadline = time.monotonic() + seconds
    with admin.connect() as conn:
        own = conn.execute(text("SELECT CONNECTION_ID()")).scalar()
        while time.monotonic() < deadline:
            rounds += 1
            rows = conn.execute(text(
                "SELECT p.ID, p.COMMAND, t.trx_id IS NOT NULL AS in_trx "
                "FROM information_schema.PROCESSLIST p "
                "LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID "
                "WHERE p.DB = :db AND p.ID <> :own"), {"db": ctx.env.db_name, "own": own}).all()
            for pid, command, trx in rows:
                if rounds % 4 == 0 or trx or command == "Query":
                    try:
                        conn.execute(text(f"KILL CONNECTION {int(pid)}"))
                    except Exception:  # gone between the listing and the kill
                        continue
                    killed += 1
                    in_trx += 1 if trx else 0
            time.sleep(0.5)
    return {"detail": f"{killed} connections killed in {rounds} rounds over {seconds:g} s, "
                      f"{in_trx} of them inside a transaction"}


def cache_evicting(ctx: Context, seconds: float = 20.0) -> dict:
    """A maxmemory a tenth below what the cache holds, allkeys-lru: it evicts at once and goes on
    evicting under the load (a limit above the cache's size may never be reached in a short row). Keyspace notifications name the evicted keys, so evicted version keys are counted.
    The limit stays for the rest of the row (reads after recovery run against a full cache)."""
    client = redis.Redis.from_url(ctx.env.cache.url)
    info = client.info("memory")
    base = int(info["used_memory"])
    limit = max(int(base * 0.9), int(info["used_memory_startup"]) + 1024 * 1024)
    client.config_set("notify-keyspace-events", "Ee")
    evicted: dict[str, int] = {"version": 0, "other": 0}
    stop = threading.Event()
    listener = threading.Thread(target=_count_evictions, args=(client, evicted, stop),
                                daemon=True)
    listener.start()
    before = int(client.info("stats")["evicted_keys"])
    client.config_set("maxmemory", limit)
    time.sleep(seconds)
    after = int(client.info("stats")["evicted_keys"])
    stop.set()
    listener.join(timeout=5)
    client.close()
    return {"detail": f"maxmemory {limit / 1024 / 1024:.1f} MB (was using "
                      f"{base / 1024 / 1024:.1f} MB), allkeys-lru, {seconds:g} s under load: "
                      f"{after - before} keys evicted, {evicted['version']} of them version keys",
            "evicted": after - before, "evicted_version_keys": evicted["version"]}


def _count_evictions(client: redis.Redis, evicted: dict, stop: threading.Event) -> None:
    pubsub = client.pubsub()
    pubsub.subscribe("__keyevent@0__:evicted")
    try:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message":
                key = message["data"].decode(errors="replace")
                evicted["version" if key.startswith("v:") else "other"] += 1
    except redis.RedisError:
        pass
    finally:
        pubsub.close()


FAULTS: list[Fault] = [
    Fault("cache-restart", "Cache Redis restarted (SIGKILL, 2 s, back empty)", cache_restart),
    Fault("cache-pause", "Cache Redis paused 5 s (SIGSTOP/SIGCONT)", cache_pause),
    Fault("broker-down-10", "Broker Redis down 10 s (SIGKILL, back empty)", broker_down(10)),
    Fault("broker-down-60", "Broker Redis down 60 s (SIGKILL, back empty)", broker_down(60)),
    Fault("worker-pool-sigkill", "Celery pool processes SIGKILLed x10 during writes",
          worker_pool_sigkill),
    Fault("worker-sigkill", "Celery worker SIGKILLed x10 during writes (the supervisor's child)",
          worker_sigkill),
    Fault("beat-kill", "Beat SIGKILLed (the supervisor must start it again)", beat_kill),
    Fault("mariadb-kill", "MariaDB connections killed mid-transaction (KILL CONNECTION, 10 s)",
          mariadb_kill_connections, backends=("mariadb",)),
    Fault("cache-evicting", "Cache Redis at maxmemory, evicting (allkeys-lru, 20 s)",
          cache_evicting),
]

BY_NAME = {f.name: f for f in FAULTS}
