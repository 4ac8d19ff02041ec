"""Fuzzing the MLLP listener: whatever a peer sends, it gets an answer (an ACK with AA, AE or AR) for each message it
framed, or a clean close for framing abuse, in bounded time; the listener keeps serving; and nothing acknowledged
AA is missing from the journal.

The engine (its orders channel) runs on an event loop in a thread of its own (``ServedEngine`` of the HTTP fuzz
suite), so that hypothesis drives plain blocking sockets. Each input is written in pieces cut anywhere (an end
block split across two writes too), then the write side is shut: the listener answers what it was sent and
closes. ``bench/fuzz_mllp.py`` runs the same inputs by the thousand.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.test_flow import engine_config, fixture, mllp_port
from tests.test_fuzz_http import ServedEngine
from traboule.adapters.mllp import END, MAX_UNFRAMED, START
from traboule.app.runtime import Runtime
from traboule.formats import hl7

ANSWER_WITHIN = 5.0  # seconds for a whole exchange; the listener answers in milliseconds, the margin is the machine's
MAX_MESSAGE = 256 * 1024  # the fuzzed listener's max_message_size: small, so that going over it is cheap
CONTROL_ID = "FZCID"  # replaced at send time by an id unique to the exchange: each AA is looked up in the journal


# -- the engine, served in a thread ---------------------------------------------------------------------------


class MLLPEngine(ServedEngine):
    """The orders channel alone (no consumer: the journal is what is checked), its listener on 127.0.0.1, on
    uvloop as ``traboule run`` serves it (its transports are not asyncio's: the other listener tests use those)."""

    def __init__(self, data_dir: Path | None = None) -> None:
        super().__init__(data_dir)
        self.loop.close()
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-mllp-engine", daemon=True)

    async def _start(self) -> None:
        assert self.data_dir is not None
        cfg = engine_config(self.data_dir)
        cfg.channels = cfg.channels[:1]
        cfg.channels[0]["reports"] = {"validate": False}
        cfg.channels[0]["source"].update(max_message_size=MAX_MESSAGE, frame_timeout=ANSWER_WITHIN)
        self.runtime = Runtime(cfg)
        await self.runtime.start()
        self.port = mllp_port(self.runtime)

    async def _stop(self) -> None:
        assert self.runtime is not None
        await self.runtime.stop()

    def journal(self) -> sqlite3.Connection:
        """A reader of the journal of its own (the engine's connection belongs to the engine's thread)."""
        assert self.runtime is not None
        return sqlite3.connect(f"file:{self.runtime.journal_path}?mode=ro", uri=True, check_same_thread=False)


# -- one exchange, byte for byte ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What a peer writes (``pieces``, in order) and how many answers it is owed (``frames``: messages framed, a
    batch being one). ``abuse``: framing the listener refuses (unterminated, over the size limit): fewer answers
    are fine, a clean close is required."""

    pieces: tuple[bytes, ...]
    frames: int
    abuse: bool = False


@dataclass
class Outcome:
    answers: list[bytes]  # the frames the listener wrote back, unframed
    closed: bool  # the listener closed the connection (EOF or reset) within ANSWER_WITHIN
    ms: float
    codes: list[tuple[str, set[str]]] = field(default_factory=list)  # MSA-1 of every ACK, MSA-2 as the journal reads it
    unreadable: list[bytes] = field(default_factory=list)  # answers that are not ACKs


_ids = itertools.count(1)


def exchange(port: int, case: Case, timeout: float = ANSWER_WITHIN) -> Outcome:
    """Write ``case`` on a fresh connection (control ids made unique), shut the write side, read until closed."""
    tag = f"F{next(_ids)}x".encode()
    started = time.perf_counter()
    data = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # refused (too large): closed while we write
            for piece in case.pieces:
                sock.sendall(piece.replace(CONTROL_ID.encode(), tag))
            sock.shutdown(socket.SHUT_WR)
        deadline = started + timeout
        try:
            while (left := deadline - time.perf_counter()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except TimeoutError:
            pass
        except OSError:
            closed = True  # a reset: what was read counts
    outcome = Outcome([], closed, (time.perf_counter() - started) * 1000)
    for part in data.split(END):
        if START in part:
            outcome.answers.append(part[part.index(START) + 1 :])
    for answer in outcome.answers:
        codes = ack_codes(answer)
        outcome.codes += codes
        if not codes:
            outcome.unreadable.append(answer)
    return outcome


def ack_codes(answer: bytes) -> list[tuple[str, set[str]]]:
    """MSA-1 of an ACK, or of each ACK of a batch answer, with MSA-2 read as the journal reads a control id (MSH-10
    unescaped and stripped) in each codec the message may have been read with: the ACK is in the message's codec,
    which its own bytes do not always reveal."""
    codes = []
    for message in hl7.split_batch(answer.decode("latin-1")):  # latin-1: every byte as it is
        with contextlib.suppress(hl7.HL7Error):
            ack = hl7.parse(message)
            msa = ack.segment("MSA")
            if msa is None or not ack.message_type.startswith("ACK"):
                continue
            raw = msa.field(2).encode("latin-1")
            ids = set()
            for codec in ("latin-1", "utf-8", "iso8859_15", "cp1252"):
                with contextlib.suppress(UnicodeDecodeError):
                    ids.add(hl7.unescape(raw.decode(codec), ack.separators).strip())
            codes.append((msa.field(1), ids))
    return codes


def problems(journal: sqlite3.Connection, case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with the listener's answer to ``case`` (nothing: an empty list)."""
    found = []
    if not outcome.closed:
        found.append(f"not closed within {ANSWER_WITHIN} s")
    if len(outcome.answers) > case.frames or (not case.abuse and len(outcome.answers) != case.frames):
        found.append(f"{len(outcome.answers)} answers to {case.frames} framed messages")
    if outcome.unreadable:
        found.append(f"not an ACK: {outcome.unreadable[0][:200]!r}")
    for code, ids in outcome.codes:
        if code not in ("AA", "AE", "AR"):
            found.append(f"MSA-1 {code!r}")
        elif code == "AA":
            rows = journal.execute(
                "SELECT count(*) FROM messages WHERE status IN ('accepted', 'duplicate') "
                f"AND control_id IN ({', '.join('?' * len(ids))})",
                sorted(ids),
            ).fetchone()[0]
            if not rows:
                found.append(f"AA for {sorted(ids)!r}, not in the journal")
    return found


