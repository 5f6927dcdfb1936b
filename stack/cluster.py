"""`make up-cluster`: the caching strategy's topology on one machine, in the foreground.

nginx (edge cache and load balancer) on WEB_PORT in front of two API instances (separate gunicorn
masters, separate L1 caches, each naming itself in X-Instance); the cache on a Redis Cluster
(REDIS_CLUSTER_URL, or three masters with a replica each started here); a broker Redis of its own
(noeviction, append-only file) that also holds the beats' lock; two Celery workers; two RedBeat
beats of which the one holding the lock schedules; Flower. The children run under
stack/supervisor.py, as `make up`'s do: one that dies is started again with backoff while the
others carry on; Ctrl-C or SIGTERM stops everything.

    python -m stack.cluster [--instances N] [--cache cluster|single] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from config import SettingError, load_settings
from stack import nginx
from stack.redis_cluster import RedisCluster
from stack.redis_server import RedisServer, free_port
from stack.supervisor import StopRequest, Supervisor
from stack.up import (
    BIN_DIR,
    CACHE_MAXMEMORY,
    GUNICORN_CONF,
    PROJECT_ROOT,
    VAR_DIR,
    WORKER_QUEUES,
    WSGI_APP,
    celery_command,
    export,
    flower_basic_auth,
    hand_files_to,
    http_answers,
    local_host,
    prepare_database,
    printable,
    redact_url,
    unprivileged_user,
    worker_commands,
)

RUN_DIR = VAR_DIR / "cluster"
STATE_FILE = "topology.json"
BEAT_MAX_INTERVAL = 1  # seconds between a beat's ticks: lock extension, and a standby's polls
WORKERS = BEATS = 2
# Child output to a file of its own (`--log-dir`): the shell opens it and becomes the child, so
# the pid and process group the supervisor watches are the child's.
TO_LOG_FILE = 'exec "$0" "$@" >>"$TASKCACHE_CHILD_LOG" 2>&1'


def log(message: str) -> None:
    print(f"[cluster] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stack.cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2, help="API instances (default 2)")
    parser.add_argument("--cache", choices=("cluster", "single"), default="cluster",
                        help="the cache on a Redis Cluster (default) or on one private "
                             "redis-server (the benchmark's comparison)")
    parser.add_argument("--log-dir", type=Path,
                        help="one log file per child here instead of this terminal")
    return parser.parse_args(argv)


# --- servers the supervisor does not restart ----------------------------------------------------


def start_cache(cleanups: list[Callable[[], None]], kind: str) -> None:
    """The cache: the Redis Cluster REDIS_CLUSTER_URL names, else one of our own: three masters
    with a replica each, every node evicting (allkeys-lru) within CACHE_MAXMEMORY. `single`: one
    private redis-server instead, through the same code path."""
    if kind == "single":
        os.environ.pop("REDIS_CLUSTER_URL", None)
        server = RedisServer.start(extra_args=["--maxmemory", CACHE_MAXMEMORY])
        cleanups.append(server.stop)
        export(REDIS_URL=server.url_for(0))
        log(f"cache: one private redis-server on port {server.port} (--cache single)")
        return
    if os.environ.get("REDIS_CLUSTER_URL"):
        log(f"cache: the Redis Cluster at {redact_url(os.environ['REDIS_CLUSTER_URL'])}")
        return
    cluster = RedisCluster.start(masters=3, replicas=1,
                                 extra_args=["--maxmemory", CACHE_MAXMEMORY])
    cleanups.append(cluster.stop)
    export(REDIS_CLUSTER_URL=cluster.url)
    log(f"cache: a Redis Cluster of {len(cluster.masters)} masters and {len(cluster.replicas)} "
        f"replicas started here: {cluster.url}")


def start_broker(cleanups: list[Callable[[], None]]) -> None:
    """A Redis of the broker's own: never evicts (a queue is never dropped for memory), appends
    every write to a file so a restarted broker keeps its queues, and holds RedBeat's lock."""
    if os.environ.get("CELERY_BROKER_URL"):
        log(f"broker: {redact_url(os.environ['CELERY_BROKER_URL'])}")
        return
    server = RedisServer.start(maxmemory_policy="noeviction",
                               extra_args=("--appendonly", "yes", "--appendfsync", "everysec"))
    cleanups.append(server.stop)
    export(CELERY_BROKER_URL=server.url_for(0))
    log(f"broker: a redis-server of its own on port {server.port} (noeviction, append-only)")


# --- the supervised children --------------------------------------------------------------------


def child_env(**extra: object) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({name: str(value) for name, value in extra.items()})
    return env


