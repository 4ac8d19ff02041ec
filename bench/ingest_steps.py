"""Where the ingest thread's CPU goes, step by step: the orders channel's handler called by concurrent tasks in one
process (no sockets, no client), each step of an order's handling timed in place with the calling thread's CPU clock,
and the CPU of each of the process's threads per order.

The configuration and the orders are `bench/mllp_ingest.py`'s (the orders channel with its reports catalog; the
worklist channel in another process, so that this one neither runs it nor keeps the journal's search index; ORM^O01
NW orders of their own accession numbers and Study Instance UIDs, one patient for all or each its own).
The timers cost about a microsecond a call: the steps' sum is a little above what they take untimed.

    .venv/bin/python bench/ingest_steps.py [--orders 4000] [--connections 8] [--patients one|each]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("json", "warning")

import uvloop  # noqa: E402
from mllp_ingest import CONFIG, PATIENTS, message  # noqa: E402  the measured setup and its orders

from traboule.app import config as config_mod  # noqa: E402
from traboule.app.runtime import Runtime  # noqa: E402


class Steps:
    """CPU time of the calling thread spent in each timed call, by step."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.on = False

    def time(self, owner: Any, attribute: str, step: str) -> None:
        """Replace ``owner.attribute`` (a function) by a timed one."""
        call: Callable[..., Any] = getattr(owner, attribute)

        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return call(*args, **kwargs)
            started = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                self.spent[step] = self.spent.get(step, 0.0) + time.thread_time() - started

        setattr(owner, attribute, timed)


def instrument(runtime: Runtime, channel: Any, steps: Steps) -> None:
    from traboule.app import runtime as runtime_module
    from traboule.channels import orders
    from traboule.formats import hl7
    from traboule.model import Envelope

    steps.time(hl7, "decode", "decode")
    steps.time(hl7, "parse", "tokenize")
    steps.time(hl7, "build_ack", "ACK")
    steps.time(channel.mapping, "map", "inbound mapping")
    steps.time(channel, "_check_identities", "patient identity: checks")
    steps.time(channel.identities, "record", "patient identity: record")
    steps.time(channel, "_audit", "audit event made")
    steps.time(Envelope, "to_json", "event to JSON")
    steps.time(runtime_module, "partition_headers", "partition key (outbox relay)")
    steps.time(runtime.journal, "_flush", "journal group commit")
    steps.time(runtime.journal, "pending_events", "outbox read (relay)")
    assert orders.hl7 is hl7  # the channel calls the module's functions, timed now


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by name (pool threads counted together; a thread that ended
    during the run is not counted)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = re.sub(r"[_-]\d+$", "", names.get(int(task.name), "other"))
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=4000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--patients", choices=("one", "each"), default="one")
    args = parser.parse_args()
    PATIENTS["each"], conns = args.patients == "each", args.connections
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "traboule.toml"
        path.write_text(CONFIG.format(data_dir=folder, mllp_port=0, mwl_port=0))
        runtime = Runtime(config_mod.load(str(path), env={}), process="main")
        await runtime.start()
        try:
            channel = runtime.channel("ris-orders")
            steps = Steps()
            instrument(runtime, channel, steps)

            async def sender(conn: int, count: int, phase: str) -> None:
                for i in range(count):
                    ack = await channel.handle(message(conn, i, phase), "127.0.0.1:5555")
                    if b"MSA|AA" not in ack:
                        raise SystemExit(f"not accepted: {ack[:200]!r}")

            await asyncio.gather(*(sender(c, 50, "w") for c in range(conns)))  # warm-up
            steps.on = True
            threads_before, started, cpu = thread_cpu(), time.perf_counter(), time.process_time()
            await asyncio.gather(*(sender(c, args.orders // conns, "m") for c in range(conns)))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            steps.on = False
            threads = {k: v - threads_before.get(k, 0.0) for k, v in thread_cpu().items()}
        finally:
            await runtime.stop()
    n = args.orders // conns * conns
    print(f"{n} orders, {conns} concurrent, patients: {args.patients}: {n / elapsed:.0f} orders/s in one process")
    print(f"process CPU: {cpu / n * 1000:.3f} ms per order")
    print("ingest thread, µs of CPU per order, by step:")
    for step, spent in sorted(steps.spent.items(), key=lambda item: -item[1]):
        print(f"  {step:32} {spent / n * 1e6:7.1f}")
    print(f"  {'(all of the ingest thread)':32} {threads.get('MainThread', 0.0) / n * 1e6:7.1f}")
    print("threads, µs of CPU per order:")
    for name, spent in sorted(threads.items(), key=lambda item: -item[1]):
        if spent:
            print(f"  {name:32} {spent / n * 1e6:7.1f}")


if __name__ == "__main__":
    uvloop.run(main())
