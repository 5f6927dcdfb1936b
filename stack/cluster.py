"""`make up-cluster`: the caching strategy's topology on one machine, in the foreground.

nginx (edge cache and load balancer) on WEB_PORT in front of two API instances (separate gunicorn
masters, separate L1 caches, each naming itself in X-Instance); the cache on a Redis Cluster
(REDIS_CLUSTER_URL, or one started here) or else a private redis-server; a broker Redis of its own
(noeviction, append-only file); two Celery workers; two RedBeat beats of which one holds the lock
and schedules; Flower. A child that dies is started again (backoff 1 s doubling to 30 s), so a
killed instance or beat comes back while the others carry on; Ctrl-C or SIGTERM stops everything.

    python -m stack.cluster [--instances N] [--log-dir DIR] [--print-config]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from config import load_settings
from stack import nginx
from stack.redis_server import RedisServer, free_port, preexec_for_this_thread
from stack.up import (
    BIN_DIR,
    GUNICORN_CONF,
    PROJECT_ROOT,
    VAR_DIR,
    WORKER_QUEUES,
    WSGI_APP,
    Child,
    StopRequest,
    celery_command,
    export,
    flower_basic_auth,
    migrate_database,
    printable,
    redact_url,
    seed_database,
    signal_group,
    stop_children,
)

RUN_DIR = VAR_DIR / "cluster"
STATE_FILE = "topology.json"
BEAT_MAX_INTERVAL = 1  # seconds between a beat's ticks: lock extension, and a standby's polls
FIRST_BACKOFF, MAX_BACKOFF, STEADY_AFTER = 1.0, 30.0, 30.0
POLL_INTERVAL = 0.25


def log(message: str) -> None:
    print(f"[cluster] {message}", flush=True)


@dataclass
class Service:
    """A child kept running: started again after it exits, with a growing delay if it keeps
    dying."""

    name: str
    command: list[str]
    env: dict[str, str] = field(repr=False)
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self.process = subprocess.Popen(
                self.command, cwd=PROJECT_ROOT, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True, preexec_fn=preexec_for_this_thread())
        finally:
            if out:
                out.close()
        self.started_at, self.restart_at = time.monotonic(), None
        log(f"started {self.name} (pid {self.process.pid}): {printable(self.command)}")

    def check(self, now: float) -> bool:
        """Restart when due; True when the state changed (exited, or started again)."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start()
                return True
            return False
        code = self.process.poll()
        if code is None:
            return False
        # What the dead leader leaves behind (gunicorn workers still holding its socket, a pool
        # process) goes with it: the instance is down until it starts again, not half up.
        signal_group(Child(self.name, self.process), signal.SIGKILL)
        self.failures = 1 if now - self.started_at > STEADY_AFTER else self.failures + 1
        delay = min(FIRST_BACKOFF * 2 ** (self.failures - 1), MAX_BACKOFF)
        log(f"{self.name} (pid {self.process.pid}) exited with code {code}: "
            f"starting it again in {delay:.0f} s")
        self.restart_at = now + delay
        return True

    def as_child(self) -> Child | None:
        return Child(self.name, self.process) if self.process else None


# --- settings and servers ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stack.cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2, help="API instances (default 2)")
    parser.add_argument("--log-dir", type=Path,
                        help="one log file per child here instead of this terminal")
    parser.add_argument("--print-config", action="store_true",
                        help="print what would run and exit")
    return parser.parse_args(argv)


def start_cache(stack: "Topology") -> None:
    """The cache: the Redis Cluster REDIS_CLUSTER_URL names, else one of our own when the project
    can start one, else a private redis-server."""
    if os.environ.get("REDIS_CLUSTER_URL"):
        log(f"cache: the Redis Cluster at {redact_url(os.environ['REDIS_CLUSTER_URL'])}")
        return
    try:
        from stack.redis_cluster import RedisClusterServers  # noqa: F401  (branch `cluster`)
    except ImportError:
        server = RedisServer.start(maxmemory_policy="allkeys-lru")
        stack.cleanups.append(server.stop)
        export(REDIS_URL=server.url_for(0))
        log(f"cache: a private redis-server on port {server.port} (no Redis Cluster support in "
            "this tree)")
        return
    cluster = RedisClusterServers.start()
    stack.cleanups.append(cluster.stop)
    export(REDIS_CLUSTER_URL=cluster.url)
    log(f"cache: a Redis Cluster started here, {cluster.describe()}")


def start_broker(stack: "Topology") -> None:
    """A Redis of the broker's own: never evicts (a queue is never dropped for memory), appends
    every write to a file so a restarted broker keeps its queues, and holds RedBeat's lock."""
    if os.environ.get("CELERY_BROKER_URL"):
        log(f"broker: {redact_url(os.environ['CELERY_BROKER_URL'])}")
        return
    server = RedisServer.start(maxmemory_policy="noeviction",
                               extra_args=("--appendonly", "yes", "--appendfsync", "everysec"))
    stack.cleanups.append(server.stop)
    export(CELERY_BROKER_URL=server.url_for(0))
    log(f"broker: a redis-server of its own on port {server.port} (noeviction, append-only)")


# --- the children -----------------------------------------------------------------------------


