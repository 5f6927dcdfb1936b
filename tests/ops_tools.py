"""Binaries the operations tests need from Debian's packages (promtool and prometheus from
`prometheus`, `chromium`), installed when missing as the project's other tools are (we run as root;
another installer may hold the dpkg lock: wait for it)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]


def ensure_binary(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{binary} is missing and cannot be installed here: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([*APT, "update", "-qq"],
                    [*APT, "install", "-y", "-qq", "--no-install-recommends", package]):
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"apt-get installed {package} but {binary} is not on PATH")
    return found
