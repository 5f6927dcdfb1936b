"""A small process supervisor: `make up`'s, reusable by any stack under stack/.

    stop = StopRequest()                       # Ctrl-C / SIGTERM set it
    supervisor = Supervisor(log)
    supervisor.add("web", ["gunicorn", ...], env)
    supervisor.add("worker", ["celery", ...], env, user="nobody")
    supervisor.run(stop, on_tick=...)          # returns once stopped; every child is gone

A child that exits while no stop was asked for is restarted after a backoff (1 s, doubling up to
30 s; back to 1 s once a run lasted 30 s), logged with its exit status and restart count; the
supervisor never gives up on a child and never stops the others because one died. Only a stop
request ends the run: SIGTERM to every child's process group, STOP_TIMEOUT for a graceful exit,
then SIGKILL.

Children never outlive the supervisor: each leads its own process group (a terminal's Ctrl-C
reaches only the supervisor, which then stops whole groups), and the kernel sends each one SIGTERM
when the supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG, set after any change of user, which
would clear it). Their own children need the same from their parent: Celery's prefork pool sets
it (SIGKILL), web/gunicorn_conf.py sets it in every gunicorn worker.

Why not supervisord, circus or honcho: honcho stops everything when one process exits (no
restarts); supervisord gives up on a program after `startretries` (FATAL) and, like circus,
leaves its children running when it is SIGKILLed, and each brings a daemon, a config format and,
for circus, ZeroMQ. The policy we need is about 200 lines of Python, tested on real processes.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from stack.redis_server import preexec_for_this_thread

STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.25


@dataclass(frozen=True)
class Backoff:
    first: float = 1.0
    longest: float = 30.0
    # A run at least this long counts as healthy: the next restart waits `first` again.
    stable_after: float = 30.0

    def delay(self, failures_in_a_row: int) -> float:
        return min(self.first * 2 ** max(failures_in_a_row - 1, 0), self.longest)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None
    cwd: Path | None
    user: str | None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class StopRequest:
    """SIGINT/SIGTERM set a flag the supervisor reads; a second signal aborts whatever step is
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


class Supervisor:
    def __init__(self, log: Callable[[str], None] = print, *, backoff: Backoff = Backoff(),
                 stop_timeout: float = STOP_TIMEOUT,
                 printable: Callable[[Sequence[str]], str] = " ".join) -> None:
        self.log = log
        self.backoff = backoff
        self.stop_timeout = stop_timeout
        self.printable = printable
        self.children: dict[str, Child] = {}

    # -- the API -----------------------------------------------------------------------------
    def add(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
            cwd: Path | None = None, user: str | None = None) -> Child:
        """Start `argv` now and keep it running. `user` (when the supervisor runs as root) runs
        it as that user and the user's primary group."""
        if name in self.children:
            raise ValueError(f"a child named {name!r} is already supervised")
        child = Child(name, list(argv), dict(env) if env is not None else None, cwd, user)
        self.children[name] = child
        self._spawn(child)
        return child

    def run(self, stop: StopRequest, on_tick: Callable[[], None] | None = None,
            interval: float = POLL_INTERVAL, stop_first: Iterable[str] = ()) -> None:
        """Supervise until `stop` is set, then stop every child (also when this raises): those
        named in `stop_first` (say, the API and workers), then the rest (the servers they use)."""
        try:
            while not stop:
                self.poll()
                if on_tick is not None:
                    on_tick()
                time.sleep(interval)
        finally:
            stop.ignore_further()
            self.stop(stop_first)
            self.stop()

    def poll(self) -> None:
        """One supervision step: notice exits, restart the children whose backoff is over."""
        now = time.monotonic()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is not None:
                self._on_exit(child, now)
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def stop(self, names: Iterable[str] | None = None) -> None:
        """SIGTERM to the process group of each child (or of those named), up to stop_timeout
        for a graceful exit, then SIGKILL; returns once those groups are gone."""
        chosen = [child for child in self.children.values()
                  if names is None or child.name in set(names)]
        for child in chosen:
            child.restart_at = None
        live = [child for child in chosen if child.process is not None]
        if not live:
            return
        self.log(f"stopping {', '.join(child.name for child in live)}")
        for child in live:
            _signal_group(child.process.pid, signal.SIGTERM)
        for child in _wait_for_groups(live, time.monotonic() + self.stop_timeout):
            self.log(f"{child.name} still running after {self.stop_timeout:.0f} s: killing it")
            _signal_group(child.process.pid, signal.SIGKILL)
        for child in live:
            child.process.wait()
            child.process = None
        restarted = {c.name: c.restarts for c in live if c.restarts}
        if restarted:
            self.log("restarts during this run: "
                     + ", ".join(f"{name} {count}" for name, count in restarted.items()))

    # -- internals ---------------------------------------------------------------------------
    def _spawn(self, child: Child) -> None:
        if not Path(child.argv[0]).exists():
            raise SystemExit(f"{child.argv[0]} not found: run `make install`")
        child.process = subprocess.Popen(
            child.argv, cwd=child.cwd, env=child.env, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=preexec_for_this_thread(), **_as_user(child.user))
        child.started_at = time.monotonic()
        child.restart_at = None
        attempt = f" (restart {child.restarts})" if child.restarts else ""
        as_user = f" as {child.user}" if child.user else ""
        self.log(f"started {child.name}{attempt} (pid {child.pid}){as_user}: "
                 f"{self.printable(child.argv)}")

    def _on_exit(self, child: Child, now: float) -> None:
        code = child.process.returncode
        ran = now - child.started_at
        # The leader is gone; what it left in its group (gunicorn or pool workers) goes too, so a
        # restart never runs beside the previous generation.
        _signal_group(child.process.pid, signal.SIGKILL)
        child.process = None
        child.exit_codes.append(code)
        child.failures_in_a_row = 1 if ran >= self.backoff.stable_after else (
            child.failures_in_a_row + 1)
        delay = self.backoff.delay(child.failures_in_a_row)
        child.restart_at = now + delay
        self.log(f"{child.name} exited unexpectedly ({_describe(code)}) after {ran:.1f} s: "
                 f"restart {child.restarts + 1} in {delay:g} s")


def _as_user(user: str | None) -> dict:
    if not user or os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_groups(children: list[Child], deadline: float) -> list[Child]:
    """Wait until every group has exited or the deadline passes; return the ones still alive.
    The leader may be gone while its workers (gunicorn, Celery prefork) are still exiting."""
    while True:
        for child in children:
            child.process.poll()  # reap leaders, so that their group can disappear
        alive = [child for child in children if _group_alive(child.process.pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)
