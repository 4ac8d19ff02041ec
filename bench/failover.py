"""Failover of two engine nodes on one PostgreSQL and one RabbitMQ: what ``kill -9`` of a node costs its clients.

Two ``traboule run`` nodes (orders over MLLP, the worklist's MWL SCP, FHIR; tests/test_ha.py's configuration) share
a PostgreSQL cluster and a RabbitMQ broker that the script starts (tests/peer_postgres.py, tests/peer_rabbitmq.py).
Orders stream into both nodes (two MLLP connections each, 20 ms between an AA and the next order), a modality asks
the worklist of the node to be killed (dcmtk findscu, one accession number) every 200 ms, and a queue of the
script bound to every topic receives the published events. Each round kills the holder of the "outbox" lease with
``kill -9`` and measures:

* lease: seconds until the survivor's /health says ``outbox: leader``, and until the first event reaches the queue
  after the kill (the survivor publishing);
* MLLP: for each connection of the killed node, seconds from the kill to its next AA, which the survivor gives
  after the client reconnected to it and sent again what was not acknowledged (the client moves at once, after
  a 200 ms pause);
* MWL: seconds from the kill to the modality's first answered C-FIND on the survivor (it moves after one failure).

The killed node is started again before the next round (and takes the lease over when the other is killed).

    .venv/bin/python bench/failover.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peer_dcmtk import DcmtkError, findscu  # noqa: E402
from tests.peer_postgres import run_postgres  # noqa: E402
from tests.peer_rabbitmq import run_rabbitmq  # noqa: E402
from tests.test_ha import Feeder, Node, Subscriber, node_config, wait_for  # noqa: E402

QUERY = ["PatientName", "AccessionNumber=ACC0001"]  # one item: the C-FIND's own time stays that of a small answer


class Modality:
    """C-FIND every ``period`` seconds on the first MWL port, on the next after a failure; answered C-FINDs kept."""

    def __init__(self, ports: list[int], period: float = 0.2) -> None:
        self.ports, self.period = ports, period
        self.answered: list[tuple[float, int]] = []  # (when, port)
        self.target = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            port = self.ports[self.target % len(self.ports)]
            try:
                findscu(port, "TRABOULE", QUERY, timeout=20)
                self.answered.append((time.monotonic(), port))
            except (DcmtkError, OSError, TimeoutError):
                self.target += 1
            except Exception:  # findscu timing out (subprocess.TimeoutExpired): try the next one
                self.target += 1
            self._stop.wait(self.period)


async def one_round(
    leader: Node, survivor: Node, subscriber: Subscriber, first_order: int
) -> tuple[dict[str, float], int]:
    """Kill ``leader`` under load; the measurements of the round and the next free order number."""
    feeder = Feeder([leader.ports.mllp, survivor.ports.mllp])
    orders = iter(range(first_order, first_order + 100_000))
    tasks = []
    for c in range(4):
        mine = [next(orders) for _ in range(5_000)]
        tasks.append(asyncio.create_task(feeder.connection(mine, 0 if c < 2 else 1, 0.02)))
    modality = Modality([leader.ports.mwl, survivor.ports.mwl])
    modality.start()
    await asyncio.sleep(3.0)
    leader.kill()
    killed = time.monotonic()
    leads = await asyncio.to_thread(wait_for, lambda: survivor.outbox() == "leader", 30, "survivor leads")
    await asyncio.to_thread(wait_for, lambda: any(t > killed + 0.1 for t, _, _ in subscriber.deliveries), 30)
    publishes = min(t for t, _, _ in subscriber.deliveries if t > killed + 0.1) - killed
    await asyncio.to_thread(
        wait_for, lambda: any(t > killed and p == survivor.ports.mwl for t, p in modality.answered), 30, "MWL"
    )
    mwl = min(t for t, p in modality.answered if t > killed and p == survivor.ports.mwl) - killed
    await asyncio.sleep(3.0)
    feeder.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    await asyncio.to_thread(modality.stop)
    # The killed node's connections: the first AA after the kill (from the survivor) of each one that was cut.
    cut = {a.n for a in feeder.attempts if a.port == leader.ports.mllp and not a.code and a.sent >= killed - 5}
    answered = {
        n: min(a.answered for a in feeder.attempts if a.n == n and a.code == "AA") for n in cut if n in feeder.acked
    }
    if len(answered) < len(cut):  # a cut order still not AA'd when the round ended (the survivor refusing it)
        print(f"  {len(cut) - len(answered)} order(s) cut by the kill not acknowledged by the end of the round")
    mllp = [t - killed for t in answered.values()]
    return (
        {"lease": leads, "publish": publishes, "mllp": max(mllp, default=float("nan")), "mwl": mwl},
        first_order + 100_000,
    )


async def main(rounds: int) -> None:
    results: list[dict[str, float]] = []
    with (
        tempfile.TemporaryDirectory(prefix="traboule-failover-") as scratch,
        run_postgres() as pg,
        run_rabbitmq(Path(scratch) / "rabbitmq") as broker,
    ):
        base = Path(scratch)
        url = pg.url(pg.create_database())
        nodes = [Node(node_config(base, name, url, broker.url, "traboule-failover")) for name in ("a", "b")]
        subscriber = Subscriber()
        try:
            for node in nodes:
                node.start()
                await asyncio.to_thread(node.ready)
            await asyncio.to_thread(wait_for, lambda: any(n.outbox() == "leader" for n in nodes), 30, "a leader")
            await subscriber.open(broker.url, "traboule-failover")
            next_order = 1
            for r in range(rounds):
                leader = next(n for n in nodes if n.outbox() == "leader")
                survivor = next(n for n in nodes if n is not leader)
                measured, next_order = await one_round(leader, survivor, subscriber, next_order)
                results.append(measured)
                print(
                    f"round {r + 1}: killed {leader.config.stem}: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in measured.items())
                )
                leader.start()
                await asyncio.to_thread(leader.ready)
                await asyncio.sleep(2.0)
        finally:
            with contextlib.suppress(Exception):
                await subscriber.close()
            for node in nodes:
                node.kill()
    print()
    print(f"| {'after kill -9 of the lease holder (seconds)':<58} | median | max  |")
    print(f"|{'-' * 60}|--------|------|")
    labels = {
        "lease": "survivor's /health says `outbox: leader`",
        "publish": "first event published by the survivor",
        "mllp": "MLLP: next AA of a cut connection (moved to the survivor)",
        "mwl": "MWL: first answered C-FIND on the survivor",
    }
    for key, label in labels.items():
        values = [r[key] for r in results]
        print(f"| {label:<58} | {statistics.median(values):6.2f} | {max(values):4.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args().rounds))
