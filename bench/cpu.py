"""Where the machine's CPU went during a measurement, by role: the API's gunicorn processes, the
Celery worker, MariaDB, the benchmark's redis-server, wrk, and the rest. Read from /proc (utime +
stime of every process alive at both ends of the window), so a role's share is what its
processes spent, whatever the machine's other tenants did."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def role(cmdline: str, redis: dict[int, str]) -> str:
    """The role a process plays in the benchmark, from its command line; a redis-server's is
    the name `redis` gives its port (others are "other")."""
    if "gunicorn" in cmdline:
        return "web"
    if "celery" in cmdline:
        if " beat" in cmdline:
            return "beat"
        if "flower" in cmdline:
            return "flower"
        return "worker"
    if "mariadbd" in cmdline or "mysqld" in cmdline:
        return "mariadb"
    if "redis-server" in cmdline:
        bound = cmdline.split()[1:]  # "redis-server 127.0.0.1:6379 [cluster]"
        return next((name for port, name in redis.items()
                     if any(arg.endswith(f":{port}") for arg in bound)), "other")
    if "worker.flower" in cmdline:
        return "flower"
    if "stack.up" in cmdline or "stack.cluster" in cmdline:
        return "supervisor"  # relays its children's logs
    if cmdline.startswith("wrk ") or "/wrk " in cmdline:
        return "wrk"
    return "other"


def snapshot(redis: dict[int, str]) -> dict[int, tuple[str, float]]:
    """Every process's role and CPU seconds so far."""
    found, own = {}, os.getpid()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if not cmdline:
            continue  # kernel threads
        # Fields after the name: state is [0], utime [11], stime [12] (proc(5), 14 and 15).
        pid = int(entry.name)
        found[pid] = ("bench" if pid == own else role(cmdline, redis),
                                  (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children: wrk, which has exited by the time a
    measurement's closing snapshot is taken."""
    times = os.times()
    return times.children_user + times.children_system


class Window:
    """CPU per role over a measurement: `with Window({port: "redis"}) as w: ...`, then
    `w.spent` (`redis` names the redis-servers of the system under test by port)."""

    def __init__(self, redis: dict[int, str]) -> None:
        self.redis = redis
        self.spent: dict[str, float] = {}

    def __enter__(self) -> "Window":
        self._before, self._children = snapshot(self.redis), children_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.spent = spent(self._before, snapshot(self.redis))
        self.spent["wrk"] = round(self.spent.get("wrk", 0.0) + children_cpu() - self._children, 2)


def spent(before: dict[int, tuple[str, float]],
          after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two snapshots. A process started in between counts from
    zero; one that ended in between is lost (wrk, whose time `Window` takes from this process's
    children instead)."""
    totals: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        start = before.get(pid)
        used = cpu - (start[1] if start and start[0] == name else 0.0)
        totals[name] = totals.get(name, 0.0) + used
    return {name: round(value, 2) for name, value in sorted(totals.items())}


def one_write(mixed: float, reads: float, share: float) -> float:
    """A write's part of a per-request quantity of the mix, which makes (1 - share) reads and
    share writes per request: the mixed run's figure less its reads' (a run of reads only)."""
    return (mixed - (1 - share) * reads) / share


def per_request(runs: dict[str, tuple[dict[str, float], int]],
                write_share: float) -> dict[str, dict[str, float]]:
    """Microseconds of CPU per request by role for each run, and for one write of the mix: the
    mixed run's per-request CPU less its reads' (the reads-only run's), over the write share."""
    out = {name: {role: round(seconds * 1e6 / requests, 1) for role, seconds in roles.items()}
           for name, (roles, requests) in runs.items() if requests}
    for table in out.values():  # the benchmark's own probes are not the system's cost
        table["total"] = round(sum(v for k, v in table.items() if k != "bench"), 1)
    mixed, reads = out.get("mixed"), out.get("reads_only")
    if mixed and reads and write_share:
        out["one_write"] = {
            role: round(one_write(mixed.get(role, 0.0), reads.get(role, 0.0), write_share), 1)
            for role in sorted(set(mixed) | set(reads)) if role != "total"}
        out["one_write"]["total"] = round(sum(v for k, v in out["one_write"].items()
                                              if k != "bench"), 1)
    return out
