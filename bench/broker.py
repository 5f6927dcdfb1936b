"""`python -m bench.broker`: Celery's publish-to-execute latency and throughput on the two brokers
`make up-cluster` could use, in one run on this machine: a redis-server of its own (noeviction,
append-only file) and the machine's RabbitMQ (a vhost of this run's own, a quorum queue); and
whether queued tasks survive a SIGKILL of the Redis broker (the RabbitMQ service is shared with
other users of the machine: it is not restarted).

A real worker process (`celery -A bench.broker worker`, prefork, 2 processes) runs a task that
records its delay in a private results Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis
from celery import Celery
from kombu import Queue

from stack.redis_server import RedisServer, preexec_for_this_thread

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUEUE = "probe"
RABBIT_ADMIN = "http://127.0.0.1:15672"


def make_app(broker_url: str, quorum: bool) -> Celery:
    app = Celery("broker-probe", broker=broker_url)
    arguments = {"x-queue-type": "quorum"} if quorum else None
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_acks_late=True, worker_prefetch_multiplier=1,
                    task_queues=(Queue(QUEUE, routing_key=QUEUE, queue_arguments=arguments,
                                       durable=True),),
                    task_default_queue=QUEUE, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False)

    @app.task(name="probe.stamp")
    def stamp(sent_at: float, run: str) -> None:
        results = redis.Redis.from_url(os.environ["PROBE_RESULTS_URL"])
        results.rpush(run, time.time() - sent_at)

    return app


# `celery -A bench.broker worker` loads this: the broker comes from the environment.
app = (make_app(os.environ["PROBE_BROKER_URL"], os.environ.get("PROBE_QUORUM") == "1")
       if os.environ.get("PROBE_BROKER_URL") else None)


def start_worker(broker_url: str, quorum: bool, results_url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PROBE_BROKER_URL": broker_url, "PROBE_QUORUM": "1" if quorum else "0",
           "PROBE_RESULTS_URL": results_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    out = open(log, "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "celery"), "-A", "bench.broker", "worker", "-Q", QUEUE,
         "-c", "2", "-P", "prefork", "--without-mingle", "--without-gossip", "-l", "INFO",
         "-n", f"probe-{uuid.uuid4().hex[:6]}@%h"], cwd=PROJECT_ROOT, env=env, stdout=out,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=preexec_for_this_thread())
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"probe worker did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def wait_count(results: redis.Redis, run: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while results.llen(run) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return results.llen(run)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def measure(name: str, broker_url: str, quorum: bool, results: RedisServer, work: Path,
            paced: int, burst: int) -> dict:
    client = redis.Redis.from_url(results.url)
    sender = make_app(broker_url, quorum)
    worker = start_worker(broker_url, quorum, results.url, work / f"{name}.log")
    try:
        run = f"{name}-paced"
        for _ in range(paced):
            sender.send_task("probe.stamp", args=[time.time(), run], queue=QUEUE)
            time.sleep(0.02)
        wait_count(client, run, paced, 60)
        latencies = [float(v) for v in client.lrange(run, 0, -1)]
        run = f"{name}-burst"
        started = time.time()
        for _ in range(burst):
            sender.send_task("probe.stamp", args=[time.time(), run], queue=QUEUE)
        published = time.time() - started
        done = wait_count(client, run, burst, 120)
        elapsed = time.time() - started
    finally:
        stop(worker)
        sender.pool.force_close_all()
    return {"paced_samples": len(latencies), "latency_p50_ms": pct(latencies, 0.5),
            "latency_p99_ms": pct(latencies, 0.99), "burst": burst, "burst_done": done,
            "publish_per_s": round(burst / published), "execute_per_s": round(done / elapsed)}


def redis_restart(results: RedisServer, work: Path, count: int = 200) -> dict:
    """Queue `count` tasks with no worker, SIGKILL the broker more than a second later (the
    append-only file is synced every second), start it again, then a worker: how many ran."""
    broker = RedisServer.start(maxmemory_policy="noeviction",
                               extra_args=("--appendonly", "yes", "--appendfsync", "everysec"))
    try:
        sender = make_app(broker.url, False)
        run = "redis-restart"
        for _ in range(count):
            sender.send_task("probe.stamp", args=[time.time(), run], queue=QUEUE)
        sender.pool.force_close_all()
        time.sleep(1.5)
        broker.kill()
        broker.restart()
        worker = start_worker(broker.url, False, results.url, work / "restart.log")
        try:
            ran = wait_count(redis.Redis.from_url(results.url), run, count, 60)
        finally:
            stop(worker)
        return {"queued": count, "ran_after_sigkill_and_restart": ran}
    finally:
        broker.stop()


def rabbit_vhost(name: str, create: bool) -> None:
    command = ["rabbitmqctl", "add_vhost" if create else "delete_vhost", name]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    if create:
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--paced", type=int, default=200)
    parser.add_argument("--burst", type=int, default=2000)
    args = parser.parse_args(argv)
    work = Path(PROJECT_ROOT / "var" / "bench-broker")
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    with RedisServer.start(maxmemory_policy="noeviction") as results:
        broker = RedisServer.start(maxmemory_policy="noeviction",
                                   extra_args=("--appendonly", "yes", "--appendfsync", "everysec"))
        try:
            out["redis"] = measure("redis", broker.url, False, results, work, args.paced,
                                   args.burst)
        finally:
            broker.stop()
        vhost = f"taskcache-probe-{uuid.uuid4().hex[:8]}"
        rabbit_vhost(vhost, True)
        try:
            out["rabbitmq_quorum"] = measure("rabbitmq", f"amqp://guest:guest@127.0.0.1:5672/"
                                             f"{vhost}", True, results, work, args.paced,
                                             args.burst)
        finally:
            rabbit_vhost(vhost, False)
        out["redis_restart"] = redis_restart(results, work)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
