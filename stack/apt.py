"""Tools the project runs outside Python (nginx, wrk), installed from Debian's packages by the
project itself when missing, as root; another process may hold the dpkg lock: apt waits for it."""

from __future__ import annotations

import os
import shutil
import subprocess

SBIN_DIRS = ("/usr/sbin", "/sbin")  # nginx lives here, and a non-login PATH may lack it


class ToolMissing(RuntimeError):
    pass


def find_tool(binary: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(binary, path=path)


def ensure_tool(binary: str, package: str, log=print) -> str:
    """The path of `binary`, installing Debian's `package` first when it is missing."""
    found = find_tool(binary)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolMissing(f"{binary} is not installed and this is not root: install it with "
                          f"`sudo apt-get install {package}` (Debian/Ubuntu), then run again")
    log(f"{binary} not found: installing Debian's package {package} (apt-get update; install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = ["-o", "DPkg::Lock::Timeout=600"]
    for command in (["apt-get", *lock_wait, "update", "-qq"],
                    ["apt-get", *lock_wait, "install", "-y", "-qq", "--no-install-recommends",
                     package]):
        result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ToolMissing(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    found = find_tool(binary)
    if not found:
        raise ToolMissing(f"apt-get installed {package} but {binary} is not on PATH")
    return found
