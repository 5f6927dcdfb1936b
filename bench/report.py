"""Ratios against the baselines of the same run, checked against the issue's targets, and the
Markdown table kept in BENCHMARKS.md (one block per mode, the rest of the file left alone)."""

from __future__ import annotations

import re
from pathlib import Path

from bench.cpu import one_write

# Issue 11's targets (the earlier ">= 1000x uncached for the big project" stays, as a measure).
TARGETS = {
    "stats_vs_health_rps": (">=", 0.9),
    "stats_vs_health_p99": ("<=", 2.0),
    "task_vs_health_rps": (">=", 0.9),
    "task_vs_health_p99": ("<=", 2.0),
    "list_vs_health_rps": (">=", 0.9),
    "list_vs_health_p99": ("<=", 2.0),
    "mixed_vs_health_rps": (">=", 0.5),
    "mixed_hit_rate": (">=", 0.995),
    "mixed_lowest_family_hit_rate": (">=", 0.98),
    "list_cached_vs_uncached_rps": (">=", 10.0),
    "big_stats_cached_vs_uncached_rps": (">=", 1000.0),
    "freshness_p99_ms": ("<", 100.0),
}

PREAMBLE = """# Benchmarks

`make bench` (full: about 700,000 tasks) or `make bench QUICK=1` (`python -m bench --quick`, under
two minutes on 2 cores). The benchmark installs wrk when it is missing (Debian's package, as root),
creates its own MariaDB database (`taskcache_bench_<run>`, dropped at the end unless `--keep`) and its
own redis-server on a free port, bulk-seeds it, and starts the stack as `make up` does
(`python -m stack.up`, pointed at them through the environment) twice: with the cache, then with
`CACHE_ENABLED=0`. wrk (a separate process, scripts in `bench/lua/`) drives the load. Every number
is a ratio to a baseline measured in the same run on the same machine, because the 2 cores are
shared and absolute numbers are noisy. The full results of the last run are in
`bench/results/latest.json` (not committed); the tables below are the committed copy.

Ratios: throughput as cached / baseline (higher is better); latency as baseline / cached for
"vs uncached" rows (how many times faster) and cached / `/health` for "vs /health" rows (how many
times slower than the stack's ceiling). Each "vs /health" ratio takes the `/health` measured around
its own run (`/health`, the endpoint, the endpoint, `/health`, half a measurement each; the mixed
runs between a `/health` before and one after): the machine's speed drifts within a run, and a
drift moves both sides of such a pair alike.
"""


