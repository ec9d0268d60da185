"""Loopback ports and config files for tests and benchmarks that start real servers.

Both ``tests/processes.py`` and the benchmarks in ``bench/`` write TOML configs for
``twistd -n sitesrv`` processes and pick ports for them; they share these helpers.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Mapping
from typing import Any

_choice = random.Random()


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            low, high = (int(word) for word in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1, free a moment ago, outside the
    ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) may be taken by any
    outgoing connection, such as one of a benchmark's own hundreds, before the server
    binds it; one outside the range is only ever taken by a deliberate bind.
    """
    low, high = ephemeral_ports()
    below, above = (10_000, low), (high + 1, 65_536)
    span = below if below[1] - below[0] >= above[1] - above[0] else above
    candidates = list(range(*span))
    _choice.shuffle(candidates)
    picked: list[int] = []
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        picked.append(port)
        if len(picked) == count:
            return picked
    raise RuntimeError(f"fewer than {count} free ports in {span[0]}-{span[1] - 1}")


def free_port() -> int:
    """One port as `free_ports` picks them."""
    return free_ports(1)[0]


def toml_value(value: Any) -> str:
    """A boolean, number or string as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value))


def toml_document(top: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document of top-level keys and tables (keys whose value is None left out)."""
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items() if value is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
