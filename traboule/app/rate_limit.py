"""Refused attempts counted per client address: after too many within a window, that address is refused for a while.

One `LoginLimiter` counts the console's failed logins (`traboule.app.console.auth`), another the HTTP API's refused
requests (a bad bearer token, a client certificate subject not allowed: `traboule.app.http`).
"""

from __future__ import annotations

import time


class LoginLimiter:
    """Failed logins per peer address: after ``failures`` in ``window`` seconds, that peer's logins are refused for
    ``block`` seconds (others go on). Bounded: at most ``peers`` addresses are remembered (the oldest forgotten).

    An attempt counts as failed from its arrival (`attempt`, before its body is read) until it succeeds, so slow
    concurrent bodies cannot all pass the check; at most ``concurrent`` logins are checked at once (`attempt`
    refuses the others until one ends, `done`)."""

    def __init__(
        self, failures: int = 5, window: float = 60.0, block: float = 300.0, peers: int = 10_000, concurrent: int = 8
    ) -> None:
        self.failures, self.window, self.block, self.peers = failures, window, block, peers
        self.concurrent = concurrent
        self.running = 0
        self._failed: dict[str, list[float]] = {}
        self._blocked: dict[str, float] = {}  # peer → until (monotonic)

    def attempt(self, peer: str) -> int:
        """Reserve a login attempt of ``peer`` on its arrival: 0 when it may go on (call `done` when it ends, then
        `succeeded` when the token was right), else the seconds to wait."""
        wait = self.refused_for(peer)
        if wait:
            return wait
        if self.running >= self.concurrent:
            return 1
        self.failed(peer)  # counted now; forgiven by `succeeded`
        self.running += 1
        return 0

    def done(self) -> None:
        self.running -= 1

    def refused_for(self, peer: str) -> int:
        """Seconds left before ``peer`` may try again (0: it may)."""
        until = self._blocked.get(peer, 0.0)
        left = until - time.monotonic()
        if left <= 0:
            self._blocked.pop(peer, None)
            return 0
        return int(left) + 1

    def failed(self, peer: str) -> bool:
        """Count a failed login of ``peer``; True when it is now refused for a while."""
        now = time.monotonic()
        recent = [t for t in self._failed.pop(peer, []) if now - t < self.window] + [now]
        if len(recent) >= self.failures:
            self._blocked[peer] = now + self.block
            while len(self._blocked) > self.peers:
                self._blocked.pop(next(iter(self._blocked)))
            return True
        self._failed[peer] = recent  # re-inserted last: the dict's order is the order of last failure
        while len(self._failed) > self.peers:
            self._failed.pop(next(iter(self._failed)))
        return False

    def succeeded(self, peer: str) -> None:
        self._failed.pop(peer, None)
        self._blocked.pop(peer, None)
