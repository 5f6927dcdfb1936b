"""A private `redis-server` process, owned by whoever starts it.

The tests use it to take Redis down and bring it back (`kill()`, `restart()` on the same port)
without touching a shared server; `make up` uses it when no Redis answers at REDIS_URL.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
LOG_TAIL_LINES = 20
MISSING_MESSAGE = (
    "redis-server not found on PATH; install it (apt-get install redis-server) "
    "or set REDIS_URL to a running Redis"
)


class RedisServerMissing(RuntimeError):
    """No `redis-server` binary on PATH."""


class RedisServerFailed(RuntimeError):
    """redis-server exited or did not answer PING in time."""


def _one_try_client(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis at `url` answers PING within `timeout` seconds (one try, no retries)."""
    client = _one_try_client(url, timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def free_port() -> int:
    """A port nothing listens on right now (the caller still races other processes for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """subprocess `preexec_fn`: the kernel sends SIGTERM to the child when the thread that started
    it ends, so a SIGKILLed test run or `make up` leaves no orphaned servers. Linux only."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        pr_set_pdeathsig = 1
        ctypes.CDLL(libc_name, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def preexec_for_this_thread() -> Callable[[], None] | None:
    """`die_with_parent` only from the main thread: a helper thread may end long before the
    process that wants the child, and the death signal follows the thread, not the process."""
    if threading.current_thread() is threading.main_thread():
        return die_with_parent
    return None


def redis_server_command(executable: str, port: int, directory: Path, maxmemory_policy: str,
                         extra_args: Iterable[str] = ()) -> list[str]:
    """A foreground redis-server on 127.0.0.1:`port`, no persistence, working in `directory`."""
    return [
        executable,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--maxmemory-policy", maxmemory_policy,
        *extra_args,
    ]


def redis_executable() -> str:
    executable = shutil.which("redis-server")
    if executable is None:
        raise RedisServerMissing(MISSING_MESSAGE)
    return executable


class RedisServer:
    """One `redis-server` in the foreground, no persistence, in its own temporary directory."""

    def __init__(
        self, executable: str, port: int, maxmemory_policy: str, extra_args: Iterable[str]
    ):
        self._executable = executable
        self._port = port
        self._maxmemory_policy = maxmemory_policy
        self._extra_args = tuple(extra_args)
        self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{port}-"))
        self._process: subprocess.Popen | None = None

    @classmethod
    def start(
        cls,
        port: int | None = None,
        maxmemory_policy: str = "allkeys-lru",
        extra_args: Iterable[str] = (),
    ) -> "RedisServer":
        """Start a server and wait until it answers PING. Without `port`, pick a free one (and
        pick again if another process takes it first)."""
        executable = redis_executable()
        attempts = 1 if port is not None else 3
        for attempt in range(1, attempts + 1):
            server = cls(executable, port or free_port(), maxmemory_policy, extra_args)
            try:
                server._spawn_and_wait()
                return server
            except RedisServerFailed:
                server.stop()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return self.url_for(0)

    @property
    def log_path(self) -> Path:
        return self._dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self._port}/{db}"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM, then SIGKILL after STOP_TIMEOUT); removes the temp dir."""
        self._terminate()
        atexit.unregister(self.stop)
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as in a crash: no persistence, so `restart()` brings back an empty server."""
        if self.is_running():
            self._process.kill()
            self._process.wait()

    def restart(self) -> None:
        """Start again on the same port (stopping first if still running) and wait until ready."""
        self._terminate()
        self._spawn_and_wait()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.url} pid={self.pid} {state}>"

    def _command(self) -> list[str]:
        return redis_server_command(self._executable, self._port, self._dir,
                                    self._maxmemory_policy, self._extra_args)

    def _spawn_and_wait(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
                preexec_fn=preexec_for_this_thread(),
            )
        atexit.register(self.stop)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._fail(f"exited with code {self._process.returncode}")
            if self._own_process_answers():
                return
            time.sleep(0.05)
        self._terminate()
        self._fail(f"did not answer PING within {READY_TIMEOUT:.0f} s")

    def _own_process_answers(self) -> bool:
        """PING is not enough: another server already on the port would answer it while ours
        exits with "Address already in use"."""
        client = _one_try_client(self.url, 0.2)
        try:
            return client.info("server").get("process_id") == self._process.pid
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _fail(self, what: str) -> None:
        raise RedisServerFailed(
            f"redis-server on port {self._port} {what}; its log ends with:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"

    def _terminate(self) -> None:
        if not self.is_running():
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
