"""`python -m faults [--only NAME,...] [--backend mariadb|sqlite]`: each fault on a fresh stack
under load, then lost writes, stale reads through every API process, stats convergence and the
processes; the table goes to RELIABILITY.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.load import Load
from bench.run import write_plans
from bench.stack import Stack, StackFailed
from bench.tools import ToolMissing, ensure_wrk, machine
from faults import report
from faults.env import (PROJECT_ROOT, Environment, missing_roles, process_tree,
                        tree_complete)
from faults.injections import BY_NAME, FAULTS, Context, Fault
from faults.progress import Progress, log
from faults.verify import converge, lost_writes, pin_all, stale_reads
from faults.workload import Workload

RESULTS = PROJECT_ROOT / "faults" / "results"
CONVERGE_LIMIT = 180.0


@dataclass
class Timing:
    warmup: float = 5.0
    after: float = 5.0  # load after the fault is over, before reading everything back
    converge_limit: float = CONVERGE_LIMIT
    writers: int = 3
    readers: int = 3


@dataclass
class Row:
    fault: str
    title: str
    backend: str
    detail: str = ""
    writes_sent: int = 0
    writes_acked: int = 0
    writes_unanswered: int = 0
    lost: int = 0
    status_5xx: int = 0
    reads: int = 0
    wrk_requests: int = 0
    stale: int = 0
    verify_reads: int = 0
    api_processes: int = 0
    unreached: int = 0
    converge_s: float | None = None
    stats_exact: bool = False
    outbox_backlog: int = -1
    processes_ok: bool = False
    processes: str = ""
    orphans: int = 0
    seconds: float = 0.0
    passed: bool = False
    problems: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    log_excerpt: list[str] = field(default_factory=list)


INTERESTING = re.compile(r"exited unexpectedly|Unrecoverable|Traceback|restart|Error|error:",
                         re.I)


def log_excerpt(path: Path, limit: int = 12) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [ln[:240] for ln in lines if INTERESTING.search(ln)]
    return hits[:limit]


def run_fault(env: Environment, fault: Fault, timing: Timing, wrk_load: Load | None = None,
              plan: str | None = None, stack: Stack | None = None) -> Row:
    """One row: the load, the fault, the checks. On a fresh stack, stopped at the end, unless
    `stack` is given (the short subset in the tests runs two faults on one stack)."""
    row = Row(fault.name, fault.title, env.backend)
    started = time.monotonic()
    progress = Progress(fault.name)
    own_stack = stack is None
    if stack is None:
        stack = env.start_stack(f"{fault.name}-{env.backend}")
    sup = stack.process.pid
    before = process_tree(sup)
    load = Workload(stack.port, env.data, env.tokens, writers=timing.writers,
                    readers=timing.readers, wrk_load=wrk_load, plan=plan).start()
    try:
        progress.phase("warm-up load", load.ledger)
        progress.wait(timing.warmup, load.ledger)
        progress.phase("fault", load.ledger)
        done = progress.during(lambda: fault.inject(Context(env, stack, log)), load.ledger)
        row.detail = done.get("detail", "")
        progress.phase("load after the fault", load.ledger)
        progress.wait(timing.after, load.ledger)
    except Exception as exc:  # reported in the row; the checks still run
        row.problems.append(f"the fault's injection failed: {exc!r}"[:400])
    finally:
        load.stop()
    c = load.ledger.counters
    row.writes_sent, row.writes_acked = c.writes_sent, c.writes_acked
    row.writes_unanswered, row.reads = c.writes_unanswered, c.reads
    row.status_5xx = c.status_5xx + load.wrk_5xx()
    row.wrk_requests = load.wrk_result.requests if load.wrk_result else 0
    row.examples += c.examples[:5]
    row.problems += [f"load thread died: {crash}" for crash in c.crashed]
    if load.wrk_error:
        row.problems.append(f"wrk: {load.wrk_error}")

    try:
        check(env, stack, sup, before, load, timing, progress, row)
    except Exception as exc:  # a harness failure is reported in its row; the suite goes on
        row.problems.append(f"the checks failed: {exc!r}"[:400])
    finally:
        if own_stack:
            orphans = env.stop_stack(stack)
            row.orphans = len(orphans)
            if orphans:
                row.problems.append(f"{len(orphans)} processes outlived the stack (killed): "
                                    f"{orphans}")
    row.log_excerpt = log_excerpt(stack.log_path)
    row.seconds = round(time.monotonic() - started, 1)
    row.passed = (row.lost == 0 and row.status_5xx == 0 and row.stale == 0 and row.stats_exact
                  and row.processes_ok and row.unreached == 0 and not row.problems
                  and row.writes_acked > 0)
    progress.finish(row)
    return row


def check(env: Environment, stack: Stack, sup: int, before, load: Workload, timing: Timing,
          progress: Progress, row: Row) -> None:
    """Lost writes, stale reads through every API process, convergence, the processes."""
    progress.phase("checking writes and reads through every API process", load.ledger)
    row.lost = len(lost := lost_writes(env.engine, load.ledger))
    row.examples += lost[:5]
    tree = process_tree(sup)
    web_pids = tree.pids("web-worker")
    row.api_processes = len(web_pids)
    pinned = {}
    if tree.supervisor_alive and web_pids:
        pinned, unreached = pin_all(stack.port, web_pids)
        row.unreached = len(unreached)
        stale = stale_reads(pinned, unreached, env.engine, load.ledger, env.data, env.tokens)
        row.stale, row.verify_reads = stale.stale, stale.reads
        row.examples += stale.examples[:5]
        if stale.errors:
            row.problems.append(f"{stale.errors} reads without a 200/404 answer while checking")
        progress.phase("waiting for stats to converge", load.ledger)
        row.converge_s, mismatches, row.outbox_backlog = converge(
            pinned, env.engine, env.data, env.tokens, timing.converge_limit)
        row.stats_exact = row.converge_s is not None
        row.examples += mismatches[:3]
        for pin in pinned.values():
            pin.close()
    else:
        row.problems.append("the API was not running after the fault: nothing could be read")

    after = process_tree(sup)
    row.processes_ok = tree_complete(after)
    replaced = _replaced(before, after)
    missing = missing_roles(after)
    row.processes = ("all running" if row.processes_ok else "MISSING " + ", ".join(missing)) + \
        (f"; replaced: {', '.join(replaced)}" if replaced else "")


def wrk_plan(env: Environment) -> Path:
    """The benchmark's mixed-load plan over the projects that have tasks to read and write."""
    with_tasks = replace(env.data, projects=[p for p in env.data.projects if p.sample_task_ids])
    plan, _ = write_plans(env.work, with_tasks, env.tokens)
    return plan


