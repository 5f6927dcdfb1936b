"""The system under test, started exactly as `make up` starts it (`python -m stack.up`), or as
`make up-cluster` does (`python -m stack.cluster`), pointed at the benchmark's database (and, for
`make up`, its private Redis) through the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.progress import log

PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def workers_available() -> bool:
    """The worker pipeline exists once its Celery app and settings are in the tree."""
    return ((PROJECT_ROOT / "worker" / "__init__.py").exists()
            and (PROJECT_ROOT / "celeryconfig.py").exists())


class StackFailed(RuntimeError):
    pass


class Stack:
    def __init__(self, name: str, env: dict[str, str], *, with_workers: bool,
                 log_path: Path, command: tuple[str, ...] = ("stack.up",)) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.with_workers = with_workers
        self.log_path = log_path
        self.port = int(env["WEB_PORT"])
        self.process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Stack":
        command = [sys.executable, "-m", *self.command]
        if not self.with_workers:
            command.append("--no-workers")
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                          env.get("PYTHONPATH")]))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        log(f"{self.name}: started `{' '.join(command[1:])}` (pid {self.process.pid}, "
            f"port {self.port}, CACHE_ENABLED={self.env.get('CACHE_ENABLED', '1')}), "
            f"log {self.log_path}")
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackFailed(f"{self.name} exited with code {self.process.returncode}:\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=1) as resp:
                    if resp.status == 200:
                        # gunicorn forks its workers lazily: give them a moment to import
                        time.sleep(1.0)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise StackFailed(f"{self.name} did not answer /health in {READY_TIMEOUT:.0f} s:\n"
                          f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the supervisor, which stops its children (and they die with it)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        log(f"{self.name}: stopped")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
