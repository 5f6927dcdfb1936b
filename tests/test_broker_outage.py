"""The Celery worker and beat, started with `make up`'s own command lines, outlive their broker:
killed while a task is unacknowledged (the worker used to exit with `AttributeError: 'NoneType'
object has no attribute 'hostname'`, see worker/broker_fix.py), and down for a minute."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from celery import Celery

from config import Settings
from db.migrations import upgrade
from stack.redis_server import RedisServer, preexec_for_this_thread
from stack.up import worker_commands
from worker_fixtures import PROJECT_ROOT, CeleryProcess, celery_env, wait_until

pytestmark = pytest.mark.slow
RECOUNT = "tasks.stats.recount"


@pytest.fixture
def servers(tmp_path):
    database = f"sqlite:///{tmp_path / 'outage.db'}"
    upgrade(database)
    with RedisServer.start(extra_args=["--maxmemory", "64mb"]) as cache, \
            RedisServer.start(maxmemory_policy="noeviction") as broker:
        yield database, cache, broker


def start(name: str, servers, tmp_path, **extra) -> CeleryProcess:
    """`make up`'s command for `name` (worker or beat), on these servers."""
    database, cache, broker = servers
    argv = worker_commands(Settings(), "user:password")[name]
    if name == "beat":
        argv[argv.index("--schedule") + 1] = str(tmp_path / "beat-schedule")
    env = celery_env(database, cache.url, broker.url, WORKER_METRICS_PORT=0, **extra)
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=preexec_for_this_thread())
    return CeleryProcess(name, process, log_path, env)


def sender(broker: RedisServer) -> Celery:
    app = Celery("test-sender")
    app.config_from_object("celeryconfig")
    app.conf.broker_url = broker.url
    return app


def recount_started(cache: RedisServer, worker: CeleryProcess, owner: str) -> bool:
    """A slow recount pushes its pid to the cache Redis when it starts (tasks/stats.py)."""
    import redis

    if worker.process.poll() is not None:
        raise AssertionError(f"the worker exited ({worker.process.returncode}):\n"
                             + worker.log()[-4000:])
    try:
        return bool(redis.Redis.from_url(cache.url).llen(f"test:recount-started:{owner}"))
    except redis.ConnectionError:
        return False


def send_recount(app: Celery, owner: str) -> None:
    """Retried until the broker takes it: right after a restart the first publish may fail."""
    def sent():
        try:
            app.send_task(RECOUNT, args=["project", "org", owner], retry=False)
            return True
        except Exception:
            return False
    wait_until(sent, 30, 0.2, "the broker to take a task")


def test_the_worker_outlives_its_broker_dying_while_a_task_is_unacknowledged(servers,
                                                                             tmp_path):
    _, cache, broker = servers
    worker = start("worker", servers, tmp_path, TASKCACHE_TEST_SLOW_RECOUNT=3)
    app = sender(broker)
    try:
        worker.wait_for_log(r"@\S+ ready\.")
        for attempt in range(2):
            busy = f"busy-{attempt}-{uuid.uuid4().hex[:6]}"
            send_recount(app, busy)  # acks_late: unacknowledged while it runs
            wait_until(lambda: recount_started(cache, worker, busy), 60, 0.05,
                       "the slow recount to start")
            broker.kill()
            worker.wait_for_log("(?s)" + "Connection to broker lost.*" * (attempt + 1), 60)
            broker.restart()
            after = f"after-{attempt}-{uuid.uuid4().hex[:6]}"
            send_recount(app, after)
            # The consumer reconnects with backoff (2 s, then longer): a generous deadline.
            wait_until(lambda: recount_started(cache, worker, after), 120, 0.2,
                       "the worker to consume again after the broker came back")
        assert "Unrecoverable error" not in worker.log()
        assert worker.process.poll() is None
    finally:
        worker.stop()


@pytest.mark.faults
def test_the_worker_and_beat_outlive_a_one_minute_broker_outage(servers, tmp_path):
    _, cache, broker = servers
    worker = start("worker", servers, tmp_path, TASKCACHE_TEST_SLOW_RECOUNT=0.1)
    beat = start("beat", servers, tmp_path, OUTBOX_SWEEP_INTERVAL=1, OUTBOX_SWEEP_AGE=1)
    app = sender(broker)
    try:
        worker.wait_for_log(r"@\S+ ready\.")
        worker.wait_for_log(r"Task tasks\.outbox\.sweep\[\S+\] succeeded")  # beat's ticks run
        broker.kill()
        time.sleep(60)  # the fault itself: a minute without a broker, longer than any backoff
        assert worker.process.poll() is None, worker.log()[-4000:]
        assert beat.process.poll() is None, beat.log()[-4000:]
        broker.restart()
        owner = f"after-{uuid.uuid4().hex[:6]}"
        send_recount(app, owner)
        wait_until(lambda: recount_started(cache, worker, owner), 120, 0.2,
                   "the worker to consume again after the outage")
        sweeps_before = worker.log().count("Task tasks.outbox.sweep[")
        wait_until(lambda: worker.log().count("Task tasks.outbox.sweep[") > sweeps_before + 2,
                   120, 0.5, "beat's schedule to reach the worker again")
        assert beat.process.poll() is None and worker.process.poll() is None
        assert "Unrecoverable error" not in worker.log()
    finally:
        beat.stop()
        worker.stop()
