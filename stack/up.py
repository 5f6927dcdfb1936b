"""`make up`: the whole system in the foreground.

Migrates and seeds the database, then runs the API (gunicorn), one Celery worker, exactly one beat
and Flower as child processes; starts a private redis-server when no Redis answers at REDIS_URL.
Ctrl-C, SIGTERM, or any child exiting stops everything; a child dying makes the exit status
non-zero.

    python -m stack.up [--no-workers] [--print-config]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from config import Settings, load_settings
from stack.redis_server import (
    RedisServer,
    RedisServerMissing,
    preexec_for_this_thread,
    redis_answers,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# STACK_VAR_DIR gives a second stack (the benchmark's) its own metric files and beat schedule, so
# that it neither wipes nor shares those of a `make up` running beside it.
VAR_DIR = Path(os.environ.get("STACK_VAR_DIR") or PROJECT_ROOT / "var")
PROMETHEUS_DIR = VAR_DIR / "prometheus-multiproc"
BEAT_SCHEDULE = VAR_DIR / "celerybeat-schedule"
GUNICORN_CONF = PROJECT_ROOT / "web" / "gunicorn_conf.py"
# Not resolved: .venv/bin/python is a symlink, and gunicorn and celery live next to the link.
BIN_DIR = Path(sys.executable).parent
WSGI_APP = "web:create_app()"
CELERY_APP = "worker.celery_app"
WORKER_QUEUES = "invalidate,recompute,warmup,celery"
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.25
REDACTED = "***"


def log(message: str) -> None:
    print(f"[up] {message}", flush=True)


# --- settings -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m stack.up", description=summary)
    parser.add_argument("--no-workers", action="store_true",
                        help="start only the API (no Celery worker, beat or Flower)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings (secrets redacted) and exit")
    return parser.parse_args(argv)


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    userinfo = f"{parts.username}:{REDACTED}" if parts.username else f":{REDACTED}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def redact_basic_auth(value: str | None) -> str | None:
    if value is None:
        return None
    user, _, _ = value.partition(":")
    return f"{user}:{REDACTED}"


def redacted_settings(settings: Settings) -> dict[str, object]:
    values = dataclasses.asdict(settings)
    values["secret_key"] = REDACTED
    values["flower_basic_auth"] = redact_basic_auth(settings.flower_basic_auth)
    for name in ("database_url", "redis_url", "celery_broker_url"):
        values[name] = redact_url(values[name])
    return values


def print_config(settings: Settings) -> None:
    for name, value in redacted_settings(settings).items():
        print(f"{name} = {value}")
    if not redis_answers(settings.redis_url):
        print("# no Redis answers at redis_url: `make up` would start a private redis-server")
    if settings.flower_basic_auth is None:
        print("# flower_basic_auth unset: `make up` would generate one for the run")


def export(**values: object) -> None:
    """Set variables in this process's environment, which every child inherits, so that each
    `load_settings()` (in-process, gunicorn workers, Celery) reads the same values."""
    os.environ.update({name: str(value) for name, value in values.items()})


# --- Redis, database, Flower auth -------------------------------------------------------------


def ensure_redis(settings: Settings) -> RedisServer | None:
    """Start a private redis-server for whichever of cache and broker does not answer."""
    cache_answers = redis_answers(settings.redis_url)
    broker_answers = redis_answers(settings.celery_broker_url)
    if cache_answers and broker_answers:
        log(f"using Redis at {redact_url(settings.redis_url)}")
        return None
    # One server holds both the cache (db 0) and the broker (db 1), and the broker must never lose
    # a queue to eviction; no maxmemory is set, so nothing is evicted anyway.
    server = RedisServer.start(maxmemory_policy="noeviction")
    log(f"no Redis answers at {redact_url(settings.redis_url)}: "
        f"started a private redis-server on port {server.port} (pid {server.pid})")
    if not cache_answers:
        export(REDIS_URL=server.url_for(0))
    if not broker_answers:
        export(CELERY_BROKER_URL=server.url_for(1))
    return server


def migrate_database(settings: Settings) -> None:
    from db.migrations import upgrade

    log(f"applying migrations to {redact_url(settings.database_url)}")
    upgrade(settings.database_url)


def seed_database(settings: Settings) -> None:
    from seed import seed_demo_if_empty

    demo = seed_demo_if_empty(settings)
    if demo is None:
        log("database already has data: not seeding")
        return
    log(f"seeded demo organization {demo['organization']!r}: "
        f"log in as {demo['email']} / {demo['password']}")


def flower_basic_auth(settings: Settings) -> str:
    """FLOWER_BASIC_AUTH, or a random one for this run: Flower is never served without auth."""
    if settings.flower_basic_auth:
        user, _, password = settings.flower_basic_auth.partition(":")
        if not user or not password:
            raise SystemExit("[up] FLOWER_BASIC_AUTH must look like user:password")
        return settings.flower_basic_auth
    generated = f"admin:{secrets.token_urlsafe(18)}"
    log(f"FLOWER_BASIC_AUTH unset: Flower login for this run is {generated}")
    return generated


def fresh_prometheus_dir() -> Path:
    """Multiprocess metric files from an earlier run would be summed into this run's /metrics."""
    shutil.rmtree(PROMETHEUS_DIR, ignore_errors=True)
    PROMETHEUS_DIR.mkdir(parents=True)
    return PROMETHEUS_DIR