@dataclass
class Topology:
    args: argparse.Namespace
    services: list[Service] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    api_ports: dict[str, int] = field(default_factory=dict)
    worker_metrics: dict[str, int] = field(default_factory=dict)

    def env(self, **extra: object) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                          env.get("PYTHONPATH")]))
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update({name: str(value) for name, value in extra.items()})
        return env

    def add(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log_path = self.args.log_dir / f"{name}.log" if self.args.log_dir else None
        self.services.append(Service(name, command, env, log_path))

    def plan(self, flower_auth: str, nginx_binary: str) -> None:
        settings = load_settings()
        host = socket.gethostname()
        for n in range(1, self.args.instances + 1):
            name, port = f"api-{n}", free_port()
            metrics_dir = RUN_DIR / f"prometheus-{name}"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            self.api_ports[name] = port
            self.add(name, [str(BIN_DIR / "gunicorn"), "-c", str(GUNICORN_CONF), WSGI_APP,
                            "--bind", f"127.0.0.1:{port}"],
                     self.env(INSTANCE_NAME=f"{name}@{host}:{port}",
                              PROMETHEUS_MULTIPROC_DIR=metrics_dir,
                              WEB_CONCURRENCY=os.environ.get("WEB_CONCURRENCY") or 2))
        for n in (1, 2):
            name = f"worker-{n}"
            self.worker_metrics[name] = free_port()
            self.add(name, celery_command("worker", "-n", f"worker{n}@%h", "-Q", WORKER_QUEUES,
                                          "-E", "--concurrency", "2", "--loglevel", "INFO"),
                     self.env(WORKER_METRICS_PORT=self.worker_metrics[name]))
        for n in (1, 2):
            self.add(f"beat-{n}", celery_command(
                "beat", "-S", "redbeat.RedBeatScheduler", "--max-interval", str(BEAT_MAX_INTERVAL),
                "--loglevel", "INFO"), self.env())
        self.add("flower", celery_command("flower", f"--port={settings.flower_port}",
                                          f"--basic-auth={flower_auth}"), self.env())
        conf = nginx.write_config(settings.web_port, list(self.api_ports.values()),
                                  RUN_DIR / "nginx")
        self.add("nginx", nginx.command(nginx_binary, conf), self.env())

    def write_state(self) -> None:
        """What the tests and the benchmark need to find (and kill) each piece."""
        settings = load_settings()
        state = {
            "web": f"http://127.0.0.1:{settings.web_port}",
            "flower": f"http://127.0.0.1:{settings.flower_port}",
            "api": {name: f"http://127.0.0.1:{port}" for name, port in self.api_ports.items()},
            "worker_metrics": {name: f"http://127.0.0.1:{port}/metrics"
                               for name, port in self.worker_metrics.items()},
            "pids": {s.name: s.process.pid for s in self.services
                     if s.process and s.restart_at is None},
            "logs": {s.name: str(s.log_path) for s in self.services if s.log_path},
            "redis_url": os.environ.get("REDIS_URL"),
            "redis_cluster_url": os.environ.get("REDIS_CLUSTER_URL"),
            "broker_url": os.environ.get("CELERY_BROKER_URL"),
            "database_url": settings.database_url,
        }
        path = RUN_DIR / STATE_FILE
        path.with_suffix(".tmp").write_text(json.dumps(state, indent=2))
        path.with_suffix(".tmp").replace(path)

    def stop(self) -> None:
        stop_children([child for s in self.services if (child := s.as_child())])
        for cleanup in reversed(self.cleanups):
            cleanup()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def print_urls(stack: Topology) -> None:
    settings = load_settings()
    base = f"http://127.0.0.1:{settings.web_port}"
    log(f"API (nginx)  {base}/api   docs {base}/docs")
    for name, port in stack.api_ports.items():
        log(f"{name:<12} http://127.0.0.1:{port}/api   metrics http://127.0.0.1:{port}/metrics")
    for name, port in stack.worker_metrics.items():
        log(f"{name:<12} metrics http://127.0.0.1:{port}/metrics")
    log(f"Flower       http://127.0.0.1:{settings.flower_port}/")
    log(f"state        {RUN_DIR / STATE_FILE}")
    log("Ctrl-C stops everything")


def supervise(stack: Topology, stop: StopRequest) -> int:
    settings = load_settings()
    edge = f"http://127.0.0.1:{settings.web_port}/health"
    announced = False
    while not stop:
        now = time.monotonic()
        if any([service.check(now) for service in stack.services]):
            stack.write_state()
        if not announced and answers(edge) and all(
                answers(f"http://127.0.0.1:{port}/health") for port in stack.api_ports.values()):
            print_urls(stack)
            announced = True
        time.sleep(POLL_INTERVAL)
    log("stopping")
    return 0


def run(args: argparse.Namespace, stop: StopRequest) -> int:
    stack = Topology(args)
    try:
        nginx_binary = nginx.ensure_nginx(log)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
        start_cache(stack)
        start_broker(stack)
        settings = load_settings()
        export(SECRET_KEY=settings.secret_key, DATABASE_URL=settings.database_url,
               WEB_PORT=settings.web_port, FLOWER_PORT=settings.flower_port)
        migrate_database(settings)
        if not stop:
            seed_database(settings)
        stack.plan(flower_basic_auth(settings), nginx_binary)
        for service in stack.services:
            if stop:
                break
            service.start()
        stack.write_state()
        return supervise(stack, stop)
    finally:
        stop.ignore_further()
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        print(__doc__)
        return 0
    stop = StopRequest()
    try:
        return run(args, stop)
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
