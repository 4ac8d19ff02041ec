"""TCP ports for the servers the tests start, one allocator for every test module and peer fixture.

Ports come from below the kernel's ephemeral range (where outgoing connections take their local ports, and where
"bind to port 0" picks), each pytest-xdist worker from a slice of its own, handed out in turn: a port handed out
to one server is neither taken by another worker's server nor by a client connection before that server binds it.
"""

from __future__ import annotations

import os
import random
import socket
import threading

LOW, HIGH = 10_000, 32_000  # below Linux's default ephemeral range (32768-60999)
SLICES = 8  # workers the range is split for (a worker beyond gets the slice of its number modulo this)
HOST = "127.0.0.1"

_lock = threading.Lock()
_next: int | None = None


def _slice() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % SLICES if worker.isdigit() else 0
    size = (HIGH - LOW) // SLICES
    return LOW + index * size, LOW + (index + 1) * size


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_run(count: int = 1) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 now (an engine's child processes serve HTTP on the
    ports after its main one)."""
    global _next
    low, high = _slice()
    with _lock:
        if _next is None:  # a random start: two test runs on one machine seldom meet
            _next = random.randrange(low, high)
        for _ in range(high - low):
            port = _next
            _next = port + count if port + count < high else low
            if port + count > high:
                continue
            if all(_bindable(p) for p in range(port, port + count)):
                return port
    raise RuntimeError(f"no {count} free consecutive ports in {low}-{high}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    return free_port_run(1)
