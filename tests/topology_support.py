"""`make up-cluster` as the tests run it: `python -m stack.cluster` on free ports, a database of the
test session's and a run directory of its own, one log file per child; and a client that speaks
HTTP to its nginx (or to one API instance) the way the tests speak to the Flask test client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import requests
from redis.cluster import ClusterNode

from stack.redis_server import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 150.0
STOP_TIMEOUT = 40.0
SECRET_KEY = "test-secret-" + "x" * 32
# Outer settings the topology must not inherit: it starts its own cache and broker.
NOT_INHERITED = ("REDIS_URL", "REDIS_CLUSTER_URL", "CELERY_BROKER_URL", "PROMETHEUS_MULTIPROC_DIR",
                 "WEB_PORT", "FLOWER_PORT", "STACK_VAR_DIR", "INSTANCE_NAME")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Answer:
    """A requests.Response with the Flask test response's attributes the tests read."""

    def __init__(self, response: requests.Response) -> None:
        self.raw = response
        self.status_code = response.status_code
        self.headers = response.headers
        self.mimetype = response.headers.get("Content-Type", "").split(";")[0].strip()
        self.data = response.content

    @property
    def json(self):
        try:
            return self.raw.json()
        except ValueError:
            return None

    def get_json(self, force: bool = False, silent: bool = False):
        return self.json

    def get_data(self, as_text: bool = False):
        return self.raw.text if as_text else self.data

    def close(self) -> None:
        self.raw.close()


class HttpClient:
    """client.get/post/patch/delete(path, json=, headers=) over real HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()

    def open(self, path: str, method: str = "GET", *, json=None, data=None, headers=None,
             content_type: str | None = None, query_string=None) -> Answer:
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        response = self.session.request(method, self.base + path, json=json, data=data,
                                        headers=headers, params=query_string, timeout=30,
                                        allow_redirects=False)
        return Answer(response)

    def get(self, path, **kw):
        return self.open(path, "GET", **kw)

    def post(self, path, **kw):
        return self.open(path, "POST", **kw)

    def patch(self, path, **kw):
        return self.open(path, "PATCH", **kw)

    def put(self, path, **kw):
        return self.open(path, "PUT", **kw)

    def delete(self, path, **kw):
        return self.open(path, "DELETE", **kw)

    def healthy(self) -> bool:
        try:
            return self.get("/health").status_code == 200
        except requests.ConnectionError:
            return False


@dataclass
class RunningTopology:
    process: subprocess.Popen
    directory: Path
    web_port: int

    @classmethod
    def start(cls, database_url: str, directory: Path, **env: object) -> "RunningTopology":
        environment = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        web_port = free_port()
        environment.update(
            DATABASE_URL=database_url, SECRET_KEY=SECRET_KEY, STACK_VAR_DIR=str(directory),
            WEB_PORT=str(web_port), FLOWER_PORT=str(free_port()),
            FLOWER_BASIC_AUTH="test:flower-password", WEB_CONCURRENCY="1", STACK_USER="root",
            PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                     os.environ.get("PYTHONPATH")])))
        environment.update({k: str(v) for k, v in env.items()})
        out = open(directory / "supervisor.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "stack.cluster", "--log-dir", str(directory / "logs")],
            cwd=PROJECT_ROOT, env=environment, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        running = cls(process, directory, web_port)
        try:
            wait_for(running.ready, START_TIMEOUT, "make up-cluster to print its URLs", 0.25)
        except BaseException:
            running.stop()
            raise
        return running

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def supervisor_log(self) -> str:
        return (self.directory / "supervisor.log").read_text(errors="replace")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"stack.cluster exited ({self.process.returncode}):\n"
                                 + self.supervisor_log()[-4000:])
        return "Ctrl-C stops everything" in self.supervisor_log()

    def state(self) -> dict:
        return json.loads((self.directory / "cluster" / "topology.json").read_text())

    def client(self, instance: str | None = None) -> HttpClient:
        return HttpClient(self.state()["api"][instance] if instance else self.base)

    def log(self, name: str) -> str:
        return (self.directory / "logs" / f"{name}.log").read_text(errors="replace")

    def pid(self, name: str) -> int | None:
        return self.state()["pids"].get(name)

    def kill(self, name: str) -> int:
        """SIGKILL to the child's whole process group, as a host dying would."""
        pid = self.pid(name)
        assert pid, f"{name} is not running"
        os.killpg(pid, signal.SIGKILL)
        return pid

    def kill_cache_master_of(self, key: str) -> tuple[str, int]:
        """SIGKILL the Redis Cluster master serving `key`; returns its (host, port)."""
        node = self.cache().get_node_from_key(key)
        pid = redis.Redis(node.host, node.port).info("server")["process_id"]
        os.kill(pid, signal.SIGKILL)
        return node.host, node.port

    def cache(self) -> "redis.RedisCluster":
        from stack.redis_cluster import parse_cluster_url

        seeds = [ClusterNode(host, port)
                 for host, port in parse_cluster_url(self.state()["redis_cluster_url"])]
        return redis.RedisCluster(startup_nodes=seeds, require_full_coverage=False,
                                  socket_timeout=2)

    def wait_for_failover(self, key: str, dead: tuple[str, int], timeout: float = 60.0) -> None:
        def promoted():
            try:
                client = self.cache()
                node = client.get_node_from_key(key)
                return (node.host, node.port) != dead and client.ping() and \
                    b"cluster_state:ok" in redis.Redis(node.host, node.port).execute_command(
                        "CLUSTER", "INFO")
            except (redis.RedisError, OSError):
                return False
        wait_for(promoted, timeout, f"a replica to take over from {dead}", 0.5)

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60.0) -> int:
        return wait_for(lambda: (pid := self.pid(name)) and pid != old_pid and pid, timeout,
                        f"{name} to be started again")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/[^\]]+\] (.*)$",
                      re.MULTILINE)


def log_events(text: str, pattern: str) -> list[float]:
    """Epoch seconds of the Celery log lines whose message matches `pattern` (Celery stamps local
    time, as a naive datetime's timestamp() reads it)."""
    from datetime import datetime

    return [datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for stamp, message in LOG_TIME.findall(text) if re.search(pattern, message)]
