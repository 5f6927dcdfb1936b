"""`make up`: the whole system in the foreground.

Migrates and seeds the database, then runs the API (gunicorn), one Celery worker, exactly one beat
and Flower as supervised child processes (stack/supervisor.py: a child that exits is restarted
with backoff; only Ctrl-C or SIGTERM stops everything). Redis: see ensure_redis (private, supervised
redis-servers for what is not configured: the cache evicting, the broker not). As root, the
children run as STACK_USER (nobody) when that user can.

    python -m stack.up [--no-workers] [--print-config]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from config import SettingError, Settings, load_settings
from stack.redis_server import (
    RedisServerMissing,
    free_port,
    redis_answers,
    redis_executable,
    redis_server_command,
)
from stack.supervisor import StopRequest, Supervisor

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
# The private cache Redis: bounded, evicting the least recently used keys when full.
CACHE_MAXMEMORY = "256mb"
REDIS_READY_TIMEOUT = 10.0
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
    for variable, name in (("REDIS_URL", "cache"), ("CELERY_BROKER_URL", "broker")):
        if not os.environ.get(variable):
            print(f"# {variable} unset: `make up` would start a private {name} redis-server")
    if settings.flower_basic_auth is None:
        print("# flower_basic_auth unset: `make up` would generate one for the run")


def export(**values: object) -> None:
    """Set variables in this process's environment, which every child inherits, so that each
    `load_settings()` (in-process, gunicorn workers, Celery) reads the same values."""
    os.environ.update({name: str(value) for name, value in values.items()})


# --- Redis, database, Flower auth -------------------------------------------------------------


def private_redis(supervisor: Supervisor, name: str, policy: str, *extra_args: str) -> str:
    """A redis-server of this run, supervised like every other child (restarted on the same
    port, empty, if it dies); returns its URL once it answers."""
    port = free_port()
    directory = VAR_DIR / name  # its log; nothing else (no persistence)
    directory.mkdir(parents=True, exist_ok=True)
    command = redis_server_command(redis_executable(), port, directory, policy,
                                   [*extra_args, "--logfile", str(directory / "redis.log")])
    supervisor.add(name, command, cwd=directory)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + REDIS_READY_TIMEOUT
    while not redis_answers(url):
        if time.monotonic() > deadline:
            raise SystemExit(f"[up] the private {name} did not answer within "
                             f"{REDIS_READY_TIMEOUT:.0f} s; its log: {directory / 'redis.log'}")
        time.sleep(0.05)
    return url


def ensure_redis(supervisor: Supervisor, env=os.environ) -> None:
    """Set URLs are used as given; for each one unset, a private redis-server. Never a Redis
    that happens to answer on the default port: it is often shared and `noeviction`. Two
    servers, not two databases of one: the cache must evict when full (allkeys-lru), the broker
    must never lose a queue (noeviction), and the policy is per server."""
    if env.get("REDIS_URL"):
        log(f"cache Redis: {redact_url(env['REDIS_URL'])} (REDIS_URL)")
    else:
        url = private_redis(supervisor, "cache-redis", "allkeys-lru",
                            "--maxmemory", CACHE_MAXMEMORY)
        export(REDIS_URL=url)
        log(f"cache Redis: a private redis-server at {url} (maxmemory {CACHE_MAXMEMORY}, "
            "allkeys-lru)")
    if env.get("CELERY_BROKER_URL"):
        log(f"broker Redis: {redact_url(env['CELERY_BROKER_URL'])} (CELERY_BROKER_URL)")
    else:
        url = private_redis(supervisor, "broker-redis", "noeviction")
        export(CELERY_BROKER_URL=url)
        log(f"broker Redis: a private redis-server at {url} (noeviction)")


def migrate_database(settings: Settings) -> None:
    from db.migrations import upgrade

    log(f"applying migrations to {redact_url(settings.database_url)}")
    upgrade(settings.database_url)


def prepare_database(stop) -> Settings:
    """Settings every child will share (exported), the schema migrated, the demo seeded."""
    settings = load_settings()
    export(SECRET_KEY=settings.secret_key, DATABASE_URL=settings.database_url,
           WEB_PORT=settings.web_port, FLOWER_PORT=settings.flower_port)
    migrate_database(settings)
    if not stop:
        seed_database(settings)
    return settings


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


def web_command(settings: Settings) -> list[str]:
    return [str(BIN_DIR / "gunicorn"), "-c", str(GUNICORN_CONF), WSGI_APP,
            "--bind", f"{settings.bind_address}:{settings.web_port}"]


def celery_command(*args: str) -> list[str]:
    return [str(BIN_DIR / "celery"), "-A", CELERY_APP, *args]


def worker_commands(settings: Settings, flower_auth: str) -> dict[str, list[str]]:
    return {
        "worker": celery_command("worker", "-Q", WORKER_QUEUES, "-E", "--concurrency", "2",
                                 "--loglevel", "INFO"),
        "beat": celery_command("beat", "--loglevel", "INFO", "--schedule", str(BEAT_SCHEDULE)),
        # worker.flower: Flower with /metrics and /healthcheck behind its basic auth as well.
        "flower": [str(BIN_DIR / "python"), "-m", "worker.flower",
                   f"--address={settings.bind_address}", f"--port={settings.flower_port}",
                   f"--basic-auth={flower_auth}"],
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


def printable(command) -> str:
    return " ".join(redact_flower_flag(arg) for arg in command)


def redact_flower_flag(arg: str) -> str:
    flag, _, value = arg.partition("=")
    return f"{flag}={redact_basic_auth(value)}" if flag == "--basic-auth" else arg


# --- running as an unprivileged user ------------------------------------------------------------


def unprivileged_user(settings: Settings) -> str | None:
    """The user the children run as when `make up` runs as root (STACK_USER, default nobody), or
    None: not root, STACK_USER=root, or that user cannot run the project's Python (checked by
    running it; the reason is logged)."""
    if os.geteuid() != 0 or settings.stack_user in ("", "root"):
        return None
    user = settings.stack_user
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log(f"STACK_USER {user!r} does not exist: the stack runs as root")
        return None
    python = BIN_DIR / "python"
    try:
        probe = subprocess.run(
            [str(python), "-c", "import celery, flower, gunicorn, config"], cwd=PROJECT_ROOT,
            env=child_env("probe"), user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
            capture_output=True, text=True, timeout=60)
        failure = None if probe.returncode == 0 else (
            (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1])
    except OSError as exc:
        failure = str(exc)
    if failure is not None:
        log(f"running as root: {user} cannot run {python} (that is {python.resolve()}): "
            f"{failure}")
        return None
    return user


def hand_files_to(user: str, settings: Settings) -> None:
    """What the children write becomes the user's: var/ (metric files, beat schedule, the
    development secret key and SQLite file), and an SQLite file elsewhere with its journals and,
    unless anyone may already create files there (/tmp), its directory, where SQLite creates them.
    Never anything else: nothing is changed recursively outside var/."""
    entry = pwd.getpwnam(user)

    def give(path: str) -> None:
        os.chown(path, entry.pw_uid, entry.pw_gid)

    for root, dirs, files in os.walk(VAR_DIR):
        for name in [root, *(os.path.join(root, f) for f in dirs + files)]:
            give(name)
    if settings.database_url.startswith("sqlite:///"):
        database = Path(settings.database_url.removeprefix("sqlite:///")).resolve()
        for suffix in ("", "-wal", "-shm", "-journal"):
            if Path(f"{database}{suffix}").exists():
                give(f"{database}{suffix}")
        if not database.parent.stat().st_mode & stat.S_IWOTH:
            give(str(database.parent))


# --- supervision --------------------------------------------------------------------------------


def local_host(settings: Settings) -> str:
    """Where this machine reaches what binds to BIND_ADDRESS."""
    return "127.0.0.1" if settings.bind_address in ("0.0.0.0", "::", "") else settings.bind_address


def api_answers(settings: Settings) -> bool:
    return http_answers(f"http://{local_host(settings)}:{settings.web_port}/health")


def http_answers(url: str) -> bool:
    """Any HTTP answer counts: the server is up, and /health's own status is for monitors."""
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def print_urls(settings: Settings, with_workers: bool) -> None:
    base = f"http://{local_host(settings)}:{settings.web_port}"
    log(f"API      {base}/api")
    log(f"docs     {base}/docs")
    log(f"metrics  {base}/metrics")
    if with_workers:
        log(f"Flower   http://{local_host(settings)}:{settings.flower_port}/")
    log("Ctrl-C stops everything")


