"""The fault suite's short subset (`make faults` runs them all): the stack as `make up` runs it,
under tracked writes and reads, survives a cache Redis restart and ten SIGKILLs of Celery pool
processes with no write lost, no 5xx, no stale read through any API process, stats exact against
the database afterwards and every process running."""

from __future__ import annotations

import os
import shutil

import pytest

from faults.env import Environment
from faults.injections import BY_NAME, Fault, worker_pool_sigkill
from faults.suite import Timing, run_fault

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

SHORT = Timing(warmup=2.0, after=2.0, converge_limit=120.0, writers=2, readers=2)
# The suite's rows, the pool kills fewer times (three instead of ten) to keep `make test` short.
SUBSET = (BY_NAME["cache-restart"],
          Fault("worker-pool-sigkill", "Celery pool processes SIGKILLed x3 during writes",
                lambda ctx: worker_pool_sigkill(ctx, rounds=3)))


def _backends() -> list[str]:
    wanted = os.environ.get("TEST_DATABASES", "sqlite,mariadb")
    return [b.strip() for b in wanted.split(",") if b.strip()]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", _backends())
def test_stack_keeps_every_write_through_cache_restart_and_worker_kills(backend):
    with Environment(backend, log=print) as env:
        stack = env.start_stack(f"pytest-{backend}")
        try:
            rows = [run_fault(env, fault, SHORT, stack=stack) for fault in SUBSET]
        finally:
            orphans = env.stop_stack(stack)
    for row in rows:
        where = f"{row.fault} on {backend}: {row.examples[:3]} {row.problems}"
        assert row.writes_acked > 0, where
        assert row.lost == 0, where
        assert row.status_5xx == 0, where
        assert row.api_processes >= 2 and row.unreached == 0, where
        assert row.verify_reads > 0 and row.stale == 0, where
        assert row.stats_exact, where
        assert row.processes_ok, f"{where}: {row.processes}"
        assert not row.problems, where
    assert orphans == [], f"processes outlived the stack: {orphans}"
