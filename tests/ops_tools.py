"""The operations tests' binaries (ops/tools.py installs them from Debian's packages)."""

from __future__ import annotations

import pytest

from ops.tools import ToolMissing
from ops.tools import ensure_binary as _ensure


def ensure_binary(binary: str, package: str) -> str:
    try:
        return _ensure(binary, package)
    except ToolMissing as exc:
        pytest.fail(str(exc))
