"""Encoding of row batches for the wire: JSON, zlib-compressed from protocol 2 on.

AMP values are limited to 64 KiB, so every encoded batch is checked against
``MAX_VALUE`` and split in two until it fits. Items already encoded as JSON text (the
outbox stores its records so) are packed by ``pack_json`` into the same values without
being decoded and encoded again.
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
#: The compression ratio ``pack_json`` assumes for its first value (JSON records
#: compress 3-10 times; a low guess only makes the first value smaller).
FIRST_RATIO = 3.0
#: The share of the budget the last ratio gives that ``pack_json`` fills.
RATIO_MARGIN = 0.9


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


def pack_json(texts: Sequence[str], protocol: int) -> list[bytes]:
    """What ``pack`` makes of the items these JSON texts encode, from the texts as they
    are: each value is a JSON list of whole texts, at most MAX_VALUE bytes.

    Compressed values are cut by their uncompressed size, using the ratio the previous
    value achieved, so each is compressed once (again, with fewer texts, in the rare case
    it came out too large); ``pack`` compresses the whole batch, then each half, and so
    on until each fits.
    """
    compressed = protocol >= COMPRESSED_FROM
    if not texts:
        return pack([], protocol)
    values: list[bytes] = []
    # Characters of JSON text per value (texts are ASCII as the outbox writes them).
    budget = int(MAX_VALUE * FIRST_RATIO * RATIO_MARGIN) if compressed else MAX_VALUE
    start = 0
    while start < len(texts):
        end, size = start + 1, len(texts[start]) + 2
        while end < len(texts) and size + len(texts[end]) + 1 <= budget:
            size += len(texts[end]) + 1
            end += 1
        data = ("[" + ",".join(texts[start:end]) + "]").encode("utf-8")
        if compressed:
            raw = len(data)
            data = zlib.compress(data, 6)
            # (Never more than the receiver decodes: a very compressible value could.)
            budget = min(int(MAX_VALUE * raw / len(data) * RATIO_MARGIN), MAX_DECODED // 2)
        if len(data) > MAX_VALUE:
            if end - start == 1:
                raise ValueError(f"one item encodes to {len(data)} bytes, more than {MAX_VALUE}")
            # Again with fewer texts: a budget below what this value held.
            budget = min(budget, int(size * MAX_VALUE / len(data) * RATIO_MARGIN))
            continue
        values.append(data)
        start = end
    return values


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
