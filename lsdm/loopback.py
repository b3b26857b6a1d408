"""A free TCP port on 127.0.0.1, for the local processes a site (its SuperNode's app port) and a
coordinator (the SuperLink's control port, the demo's address) start.

Here because ``node`` and ``server`` may both import ``lsdm`` and neither may import the other.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port no process listens on now (another process may take it before the caller does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
