"""A free TCP port, for the rendezvous of multi-process test runs (torchrun, accelerate launch)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process could take it before it is used, rarely)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
