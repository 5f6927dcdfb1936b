"""Load from a separate process: wrk, with the Lua scripts in bench/lua/."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent / "lua"
MARKER = "BENCH_JSON "


@dataclass
class Load:
    """How hard wrk pushes: its threads and connections, and how long a measurement lasts."""

    wrk: str
    threads: int
    connections: int
    seconds: float


@dataclass
class Result:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    counters: dict

    def as_dict(self) -> dict:
        return {"requests": self.requests, "seconds": round(self.seconds, 2),
                "rps": round(self.rps, 1), "p50_ms": round(self.p50_ms, 3),
                "p90_ms": round(self.p90_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "max_ms": round(self.max_ms, 3), "errors": self.errors,
                **({"counters": self.counters} if self.counters else {})}


    @staticmethod
    def combined(parts: list["Result"]) -> "Result":
        """Runs of the same request back to back as one: counts and time add up; percentiles,
        which cannot be merged from summaries, are the runs' mean (max: the largest)."""
        requests, seconds = sum(r.requests for r in parts), sum(r.seconds for r in parts)
        counters: dict = {}
        for part in parts:
            for name, value in part.counters.items():
                counters[name] = counters.get(name, 0) + value
        mean = lambda field: sum(getattr(r, field) for r in parts) / len(parts)  # noqa: E731
        return Result(requests, seconds, requests / seconds if seconds else 0.0, mean("p50_ms"),
                      mean("p90_ms"), mean("p99_ms"), max(r.max_ms for r in parts),
                      sum(r.errors for r in parts), counters)


class LoadFailed(RuntimeError):
    pass


def wrk_command(load: Load, url: str, script: str, *args: str, seconds: float | None = None,
                connections: int | None = None, threads: int | None = None) -> list[str]:
    duration = seconds or load.seconds
    conns = connections or load.connections
    thr = min(threads or load.threads, conns)
    # wrk takes whole seconds only (7.5s is a usage error): --seconds 15 halves to 7.5.
    return [load.wrk, "-t", str(thr), "-c", str(conns), "-d", f"{math.ceil(duration)}s",
            "--timeout", "30s", "-s", str(LUA_DIR / script), url, "--", *args]


def parse_wrk(returncode: int, stdout: str, stderr: str) -> Result:
    """wrk's summary line (the Lua `done()`), also printed when wrk is stopped with SIGINT."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(MARKER)), None)
    if returncode != 0 or line is None:
        raise LoadFailed(f"wrk failed ({returncode}): {stderr[-1500:]}{stdout[-1500:]}")
    data = json.loads(line[len(MARKER):])
    seconds_run = data["duration_us"] / 1e6
    lat = data["latency_us"]
    errors = sum(data["errors"].values())
    if stderr.strip():
        print(stderr.strip()[-600:], flush=True)
    return Result(data["requests"], seconds_run, data["requests"] / seconds_run,
                  lat["p50"] / 1e3, lat["p90"] / 1e3, lat["p99"] / 1e3, lat["max"] / 1e3,
                  errors, data.get("counters") or {})


def wrk(load: Load, url: str, script: str, *args: str, seconds: float | None = None,
        connections: int | None = None, threads: int | None = None) -> Result:
    duration = seconds or load.seconds
    command = wrk_command(load, url, script, *args, seconds=duration, connections=connections,
                          threads=threads)
    proc = subprocess.run(command, capture_output=True, text=True,
                          timeout=duration + 120, stdin=subprocess.DEVNULL)
    return parse_wrk(proc.returncode, proc.stdout, proc.stderr)
