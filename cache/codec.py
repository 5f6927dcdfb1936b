"""Cached values are JSON (never pickle: a poisoned cache must not run code), zlib-compressed above
1 KiB. The first byte says which, so either form can be read back."""

from __future__ import annotations

import zlib
from typing import Any

import orjson

COMPRESS_ABOVE = 1024
_PLAIN = b"j"
_ZLIB = b"z"


def encode(value: Any) -> bytes:
    raw = orjson.dumps(value)
    if len(raw) > COMPRESS_ABOVE:
        return _ZLIB + zlib.compress(raw, 1)
    return _PLAIN + raw


def decode(blob: bytes) -> Any:
    tag, body = blob[:1], blob[1:]
    if tag == _ZLIB:
        return orjson.loads(zlib.decompress(body))
    if tag == _PLAIN:
        return orjson.loads(body)
    raise ValueError(f"unknown cache value encoding {tag!r}")
