"""A real RabbitMQ broker for the tests: one temporary node per session, started only when a test asks for it.

The node is isolated from any system broker: its own HOME (Erlang cookie), its own epmd on loopback (otherwise
erl daemonises one on 0.0.0.0 that outlives the broker), free loopback ports, and all state in a temp dir.
See ../shared/PEERS.md section 1a for why each setting is needed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ports


def server_log_tail(base: Path, lines: int = 40) -> str:
    """The last lines of a node's console output and log (for a start-up failure's message)."""
    chunks = []
    for path in (base / "server.out", base / "log" / "rabbit.log"):
        if path.exists():
            chunks.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(chunks)


RABBITMQ_BIN = Path(os.environ.get("TRABOULE_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
STARTUP_TIMEOUT = 60.0  # seconds; a normal boot takes 6-8 s on 2 cores, slow CI machines need headroom
STOP_TIMEOUT = 20.0


_free_port = ports.free_port  # one allocator for every test (tests/ports.py)


def _epmd_binary() -> str | None:
    found = shutil.which("epmd") or next(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), None)
    return str(found) if found else None


@dataclass
class RabbitMQNode:
    """A running temporary broker and the processes that must be stopped with it."""

    base: Path
    amqp_port: int
    env: dict[str, str]
    epmd: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl`` against this node (same HOME/cookie, epmd port and node name)."""
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log_tail(self, lines: int = 40) -> str:
        return server_log_tail(self.base, lines)

    def start(self) -> None:
        out = (self.base / "server.out").open("wb")
        # A new session puts the sh wrapper, erl and its helpers (erl_child_setup, inet_gethost) in one
        # process group that we own, so a last-resort kill cannot reach anything we did not start.
        self.server = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        # `wait <pidfile>` returns once the node runs, `await_startup` once the rabbit app (and AMQP) is up;
        # the AMQP port opens late in the boot, so polling it alone would race.
        for args in (("wait", str(self.base / "rabbit.pid")), ("await_startup",)):
            while True:
                if self.server.poll() is not None:
                    raise RuntimeError(f"rabbitmq-server exited with {self.server.returncode}\n{self.log_tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"rabbitmq-server not ready after {STARTUP_TIMEOUT} s\n{self.log_tail()}")
                try:
                    result = self.ctl(*args, "--timeout", str(int(remaining) + 1), timeout=remaining + 5)
                except subprocess.TimeoutExpired:
                    continue
                if result.returncode == 0:
                    break
                time.sleep(0.2)  # e.g. the pid file is not written yet: retry until the deadline

    def stop(self) -> None:
        """Graceful stop (SIGTERM to the sh wrapper, which stops erl), then make sure nothing is left."""
        if self.server is not None:
            _terminate_group(self.server, graceful=signal.SIGTERM)
        _terminate_group(self.epmd, graceful=signal.SIGTERM)


def _terminate_group(proc: subprocess.Popen[bytes], *, graceful: signal.Signals) -> None:
    """Stop ``proc`` (a session leader we started) and then any survivor of its process group."""
    pgid = proc.pid  # start_new_session=True: the process group id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(graceful)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    # beam.smp and its helpers may outlive the sh wrapper if it was killed: clean up the group we own.
    deadline = time.monotonic() + 5
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.1)


def _node_env(base: Path, amqp_port: int, dist_port: int, epmd_port: int) -> dict[str, str]:
    erl_args = "-kernel inet_dist_use_interface {127,0,0,1}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"}
    env.update(
        HOME=str(base),  # the Erlang cookie lives here; broker and rabbitmqctl must share it
        RABBITMQ_NODENAME=f"traboule-test-{os.getpid()}@localhost",
        RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),  # skip /etc/rabbitmq/rabbitmq-env.conf
        RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_LOGS=str(base / "log" / "rabbit.log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(base / "rabbit.pid"),
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(amqp_port),
        RABBITMQ_DIST_PORT=str(dist_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        ERL_EPMD_PORT=str(epmd_port),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=erl_args,
        RABBITMQ_CTL_ERL_ARGS=erl_args,
    )
    return env


@contextlib.contextmanager
def run_rabbitmq(base: Path) -> Iterator[RabbitMQNode]:
    """Start a temporary broker under ``base`` and stop every process of it on exit (also on errors)."""
    epmd_bin = _epmd_binary()
    if not (RABBITMQ_BIN / "rabbitmq-server").exists() or epmd_bin is None:
        pytest.skip(f"rabbitmq-server/epmd not found in {RABBITMQ_BIN} (apt install rabbitmq-server)")
    amqp_port, dist_port, epmd_port = _free_port(), _free_port(), _free_port()
    (base / "log").mkdir(parents=True, exist_ok=True)
    (base / "rabbitmq-env.conf").write_text("")
    (base / "enabled_plugins").write_text("[].\n")
    # management.* keys would make boot fail without the plugin, so only the listener is configured.
    (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n")
    env = _node_env(base, amqp_port, dist_port, epmd_port)
    # Our own foreground epmd, started first, so erl registers with it instead of daemonising a global one.
    epmd = subprocess.Popen(
        [epmd_bin, "-address", "127.0.0.1", "-port", str(epmd_port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    node = RabbitMQNode(base=base, amqp_port=amqp_port, env=env, epmd=epmd)
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQNode]:
    """The session's broker (started on first use only: 6-8 s)."""
    with run_rabbitmq(tmp_path_factory.mktemp("rabbitmq")) as node:
        yield node


@pytest.fixture(scope="session")
def rabbitmq_url(rabbitmq_node: RabbitMQNode) -> str:
    """``amqp://guest:guest@127.0.0.1:PORT/`` of the session's temporary broker."""
    return rabbitmq_node.url


@pytest.fixture
def rabbitmq_exchange() -> str:
    """A fresh exchange name per test, so that tests sharing the broker never see each other's messages."""
    return unique_name("traboule-test")


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix (exchange and queue names are global on the broker's vhost)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