def _replaced(before, after) -> list[str]:
    out = []
    for role in sorted({p.role for p in before.procs}):
        gone = set(before.pids(role)) - set(after.pids(role))
        if gone:
            out.append(f"{role} x{len(gone)}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m faults", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated fault names: " +
                        ", ".join(f.name for f in FAULTS))
    parser.add_argument("--backend", default="mariadb", choices=("mariadb", "sqlite"))
    parser.add_argument("--no-wrk", action="store_true",
                        help="no wrk mixed load beside the Python writers and readers")
    parser.add_argument("--no-markdown", action="store_true",
                        help="write faults/results/faults.json only, leave RELIABILITY.md alone")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--render", action="store_true",
                        help="only write RELIABILITY.md again from faults/results/faults.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads((RESULTS / "faults.json").read_text())
        report.update(PROJECT_ROOT / "RELIABILITY.md", "faults", report.faults_markdown(results))
        return 0
    if args.list:
        for f in FAULTS:
            print(f"{f.name:22} {f.title}")
        return 0
    faults = [BY_NAME[n.strip()] for n in args.only.split(",")] if args.only else FAULTS
    faults = [f for f in faults if args.backend in f.backends]
    if shutil.which("redis-server") is None:
        log("redis-server not found: apt-get install redis-server")
        return 2
    wrk_load = None
    if not args.no_wrk:
        try:
            wrk_load = Load(ensure_wrk(), threads=1, connections=4, seconds=0)
        except ToolMissing as exc:
            log(f"{exc}; running without wrk")
    started = time.monotonic()
    results = {"command": "make faults" + (f" ONLY={args.only}" if args.only else ""),
               "backend": args.backend,
               "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "rows": []}
    with Environment(args.backend, log=log) as env:
        results["machine"] = machine(env.db_version)
        plan = None
        if wrk_load is not None:
            plan = wrk_plan(env)
        for fault in faults:
            try:
                row = run_fault(env, fault, Timing(), wrk_load, str(plan) if plan else None)
            except (StackFailed, RuntimeError) as exc:
                row = Row(fault.name, fault.title, args.backend,
                          problems=[f"could not run: {str(exc)[:500]}"])
                log(f"{fault.name}: could not run: {exc}")
            results["rows"].append(asdict(row))
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.faults_markdown(results)
    print(table)
    if not args.no_markdown:
        report.update(PROJECT_ROOT / "RELIABILITY.md", "faults", table)
        log("updated RELIABILITY.md")
    return 0 if all(r["passed"] for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
