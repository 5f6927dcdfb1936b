"""`python -m faults.soak [--minutes 30]`: the benchmark's mixed load (wrk, bench/lua/mixed.lua) on
the stack as `make up` runs it, for a long time, sampling what could grow: the resident memory of
every process of the stack, memory, keys and clients of the cache and the broker Redis, the
stack's MariaDB connections, the outbox backlog and the tasks Flower holds. Flat = under 5%
growth from the end of the warm-up (the cache's longest TTL has passed and Flower's task buffer
is full) to the end of the run. The figures go to RELIABILITY.md."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import statistics
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import replace

import psutil
import redis
from sqlalchemy import text

from bench.load import Load, LoadFailed, Result, wrk
from bench.run import write_plans
from bench.seed import QUICK
from bench.tools import ToolMissing, ensure_wrk, machine
from faults import report
from faults.env import PROJECT_ROOT, Environment, process_tree
from faults.progress import log
from faults.verify import outbox_backlog
from worker.flower import MAX_TASKS as FLOWER_MAX_TASKS

RESULTS = PROJECT_ROOT / "faults" / "results"
FLAT = 0.05
SMALL = 10  # a count this small (clients, backlog) is flat while it stays within SMALL of itself
# Large enough that the soak measures what the cache holds, not what LRU lets it keep; evictions
# are reported beside it.
SOAK_MAXMEMORY = "1gb"
LONGEST_TTL = 600.0
FLOWER_TASKS = "Flower tasks held"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m faults.soak",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, help="seconds between samples "
                        "(default: 30, or a twentieth of a run shorter than 10 minutes)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--no-markdown", action="store_true",
                        help="write faults/results/soak.json only, leave RELIABILITY.md alone")
    parser.add_argument("--render", action="store_true",
                        help="only write RELIABILITY.md again from faults/results/soak.json")
    return parser.parse_args(argv)


def rss_by_process(supervisor: int) -> dict[str, float]:
    """Resident MB of each process of the stack, named by role and rank (web-worker 2, ...):
    a replaced process continues its predecessor's series."""
    tree = process_tree(supervisor)
    out: dict[str, float] = {}
    try:
        out["supervisor"] = psutil.Process(supervisor).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        pass
    ranks: dict[str, int] = defaultdict(int)
    for proc in sorted(tree.procs, key=lambda p: (p.role, p.pid)):
        ranks[proc.role] += 1
        try:
            rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
        out[f"RSS {proc.role} {ranks[proc.role]}"] = rss
    if "supervisor" in out:
        out["RSS supervisor (stack.up)"] = out.pop("supervisor")
    api = [v for k, v in out.items() if k.startswith("RSS web")]
    celery = [v for k, v in out.items() if k.startswith(("RSS worker", "RSS beat", "RSS flower"))]
    out["RSS all API processes"] = sum(api)
    out["RSS all Celery-side processes (worker, pool, beat, Flower)"] = sum(celery)
    return out


def redis_sample(prefix: str, url: str) -> dict[str, float]:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        info = client.info()
        keys = sum(v.get("keys", 0) for k, v in info.items() if k.startswith("db")
                   and isinstance(v, dict))
        return {f"{prefix} Redis used memory": info["used_memory"] / 2**20,
                f"{prefix} Redis keys": keys,
                f"{prefix} Redis clients": info["connected_clients"],
                f"{prefix} Redis evicted keys (cumulative)": info.get("evicted_keys", 0)}
    except redis.RedisError:
        return {}
    finally:
        client.close()


