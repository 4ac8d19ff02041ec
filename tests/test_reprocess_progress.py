"""``traboule journal reprocess`` shows its progress: a bar on a terminal, else a line every few seconds (done/total,
rate, time left), and the run's duration and rate in its summary."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import termios
from pathlib import Path

from tests.test_flow import fixture
from tests.test_reprocess import cli, receive, write_config
from traboule.app.reprocess import Progress


def test_lines_say_done_total_rate_and_time_left() -> None:
    stream = io.StringIO()
    with Progress(10, 0, stream, every=0.0) as progress:
        progress.update(4)
        progress.update(6)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"4/10 message\(s\) \(40%\), [\d.]+/s, (\dm\d\ds left|time left unknown)", lines[0])
    assert re.fullmatch(r"10/10 message\(s\) \(100%\), [\d.]+/s, 0m00s left", lines[1])
    assert re.fullmatch(r"10 message\(s\) in 0m00s \([\d.]+/s\)", progress.summary())


def test_lines_are_spaced_and_a_resumed_run_counts_its_own_rate() -> None:
    stream = io.StringIO()
    with Progress(100, 50, stream, every=3600.0) as progress:  # resumed after 50: 150 in all
        for _ in range(5):
            progress.update(10)
        assert stream.getvalue() == ""  # not yet time for a line
        assert progress.line().startswith("100/150 message(s) (67%), ")
    assert progress.summary().startswith("50 message(s) in ")  # this run's messages, not the earlier ones'


def test_no_stream_shows_nothing_and_the_report_lines_still_go_out() -> None:
    out = io.StringIO()
    with Progress(3, 0, None, every=0.0) as progress:
        progress.write("journal entry 1: refused", file=out)
        progress.update(3)
    assert out.getvalue() == "journal entry 1: refused\n"


def test_a_terminal_gets_a_bar() -> None:
    primary, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    with os.fdopen(secondary, "w") as terminal, Progress(20, 0, terminal) as progress:
        out = io.StringIO()
        progress.update(5)
        progress.write("journal entry 3: not reprocessed", file=out)
        progress.update(15)
    chunks = []
    while select.select([primary], [], [], 0.2)[0]:
        try:
            chunks.append(os.read(primary, 65536))
        except OSError:  # the terminal's other end is closed: all read
            break
    os.close(primary)
    drawn = b"".join(chunks).decode("utf-8", "replace")
    assert "20/20" in drawn and "msg" in drawn
    assert out.getvalue().strip() == "journal entry 3: not reprocessed"


async def test_the_command_says_how_long_the_run_took(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir=True)
    await receive(config, fixture("orm_o01_nw_latin1.hl7"), fixture("omi_o23_nw_utf8.hl7"))
    out = cli(config, "--type", "ORM", "--type", "OMI", "--to", "fhir")
    assert out.returncode == 0, out.stderr
    assert re.search(r"2 message\(s\) reprocessed into fhir: .*; 2 message\(s\) in \dm\d\ds \([\d.]+/s\)", out.stdout)
    dry = cli(config, "--type", "ORM", "--to", "fhir", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"nothing was sent; 1 message\(s\) in \dm\d\ds \([\d.]+/s\)", dry.stdout)
