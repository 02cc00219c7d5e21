"""Small helpers shared by tests that start servers or launchers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A local port nothing listens on now (a fixed one fails while an earlier run's socket lingers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