def run(args: argparse.Namespace, stop: StopRequest) -> int:
    supervisor = Supervisor(log, printable=printable)
    try:
        ensure_redis(supervisor)
        settings = prepare_database(stop)
        VAR_DIR.mkdir(exist_ok=True)
        fresh_prometheus_dir()
        user = unprivileged_user(settings)
        if user is not None:
            hand_files_to(user, settings)
        commands = {"web": web_command(settings)}
        app_children: list[str] = []
        if not args.no_workers:
            commands.update(worker_commands(settings, flower_basic_auth(settings)))
        for name, command in commands.items():
            if stop:
                break
            supervisor.add(name, command, child_env(name), cwd=PROJECT_ROOT, user=user)
            app_children.append(name)
        announced = False

        def announce_once_the_api_answers() -> None:
            nonlocal announced
            if not announced and api_answers(settings):
                print_urls(settings, not args.no_workers)
                announced = True

        supervisor.run(stop, on_tick=announce_once_the_api_answers, stop_first=app_children)
        log(f"received {signal.Signals(stop.signum).name}: stopped")
        return 0
    finally:
        stop.ignore_further()
        supervisor.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = StopRequest()
    try:
        settings = load_settings()  # a refused setting stops here, before anything starts
        if args.print_config:
            print_config(settings)
            return 0
        return run(args, stop)
    except SettingError as error:
        log(f"configuration: {error}")
        return 2
    except RedisServerMissing as error:
        log(str(error))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
