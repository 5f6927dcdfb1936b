"""Where a request's CPU goes, across every process that serves it:
`python -m bench.cost [--seconds 15]`.

Seeds the quick dataset into a MariaDB database of its own, starts the stack as `make up` does
(gunicorn, a Celery worker, beat, Flower; a cache and a broker redis-server), and runs the
benchmark's mixed workload (wrk, bench/lua/mixed.lua) three ways: reads only, writes only and
the benchmark's 5% of writes. For each, the CPU seconds every process spent (bench/cpu.py: user +
system, from /proc, read before and after, with a pause after the load for the worker to finish),
divided by the requests served. On a 2-core machine where everything shares the cores, CPU per request is
what bounds throughput. It still moves between runs here (the same reads cost 0.86 ms in one run
and 1.08 ms in the next: shared cores run slower when busy), so compare within a run: the last
line gives a write's cost in reads.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from bench import cpu
from bench.load import Load, wrk
from bench.progress import log
from bench.run import WRITE_SHARE, write_plans
from bench.seed import QUICK
from bench.tools import ensure_wrk
from faults.env import Environment

SETTLE = 4.0  # seconds after the load for the worker to finish what it was handed


def measure(env: Environment, stack, load: Load, plan) -> dict:
    redis = {env.cache.port: "cache redis-server", env.broker.port: "broker redis-server"}
    with cpu.Window(redis) as window:
        result = wrk(load, stack.base + "/", "mixed.lua", str(plan), "5")
        time.sleep(SETTLE)
    return {"rps": result.rps, "requests": result.requests, "counters": result.counters,
            "ms_per_request": {name: 1000 * s / result.requests
                               for name, s in window.spent.items() if name != "bench"}}


def report(name: str, found: dict) -> None:
    per = found["ms_per_request"]
    log(f"{name}: {found['rps']:,.0f} req/s, {found['requests']:,} requests")
    for role, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        if ms >= 0.0005:
            log(f"    {role:<22} {ms:7.3f} ms CPU per request")
    log(f"    {'all processes':<22} {sum(per.values()):7.3f} ms CPU per request")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per workload")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)
    load = Load(ensure_wrk(), threads=1, connections=args.connections, seconds=args.seconds)
    with Environment("mariadb", size=QUICK, log=log, cache_maxmemory="1gb") as env:
        stack = env.start_stack("cost")
        try:
            with_tasks = replace(env.data, projects=[p for p in env.data.projects
                                                     if p.sample_task_ids])
            plan, _ = write_plans(env.work, with_tasks, env.tokens)
            text = plan.read_text()
            plans = {}
            for name, share in (("reads only", 0), ("writes only", 1),
                                (f"mixed ({WRITE_SHARE:.0%} writes)", WRITE_SHARE)):
                plans[name] = env.work / f"cost-{share}.plan"
                plans[name].write_text(text.replace(f"write {WRITE_SHARE}\n", f"write {share}\n"))
            wrk(load, stack.base + "/", "mixed.lua", str(plans["reads only"]), "1")  # warm-up
            total = {}
            for name, path in plans.items():
                found = measure(env, stack, load, path)
                report(name, found)
                total[name] = sum(found["ms_per_request"].values())
            log(f"a write costs the CPU of {total['writes only'] / total['reads only']:.1f} "
                "reads (all processes, this run)")
        finally:
            env.stop_stack(stack)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
