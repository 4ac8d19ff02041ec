"""A real rsyslog receiving syslog over TLS (RFC 5425), as an audit record repository for the tests.

``RSyslog(folder, port, pki)`` writes a configuration (``imtcp`` with the ``gtls`` stream driver, mode 1 = TLS,
anonymous clients; the server certificate of the test PKI) and runs ``rsyslogd -n`` in the foreground. Every
message received is written to ``received.log``, one line each: the raw SYSLOG-MSG escaped as a JSON string
(`RSyslog.messages` reads them back). ``stop()`` / ``start()`` again on the same port simulate an outage.
Skipped when rsyslogd (Debian packages ``rsyslog`` and ``rsyslog-gnutls``, ``make peers``) is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import ports
from tests.tls_pki import PKI

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)


def gtls_available() -> bool:
    return any(Path(d).joinpath("lmnsd_gtls.so").exists() for d in ("/usr/lib/x86_64-linux-gnu/rsyslog",
                                                                  "/usr/lib/aarch64-linux-gnu/rsyslog",
                                                                  "/usr/lib/rsyslog"))  # fmt: skip


def require_rsyslog() -> str:
    if RSYSLOGD is None or not gtls_available():
        pytest.skip("rsyslogd with the gtls driver is not installed (Debian: rsyslog rsyslog-gnutls; `make peers`)")
    return RSYSLOGD


CONFIG = """\
global(
  maxMessageSize="256k"
  parser.escapeControlCharactersOnReceive="off"
  workDirectory="{folder}"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="{driver}" streamDriver.mode="{mode}" streamDriver.authMode="anon")
template(name="raw" type="string" string="%rawmsg:::json%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{output}" template="raw" flushOnTXEnd="on")
}}
input(type="imtcp" port="{port}" ruleset="audit")
"""


class RSyslog:
    def __init__(self, folder: Path, port: int, pki: PKI, *, tls: bool = True) -> None:
        self.binary = require_rsyslog()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.output = folder / "received.log"
        self.pidfile = folder / "rsyslogd.pid"
        self.config = folder / "rsyslog.conf"
        self.config.write_text(
            CONFIG.format(
                folder=folder,
                ca=pki.ca,
                cert=pki.server.cert,
                key=pki.server.key,
                driver="gtls" if tls else "ptcp",
                mode=1 if tls else 0,
                output=self.output,
                port=port,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.pidfile.unlink(missing_ok=True)
        log = (self.folder / "rsyslogd.out").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.pidfile)], stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {(self.folder / 'rsyslogd.out').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rsyslogd did not listen in time")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def messages(self) -> list[bytes]:
        """The raw SYSLOG-MSGs received so far."""
        if not self.output.exists():
            return []
        return [
            json.loads('"' + line + '"').encode("utf-8")
            for line in self.output.read_text(encoding="utf-8").splitlines()
            if line
        ]


free_port = ports.free_port  # one allocator for every test (tests/ports.py)
