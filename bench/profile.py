"""Profile the API's hot path under load: `python -m bench.profile [--path stats] [--seconds 10]`.

Seeds the quick dataset, starts the cached stack without workers (the web alone), warms the
endpoint, then runs wrk against it while py-spy samples every gunicorn worker. Prints the
functions with the most samples (inclusive and own) and writes the collapsed stacks (flamegraph
input) to var/bench/profile-<path>.txt. `PYSPY_GIL=1` samples only the threads holding the GIL:
where the Python time goes, without the time threads spend in socket calls.

py-spy is not a project dependency: pass its path with --py-spy or have it on PATH (for example
`.tools/bin/uv venv /tmp/pyspy && .tools/bin/uv pip install --python /tmp/pyspy/bin/python py-spy`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench import cpu, probes
from bench.load import wrk
from bench.progress import log
from bench.run import LOG_DIR, Bench, parse_args as bench_args


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(p) for p in task.read_text().split()]
    return found


def gunicorn_master(stack_pid: int) -> int:
    for pid in children(stack_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gunicorn" in cmd:
            return pid
    raise RuntimeError("no gunicorn under the stack")


def summarize(collapsed: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        # py-spy raw frames: "function (file:line)"; fold lines so a function counts once
        names = [f.split(":")[0] + ")" if "(" in f else f for f in frames]
        total += n
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    lines += ["", "own:"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--path", default="stats",
                        choices=["stats", "health", "task", "list", "mixed", "reads", "writes"],
                        help="one endpoint, the mixed workload, or its reads or writes alone")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy-venv/bin/py-spy")
    args = parser.parse_args(argv)
    if not Path(args.py_spy).exists():
        log("py-spy not found: see this module's docstring")
        return 2
    bench = Bench(bench_args(["--quick", "--no-workers", "--no-markdown"]))
    try:
        bench.setup()
        stack = bench.start_stack("profile", True, False)
        paths = bench.paths(bench.data.small)
        if args.path in ("mixed", "reads", "writes"):
            path, script, token = "/", "mixed.lua", None
            plan = bench.plan
            if args.path != "mixed":
                share = "1" if args.path == "writes" else "0"
                plan = plan.with_name(f"{args.path}.plan")
                plan.write_text(re.sub(r"(?m)^write .*$", f"write {share}",
                                       bench.plan.read_text()))
            script_args = [str(plan), "5"]
            probes.sweep(stack.base, bench.sweep)
        else:
            path = "/health" if args.path == "health" else paths[args.path]
            token = None if args.path == "health" else bench.token0
            script, script_args = "auth.lua", [token or ""]
            if token:
                bench.warm(path, token)
        master = gunicorn_master(stack.process.pid)
        out = LOG_DIR / f"profile-{args.path}.txt"
        spy = subprocess.Popen([args.py_spy, "record", "--pid", str(master), "--subprocesses",
                                *(["--gil"] if os.environ.get("PYSPY_GIL") else []), "--format", "raw", "--rate", str(args.rate), "--nonblocking",
                                "--duration", str(int(args.seconds)), "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        result = {}
        load = threading.Thread(target=lambda: result.setdefault("r", wrk(
            bench.load, stack.base + path, script, *script_args, seconds=args.seconds)))
        with cpu.Window({bench.redis_server.port: "redis"}) as spent:
            load.start()
            load.join()
        _, err = spy.communicate(timeout=60)
        r = result.get("r")
        if r:
            log(f"{path}: {r.rps:.1f} req/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms; CPU per "
                f"request by role (us, py-spy's own in 'other'): " + ", ".join(
                    f"{k} {v * 1e6 / max(r.requests, 1):,.0f}" for k, v in spent.spent.items()))
        if not out.exists():
            log(f"py-spy wrote nothing: {err[-1000:]}")
            return 1
        print(summarize(out, args.top))
        log(f"collapsed stacks in {out}")
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
