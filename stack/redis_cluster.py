"""A private Redis Cluster: N masters with M replicas each, from `redis-server` processes on free
ports, owned by whoever starts it.

The nodes are plain `RedisServer`s started with cluster mode on (no persistence, each in its own
directory, its bus on a free port of its own). The cluster is formed with CLUSTER ADDSLOTSRANGE,
MEET and REPLICATE (no `redis-cli --cluster` needed), and `start()` returns once every node says
`cluster_state:ok` and every replica is in sync. Tests use `kill_master_of()` to crash a shard's
master and `wait_for_failover()` to see its replica promoted; `make up-cluster` uses it when no
cluster answers at REDIS_CLUSTER_URL.

    python -m stack.redis_cluster [--masters 3] [--replicas 1]   # prints the URL, runs until ^C
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import redis

from stack.redis_server import RedisServer, RedisServerFailed, _one_try_client, free_port

SLOTS = 16384
READY_TIMEOUT = 30.0
# Small enough that a test's failover takes a few seconds; production keeps Redis's 15 s.
NODE_TIMEOUT_MS = 2000


class RedisClusterFailed(RuntimeError):
    """The nodes did not form a healthy cluster in time."""


@dataclass
class ClusterNode:
    server: RedisServer
    bus_port: int
    node_id: str = ""

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return _one_try_client(self.server.url, timeout)

    def ask(self, *command, timeout: float = 1.0):
        client = self.client(timeout)
        try:
            return client.execute_command(*command)
        finally:
            client.close()


def parse_cluster_url(url: str) -> list[tuple[str, int]]:
    """`redis://h1:p1,redis://h2:p2` or `h1:p1,h2:p2` (REDIS_CLUSTER_URL): the seed nodes."""
    seeds = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        address = part.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0]
        host, _, port = address.rpartition(":")
        seeds.append((host or "127.0.0.1", int(port or 6379)))
    if not seeds:
        raise ValueError(f"no seed node in cluster URL {url!r}")
    return seeds


def cluster_answers(url: str, timeout: float = 0.5) -> bool:
    """True when a seed node of `url` answers with `cluster_state:ok` (one try each)."""
    for host, port in parse_cluster_url(url):
        client = _one_try_client(f"redis://{host}:{port}/0", timeout)
        try:
            if client.cluster("info").get("cluster_state") == "ok":
                return True
        except (redis.RedisError, OSError):
            continue
        finally:
            client.close()
    return False


def _start_node(node_timeout_ms: int, extra_args: Iterable[str]) -> ClusterNode:
    """A cluster-enabled server; its bus port is picked free too (port + 10000 may be taken, or
    above 65535), so a failed start retries with both ports new."""
    for attempt in (1, 2, 3):
        bus_port = free_port()
        try:
            return ClusterNode(RedisServer.start(extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus_port),
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica may always take over, however long its link was down: a cache would
                # rather serve a slightly older replica than refuse the shard.
                "--cluster-replica-validity-factor", "0",
                # The other shards keep answering while one has no master.
                "--cluster-require-full-coverage", "no",
                # A replica's first sync streams at once instead of waiting 5 s for company.
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                *extra_args,
            ]), bus_port)
        except RedisServerFailed:
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


class RedisCluster:
    """A running cluster of private nodes. `stop()` (or the context manager) stops them all."""

    def __init__(self, masters: list[ClusterNode], replicas: list[ClusterNode]):
        self.masters = masters
        self.replicas = replicas

    @classmethod
    def start(cls, masters: int = 3, replicas: int = 1, *,
              node_timeout_ms: int = NODE_TIMEOUT_MS, extra_args: Iterable[str] = ()) -> "RedisCluster":
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master and no negative replicas")
        extra = tuple(extra_args)
        nodes: list[ClusterNode] = []
        try:
            for _ in range(masters * (1 + replicas)):
                nodes.append(_start_node(node_timeout_ms, extra))
            cluster = cls(nodes[:masters], nodes[masters:])
            cluster._form(replicas)
            return cluster
        except BaseException:
            for node in nodes:
                node.server.stop()
            raise

    # -- addresses -------------------------------------------------------------------------
    @property
    def nodes(self) -> list[ClusterNode]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        """REDIS_CLUSTER_URL: every node as a seed, so a client starts even with one down."""
        return ",".join(f"redis://{node.address}" for node in self.nodes)

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def __enter__(self) -> "RedisCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisCluster {len(self.masters)} masters {len(self.replicas)} replicas {self.url}>"

    def _form(self, replicas: int) -> None:
        for node in self.nodes:
            node.node_id = node.ask("CLUSTER", "MYID").decode()
        per_master = SLOTS // len(self.masters)
        for i, master in enumerate(self.masters):
            first = i * per_master
            last = SLOTS - 1 if i == len(self.masters) - 1 else first + per_master - 1
            master.ask("CLUSTER", "ADDSLOTSRANGE", first, last)
        seed = self.masters[0]
        for node in self.nodes[1:]:
            seed.ask("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        self._wait("every node knows every other", self._all_nodes_known)
        for j, replica in enumerate(self.replicas):
            master = self.masters[j // replicas]
            replica.ask("CLUSTER", "REPLICATE", master.node_id)
        self._wait("cluster_state:ok on every node, replicas in sync", self.is_healthy)

    def _wait(self, what: str, condition, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (redis.RedisError, OSError, RedisClusterFailed):
                pass
            time.sleep(0.1)
        raise RedisClusterFailed(f"Redis Cluster not ready within {timeout:.0f} s: {what}")

    def _all_nodes_known(self) -> bool:
        expected = len(self.nodes)
        for node in self.nodes:
            lines = node.ask("CLUSTER", "NODES").decode().strip().splitlines()
            if len(lines) != expected or any("handshake" in line for line in lines):
                return False
        return True

    def current_masters(self) -> list[ClusterNode]:
        """The running nodes that are masters now (a failover swaps a master and its replica)."""
        return [node for node in self.running_nodes()
                if node.client().info("replication").get("role") == "master"]

    def flushall(self) -> None:
        """Empty every running master (their replicas follow)."""
        for node in self.current_masters():
            node.ask("FLUSHALL")

    # -- health and failover -----------------------------------------------------------------
    def running_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.server.is_running()]

    def is_healthy(self) -> bool:
        """Every running node sees `cluster_state:ok` and every slot served by a master whose
        replicas (the running ones) are linked to it."""
        for node in self.running_nodes():
            info = node.ask("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info or f"cluster_slots_ok:{SLOTS}" not in info:
                return False
        for node in self.running_nodes():
            replication = node.client().info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def master_of(self, key: str) -> ClusterNode:
        """The running node that serves `key`'s slot as master now."""
        any_node = self.running_nodes()[0]
        slot = int(any_node.ask("CLUSTER", "KEYSLOT", key))
        for node in self.running_nodes():
            replication = node.client().info("replication")
            if replication.get("role") != "master":
                continue
            for first, last in self._slot_ranges(node):
                if first <= slot <= last:
                    return node
        raise RedisClusterFailed(f"no running master serves slot {slot} of {key!r}")

    def _slot_ranges(self, node: ClusterNode) -> list[tuple[int, int]]:
        for line in node.ask("CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if "myself" not in fields[2]:
                continue
            ranges = []
            for part in fields[8:]:
                if part.startswith("["):  # a slot being migrated
                    continue
                first, _, last = part.partition("-")
                ranges.append((int(first), int(last or first)))
            return ranges
        return []

    def kill_master_of(self, key: str) -> ClusterNode:
        """SIGKILL the master serving `key` (a crash); returns it."""
        master = self.master_of(key)
        master.server.kill()
        return master

    def wait_for_failover(self, key: str, dead: ClusterNode, timeout: float = READY_TIMEOUT) -> ClusterNode:
        """Wait until a replica has taken over `dead`'s slots and every running node sees
        `cluster_state:ok` again; returns the new master of `key`."""
        def promoted() -> bool:
            return self.master_of(key) is not dead and self.is_healthy()
        self._wait(f"a replica takes over from {dead.address}", promoted, timeout)
        return self.master_of(key)

    def rejoin(self, node: ClusterNode) -> None:
        """Bring a killed node back (empty, on the same port with its nodes.conf): the cluster
        has promoted its replica meanwhile, so it comes back as that replica's replica."""
        node.server.restart()
        self._wait(f"{node.address} rejoins as a replica",
                   lambda: node.client().info("replication").get("role") == "slave"
                   and self.is_healthy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stack.redis_cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the context manager stops every node.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with RedisCluster.start(args.masters, args.replicas) as cluster:
        print(f"REDIS_CLUSTER_URL={cluster.url}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