class Serving:
    """Whether a valid order still gets its AA; falsy otherwise, its repr saying what came back instead."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def __bool__(self) -> bool:
        return [code for code, _ in self.outcome.codes] == ["AA"]

    def __repr__(self) -> str:
        o = self.outcome
        return f"Serving(answers={o.answers!r}, closed={o.closed}, ms={o.ms:.0f})"


def still_serving(engine: MLLPEngine) -> Serving:
    """A valid order of a patient and exam of its own: the fuzzed messages (ADT updates from any sender, merges) may
    have changed what the registry holds for the fixtures' patient, and an order of that patient is then rightly
    refused (AE, PID-3); one no message named before must get its AA."""
    n = next(_SERVING)
    body = f"{1790375000000 + n:013d}"
    order = (
        fixture("orm_o01_nw_latin1.hl7")
        .replace(b"MSG0001", CONTROL_ID.encode())
        .replace(b"IPP0001", f"SRV{n:07d}".encode())
        .replace(b"279035121518989", f"{body}{97 - int(body) % 97:02d}".encode())
        .replace(b"PLC0001", f"SRVP{n}".encode())
        .replace(b"FIL0001", f"SRVF{n}".encode())
        .replace(b"ACC0001", f"SRVA{n}".encode())
        .replace(b"1.2.250.1.999.1.2.20261125.1", f"1.2.250.1.999.1.2.99.{n}".encode())
    )
    return Serving(exchange(engine.port, Case((START + order + END,), 1)))


_SERVING = itertools.count(1)


# -- what peers send -----------------------------------------------------------------------------------------------

BASES = [
    (fixture(name).decode(codec), codec)
    for name, codec in [
        ("orm_o01_nw_latin1.hl7", "latin-1"),
        ("omi_o23_nw_utf8.hl7", "utf-8"),
        ("orm_o01_ca.hl7", "latin-1"),
        ("adt_a08_update.hl7", "latin-1"),
        ("adt_a40_merge.hl7", "latin-1"),
        ("oru_r01_report.hl7", "latin-1"),
        ("siu_s12_unsupported.hl7", "latin-1"),
    ]
]
SEPARATORS = ["#", "!", "$", "\t", "^", " ", "\x00", "é"]
ENCODING_CHARACTERS = ["^~\\&#", "^~", "", "^~\\&^", "~^&\\", "^^^^", "^\\~\\&", "^~\\&#%$"]
CHARSETS = ["", "8859/1", "UNICODE UTF-8", "8859/15", "ASCII", "UTF-8", "ISO IR192", "ISO IR100", "KLINGON"]
CHARSETS += ["8859/1~UNICODE UTF-8", "UNICODE UTF-8^x", "\\X00\\", "8859/1" * 40, " unicode utf-8 ", "~", "^"]
VERSIONS = ["2.3.1", "2.5", "2.5.1", "2.5^FRA^2.11", "", "9.9", "x", "2.5" * 30]
TYPES = ["", "ORM", "ORM^O01^ORM_O01", "ZZZ^Z99", "^^^", "ADT^A40", "ORU^R01", "ACK^O01", "MDM^T02"]
ESCAPES = ["\\X0D\\", "\\H\\", "\\.br\\", "\\Zxx\\", "\\", "\\X\\", "\\XZZ\\", "\\F\\", "\\E\\\\", "\\S\\\\T\\"]
CODECS = ["latin-1", "utf-8", "cp1252", "utf-16", "cp437", "iso8859_15"]
GROWTHS = ["segments", "fields", "repetitions", "components", "huge"]
NOT_FRAMING = st.binary(max_size=8).map(lambda b: b.replace(b"\x1c", b"").replace(b"\x0b", b""))
# Each variation on its own is rare, so that an input usually has none to three and a good share is accepted (the
# AA path is the one whose promise, journaled before acknowledged, is checked).
sometimes = st.sampled_from([False] * 5 + [True])


def _set_field(segment: str, n: int, value: str, sep: str) -> str:
    """``segment`` (MSH numbering: field n is at index n - 1 after the name) with field ``n`` set to ``value``."""
    parts = segment.split(sep)
    index = n - 1 if segment.startswith("MSH") else n
    parts += [""] * (index + 1 - len(parts))
    parts[index] = value
    return sep.join(parts)


@st.composite
def messages(draw: st.DrawFn, index: int = 0) -> bytes:
    """One message: a fixture with its MSH varied (separators, type, version, MSH-18), grown (segments,
    fields, repetitions, components, one huge field), escaped oddly, encoded in any codec, bytes mutated."""
    text, codec = draw(st.sampled_from(BASES))
    segments = [s for s in text.split("\r") if s]
    msh = _set_field(segments[0], 10, f"{CONTROL_ID}{index}", "|")
    if draw(sometimes):
        msh = _set_field(msh, 18, draw(st.sampled_from(CHARSETS)), "|")
    if draw(sometimes):
        msh = _set_field(msh, 12, draw(st.sampled_from(VERSIONS)), "|")
    if draw(sometimes):
        msh = _set_field(msh, 9, draw(st.sampled_from(TYPES)), "|")
    segments[0] = msh
    growth = draw(st.sampled_from(GROWTHS)) if draw(sometimes) else ""
    if growth == "segments":
        segments += [f"NTE|{i}||x" for i in range(draw(st.integers(1, 3000)))]
    elif growth == "fields":
        segments.append("ZFZ" + "|x" * draw(st.integers(1, 20_000)))
    elif growth == "repetitions":
        pid = next((i for i, s in enumerate(segments) if s.startswith("PID")), 0)
        segments[pid] = _set_field(segments[pid], 3, "~".join(["I^^^A"] * draw(st.integers(1, 5000))), "|")
    elif growth == "components":
        segments.append("NTE|1||" + "^" * draw(st.integers(1, 20_000)))
    elif growth == "huge":
        size = draw(st.one_of(st.integers(1, 200_000), st.sampled_from([MAX_MESSAGE - 2000, MAX_MESSAGE + 1])))
        segments.append("NTE|1||" + "x" * size)
    if draw(sometimes):
        at = draw(st.integers(1, len(segments) - 1)) if len(segments) > 1 else 0
        segments[at] += draw(st.sampled_from(ESCAPES))
    line_break = draw(st.sampled_from(["\r", "\n", "\r\n"])) if draw(sometimes) else "\r"
    text = line_break.join(segments) + "\r"
    if draw(sometimes):
        text = text.replace("|", draw(st.sampled_from(SEPARATORS)))
    if draw(sometimes):
        text = text[:4] + draw(st.sampled_from(ENCODING_CHARACTERS)) + text[8:]
    data = text.encode(draw(st.sampled_from(CODECS)) if draw(sometimes) else codec, "replace")
    if draw(sometimes):
        data = b"\xef\xbb\xbf" + data
    for _ in range(draw(st.integers(1, 3)) if draw(sometimes) else 0):  # any byte but framing ones: non-UTF-8, NUL
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(NOT_FRAMING) + data[at + draw(st.integers(0, 3)) :]
    return data


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    """FHS/BHS batches of one to three messages, trailers right, wrong or missing."""
    count = draw(st.integers(1, 3))
    body = b"".join(draw(messages(i)) for i in range(count))
    head = draw(st.sampled_from([b"FHS|^~\\&|RIS\rBHS|^~\\&|RIS\r", b"BHS|^~\\&|RIS\r", b"FHS|^~\\&|RIS\r"]))
    tail = draw(st.sampled_from([b"BTS|%d\rFTS|1\r" % count, b"BTS|%d\r" % count, b"", b"BTS|99\rFTS|x\r"]))
    return head + body + tail


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A message (or batch) framed right or wrong, written in pieces cut anywhere."""
    message = draw(st.one_of(messages(), messages(), messages(), batches()))
    framing = draw(
        st.sampled_from(
            ["plain"] * 5
            + ["line_break_after", "noise_before", "no_start_block", "two", "unterminated", "double_end"]
            + ["noise_only", "start_in_frame", "oversize", "no_cr", "no_cr_then_next", "stray_end_byte"]
        )
    )
    frames, abuse = 1, False
    if framing == "plain":
        data = START + message + END
    elif framing == "line_break_after":
        data = START + message + END + b"\r\n"
    elif framing == "noise_before":
        data = draw(NOT_FRAMING) + START + message + END
    elif framing == "no_start_block":  # answered AR (or, if the message holds a start block, framed from there)
        data = message + END
        abuse = len(message) > MAX_UNFRAMED  # then refused (AR) before its end: the close may cut the answer off
    elif framing == "two":
        data = START + message + END + START + draw(messages(1)) + END
        frames = 2
    elif framing == "unterminated":  # unanswered, closed at the peer's end (over the size limit: refused, AR)
        data, frames, abuse = START + message, int(len(message) > MAX_MESSAGE), True
    elif framing == "double_end":
        data = START + message + END + END
    elif framing == "noise_only":
        data, frames = draw(NOT_FRAMING), 0
    elif framing == "start_in_frame":  # a frame cut short by a start block: unanswered; the frame from there is
        at = draw(st.integers(0, len(message)))
        data = START + message[:at] + START + message[at:] + END
    elif framing == "no_cr":  # 0x1C without its 0x0D, then the end of the stream: answered AR
        data = START + message + b"\x1c"
    elif framing == "no_cr_then_next":  # answered AR, and the next frame (from its start block) answered too
        data, frames = START + message + b"\x1c" + START + draw(messages(1)) + END, 2
    elif framing == "stray_end_byte":  # a 0x1C inside the content: the frame goes on to its end block, one AR
        at = draw(st.integers(0, len(message)))
        data = START + message[:at] + b"\x1cX" + draw(NOT_FRAMING) + message[at:] + END  # X: never 0x0D
    else:  # over max_message_size: answered AR (if the peer reads it before the close) and closed
        data, abuse = START + message + b"NTE|1||" + b"x" * (MAX_MESSAGE + 1) + END, True
    if len(message) > MAX_MESSAGE:
        abuse = True  # a grown message over the limit: refused and closed
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    pieces = tuple(data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)]) if b > a)
    return Case(pieces, frames, abuse)


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Any:
    with MLLPEngine() as served:
        yield served


