"""MLLP ingest with and without TLS, side by side in one run: ORM^O01 NW orders/s and ACK latency, 1 and 8 connections.

The setup of ``bench/mllp_ingest.py`` (``traboule run``, orders in the main process, the worklist in its own, durable
journal, fresh data dir, logs at warning), started twice: the orders listener on plain TCP, then on TLS (``tls =
true`` with a ``[tls]`` server certificate, ECDSA P-256 from a throwaway test PKI, no client certificate; the clients
check the server's against the test CA). Each connection shakes hands once and then sends its share, so the TLS
figure is the cost of the records; the handshake itself is measured apart, against a bare listener (the framing code
answering a fixed ACK), as new connections per second with one order each. The bare listener also gives the cost of
TLS with nothing else to do.

Plain and TLS engines are run in turn, ``--rounds`` times each; the best round of each row is printed (a shared
machine's other load only ever slows a round down).

    .venv/bin/python bench/tls_mllp.py [--messages 4000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mllp_ingest as ingest  # noqa: E402  (configures the logs at warning)

from tests.tls_pki import PKI, make_pki  # noqa: E402
from traboule.adapters.mllp import MLLPClient, MLLPListener  # noqa: E402
from traboule.tls import TLSSettings, client_context, server_context  # noqa: E402

TLS_TABLE = """
[tls]
cert_file = "{cert}"
key_file = "{key}"
"""
ACK = b"MSH|^~\\&|TRABOULE||RIS||20261125||ACK^O01^ACK|1|P|2.3.1\rMSA|AA|X\r"


async def drive(
    port: int, connections: int, total: int, phase: str, ctx: ssl.SSLContext | None
) -> tuple[float, list[float]]:
    """``total`` orders over ``connections`` kept connections (one handshake each), as fast as the ACKs come."""
    per_conn = total // connections
    latencies: list[float] = []

    async def one(conn: int) -> None:
        async with MLLPClient("127.0.0.1", port, timeout=30, ssl=ctx) as client:
            for i in range(per_conn):
                t0 = time.perf_counter()
                ack = await client.send(ingest.message(conn, i, phase))
                latencies.append(time.perf_counter() - t0)
                if b"MSA|AA" not in ack:
                    raise RuntimeError(f"not accepted: {ack[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(connections)))
    return time.perf_counter() - started, latencies


async def engine_rows(pki: PKI, messages: int, tls: bool) -> list[tuple[str, int, float, float, float]]:
    rows = []
    ctx = client_context(TLSSettings(enabled=True, ca_file=str(pki.ca))) if tls else None
    with tempfile.TemporaryDirectory() as tmp:
        port = ingest.free_port()
        text = ingest.CONFIG.format(data_dir=tmp, mllp_port=port, mwl_port=ingest.free_port())
        if tls:
            text = text.replace(f"port = {port}}}", f"port = {port}, tls = true}}")
            text += TLS_TABLE.format(cert=pki.server.cert, key=pki.server.key)
        config = Path(tmp) / "traboule.toml"
        config.write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
        env.update(
            TRABOULE_HTTP_PORT=str(ingest.http_port_pair()), TRABOULE_LOG_LEVEL="error", TRABOULE_LOG_FORMAT="json"
        )
        command = [str(ROOT / ".venv" / "bin" / "traboule"), "--config", str(config), "run"]
        engine = subprocess.Popen(command, env=env, cwd=ROOT)
        try:
            await ingest.wait_port(port)
            await drive(port, 1, 200, "w", ctx)  # warm-up
            done = 200
            worklist = Path(tmp) / "worklist.sqlite"
            for conns in (1, 8):
                await ingest.until_worklist(worklist, done)
                elapsed, lat = await drive(port, conns, messages, f"c{conns}-", ctx)
                done += messages
                name = "traboule, TLS" if tls else "traboule, plain TCP"
                rows.append(ingest.row(name, conns, messages, elapsed, lat))
        finally:
            engine.terminate()
            engine.wait(30)
    return rows


async def bare_rows(pki: PKI, messages: int) -> tuple[list[tuple[str, int, float, float, float]], dict[str, float]]:
    """The bare listener, plain and TLS: kept connections, then a new connection per order (handshakes/s)."""
    rows, per_second = [], {}
    settings = TLSSettings(enabled=True, cert_file=str(pki.server.cert), key_file=str(pki.server.key))
    ctx = client_context(TLSSettings(enabled=True, ca_file=str(pki.ca)))

    async def handler(data: bytes, peer: str) -> bytes:
        return ACK

    for tls in (False, True):
        listener = MLLPListener(handler, port=0, name="bare", ssl=server_context(settings) if tls else None)
        await listener.start()
        client = ctx if tls else None
        name = "bare MLLP ACK, TLS" if tls else "bare MLLP ACK, plain TCP"
        for conns in (1, 8):
            elapsed, lat = await drive(listener.port, conns, messages, "", client)
            rows.append(ingest.row(name, conns, messages, elapsed, lat))
        count = 500
        started = time.perf_counter()
        for i in range(count):
            async with MLLPClient("127.0.0.1", listener.port, timeout=30, ssl=client) as one:
                await one.send(ingest.message(0, i, "h"))
        per_second["TLS" if tls else "plain TCP"] = count / (time.perf_counter() - started)
        await listener.stop()
    return rows, per_second


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    best: dict[tuple[str, int], tuple[str, int, float, float, float]] = {}
    connects: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        pki = make_pki(Path(folder))
        for _ in range(args.rounds):
            rows = await engine_rows(pki, args.messages, tls=False)
            rows += await engine_rows(pki, args.messages, tls=True)
            bare, per_second = await bare_rows(pki, args.messages)
            for r in rows + bare:
                if (r[0], r[1]) not in best or r[2] > best[(r[0], r[1])][2]:
                    best[(r[0], r[1])] = r
            for kind, value in per_second.items():
                connects[kind] = max(value, connects.get(kind, 0.0))
    rows = list(best.values())
    print(f"{'listener':28} {'conns':>5} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, conns, rate, p50, p99 in rows:
        print(f"{name:28} {conns:>5} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}")
    rate = {(r[0], r[1]): r[2] for r in rows}
    for prefix in ("traboule", "bare MLLP ACK"):
        for conns in (1, 8):
            ratio = rate[(f"{prefix}, TLS", conns)] / rate[(f"{prefix}, plain TCP", conns)]
            print(f"ratio TLS / plain, {prefix}, {conns} connection(s): {ratio:.2f}")
    for kind, value in connects.items():
        print(f"new connection per order (bare listener), {kind}: {value:.0f} connections/s")


if __name__ == "__main__":
    asyncio.run(main())
