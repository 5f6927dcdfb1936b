"""A real gunicorn serving the app, started as `make up` starts it (web/gunicorn_conf.py, the same
WSGI entry point), on the test database and a Redis of the caller's choosing, with its
Prometheus metrics aggregated over its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from stack.redis_server import free_port, preexec_for_this_thread
from worker_fixtures import parse_metrics, wait_until

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
START_TIMEOUT = 60.0


@dataclass
class Gunicorn:
    base: str
    process: subprocess.Popen
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as answer:
            return parse_metrics(answer.read().decode())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_gunicorn(database_url: str, redis_url: str, work_dir: Path, *, workers: int = 2,
                   **extra: str) -> Gunicorn:
    port = free_port()
    metrics_dir = work_dir / f"prometheus-{uuid.uuid4().hex[:6]}"
    metrics_dir.mkdir()
    env = dict(os.environ)
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url,
               CELERY_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/1",
               SECRET_KEY="test-secret-" + "x" * 32, WEB_CONCURRENCY=str(workers),
               PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                        env.get("PYTHONPATH")])))
    env.update({k: str(v) for k, v in extra.items()})
    log_path = work_dir / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [GUNICORN, "-c", str(PROJECT_ROOT / "web" / "gunicorn_conf.py"), "web:create_app()",
             "--bind", f"127.0.0.1:{port}"],
            cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=preexec_for_this_thread())
    server = Gunicorn(f"http://127.0.0.1:{port}", process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"gunicorn exited ({process.returncode}):\n{server.log()[-3000:]}")
        return _answers(server.base)
    try:
        wait_until(ready, START_TIMEOUT, 0.2, "gunicorn to answer /health")
    except BaseException:
        server.stop()
        raise
    return server
