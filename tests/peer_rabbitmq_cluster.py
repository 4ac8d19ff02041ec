"""A real three-node RabbitMQ cluster for the tests: started once per session, only when a test asks for it.

Each node has its own node name, AMQP and distribution ports and state directory under one temp dir; they share
one HOME (the Erlang cookie) and one epmd on loopback, on a port of their own, so that neither a system broker nor
the single-node fixture of ``tests.peer_rabbitmq`` (its own epmd port) is disturbed. The first node boots alone;
the two others boot together and join it through classic-config peer discovery
(``cluster_formation.classic_config.nodes``), which a node applies on its first boot only: a node killed and
started again rejoins from its own state. Every node runs the ``rabbitmq_consistent_hash_exchange`` plugin (the
bus's partitions). A test may ``kill(i)`` a node (SIGKILL, as a crash) and ``start(i)`` it again; every process
is stopped by PID (process group) at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peer_rabbitmq import (
    RABBITMQ_BIN,
    STARTUP_TIMEOUT,
    _epmd_binary,
    _free_port,
    _node_env,
    _terminate_group,
    server_log_tail,
)

SIZE = 3
PLUGINS = ("rabbitmq_consistent_hash_exchange",)  # shipped with RabbitMQ; enabled on every node from its first boot


@dataclass
class ClusterNode:
    """One node of the cluster: its ports, environment and (while running) its ``rabbitmq-server`` process."""

    index: int
    base: Path
    name: str
    amqp_port: int
    env: dict[str, str]
    server: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.poll() is None

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl`` against this node (shared cookie and epmd)."""
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log_tail(self, lines: int = 40) -> str:
        return server_log_tail(self.base, lines)

    def spawn(self) -> None:
        """Start ``rabbitmq-server`` in a new session (a process group we own), not waiting for it."""
        (self.base / "rabbit.pid").unlink(missing_ok=True)  # a killed node's stale pid file would fool `wait`
        with (self.base / "server.out").open("ab") as out:
            self.server = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env,
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        """Until the node runs and its rabbit application (AMQP listener included) is up."""
        assert self.server is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for args in (("wait", str(self.base / "rabbit.pid")), ("await_startup",)):
            while True:
                if self.server.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.server.returncode}\n{self.log_tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"{self.name} not ready after {STARTUP_TIMEOUT} s\n{self.log_tail()}")
                try:
                    result = self.ctl(*args, "--timeout", str(int(remaining) + 1), timeout=remaining + 5)
                except subprocess.TimeoutExpired:
                    continue
                if result.returncode == 0:
                    break
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole node (a crash: nothing is flushed or handed over)."""
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(timeout=10)
            _terminate_group(self.server, graceful=signal.SIGKILL)  # reaps whatever is left of the group

    def stop(self) -> None:
        if self.server is not None:
            _terminate_group(self.server, graceful=signal.SIGTERM)


@dataclass
class RabbitMQCluster:
    """Three clustered nodes on loopback; ``urls()`` in node order, ``kill(i)`` / ``start(i)`` one node."""

    nodes: list[ClusterNode]
    epmd: subprocess.Popen[bytes]
    startup_seconds: float = 0.0
    restarts: list[float] = field(default_factory=list)  # seconds each start(i) took

    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def start(self, i: int) -> None:
        """Start node ``i`` again (after ``kill``) and wait until it serves AMQP; a no-op when it runs."""
        node = self.nodes[i]
        if node.running:
            return
        began = time.monotonic()
        node.spawn()
        node.wait_ready()
        self.restarts.append(time.monotonic() - began)

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl`` against the first running node."""
        return next(n for n in self.nodes if n.running).ctl(*args, timeout=timeout)

    def leader(self, queue: str) -> int:
        """The index of the node holding ``queue``'s quorum leader (as the cluster reports it now)."""
        result = self.ctl("list_queues", "--quiet", "--no-table-headers", "name", "leader")
        for line in result.stdout.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return next(n.index for n in self.nodes if n.name == leader.strip())
        raise LookupError(f"no queue {queue!r} on the cluster: {result.stdout}{result.stderr}")

    def stop(self) -> None:
        """Graceful stop of every node at once (SIGTERM, then the group), then epmd."""
        for node in self.nodes:
            if node.running:
                assert node.server is not None
                node.server.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()
        _terminate_group(self.epmd, graceful=signal.SIGTERM)


def _config(amqp_port: int, seed: str | None) -> str:
    lines = [f"listeners.tcp.default = 127.0.0.1:{amqp_port}"]
    if seed is not None:  # joins ``seed`` on its first boot
        lines += [
            "cluster_formation.peer_discovery_backend = classic_config",
            f"cluster_formation.classic_config.nodes.1 = {seed}",
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_cluster(base: Path) -> Iterator[RabbitMQCluster]:
    """Start a three-node cluster under ``base``; every process of it is stopped on exit (also on errors)."""
    epmd_bin = _epmd_binary()
    if not (RABBITMQ_BIN / "rabbitmq-server").exists() or epmd_bin is None:
        pytest.skip(f"rabbitmq-server/epmd not found in {RABBITMQ_BIN} (apt install rabbitmq-server)")
    epmd_port = _free_port()
    cookie = base / ".erlang.cookie"
    cookie.write_text(f"TRABOULECLUSTER{os.getpid()}{time.time_ns()}")
    cookie.chmod(0o400)
    nodes = []
    for i in range(SIZE):
        node_base = base / f"node{i}"
        (node_base / "log").mkdir(parents=True)
        amqp_port, dist_port = _free_port(), _free_port()
        name = f"traboule-cluster{i}-{os.getpid()}@localhost"
        env = _node_env(node_base, amqp_port, dist_port, epmd_port)
        env.update(HOME=str(base), RABBITMQ_NODENAME=name)  # one cookie for all nodes and rabbitmqctl
        (node_base / "rabbitmq-env.conf").write_text("")
        # The consistent-hash exchange spreads a partitioned subscriber's messages over its queues.
        (node_base / "enabled_plugins").write_text(f"[{', '.join(PLUGINS)}].\n")
        seed = None if i == 0 else nodes[0].name
        (node_base / "rabbitmq.conf").write_text(_config(amqp_port, seed))
        nodes.append(ClusterNode(i, node_base, name, amqp_port, env))
    epmd = subprocess.Popen(
        [epmd_bin, "-address", "127.0.0.1", "-port", str(epmd_port)],
        env=nodes[0].env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cluster = RabbitMQCluster(nodes, epmd)
    try:
        began = time.monotonic()
        nodes[0].spawn()
        nodes[0].wait_ready()
        for node in nodes[1:]:  # together: each joins the first node, which is up
            node.spawn()
        for node in nodes[1:]:
            node.wait_ready()
        status = nodes[0].ctl("cluster_status", "--formatter", "json")
        missing = [n.name for n in nodes if n.name not in status.stdout.split('"running_nodes"')[-1]]
        if status.returncode != 0 or missing:
            raise RuntimeError(f"cluster not formed, not running: {missing}\n{status.stdout}{status.stderr}")
        cluster.startup_seconds = time.monotonic() - began
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def rabbitmq_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQCluster]:
    """The session's three-node cluster (started on first use only); tests that kill a node start it again."""
    with run_cluster(tmp_path_factory.mktemp("rabbitmq-cluster")) as cluster:
        yield cluster