def _get(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _div(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def ratios(r: dict) -> dict:
    c, u = r.get("cached", {}), r.get("uncached", {})
    health_rps = _mean(_get(c, "health", "rps"), _get(c, "health_after", "rps"))
    health_p50 = _mean(_get(c, "health", "p50_ms"), _get(c, "health_after", "p50_ms"))
    health_p99 = _mean(_get(c, "health", "p99_ms"), _get(c, "health_after", "p99_ms"))
    def vs_health(run: dict | None, field: str) -> float | None:
        """A run against the /health measured around it (bench/run.py measure_against_health),
        or, in results from before the pairing, against the run's two /health measurements."""
        own = _get(run or {}, "paired_health", field)
        base = own if own is not None else {"rps": health_rps, "p50_ms": health_p50,
                                            "p99_ms": health_p99}[field]
        return _div(_get(run or {}, field), base)

    mixed = dict(_get(c, "mixed", "load") or {}, paired_health=_get(c, "mixed", "paired_health"))
    reads_only = dict(_get(c, "mixed", "reads_only") or {},
                      paired_health=_get(c, "mixed", "paired_health"))
    out = {
        "stats_vs_health_rps": vs_health(c.get("stats_small"), "rps"),
        "stats_vs_health_p50": vs_health(c.get("stats_small"), "p50_ms"),
        "stats_vs_health_p99": vs_health(c.get("stats_small"), "p99_ms"),
        "big_stats_vs_health_rps": vs_health(c.get("stats_big"), "rps"),
        "mixed_vs_health_rps": vs_health(mixed, "rps"),
        "mixed_vs_health_p99": vs_health(mixed, "p99_ms"),
        "mixed_reads_only_vs_health_rps": vs_health(reads_only, "rps"),
        "mixed_hit_rate": _get(c, "mixed", "hit_rates", "overall", "hit_rate"),
        "mixed_lowest_family_hit_rate": min(
            (v["hit_rate"] for v in (_get(c, "mixed", "hit_rates", "overall", "families")
                                     or {}).values() if v.get("hit_rate") is not None),
            default=None),
        "freshness_p50_ms": _get(c, "mixed", "freshness", "p50_ms"),
        "freshness_p99_ms": _get(c, "mixed", "freshness", "p99_ms"),
        "recomputes_per_1000_writes": _get(c, "burst", "recomputes_per_1000"),
    }
    # The floors (bench/naive.py): the simplest app's requests against its own /health, its mix
    # measured, and this stack's reads with the promised write, and with the write that also
    # warms (computed from the two runs).
    share = _get(c, "mixed", "write_share")
    naive = r.get("naive", {})
    for name in ("read", "read_held", "write", "write_promised", "write_warmed", "mix",
                 "mix_warmed"):
        out[f"naive_{name}_vs_health_rps"] = vs_health(naive.get(name), "rps")
    out["naive_write_answer_in_mix_p99_ms"] = _get(naive, "write_answer_in_mix", "p99_ms")
    # The most any cached read can beat the uncached page by: a read at the naive authenticated
    # floor against it, each against its own stack's /health (the two stacks run minutes apart).
    uncached_list = _div(_get(u, "list", "rps"), _get(u, "health", "rps"))
    if out["naive_read_held_vs_health_rps"] and uncached_list:
        out["list_cached_vs_uncached_at_floor_rps"] = (out["naive_read_held_vs_health_rps"]
                                                       / uncached_list)
    reads = out["mixed_reads_only_vs_health_rps"]
    for write in ("promised", "warmed"):
        floor = out[f"naive_write_{write}_vs_health_rps"]
        if share and floor and reads:
            out[f"mixed_with_{write}_writes_vs_health_rps"] = 1 / ((1 - share) / reads
                                                                   + share / floor)
    for name in ("task", "list", "floor", "floor_authenticated"):
        out[f"{name}_vs_health_rps"] = vs_health(c.get(name), "rps")
        out[f"{name}_vs_health_p99"] = vs_health(c.get(name), "p99_ms")
    for name in ("stats_small", "stats_big", "task", "list"):
        prefix = {"stats_small": "small_stats", "stats_big": "big_stats"}.get(name, name)
        out[f"{prefix}_cached_vs_uncached_rps"] = _div(_get(c, name, "rps"), _get(u, name, "rps"))
        out[f"{prefix}_cached_vs_uncached_p50"] = _div(_get(u, name, "p50_ms"),
                                                       _get(c, name, "p50_ms"))
        out[f"{prefix}_cached_vs_uncached_p99"] = _div(_get(u, name, "p99_ms"),
                                                       _get(c, name, "p99_ms"))
    # The hot path against Flask's dispatch, the same request on two stacks measured in turns.
    dispatch = r.get("dispatch", {})
    for name in ("health", "task"):
        out[f"hot_path_{name}_vs_flask_rps"] = _div(_get(dispatch, "hot", name, "rps"),
                                                    _get(dispatch, "flask", name, "rps"))
        out[f"hot_path_{name}_cpu_vs_flask"] = _div(_get(dispatch, "hot", name, "web_cpu_us"),
                                                    _get(dispatch, "flask", name, "web_cpu_us"))
    out["hot_path_task_vs_flask_health_rps"] = _div(_get(dispatch, "hot", "task", "rps"),
                                                    _get(dispatch, "flask", "health", "rps"))
    t = r.get("topology", {})
    out["topology_stats_vs_health_rps"] = _div(_get(t, "cluster", "stats_small", "rps"),
                                               _get(t, "cluster", "health", "rps"))
    out["topology_stats_vs_health_p50"] = _div(_get(t, "cluster", "stats_small", "p50_ms"),
                                               _get(t, "cluster", "health", "p50_ms"))
    # > 1: a warm read costs more on the cluster than on one Redis (same topology otherwise).
    out["cluster_vs_single_redis_cost_per_warm_read"] = _div(
        _get(t, "single", "stats_small", "rps"), _get(t, "cluster", "stats_small", "rps"))
    out["cluster_vs_single_redis_p50"] = _div(_get(t, "cluster", "stats_small", "p50_ms"),
                                              _get(t, "single", "stats_small", "p50_ms"))
    # The same, each run's stats throughput taken relative to its own /health: the two stacks run
    # one after the other, and on a shared machine the load around them differs.
    out["cluster_vs_single_redis_cost_vs_health"] = _div(
        _div(_get(t, "single", "stats_small", "rps"), _get(t, "single", "health", "rps")),
        out["topology_stats_vs_health_rps"])
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    out["targets"] = {}
    for name, (op, bound) in TARGETS.items():
        value = out.get(name)
        met = None if value is None else {">=": value >= bound, "<=": value <= bound,
                                           "<": value < bound}[op]
        out["targets"][name] = {"value": value, "target": f"{op} {bound:g}", "met": met}
    return out


def _mean(*values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _x(v, digits=2) -> str:
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:,.0f}x"
    return f"{v:.{digits}f}x"


def _write_cost_row(mx: dict, health: dict) -> str:
    """A write's cost in reads of the mix, from the two mixed runs (with and without writes):
    per request the mix takes (1 - s) reads and s writes. And what the 0.5x target allows."""
    share = mx.get("write_share") or 0
    mixed, reads, base = (_get(mx, "load", "rps"), _get(mx, "reads_only", "rps"),
                          health.get("rps"))
    if not (share and mixed and reads and base):
        return "| Mixed: one write's cost in reads | n/a | | | |"
    read = 1 / reads  # seconds per read, per request of the mix
    cost = one_write(1 / mixed, read, share) / read
    allowed = one_write(1 / (TARGETS["mixed_vs_health_rps"][1] * base), read, share) / read
    return (f"| Mixed: one write's cost in reads of the mix (from the runs with and without its "
            f"writes; the 0.5x target allows {max(allowed, 0):.1f} at this read cost) | "
            f"{cost:.1f} reads | | | |")


def _cpu_rows(mx: dict) -> list[str]:
    """CPU per request of every process on the machine, by role (bench/cpu.py): the mix's reads
    and one of its writes against a /health request."""
    cpu = mx.get("cpu_us_per_request") or {}
    health = _get(cpu, "health", "total")
    rows = []
    for name, label in (("reads_only", "one read of the mix"),
                        ("one_write", "one write of the mix (the mixed run less its reads, over "
                         "the write share: its own cost and what it costs the reads around it)"),
                        ("writes_only", "one write alone (a run of the mix's writes only, until "
                         "the worker's queue is empty)")):
        roles = cpu.get(name)
        if not roles or not health:
            continue
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in roles.items()
                          if k not in ("total", "bench") and abs(v) >= 1)
        rows.append(f"| CPU of {label}, all processes, by role in us ({parts}) vs a `/health` "
                    f"request's | {roles['total']:,.0f} us | {health:,.0f} us | "
                    f"{_x(roles['total'] / health, 1)} | |")
    return rows


def _dispatch_rows(r: dict) -> list[str]:
    """The hot path (web/hot.py) against Flask's dispatch (WEB_HOT_PATH=0)."""
    dispatch, q = r.get("dispatch") or {}, r["ratios"]
    if not dispatch:
        return []
    rows = []
    for name, label in (("task", "warm task GET"), ("health", "`/health`")):
        hot, flask = _get(dispatch, "hot", name) or {}, _get(dispatch, "flask", name) or {}
        rows += [
            f"| Hot path (`web/hot.py`): {label} vs the same through Flask's dispatch "
            f"(`WEB_HOT_PATH=0`), two stacks in turns: throughput | {_rps(hot.get('rps'))} | "
            f"{_rps(flask.get('rps'))} | {_x(q.get(f'hot_path_{name}_vs_flask_rps'))} | |",
            f"| Hot path: {label}, the API processes' CPU per request | "
            f"{hot.get('web_cpu_us', 0):,.0f} us | {flask.get('web_cpu_us', 0):,.0f} us | "
            f"{_x(q.get(f'hot_path_{name}_cpu_vs_flask'))} | |",
        ]
    rows.append(f"| Hot path: warm task GET vs `/health` through Flask's dispatch (the floor "
                f"before the hot path): throughput | {_rps(_get(dispatch, 'hot', 'task', 'rps'))} "
                f"| {_rps(_get(dispatch, 'flask', 'health', 'rps'))} | "
                f"{_x(q.get('hot_path_task_vs_flask_health_rps'))} | |")
    return rows


def _naive_rows(r: dict) -> list[str]:
    """The floors: what the simplest app (bench/naive.py) does on the same machine."""
    naive, q = r.get("naive") or {}, r["ratios"]
    if not naive:
        return []
    rows = []
    for name, label in (("read", "one Redis GET of a cached value"),
                        ("read_held", "the same value held by the process, for a bearer token "
                         "verified once: an authenticated read with no round trip; a read this "
                         "fast would be "
                         f"{_x(q.get('list_cached_vs_uncached_at_floor_rps'))} the uncached "
                         "list page"),
                        ("write", "one row UPDATE, committed in MariaDB"),
                        ("write_promised", "a write with its promises: the project locked, the "
                         "task updated, the change numbered, its outbox row, committed; then "
                         "two versions bumped and the statistics changed in one pipeline"),
                        ("write_warmed", "the promised write, and the warm-up issue 11 asks "
                         "of it: the task's row and its project's first page of 50 read in its "
                         "transaction, both stored in the pipeline after the commit"),
                        ("mix", "the mix at these floors: 95% the read, 5% the promised write; "
                         f"this stack's reads with the promised write would make "
                         f"{_x(q.get('mixed_with_promised_writes_vs_health_rps'))}"),
                        ("mix_warmed", "the same mix with the warmed write; this stack's reads "
                         "with the warmed write would make "
                         f"{_x(q.get('mixed_with_warmed_writes_vs_health_rps'))}")):
        run = naive.get(name) or {}
        rows.append(f"| Floor, naive app ({label}) vs its own `/health` | {_rps(run.get('rps'))} | "
                    f"{_rps(_get(run, 'paired_health', 'rps'))} | "
                    f"{_x(q.get(f'naive_{name}_vs_health_rps'))} | |")
    answers = naive.get("write_answer_in_mix") or {}
    if answers.get("p99_ms") is not None:
        rows.append(f"| Floor of freshness under load: a promised write's answer (its bump came "
                    f"before it) during the naive mix, p99 ({answers['samples']} probes) | "
                    f"{answers['p99_ms']} ms | | | |")
    return rows


def _rps(v) -> str:
    return "n/a" if v is None else f"{v:,.0f} req/s"


def _ms(v) -> str:
    return "n/a" if v is None else (f"{v:.2f} ms" if v < 100 else f"{v:,.0f} ms")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _met(r: dict, name: str) -> str:
    t = r["ratios"]["targets"].get(name)
    if not t or t["met"] is None:
        return f"{t['target'] if t else ''} (n/a)"
    return f"{t['target']} {'met' if t['met'] else 'MISSED'}"


def topology_rows(r: dict) -> list[str]:
    """The `make up-cluster` rows: through nginx, two API instances, cache on the Redis Cluster
    (then on one redis-server for the last two rows)."""
    t, q = r.get("topology", {}), r["ratios"]
    if not t:
        return []
    cl, single = t.get("cluster", {}), t.get("single", {})
    s, h = cl.get("stats_small", {}), cl.get("health", {})
    ss = single.get("stats_small", {})
    return [
        f"| Topology (`make up-cluster`): warm stats via nginx vs `/health` via nginx: "
        f"throughput | {_rps(s.get('rps'))} | {_rps(h.get('rps'))} | "
        f"{_x(q['topology_stats_vs_health_rps'])} | |",
        f"| Topology: same, p50 | {_ms(s.get('p50_ms'))} | {_ms(h.get('p50_ms'))} | "
        f"{_x(q['topology_stats_vs_health_p50'])} slower | |",
        f"| Topology: warm stats, cache on the Redis Cluster vs one redis-server: cost per read "
        f"(inverse throughput) | {_rps(s.get('rps'))} | {_rps(ss.get('rps'))} | "
        f"{_x(q['cluster_vs_single_redis_cost_per_warm_read'])} | |",
        f"| Topology: same, p50 | {_ms(s.get('p50_ms'))} | {_ms(ss.get('p50_ms'))} | "
        f"{_x(q['cluster_vs_single_redis_p50'])} | |",
        f"| Topology: same cost per read, each run relative to its own `/health` via nginx "
        f"(`/health`: {_rps(h.get('rps'))} cluster run, "
        f"{_rps(single.get('health', {}).get('rps'))} single run) | | | "
        f"{_x(q['cluster_vs_single_redis_cost_vs_health'])} | |",
    ]


def markdown(r: dict) -> str:
    c, u, q = r.get("cached", {}), r.get("uncached", {}), r["ratios"]
    m, d = r.get("machine", {}), r.get("dataset", {})
    lines = [
        f"## {r['mode'].capitalize()} mode: run {r['run_id']} ({r['started_at']}, "
        f"{r.get('duration_seconds', 0):.0f} s)",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, kernel "
        f"{m.get('kernel')}; Python {m.get('python')}, Redis {m.get('redis')}, MariaDB "
        f"{m.get('mariadb')}, {m.get('wrk')}.",
        "",
        f"Dataset: {d.get('orgs')} organizations, {d.get('rows', {}).get('users', 0):,} users, "
        f"{d.get('projects'):,} projects of {d.get('tasks_per_project'):,} tasks plus one of "
        f"{d.get('big_project_tasks'):,} tasks and {d.get('big_project_comments'):,} comments; "
        f"{d.get('rows', {}).get('tasks', 0):,} tasks and "
        f"{d.get('rows', {}).get('comments', 0):,} comments in all, seeded in "
        f"{d.get('seed_seconds')} s. Load: wrk, {r['load']['threads']} thread, "
        f"{r['load']['connections']} connections, {r['load']['seconds_per_measurement']:g} s "
        f"per measurement. Worker pipeline: {'running' if c.get('workers') else 'not running'}.",
        "",
        "| Measurement | Cached | Baseline | Ratio | Target |",
        "| --- | --- | --- | --- | --- |",
    ]
    # Each "vs /health" row's baseline is the /health measured around that run (older results:
    # the run's first /health).
    health = c.get("health", {})
    s, b = c.get("stats_small", {}), c.get("stats_big", {})
    sh = s.get("paired_health", health)
    lines += [
        f"| Warm project stats vs `/health`: throughput | {_rps(s.get('rps'))} | "
        f"{_rps(sh.get('rps'))} | {_x(q['stats_vs_health_rps'])} | "
        f"{_met(r, 'stats_vs_health_rps')} |",
        f"| Warm project stats vs `/health`: p50 | {_ms(s.get('p50_ms'))} | "
        f"{_ms(sh.get('p50_ms'))} | {_x(q['stats_vs_health_p50'])} slower | |",
        f"| Warm project stats vs `/health`: p99 | {_ms(s.get('p99_ms'))} | "
        f"{_ms(sh.get('p99_ms'))} | {_x(q['stats_vs_health_p99'])} slower | "
        f"{_met(r, 'stats_vs_health_p99')} |",
    ]
    for name, label in (("task", "Warm task GET"), ("list", "Warm task list page")):
        cur = c.get(name, {})
        ph = cur.get("paired_health", health)
        lines += [
            f"| {label} vs `/health`: throughput | {_rps(cur.get('rps'))} | "
            f"{_rps(ph.get('rps'))} | {_x(q[f'{name}_vs_health_rps'])} | "
            f"{_met(r, f'{name}_vs_health_rps')} |",
            f"| {label} vs `/health`: p99 | {_ms(cur.get('p99_ms'))} | "
            f"{_ms(ph.get('p99_ms'))} | {_x(q[f'{name}_vs_health_p99'])} slower | "
            f"{_met(r, f'{name}_vs_health_p99')} |",
        ]
    floor = c.get("floor")
    if floor:
        lines.append(
            f"| Floor of a cached read (one copy in the process, no token: "
            f"`/api/public/feature-flags`) vs `/health`: throughput | {_rps(floor.get('rps'))} | "
            f"{_rps(floor.get('paired_health', health).get('rps'))} | "
            f"{_x(q['floor_vs_health_rps'])} | |")
    floor = c.get("floor_authenticated")
    if floor:
        lines.append(
            f"| Floor of an authenticated read (the token, the session and one copy, all in the "
            f"process: `/api/orgs/current`) vs `/health`: throughput | {_rps(floor.get('rps'))} | "
            f"{_rps(floor.get('paired_health', health).get('rps'))} | "
            f"{_x(q['floor_authenticated_vs_health_rps'])} | |")
    rows = (("stats_small", "small_stats", f"Stats, {d.get('tasks_per_project'):,}-task project"),
            ("stats_big", "big_stats", f"Stats, {d.get('big_project_tasks'):,}-task project"),
            ("task", "task", "Task GET (entity)"), ("list", "list", "Task list, first page (50)"))
    for name, prefix, label in rows:
        cur, base = c.get(name, {}), u.get(name, {})
        target = {"stats_big": _met(r, "big_stats_cached_vs_uncached_rps"),
                  "list": _met(r, "list_cached_vs_uncached_rps")}.get(name, "")
        lines += [
            f"| {label}: cached vs uncached throughput | {_rps(cur.get('rps'))} | "
            f"{_rps(base.get('rps'))} | {_x(q[f'{prefix}_cached_vs_uncached_rps'])} | {target} |",
            f"| {label}: p50 / p99 | {_ms(cur.get('p50_ms'))} / {_ms(cur.get('p99_ms'))} | "
            f"{_ms(base.get('p50_ms'))} / {_ms(base.get('p99_ms'))} | "
            f"{_x(q[f'{prefix}_cached_vs_uncached_p50'])} / "
            f"{_x(q[f'{prefix}_cached_vs_uncached_p99'])} faster | |",
        ]
    mx = c.get("mixed", {})
    load, rates, fresh = mx.get("load", {}), mx.get("hit_rates", {}), mx.get("freshness", {})
    layer_rates = ", ".join(f"{name} {_pct(v.get('hit_rate'))}" for name, v in rates.items()
                            if name != "overall")
    health = mx.get("paired_health", health)
    lines += [
        f"| Mixed (Zipf s={mx.get('zipf_s')}, {100 * (mx.get('write_share') or 0):g}% writes): "
        f"throughput vs `/health` | {_rps(load.get('rps'))} | {_rps(health.get('rps'))} | "
        f"{_x(q['mixed_vs_health_rps'])} | {_met(r, 'mixed_vs_health_rps')} |",
        f"| Mixed without its writes (the same reads, 0% writes): throughput vs `/health` | "
        f"{_rps(_get(mx, 'reads_only', 'rps'))} | {_rps(health.get('rps'))} | "
        f"{_x(q.get('mixed_reads_only_vs_health_rps'))} | |",
        _write_cost_row(mx, health),
        *_cpu_rows(mx),
        *_dispatch_rows(r),
        *_naive_rows(r),
        f"| Mixed: p50 / p99 (p99 vs `/health`) | {_ms(load.get('p50_ms'))} / "
        f"{_ms(load.get('p99_ms'))} | {_ms(health.get('p50_ms'))} / "
        f"{_ms(health.get('p99_ms'))} | {_x(q['mixed_vs_health_p99'])} slower | |",
        f"| Mixed: hit rate, all layers ({layer_rates}) | "
        f"{_pct(q['mixed_hit_rate'])} | | | {_met(r, 'mixed_hit_rate')} |",
        f"| Stats freshness, write sent to visible: p50 / p99 ({fresh.get('samples')} probes "
        f"under the mixed load; visible at the first read after the write's answer: "
        f"{_pct(fresh.get('first_poll_share'))}; from the answer: "
        f"{_ms(fresh.get('from_ack_p50_ms'))} / {_ms(fresh.get('from_ack_p99_ms'))}; the "
        f"write's own answer: {_ms(fresh.get('answer_p50_ms'))} / "
        f"{_ms(fresh.get('answer_p99_ms'))}) | "
        f"{_ms(fresh.get('p50_ms'))} / {_ms(fresh.get('p99_ms'))} | | | "
        f"{_met(r, 'freshness_p99_ms')} |",
    ]
    rest = mx.get("freshness_at_rest")
    if rest:
        lines.append(
            f"| Stats freshness at rest (the same probe with no other load; the write's own "
            f"answer: {_ms(rest.get('answer_p50_ms'))} / {_ms(rest.get('answer_p99_ms'))}; "
            f"visible at the first read after it: {_pct(rest.get('first_poll_share'))}): "
            f"p50 / p99 | {_ms(rest.get('p50_ms'))} / {_ms(rest.get('p99_ms'))} | | | |")
    families = ", ".join(f"{f} {_pct(v.get('hit_rate'))}" for f, v in
                         (rates.get("overall", {}).get("families") or {}).items())
    if families:
        lines.append(f"| Mixed: hit rate per key family, all layers ({families}) | "
                     f"{_pct(q.get('mixed_lowest_family_hit_rate'))} lowest | | | "
                     f"{_met(r, 'mixed_lowest_family_hit_rate')} |")
    if "inline_per_hour" in mx:
        worker = (mx.get("recounts_by_reason") or {}).get("worker") or {}
        reasons = ", ".join(f"{k} {v:g}" for k, v in sorted(worker.items())) or "none"
        lines.append(
            f"| Mixed: statistics computed on a request (cold misses), after warm-up: "
            f"{mx.get('inline_computations', 0):g} in {mx.get('inline_seconds', 0):g} s "
            f"(the worker's recounts meanwhile, by reason: {reasons}) | "
            f"{mx['inline_per_hour']:,.0f} per hour | | | goal 0 |")
    for name, label in (("under_load", "under the mixed load"), ("steady", "at steady state")):
        found = (c.get("staleness") or {}).get(name)
        if not found:
            continue
        stale = ", ".join(f"{k} {v}" for k, v in found["stale_by_family"].items()) or "none"
        ratio = found.get("stale_ratio")
        lines.append(
            f"| Stale ratio found by the auditor {label} ({found['rounds']} rounds, "
            f"{found['checked']:,} cached values compared with the database; stale: {stale}; "
            f"in flight, not stale: {found['in_flight']}) | "
            f"{'n/a' if ratio is None else f'{100 * ratio:.3f}%'} | | | expected 0 |")
    burst = c.get("burst", {})
    rec = q.get("recomputes_per_1000_writes")
    rec_text = (f"{rec:g}" if rec is not None else
                f"n/a (no worker; web recounts {sum((burst.get('web_recomputes') or {}).values()):g})")
    if rec is not None and burst.get("writes") != 1000:
        rec_text = f"{rec:g} ({burst.get('recomputes'):g} for {burst.get('writes')} writes)"
    users = sum((burst.get("worker_user_stats_recomputes") or {}).values())
    lines.append(f"| Full recomputes of the project's stats per 1,000-write burst on it ("
                 f"{burst.get('writes_per_s')} writes/s; stats exact afterwards: "
                 f"{burst.get('stats_exact_after')}; recounts of the assignees' user stats "
                 f"meanwhile: {users:g}) | {rec_text} | | | |")
    for family, mem in (c.get("memory") or {}).items():
        if family.startswith("_"):
            continue
        lines.append(f"| Redis memory per `{family}` entry vs its JSON | "
                     f"{mem['redis_bytes']:,} B | {mem['json_bytes']:,} B JSON | "
                     f"{_x(mem['ratio'])} | |")
    ver = (c.get("memory") or {}).get("_version_key")
    if ver:
        lines.append(f"| Redis memory per version key (each entry names 2-3) | "
                     f"{ver['redis_bytes']:,} B | | | |")
    sizing = c.get("sizing")
    if sizing:
        lines += ["", "`flask --app web cache-size` on this dataset, after the load:", "", "```",
                  sizing["table"], "```"]
    lines += topology_rows(r)
    if r.get("notes"):
        lines += ["", "Notes: " + "; ".join(r["notes"]) + "."]
    return "\n".join(lines) + "\n"


def update_benchmarks_md(path: Path, r: dict, table: str) -> None:
    """Replace this mode's block, keep everything else (the other mode, the profile notes)."""
    replace_block(path, f"bench:{r['mode']}", table, PREAMBLE)


def replace_block(path: Path, name: str, block_text: str, preamble: str) -> None:
    """Rewrite the `<!-- name -->` block of a generated document (appended when missing); the
    rest of the file, hand-written notes included, stays as it is."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{block_text}{end}"
    text = path.read_text() if path.exists() else preamble
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
