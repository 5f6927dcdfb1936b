"""stack/supervisor.py on real (small) processes: restarts with growing backoff, counted and
logged; the others untouched; stop() ends whole process groups."""

from __future__ import annotations

import os
import sys

import pytest

from stack.supervisor import Backoff, Supervisor
from worker_fixtures import wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
# A child that leaves a grandchild in its process group, then waits.
PARENT = [sys.executable, "-c", "import subprocess, sys, time; "
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
          "print(p.pid, flush=True); time.sleep(120)"]


def test_a_failing_child_is_restarted_with_backoff_and_the_others_are_untouched():
    lines: list[str] = []
    supervisor = Supervisor(lines.append, backoff=Backoff(first=0.1, longest=0.4,
                                                          stable_after=60), stop_timeout=5)
    steady = supervisor.add("steady", SLEEPER)
    flaky = supervisor.add("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    family = supervisor.add("family", PARENT)
    steady_pid = steady.pid
    try:
        wait_until(lambda: (supervisor.poll(), flaky.restarts >= 4)[1], 60, 0.02,
                   "four restarts of the failing child")
        exits = [line for line in lines if line.startswith("flaky exited unexpectedly")]
        assert all("(code 3)" in line for line in exits)
        delays = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in exits[:4]]
        assert delays == [0.1, 0.2, 0.4, 0.4]  # doubling, capped
        assert steady.pid == steady_pid and steady.running() and steady.restarts == 0
        grandchild = int(wait_until(lambda: _children(family.pid), 30, 0.05, "the grandchild")[0])
    finally:
        pids = [steady.pid, family.pid]
        supervisor.stop()
    pids.append(grandchild)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
    assert any("restarts during this run: flaky" in line for line in lines)
    assert steady.process is None and family.process is None and flaky.restart_at is None


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return children.read().split()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a child as another user")
def test_a_child_runs_as_the_user_it_was_given():
    import pwd

    nobody = pwd.getpwnam("nobody")
    supervisor = Supervisor(lambda line: None)
    child = supervisor.add("unprivileged", ["/bin/sleep", "60"], user="nobody")
    try:
        with open(f"/proc/{child.pid}/status") as status:
            ids = {line.split(":")[0]: line.split()[1:] for line in status}
        assert ids["Uid"] == [str(nobody.pw_uid)] * 4
        assert ids["Gid"] == [str(nobody.pw_gid)] * 4
        assert ids["Groups"] == []  # root's supplementary groups dropped too
    finally:
        supervisor.stop()
