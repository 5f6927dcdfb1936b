"""Measurements made from Python beside the load: metrics deltas, stats freshness, a write burst,
and what a cached entry costs in Redis."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import statistics
import threading
import time
from collections import defaultdict
from urllib.parse import urlsplit

import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families

from aggregates import PROJECT_STATS
from bench.cpu import one_write
from cache import codec


class Client:
    """One keep-alive HTTP connection (http.client: no dependency, little overhead)."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 30.0) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict | None = None) -> tuple[int, dict | str | None, dict]:
        hdrs = {**self.headers, **(headers or {})}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            hdrs["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout)
                if attempt == 2:
                    raise
        ctype = resp.getheader("Content-Type", "")
        payload = orjson.loads(raw) if raw and "json" in ctype else raw.decode(errors="replace")
        return resp.status, payload, dict(resp.getheaders())

    def get(self, path: str) -> tuple[int, object, dict]:
        return self.request("GET", path)

    def close(self) -> None:
        self.conn.close()


# -- metrics --------------------------------------------------------------------------------------
def scrape(base: str) -> dict[tuple, float]:
    """Every sample of a Prometheus endpoint ({} when it does not answer)."""
    client = Client(base, timeout=10)
    try:
        status, text, _ = client.get("/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        client.close()
    if status != 200:
        return {}
    found: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text if isinstance(text, str) else ""):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def delta(before: dict, after: dict, name: str) -> dict[tuple, float]:
    out = {}
    for key, value in after.items():
        if key[0] == name:
            d = value - before.get(key, 0.0)
            if d:
                out[key[1]] = d
    return out


def hit_rates(before: dict, after: dict) -> dict:
    """Hits and misses per layer and per entity type over the interval, from /metrics."""
    hits, misses = delta(before, after, "cache_hits_total"), delta(before, after,
                                                                    "cache_misses_total")
    layers: dict[str, dict] = defaultdict(lambda: {"hits": 0, "misses": 0, "families": {}})
    for source, kind in ((hits, "hits"), (misses, "misses")):
        for labels, value in source.items():
            lab = dict(labels)
            layer = layers[lab.get("cache_layer", "?")]
            layer[kind] += int(value)
            fam = layer["families"].setdefault(lab.get("entity_type", "?"),
                                               {"hits": 0, "misses": 0})
            fam[kind] += int(value)
    # A lookup missed by the process's own copies (l1) goes on to Redis: only Redis' misses are
    # reads the caches could not serve.
    total_h = sum(v["hits"] for v in layers.values())
    total_m = layers["redis"]["misses"] if "redis" in layers else 0
    families: dict[str, dict] = defaultdict(lambda: {"hits": 0, "misses": 0})
    for name, layer in layers.items():
        for family, counts in layer["families"].items():
            families[family]["hits"] += counts["hits"]
            if name == "redis":
                families[family]["misses"] += counts["misses"]

    def rate(h: int, m: int) -> float | None:
        return round(h / (h + m), 5) if h + m else None

    result = {"overall": {"hits": total_h, "misses": total_m, "hit_rate": rate(total_h, total_m),
                          "families": {f: {**v, "hit_rate": rate(v["hits"], v["misses"])}
                                       for f, v in sorted(families.items())}}}
    for name, layer in sorted(layers.items()):
        result[name] = {"hits": layer["hits"], "misses": layer["misses"],
                        "hit_rate": rate(layer["hits"], layer["misses"]),
                        "families": {f: {**v, "hit_rate": rate(v["hits"], v["misses"])}
                                     for f, v in sorted(layer["families"].items())}}
    return result


def summed(before: dict, after: dict, name: str, by: str | None = None,
           where: dict | None = None) -> dict | float:
    """The increase of a counter between two scrapes, summed (or per value of label `by`),
    over the series whose labels match `where`."""
    d = delta(before, after, name)
    if where:
        d = {labels: v for labels, v in d.items()
             if all(dict(labels).get(k) == want for k, want in where.items())}
    if by is None:
        return sum(d.values())
    out: dict[str, float] = defaultdict(float)
    for labels, value in d.items():
        out[dict(labels).get(by, "?")] += value
    return dict(out)


class RedisCommands:
    """Commands the benchmark's redis-server ran during measurements (INFO commandstats), so a
    write's Redis traffic can be told from its reads'."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runs: dict[str, dict[str, int]] = {}

    def _calls(self) -> dict[str, int]:
        client = redis.Redis.from_url(self.url)
        try:
            return {name.removeprefix("cmdstat_"): stats["calls"]
                    for name, stats in client.info("commandstats").items()}
        finally:
            client.close()

    @contextlib.contextmanager
    def counting(self, run: str):
        before = self._calls()
        yield
        after = self._calls()
        self.runs[run] = {name: n - before.get(name, 0) for name, n in after.items()
                          if n > before.get(name, 0)}

    def per_request(self, run: str, requests: int) -> dict[str, float]:
        calls = self.runs.get(run, {})
        return {name: round(n / requests, 1) for name, n in
                sorted(calls.items(), key=lambda kv: -kv[1]) if requests and n / requests >= 0.1}

    def per_write(self, mixed_requests: int, reads_requests: int,
                  share: float) -> dict[str, float]:
        """Each command's calls per write: the mixed run's per request less its reads' (the
        reads-only run's), over the write share; the largest first."""
        mixed, reads = self.runs.get("mixed", {}), self.runs.get("reads_only", {})
        if not (mixed_requests and reads_requests and share):
            return {}
        out = {name: one_write(mixed.get(name, 0) / mixed_requests,
                               reads.get(name, 0) / reads_requests, share)
               for name in set(mixed) | set(reads)}
        return {name: round(v, 1) for name, v in sorted(out.items(), key=lambda kv: -kv[1])
                if abs(v) >= 0.1}


# -- freshness ------------------------------------------------------------------------------------
class FreshnessProbe(threading.Thread):
    """Flips one task of a project nobody else writes between TODO and COMPLETED and polls the
    project's stats until the change shows. Latency from sending the write (an upper bound of
    commit-to-visible: the commit happens after the send) and from its acknowledgement."""

    def __init__(self, base: str, token: str, project_id: str, task_id: str, *,
                 count: int, interval: float, timeout: float = 10.0) -> None:
        super().__init__(name="freshness-probe", daemon=True)
        self.base, self.token = base, token
        self.project_id, self.task_id = project_id, task_id
        self.count, self.interval, self.timeout = count, interval, timeout
        self.from_send: list[float] = []
        self.from_ack: list[float] = []
        self.answered: list[float] = []  # the write's own latency: sent to answered
        self.polls: list[int] = []
        self.timeouts = 0
        self.errors: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        client = Client(self.base, self.token)
        try:
            status, task, _ = client.get(f"/api/tasks/{self.task_id}")
            if status != 200:
                self.errors.append(f"GET task: {status}")
                return
            current = task["status"]
            for _ in range(self.count):
                if self.stop_flag.is_set():
                    break
                self._one(client, current)
                current = "TODO" if current == "COMPLETED" else "COMPLETED"
                time.sleep(self.interval)
        except Exception as exc:  # reported, never fatal to the benchmark
            self.errors.append(repr(exc))
        finally:
            client.close()

    def _completed(self, client: Client) -> int:
        status, stats, _ = client.get(f"/api/projects/{self.project_id}/stats")
        if status != 200:
            raise RuntimeError(f"stats: {status} {stats}")
        return stats["completed_tasks"]

    def _one(self, client: Client, current: str) -> None:
        before = self._completed(client)
        target = "TODO" if current == "COMPLETED" else "COMPLETED"
        expected = before + (1 if target == "COMPLETED" else -1)
        sent = time.perf_counter()
        status, body, _ = client.request("PATCH", f"/api/tasks/{self.task_id}",
                                         {"status": target})
        acked = time.perf_counter()
        if status != 200:
            self.errors.append(f"PATCH: {status} {body}")
            return
        polls = 0
        while True:
            polls += 1
            seen = self._completed(client)
            now = time.perf_counter()
            if seen == expected:
                self.from_send.append(now - sent)
                self.from_ack.append(now - acked)
                self.answered.append(acked - sent)
                self.polls.append(polls)
                return
            if now - sent > self.timeout:
                self.timeouts += 1
                return
            time.sleep(0.002)

    def report(self) -> dict:
        pct = _percentile_ms
        return {"samples": len(self.from_send), "timeouts": self.timeouts,
                "p50_ms": pct(self.from_send, 0.50), "p99_ms": pct(self.from_send, 0.99),
                "max_ms": pct(self.from_send, 1.0),
                "from_ack_p50_ms": pct(self.from_ack, 0.50),
                "from_ack_p99_ms": pct(self.from_ack, 0.99),
                "answer_p50_ms": pct(self.answered, 0.50),
                "answer_p99_ms": pct(self.answered, 0.99),
                "first_poll_share": round(sum(1 for p in self.polls if p == 1)
                                          / len(self.polls), 3) if self.polls else None,
                "errors": self.errors[:5]}


class AnswerProbe(threading.Thread):
    """One request at a time, `interval` apart, until stopped: each one's latency, sent to
    answered. On the naive app a promised write's answer comes after its bump, so this is the
    floor of the freshness probe's measure (sent to visible) under the same load."""

    def __init__(self, base: str, path: str, *, interval: float) -> None:
        super().__init__(name="answer-probe", daemon=True)
        self.base, self.path, self.interval = base, path, interval
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        client = Client(self.base)
        try:
            while not self.stop_flag.wait(self.interval):
                sent = time.perf_counter()
                status, body, _ = client.get(self.path)
                if status != 200:
                    self.errors.append(f"{self.path}: {status} {body}")
                    continue
                self.latencies.append(time.perf_counter() - sent)
        except Exception as exc:  # reported, never fatal to the benchmark
            self.errors.append(repr(exc))
        finally:
            client.close()

    def report(self) -> dict:
        return {"samples": len(self.latencies), "p50_ms": _percentile_ms(self.latencies, 0.50),
                "p99_ms": _percentile_ms(self.latencies, 0.99), "errors": self.errors[:5]}


def _percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


# -- a burst of writes ----------------------------------------------------------------------------
def run_in_threads(target, count: int) -> float:
    """Run `target` in `count` threads at once; the seconds until the last one finished."""
    started = time.perf_counter()
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def write_burst(base: str, token: str, task_ids: list[str], writes: int,
                connections: int = 4) -> dict:
    """`writes` status changes spread over `task_ids`, sent as fast as `connections` allow."""
    statuses = ["TODO", "IN_PROGRESS", "BLOCKED", "COMPLETED"]
    lock = threading.Lock()
    counter = {"next": 0, "ok": 0, "failed": 0}

    def worker() -> None:
        client = Client(base, token)
        try:
            while True:
                with lock:
                    n = counter["next"]
                    if n >= writes:
                        return
                    counter["next"] += 1
                task = task_ids[n % len(task_ids)]
                status, _, _ = client.request("PATCH", f"/api/tasks/{task}",
                                              {"status": statuses[(n // len(task_ids)) % 4]})
                with lock:
                    counter["ok" if status == 200 else "failed"] += 1
        finally:
            client.close()

    seconds = run_in_threads(worker, connections)
    return {"writes": writes, "ok": counter["ok"], "failed": counter["failed"],
            "seconds": round(seconds, 2), "writes_per_s": round(writes / seconds, 1)}


def sweep(base: str, lines: list[tuple[str, str]], connections: int = 8) -> dict:
    """GET every (token, path) once: the warm-up before the mixed workload."""
    lock = threading.Lock()
    state = {"next": 0, "failed": 0}

    def worker() -> None:
        clients: dict[str, Client] = {}
        try:
            while True:
                with lock:
                    n = state["next"]
                    if n >= len(lines):
                        return
                    state["next"] += 1
                token, path = lines[n]
                client = clients.get(token) or clients.setdefault(token, Client(base, token))
                status, _, _ = client.get(path)
                if status != 200:
                    with lock:
                        state["failed"] += 1
        finally:
            for c in clients.values():
                c.close()

    seconds = run_in_threads(worker, connections)
    return {"requests": len(lines), "failed": state["failed"], "seconds": round(seconds, 2)}


# -- flower -----------------------------------------------------------------------------------------
def flower_recomputes(port: int, auth: str, since: float) -> int | None:
    """Recompute tasks Flower saw received since `since` (None when Flower does not answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/api/tasks?limit=100000", headers={
            "Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        tasks = json.loads(resp.read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return sum(1 for t in tasks.values()
               if any(w in (t.get("name") or "") for w in ("recompute", "recount"))
               and (t.get("received") or 0) >= since)


# -- memory per cached entry ------------------------------------------------------------------------
def memory_per_entry(client: redis.Redis, per_family: int = 40) -> dict:
    """MEMORY USAGE of sample keys against the size of the JSON they hold, per key family."""
    samples: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    versions: list[int] = []
    # A measurement after the load, on the benchmark's own private redis-server: no request
    # path scans (the application never does).
    for name in client.scan_iter(count=1000):
        key = name.decode()
        if key.startswith("v:"):
            if len(versions) < per_family:
                versions.append(client.memory_usage(name, samples=0) or 0)
            continue
        if not key.startswith("t:"):
            continue
        # t:{o:<org>:<slice>}:<family>:<ident>, or t:{o:<org>:<slice>}:stats:<kind>:<owner>
        parts = key.partition("}:")[2].split(":")
        family = parts[0]
        if family == "stats":
            family = f"{parts[1]}_stats"
        if len(samples.get(family, ())) >= per_family:
            continue
        kind = client.type(name).decode()
        if kind == "string":
            stored = client.get(name)
            if stored is None:
                continue
            blob = stored.partition(b"|")[2]  # after the version tokens it was stored under
            json_len, stored = len(orjson.dumps(codec.decode(blob))), len(stored)
        elif kind == "hash" and family == "project_stats":
            raw = {k.decode(): v for k, v in client.hgetall(name).items()}
            counts = {f: int(raw.get(f, 0)) for f in PROJECT_STATS.fields}
            presented = PROJECT_STATS.present(parts[2], counts)
            json_len = len(orjson.dumps(presented))
            stored = sum(len(k) + len(v) for k, v in raw.items())
        else:
            continue
        usage = client.memory_usage(name, samples=0) or 0
        samples[family].append((usage, json_len, stored))
    out = {}
    for family, rows in sorted(samples.items()):
        mem = statistics.mean(r[0] for r in rows)
        js = statistics.mean(r[1] for r in rows)
        out[family] = {"keys_sampled": len(rows), "redis_bytes": round(mem),
                       "json_bytes": round(js), "stored_bytes": round(statistics.mean(
                           r[2] for r in rows)), "ratio": round(mem / js, 2) if js else None}
    if versions:
        out["_version_key"] = {"keys_sampled": len(versions),
                               "redis_bytes": round(statistics.mean(versions))}
    return out


# -- staleness (the auditor, run from here) -------------------------------------------------------
class AuditLoop(threading.Thread):
    """The staleness auditor (tasks/audit.py) in rounds until stopped (or `rounds` done): how many
    cached values it compared, found stale (each one retired) or saw in flight."""

    def __init__(self, services, rounds: int | None = None, sample: int = 20,
                 pause: float = 0.5) -> None:
        super().__init__(name="audit-loop", daemon=True)
        self.services, self.rounds, self.sample, self.pause = services, rounds, sample, pause
        self.stop_flag = threading.Event()
        self.done = 0
        self.checked: dict[str, int] = defaultdict(int)
        self.stale: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []

    def run(self) -> None:
        from tasks.audit import audit

        while not self.stop_flag.is_set() and (self.rounds is None or self.done < self.rounds):
            try:
                report = audit(self.services, self.sample)
            except Exception as exc:  # reported, never fatal to the benchmark
                self.errors.append(repr(exc))
                break
            self.done += 1
            for table, found in ((self.checked, report.checked), (self.stale, report.stale),
                                 (self.in_flight, report.in_flight)):
                for family, n in found.items():
                    table[family] += n
            self.stop_flag.wait(self.pause)

    def report(self) -> dict:
        checked, stale = sum(self.checked.values()), sum(self.stale.values())
        return {"rounds": self.done, "checked": checked, "stale": stale,
                "in_flight": sum(self.in_flight.values()),
                "stale_ratio": round(stale / checked, 6) if checked else None,
                "checked_by_family": dict(sorted(self.checked.items())),
                "stale_by_family": dict(sorted(self.stale.items())),
                "in_flight_by_family": dict(sorted(self.in_flight.items())),
                "errors": self.errors[:5]}