# --- child processes ----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen

    @property
    def pgid(self) -> int:
        return self.process.pid  # each child leads its own session and process group


def web_command(settings: Settings) -> list[str]:
    return [str(BIN_DIR / "gunicorn"), "-c", str(GUNICORN_CONF), WSGI_APP,
            "--bind", f"0.0.0.0:{settings.web_port}"]


def celery_command(*args: str) -> list[str]:
    return [str(BIN_DIR / "celery"), "-A", CELERY_APP, *args]


def worker_commands(settings: Settings, flower_auth: str) -> dict[str, list[str]]:
    return {
        "worker": celery_command("worker", "-Q", WORKER_QUEUES, "-E", "--concurrency", "2",
                                 "--loglevel", "INFO"),
        "beat": celery_command("beat", "--loglevel", "INFO", "--schedule", str(BEAT_SCHEDULE)),
        "flower": celery_command("flower", f"--port={settings.flower_port}",
                                 f"--basic-auth={flower_auth}"),
    }


def child_env(name: str) -> dict[str, str]:
    """Only the gunicorn processes write multiprocess metric files; the directory is theirs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    if name == "web":
        env["PROMETHEUS_MULTIPROC_DIR"] = str(PROMETHEUS_DIR)
    else:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def printable(command: list[str]) -> str:
    return " ".join(redact_flower_flag(arg) for arg in command)


def redact_flower_flag(arg: str) -> str:
    flag, _, value = arg.partition("=")
    return f"{flag}={redact_basic_auth(value)}" if flag == "--basic-auth" else arg


def spawn(name: str, command: list[str]) -> Child:
    """In its own session, so a terminal's Ctrl-C reaches only this supervisor, which then stops
    every child's whole process group; and with a parent-death signal, so that `kill -9` of the
    supervisor orphans nothing."""
    if not Path(command[0]).exists():
        raise SystemExit(f"[up] {command[0]} not found: run `make install`")
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=child_env(name),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=preexec_for_this_thread(),
    )
    log(f"started {name} (pid {process.pid}): {printable(command)}")
    return Child(name, process)


def signal_group(child: Child, signum: int) -> None:
    try:
        os.killpg(child.pgid, signum)
    except ProcessLookupError:
        pass


def group_alive(child: Child) -> bool:
    """The leader may be gone while its workers (gunicorn, Celery prefork) are still exiting."""
    try:
        os.killpg(child.pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_groups(children: list[Child], deadline: float) -> list[Child]:
    """Wait until every group has exited or the deadline passes; return the ones still alive."""
    while True:
        for child in children:
            child.process.poll()  # reap leaders, so that their group can disappear
        alive = [child for child in children if group_alive(child)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def stop_children(children: list[Child]) -> None:
    """SIGTERM to every process group, up to STOP_TIMEOUT for a graceful exit, then SIGKILL."""
    if not children:
        return
    log(f"stopping {', '.join(child.name for child in children)}")
    for child in children:
        signal_group(child, signal.SIGTERM)
    for child in wait_for_groups(children, time.monotonic() + STOP_TIMEOUT):
        log(f"{child.name} still running after {STOP_TIMEOUT:.0f} s: killing it")
        signal_group(child, signal.SIGKILL)
    for child in children:
        child.process.wait()


# --- supervision --------------------------------------------------------------------------------


class StopRequest:
    """SIGINT/SIGTERM set a flag the main loop reads; a second signal aborts whatever step is
    running (a hung migration, say) by raising KeyboardInterrupt, and cleanup still runs."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def ignore_further(self) -> None:
        """While stopping, signals only record: stopping is bounded (STOP_TIMEOUT, then SIGKILL)
        and must not be cut short, or children would outlive the supervisor."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def api_answers(settings: Settings) -> bool:
    """Any HTTP answer counts: the server is up, and /health's own status is for monitors."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/health", timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def print_urls(settings: Settings, with_workers: bool) -> None:
    base = f"http://127.0.0.1:{settings.web_port}"
    log(f"API      {base}/api")
    log(f"docs     {base}/docs")
    log(f"metrics  {base}/metrics")
    if with_workers:
        log(f"Flower   http://127.0.0.1:{settings.flower_port}/")
    log("Ctrl-C stops everything")