@dataclass
class Topology:
    log_dir: Path | None
    supervisor: Supervisor
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    api_ports: dict[str, int] = field(default_factory=dict)
    worker_metrics: dict[str, int] = field(default_factory=dict)
    published: dict[str, int | None] = field(default_factory=dict)

    def plan(self, instances: int, flower_auth: str, nginx_binary: str, user: str | None) -> None:
        settings = load_settings()
        host = socket.gethostname()
        for n in range(1, instances + 1):
            name, port = f"api-{n}", free_port()
            metrics_dir = RUN_DIR / f"prometheus-{name}"  # each instance sums only its workers
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            self.api_ports[name] = port
            self.commands[name] = (
                [str(BIN_DIR / "gunicorn"), "-c", str(GUNICORN_CONF), WSGI_APP,
                 "--bind", f"127.0.0.1:{port}"],
                child_env(INSTANCE_NAME=f"{name}@{host}:{port}",
                          # nginx, on this host, says who the client is (X-Forwarded-For).
                          TRUSTED_PROXIES=os.environ.get("TRUSTED_PROXIES") or "127.0.0.1",
                          PROMETHEUS_MULTIPROC_DIR=metrics_dir,
                          WEB_CONCURRENCY=os.environ.get("WEB_CONCURRENCY") or 2))
        for n in range(1, WORKERS + 1):
            name = f"worker-{n}"
            self.worker_metrics[name] = free_port()
            self.commands[name] = (
                celery_command("worker", "-n", f"worker{n}@%h", "-Q", WORKER_QUEUES, "-E",
                               "--concurrency", "2", "--loglevel", "INFO"),
                child_env(WORKER_METRICS_PORT=self.worker_metrics[name]))
        for n in range(1, BEATS + 1):
            self.commands[f"beat-{n}"] = (celery_command(
                "beat", "-S", "redbeat.RedBeatScheduler", "--max-interval",
                str(BEAT_MAX_INTERVAL), "--loglevel", "INFO"), child_env())
        self.commands["flower"] = (worker_commands(settings, flower_auth)["flower"], child_env())
        conf = nginx.write_config(settings.bind_address, settings.web_port,
                                  list(self.api_ports.values()), RUN_DIR / "nginx", user)
        self.commands["nginx"] = (nginx.command(nginx_binary, conf), child_env())

    def start(self, stop: StopRequest, user: str | None) -> None:
        for name, (command, env) in self.commands.items():
            if stop:
                return
            if self.log_dir:
                env = {**env, "TASKCACHE_CHILD_LOG": str(self.log_dir / f"{name}.log")}
                command = ["/bin/sh", "-c", TO_LOG_FILE, *command]
            self.supervisor.add(name, command, env, cwd=PROJECT_ROOT, user=user)

    def publish_state(self) -> None:
        """topology.json: what the tests and the benchmark need to find (and kill) each piece;
        rewritten whenever a child's pid changes (None while it waits to be restarted)."""
        pids = {name: child.pid for name, child in self.supervisor.children.items()}
        if pids == self.published:
            return
        settings = load_settings()
        here = local_host(settings)
        state = {
            "web": f"http://{here}:{settings.web_port}",
            "flower": f"http://{here}:{settings.flower_port}",
            "api": {name: f"http://127.0.0.1:{port}" for name, port in self.api_ports.items()},
            "worker_metrics": {name: f"http://127.0.0.1:{port}/metrics"
                               for name, port in self.worker_metrics.items()},
            "pids": pids,
            "redis_cluster_url": os.environ.get("REDIS_CLUSTER_URL"),
            "redis_url": None if os.environ.get("REDIS_CLUSTER_URL") else os.environ.get(
                "REDIS_URL"),
            "broker_url": os.environ.get("CELERY_BROKER_URL"),
        }
        path = RUN_DIR / STATE_FILE
        path.with_suffix(".tmp").write_text(json.dumps(state, indent=2))
        path.with_suffix(".tmp").replace(path)
        self.published = pids


def reaches_an_instance(edge: str) -> bool:
    """nginx answers with an API instance's answer (X-Instance), not its own 503."""
    try:
        with urllib.request.urlopen(edge, timeout=0.5) as answer:
            return bool(answer.headers.get("X-Instance"))
    except (urllib.error.URLError, OSError):
        return False


def print_urls(stack: Topology) -> None:
    settings = load_settings()
    here = local_host(settings)
    base = f"http://{here}:{settings.web_port}"
    log(f"API (nginx)  {base}/api   docs {base}/docs   (X-Instance names the instance)")
    for name, port in stack.api_ports.items():
        log(f"{name:<12} http://127.0.0.1:{port}/api   metrics http://127.0.0.1:{port}/metrics")
    for name, port in stack.worker_metrics.items():
        log(f"{name:<12} metrics http://127.0.0.1:{port}/metrics")
    log(f"Flower       http://{here}:{settings.flower_port}/")
    log(f"state        {RUN_DIR / STATE_FILE}")
    log("Ctrl-C stops everything")


def run(args: argparse.Namespace, stop: StopRequest) -> int:
    stack = Topology(args.log_dir, Supervisor(log, printable=printable))
    cleanups: list[Callable[[], None]] = []
    try:
        nginx_binary = nginx.ensure_nginx(log)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
        start_cache(cleanups, args.cache)
        start_broker(cleanups)
        settings = prepare_database(stop)
        user = unprivileged_user(settings)
        stack.plan(args.instances, flower_basic_auth(settings), nginx_binary, user)
        if user is not None:
            hand_files_to(user, settings)
            if args.log_dir:
                shutil.chown(args.log_dir, user)
        stack.start(stop, user)
        edge = f"http://{local_host(settings)}:{settings.web_port}/health"
        instances = [f"http://127.0.0.1:{port}/health" for port in stack.api_ports.values()]
        announced = False

        def on_tick() -> None:
            nonlocal announced
            stack.publish_state()
            # The instances first, then the edge, which must reach one: asked before they
            # listened, nginx would rest them (FAIL_TIMEOUT) and answer the first clients 503.
            if not announced and all(http_answers(url) for url in instances) \
                    and reaches_an_instance(edge):
                print_urls(stack)
                announced = True

        stack.supervisor.run(stop, on_tick=on_tick)
        log("stopped")
        return 0
    finally:
        stop.ignore_further()
        stack.supervisor.stop()
        for cleanup in reversed(cleanups):
            cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopRequest()
    try:
        load_settings()  # a refused setting stops here, before anything starts
        return run(args, stop)
    except SettingError as error:
        log(f"configuration: {error}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
