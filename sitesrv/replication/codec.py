"""Encoding of row batches for the wire: JSON, zlib-compressed from protocol 2 on.

AMP values are limited to 64 KiB, so every encoded batch is checked against
``MAX_VALUE`` and split in two until it fits.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

from sitesrv.replication.commands import ProtocolViolation

#: Largest encoded batch: below AMP's 65,535-byte value limit, with room to spare.
MAX_VALUE = 60_000
#: The most a decoded batch may expand to (protects the site from a zip bomb).
MAX_DECODED = 8 * 1024 * 1024
#: Protocol versions from which batches are compressed.
COMPRESSED_FROM = 2


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def pack(items: Sequence[Any], protocol: int) -> list[bytes]:
    """Encode ``items`` into one or more values, each at most MAX_VALUE bytes."""
    data = _dump(list(items))
    if protocol >= COMPRESSED_FROM:
        data = zlib.compress(data, 6)
    if len(data) <= MAX_VALUE:
        return [data]
    if len(items) <= 1:
        raise ValueError(f"one item encodes to {len(data)} bytes, more than {MAX_VALUE}")
    half = len(items) // 2
    return pack(items[:half], protocol) + pack(items[half:], protocol)


def unpack(value: bytes, protocol: int) -> list[Any]:
    """Decode a value made by ``pack``; ProtocolViolation when it is malformed."""
    try:
        if protocol >= COMPRESSED_FROM:
            inflater = zlib.decompressobj()
            value = inflater.decompress(value, MAX_DECODED)
            if inflater.unconsumed_tail:
                raise ProtocolViolation("batch expands beyond the size limit")
        items = json.loads(value)
    except (zlib.error, ValueError, UnicodeDecodeError) as e:
        raise ProtocolViolation(f"malformed batch: {e}") from None
    if not isinstance(items, list):
        raise ProtocolViolation("malformed batch: not a list")
    return items


def estimate(item: Any) -> int:
    """The uncompressed JSON size of one item (used to size pages before packing)."""
    return len(_dump(item))