@pytest.fixture(scope="module")
def journal(engine: MLLPEngine) -> Any:
    with contextlib.closing(engine.journal()) as reader:
        yield reader


FUZZ = settings(
    max_examples=300,
    deadline=None,  # bounded by ANSWER_WITHIN instead
    database=None,  # nothing written into the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

ORDER = fixture("orm_o01_nw_latin1.hl7").replace(b"MSG0001", CONTROL_ID.encode())


# The framings main dropped or mishandled (issue "Availability under hostile conditions", item 11), always tried.
@example(case=Case((ORDER + END,), 1))  # no start block: dropped without an answer on main
@example(case=Case((START + ORDER[:100], ORDER[100:] + END[:1], END[1:]), 1))  # end block split across writes
@example(case=Case((b"\x00garbage\r\n" + START + ORDER + END,), 1))
@example(case=Case((START + ORDER + END + START + ORDER + END,), 2))
# The framings answered wrong before the MLLP review: a start block inside a frame (the concatenation was one
# message), an end block without its 0x0D (no answer until frame_timeout), at the end of the stream or not.
@example(case=Case((START + ORDER[:80] + START + ORDER + END,), 1))
@example(case=Case((START + START + ORDER + END,), 1))
@example(case=Case((START + ORDER + b"\x1c",), 1))
@example(case=Case((START + ORDER + b"\x1c" + START + ORDER + END,), 2))
@example(case=Case((START + ORDER[:80] + b"\x1cX" + ORDER[80:] + END,), 1))
@FUZZ
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # the repr of a 256 kB input
@given(case=cases())
def test_every_framed_message_is_answered_and_every_aa_journaled(
    engine: MLLPEngine, journal: sqlite3.Connection, case: Case
) -> None:
    outcome = exchange(engine.port, case)
    found = problems(journal, case, outcome)
    assert not found, (found, [p[:300] for p in case.pieces])
    assert still_serving(engine)


def test_still_serving_after_the_fuzzing(engine: MLLPEngine) -> None:
    assert still_serving(engine)
    runtime = engine.runtime
    assert runtime is not None
    listener = runtime.channel("ris-orders").listener  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while (listener.connections or listener.buffered) and time.monotonic() < deadline:
        time.sleep(0.02)  # the last connections' tasks end
    assert (listener.connections, listener.buffered) == (0, 0)  # nothing leaked: connections, bytes