def mariadb_sample(env: Environment) -> dict[str, float]:
    with env.admin.connect() as conn:
        ours = conn.execute(text("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                                 "WHERE DB = :db"), {"db": env.db_name}).scalar()
        server = conn.execute(text("SHOW GLOBAL STATUS LIKE 'Threads_connected'")).all()[0][1]
    return {"MariaDB connections of the stack": int(ours),
            "MariaDB Threads_connected (whole server, shared)": int(server)}


def flower_tasks(stack) -> dict[str, float]:
    """How many tasks Flower holds: it keeps the last MAX_TASKS, so until it holds that many its
    memory can only grow (a buffer filling, not a leak)."""
    request = urllib.request.Request(f"http://127.0.0.1:{stack.env['FLOWER_PORT']}/api/tasks")
    user, _, password = stack.env["FLOWER_BASIC_AUTH"].partition(":")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return {FLOWER_TASKS: len(json.load(answer))}
    except (OSError, ValueError):
        return {}


def sample(env: Environment, stack) -> dict[str, float]:
    supervisor = stack.process.pid
    values = rss_by_process(supervisor)
    values.update(flower_tasks(stack))
    values.update(redis_sample("cache", env.cache.url))
    values.update(redis_sample("broker", env.broker.url))
    values.update(mariadb_sample(env))
    values["outbox backlog"] = outbox_backlog(env.engine)
    return values


UNITS = {"RSS": "MB", "used memory": "MB"}


def unit_of(name: str) -> str:
    return "MB" if any(k in name for k in UNITS) else ""


def warmup_end(samples: list[dict], floor: float) -> float:
    """The warm-up ends once every bounded store has filled or turned over once: the cache's
    longest TTL has passed (`floor`) and Flower holds as many tasks as it keeps. Until then both
    can only grow; from then on, growth is what the soak is looking for."""
    full = next((s["t"] for s in samples
                 if s["values"].get(FLOWER_TASKS, 0) >= FLOWER_MAX_TASKS), None)
    return floor if full is None else max(floor, full)


def summarize(samples: list[dict], warmup_s: float) -> list[dict]:
    """Per series: start, after warm-up (mean of 3 samples), peak, end (mean of the last 3),
    growth between those two means."""
    names = list(dict.fromkeys(n for s in samples for n in s["values"]))
    after = [s for s in samples if s["t"] >= warmup_s]
    out = []
    for name in names:
        series = [s["values"][name] for s in samples if name in s["values"]]
        tail = [s["values"][name] for s in after if name in s["values"]]
        if not series or not tail:
            continue
        base = statistics.mean(tail[:3])
        end = statistics.mean(tail[-3:])
        if "(cumulative)" in name or "Threads_connected" in name:
            flat = True  # a cumulative counter, or other people's connections: shown, not judged
        elif base < SMALL and not unit_of(name):
            flat = end - base < SMALL
        else:
            flat = (end - base) / base < FLAT
        out.append({"name": name, "unit": unit_of(name), "start": series[0], "after_warmup": base,
                    "peak": max(series), "end": end,
                    "growth": (end - base) / base if base >= SMALL or (base and unit_of(name))
                    else None,
                    "flat": flat, "judged": "(cumulative)" not in name
                    and "Threads_connected" not in name})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads((RESULTS / "soak.json").read_text())
        report.update(PROJECT_ROOT / "RELIABILITY.md", "soak", report.soak_markdown(results))
        return 0
    seconds = args.minutes * 60
    interval = args.interval or (30.0 if args.minutes >= 10 else max(5.0, seconds / 20))
    # The longest TTL a cached key (organization, config values, event markers) holds in steady
    # state: before it has turned over once, the cache's key count can only grow.
    warmup = min(LONGEST_TTL, seconds * 0.5)
    try:
        load = Load(ensure_wrk(), threads=1, connections=args.connections, seconds=seconds)
    except ToolMissing as exc:
        log(str(exc))
        return 2
    results: dict = {"command": "make soak" + (f" MINUTES={args.minutes:g}"
                                               if args.minutes != 30 else ""),
                     "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "minutes": args.minutes, "interval_s": interval, "warmup_s": warmup,
                     "connections": args.connections, "cache_maxmemory": SOAK_MAXMEMORY,
                     "notes": []}
    with Environment("mariadb", size=QUICK, log=log, cache_maxmemory=SOAK_MAXMEMORY) as env:
        results["machine"] = machine(env.db_version)
        stack = env.start_stack("soak")
        try:
            with_tasks = replace(env.data, projects=[p for p in env.data.projects
                                                     if p.sample_task_ids])
            plan, _ = write_plans(env.work, with_tasks, env.tokens)
            box: dict = {}

            def drive() -> None:
                try:
                    box["result"] = wrk(load, stack.base + "/", "mixed.lua", str(plan), "5")
                except LoadFailed as exc:
                    box["error"] = str(exc)

            driver = threading.Thread(target=drive, daemon=True)
            started = time.monotonic()
            driver.start()
            samples = []
            while driver.is_alive():
                t = time.monotonic() - started
                values = sample(env, stack)
                samples.append({"t": round(t, 1), "values": values})
                rss = values["RSS all API processes"], values[
                    "RSS all Celery-side processes (worker, pool, beat, Flower)"]
                log(f"soak {t / 60:5.1f}/{args.minutes:g} min: RSS API {rss[0]:,.0f} MB, "
                    f"Celery side {rss[1]:,.0f} MB, cache "
                    f"{values.get('cache Redis keys', 0):,.0f} keys "
                    f"{values.get('cache Redis used memory', 0):,.1f} MB, broker "
                    f"{values.get('broker Redis keys', 0):,.0f} keys, outbox backlog "
                    f"{values['outbox backlog']}, stack DB connections "
                    f"{values['MariaDB connections of the stack']}")
                driver.join(timeout=interval)
            samples.append({"t": round(time.monotonic() - started, 1),
                            "values": sample(env, stack)})
        finally:
            env.stop_stack(stack)
    if "error" in box:
        log(f"wrk failed: {box['error']}")
        results["notes"].append(f"wrk failed: {box['error'][:300]}")
    result: Result | None = box.get("result")
    if result is not None:
        results["rps"] = round(result.rps, 1)
        results["requests"] = result.requests
        results["status_5xx"] = int(result.counters.get("s5xx", 0))
    results["samples"] = len(samples)
    results["warmup_s"] = warmup = warmup_end(samples, warmup)
    if not any(s["values"].get(FLOWER_TASKS, 0) >= FLOWER_MAX_TASKS for s in samples):
        results["notes"].append(f"Flower never held its {FLOWER_MAX_TASKS:,} tasks: its memory "
                                "was still filling its buffer at the end")
    results["series"] = summarize(samples, warmup)
    growing = [s["name"] for s in results["series"] if s["judged"] and not s["flat"]]
    results["verdict"] = "flat" if not growing else "NOT flat: " + ", ".join(growing)
    results["raw"] = samples
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.soak_markdown(results)
    print(table)
    if not args.no_markdown:
        report.update(PROJECT_ROOT / "RELIABILITY.md", "soak", table)
        log("updated RELIABILITY.md")
    return 0 if not growing else 1


if __name__ == "__main__":
    sys.exit(main())
