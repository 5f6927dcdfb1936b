"""The tools the benchmark needs outside Python, installed by the benchmark itself, and a
description of the machine it runs on."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

from bench.progress import log
from stack.apt import ToolMissing, ensure_tool


def ensure_wrk() -> str:
    """The path of wrk, installing Debian's package first when it is missing and we are root."""
    return ensure_tool("wrk", "wrk", log)


def ensure_redis_server() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise ToolMissing("redis-server not found: apt-get install redis-server")
    return found


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine(mariadb_version: str) -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    redis_v = _first_line(["redis-server", "--version"])
    redis_v = next((p[2:] for p in redis_v.split() if p.startswith("v=")), redis_v)
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "redis": redis_v,
        "mariadb": mariadb_version,
        "wrk": _first_line(["wrk", "-v"]).split(" [")[0],
    }
