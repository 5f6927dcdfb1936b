"""Debian packages the operations checks need (prometheus, chromium), installed when missing:
as root, waiting for another installer's dpkg lock."""

from __future__ import annotations

import os
import shutil
import subprocess

APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]


class ToolMissing(RuntimeError):
    pass


def ensure_binary(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolMissing(f"{binary} is missing and cannot be installed here: "
                          f"apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([*APT, "update", "-qq"],
                    [*APT, "install", "-y", "-qq", "--no-install-recommends", package]):
        done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            raise ToolMissing(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    found = shutil.which(binary)
    if not found:
        raise ToolMissing(f"apt-get installed {package} but {binary} is not on PATH")
    return found