def first_exited(children: list[Child]) -> Child | None:
    return next((child for child in children if child.process.poll() is not None), None)


def supervise(
    children: list[Child], stop: StopRequest, settings: Settings, with_workers: bool
) -> int:
    """Block until a signal (exit 0) or a child's exit (exit 1); print the URLs once the API
    answers."""
    announced = False
    while not stop:
        exited = first_exited(children)
        if exited is not None:
            log(f"{exited.name} exited unexpectedly (code {exited.process.returncode}): "
                "stopping everything")
            return 1
        if not announced and api_answers(settings):
            print_urls(settings, with_workers)
            announced = True
        time.sleep(POLL_INTERVAL)
    log(f"received {signal.Signals(stop.signum).name}: stopping")
    return 0


def start_children(children: list[Child], settings: Settings, with_workers: bool,
                   stop: StopRequest) -> None:
    """Appends each child as soon as it runs: the caller stops `children` whatever happens."""
    commands = {"web": web_command(settings)}
    if with_workers:
        commands.update(worker_commands(settings, flower_basic_auth(settings)))
    fresh_prometheus_dir()
    for name, command in commands.items():
        if stop:
            return
        children.append(spawn(name, command))


def run(args: argparse.Namespace, stop: StopRequest) -> int:
    children: list[Child] = []
    redis_server = None
    try:
        redis_server = ensure_redis(load_settings())
        settings = load_settings()
        export(SECRET_KEY=settings.secret_key, DATABASE_URL=settings.database_url,
               WEB_PORT=settings.web_port, FLOWER_PORT=settings.flower_port)
        migrate_database(settings)
        if not stop:
            seed_database(settings)
        VAR_DIR.mkdir(exist_ok=True)
        start_children(children, settings, not args.no_workers, stop)
        return supervise(children, stop, settings, not args.no_workers)
    finally:
        stop.ignore_further()
        stop_children(children)
        if redis_server is not None:
            log(f"stopping the private redis-server on port {redis_server.port}")
            redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        print_config(load_settings())
        return 0
    stop = StopRequest()
    try:
        return run(args, stop)
    except RedisServerMissing as error:
        log(str(error))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
