"""Fuzzing the MWL C-FIND identifier: generated hostile identifiers (every worklist key, with its own VR or any
other, wild cards, ranges, pathological patterns, garbage bytes, character sets, sequences of 0 to 2 items, nested
ones) sent over a real association to the real SCP and store, and straight to `compile_query` + `WorklistStore.find`.

Each must get a DICOM status the SCP chose (a handled one, not pynetdicom's "exception in handler") within
ANSWER_WITHIN seconds, and the SCP must still answer the next valid query. bench/fuzz_dicom.py runs the same
generators for 10,000+ inputs.
"""

from __future__ import annotations

import logging
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import TracebackType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import ModalityWorklistInformationFind

from tests.peer_dcmtk import free_port, mwl_item
from traboule.adapters.dicom_mwl import WorklistSCP
from traboule.formats.dicom_match import QueryError
from traboule.stores.worklist import WorklistStore

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about every invalid value it meets, by design

AET = "TRABOULE"
ANSWER_WITHIN = 5.0  # seconds, per query
# The statuses the SCP answers on purpose: Success, Cancel, Out of Resources, Identifier does not match SOP
# class, Unable to process. pynetdicom's own C311/C312 would mean our handler raised.
HANDLED = frozenset({0x0000, 0xFE00, 0xA700, 0xA900, 0xC001})
KNOWN_ACCESSION = "FUZZ0001"

# Worklist keys (PS3.4 K.6 / IHE RAD SWF) with their VR: the top level, then the Scheduled Procedure Step item.
KEYS: dict[int, str] = {
    0x00080050: "SH",  # Accession Number
    0x00080090: "PN",  # Referring Physician's Name
    0x00100010: "PN",  # Patient's Name
    0x00100020: "LO",  # Patient ID
    0x00100021: "LO",  # Issuer of Patient ID
    0x00100030: "DA",  # Patient's Birth Date
    0x00100040: "CS",  # Patient's Sex
    0x00101010: "AS",  # Patient's Age
    0x00101030: "DS",  # Patient's Weight
    0x0020000D: "UI",  # Study Instance UID
    0x00321060: "LO",  # Requested Procedure Description
    0x00380010: "LO",  # Admission ID
    0x00401001: "SH",  # Requested Procedure ID
    0x00401400: "LT",  # Requested Procedure Comments
    0x00080052: "CS",  # Query/Retrieve Level
    0x00091010: "LO",  # a private element
    0x00100000: "UL",  # a group length
}
SPS = 0x00400100
SPS_KEYS: dict[int, str] = {
    0x00080060: "CS",  # Modality
    0x00400001: "AE",  # Scheduled Station AE Title
    0x00400002: "DA",  # Scheduled Procedure Step Start Date
    0x00400003: "TM",  # Scheduled Procedure Step Start Time
    0x00400006: "PN",  # Scheduled Performing Physician's Name
    0x00400007: "LO",  # Scheduled Procedure Step Description
    0x00400009: "SH",  # Scheduled Procedure Step ID
    0x00400010: "SH",  # Scheduled Station Name
    0x00400020: "CS",  # Scheduled Procedure Step Status
    0x00400244: "DA",  # Performed Procedure Step Start Date (a combined date-time range partner)
    0x00400245: "TM",
}
CODE_SEQUENCES = (0x00321064, 0x00400008)  # Requested Procedure Code, Scheduled Protocol Code (in the SPS item)
ANY_VR = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OW", "PN", "SH", "SL", "SQ")
ANY_VR += ("SS", "ST", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT")
CHARSETS = ("ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "\\ISO 2022 IR 149", "GB18030", "ISO_IR 6", "NONSENSE")

# -- generators ------------------------------------------------------------------------------------------------

wildcards = st.lists(st.sampled_from(["*", "?", "a", "Z", "é", "Ł", "^", "\\", " ", "-", ".", "["]), max_size=120)
pathological = st.sampled_from(
    [
        "*?" * 10 + "Z",  # exponential for a backtracking regex
        "*a" * 40 + "*b",
        "*?" * 6000,  # over the pattern length limit
        "?" * 10241,
        "*" * 20000,
        "a" * 5000 + "*",
        "-" * 100,
        "\\" * 300,
    ]
)
text_values = st.one_of(
    wildcards.map("".join),
    st.text(max_size=64),  # any Unicode, control characters included
    st.from_regex(r"[0-9.]{0,10}(-[0-9.]{0,10})?", fullmatch=True),  # DA-like and ranges
    st.from_regex(r"[0-9:.]{0,14}(-[0-9:.]{0,14})?", fullmatch=True),  # TM-like
    st.from_regex(r"[0-9.+-]{0,28}", fullmatch=True),  # DT-like, offsets
    pathological,
)
values = st.one_of(
    st.tuples(text_values, st.sampled_from(["utf-8", "latin-1"])).map(lambda t: t[0].encode(t[1], "replace")),
    st.binary(max_size=64),  # garbage: odd lengths, NULs, invalid in every character set
)


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element in Explicit VR Little Endian, whatever its VR and value (PS3.5 7.1.2)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in _LONG_LENGTH_VRS:
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def item(content: bytes) -> bytes:
    """A sequence item of explicit length (PS3.5 7.5)."""
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(content)) + content


_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


@st.composite
def elements(draw: st.DrawFn, keys: dict[int, str]) -> bytes:
    """One key of `keys`, usually with its own VR, sometimes with any other."""
    tag = draw(st.sampled_from(sorted(keys)))
    vr = draw(st.sampled_from(ANY_VR)) if draw(st.integers(0, 9)) == 0 else keys[tag]
    return element(tag, vr, draw(values))


@st.composite
def items(draw: st.DrawFn, keys: dict[int, str], depth: int, min_size: int = 0) -> bytes:
    """The content of an item (or of the identifier): some keys, maybe a code sequence, maybe garbage."""
    if min_size == 0 and draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=32))
    content = draw(st.lists(elements(keys), min_size=min_size, max_size=6))
    if depth > 0 and draw(st.booleans()):
        code_keys = {0x00080100: "SH", 0x00080102: "SH", 0x00080104: "LO"}
        codes = draw(st.lists(items(code_keys, depth - 1), max_size=2))
        content.append(element(draw(st.sampled_from(CODE_SEQUENCES)), "SQ", b"".join(item(c) for c in codes)))
    return b"".join(content)


@st.composite
def identifiers(draw: st.DrawFn) -> bytes:
    """A C-FIND identifier as a hostile or broken modality could send it, in Explicit VR Little Endian. Never
    empty: pynetdicom would then send a C-FIND announcing an identifier and no identifier, which the SCP
    rightly waits for (until network_timeout)."""
    parts = [draw(items(KEYS, 1, min_size=1))]
    charset = draw(st.one_of(st.none(), st.sampled_from(CHARSETS).map(str.encode), st.binary(max_size=16)))
    if charset is not None:
        parts.append(element(0x00080005, "CS", charset))
    if draw(st.integers(0, 4)) > 0:
        steps = draw(st.lists(items(SPS_KEYS, 1), max_size=2))
        parts.append(element(SPS, "SQ", b"".join(item(step) for step in steps)))
    return b"".join(parts)


def as_received(identifier: bytes) -> Dataset:
    """The identifier as the SCP's pynetdicom decodes it (lazily: values are converted when read)."""
    return decode(BytesIO(identifier), False, True, False)


def valid_query() -> bytes:
    return element(0x00080050, "SH", KNOWN_ACCESSION.encode()) + element(0x00100010, "PN", b"")


# -- a real SCP and a real SCU ---------------------------------------------------------------------------------


class ServedWorklist:
    """A worklist store with a few items and its MWL SCP on a free loopback port (a context manager)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-mwl-")
        self.store = WorklistStore(str(Path(self._tmp.name) / "worklist.sqlite"))
        self.store.apply(
            [
                ("f1#1", mwl_item(accession=KNOWN_ACCESSION)),
                ("f2#1", mwl_item(charset="ISO_IR 192", patient_name="KOWALSKI^Łukasz", accession="FUZZ0002")),
                ("f3#1", mwl_item(accession="FUZZ0003", station_aet=["CT01", "CT02"], start_time="2330")),
                ("f4#1", mwl_item(accession="FUZZ0004", description="a" * 60 + "Z", modality="MR")),
            ],
            [],
        )
        self.scp = WorklistSCP(self.store.find, ae_title=AET, port=free_port())

    def __enter__(self) -> ServedWorklist:
        self.scp.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.scp.stop()
        self.store.close()
        self._tmp.cleanup()

    @property
    def port(self) -> int:
        return self.scp.port


@dataclass
class Answer:
    statuses: list[int | None]  # every response status, in order (None: no status, the association went away)
    ms: float

    @property
    def final(self) -> int | None:
        return self.statuses[-1] if self.statuses else None

    @property
    def handled(self) -> bool:
        """A final status the SCP chose, preceded by Pending ones only."""
        return self.final in HANDLED and all(s == 0xFF00 for s in self.statuses[:-1])


class Modality:
    """A pynetdicom C-FIND SCU that sends identifier bytes as they are (Explicit VR Little Endian, the only
    transfer syntax it proposes) and reads the responses itself, reconnecting when an association is gone.

    Its association's reactor stays paused: pynetdicom's send_c_find pauses it per request, and under GIL
    contention (the SCP runs in this process) the reactor sometimes takes a response first and drops it
    ("Received unexpected C-FIND service message"), a lost answer that would be blamed on the SCP."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._ae = AE(ae_title="FUZZER")
        self._ae.add_requested_context(ModalityWorklistInformationFind, ExplicitVRLittleEndian)
        self._ae.dimse_timeout = ANSWER_WITHIN * 2
        self._assoc: Association | None = None
        self._message_id = 0

    def _association(self) -> Association:
        if self._assoc is not None and self._assoc.dul.state_machine.current_state == "Sta6":
            return self._assoc
        if self._assoc is not None:
            self._assoc.abort()
        assoc = self._ae.associate("127.0.0.1", self.port, ae_title=AET)
        assert assoc.is_established, "the SCP refused a new association"
        # Nagle off on this side too, else each request waits ~40 ms for a delayed ACK.
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc._reactor_checkpoint.clear()
        for _ in range(2):  # paused, and still paused after any iteration that was under way
            while not assoc._is_paused:
                time.sleep(0.0001)
            time.sleep(0.01)
        self._assoc = assoc
        return assoc

    def ask(self, identifier: bytes) -> Answer:
        assoc = self._association()
        context_id = assoc.accepted_contexts[0].context_id
        self._message_id = self._message_id % 0xFFFF + 1
        request = C_FIND()
        request.MessageID = self._message_id
        request.AffectedSOPClassUID = ModalityWorklistInformationFind
        request.Priority = 2
        request.Identifier = BytesIO(identifier)  # not encoded from a Dataset: pydicom cannot read some of them
        started = time.perf_counter()
        assoc.dimse.send_msg(request, context_id)
        statuses: list[int | None] = []
        while True:
            _context, response = assoc.dimse.get_msg(block=True)  # None: timed out, or the association is gone
            status = getattr(response, "Status", None)
            statuses.append(None if status is None else int(status))
            if status is None or status not in (0xFF00, 0xFF01):
                break
        return Answer(statuses, (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        if self._assoc is not None and self._assoc.dul.state_machine.current_state == "Sta6":
            self._assoc.release()


@pytest.fixture(scope="module", autouse=True)
def quiet_pydicom() -> Iterator[None]:
    """pydicom logs a warning for each invalid value it decodes: thousands here, all expected."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def served() -> Iterator[ServedWorklist]:
    with ServedWorklist() as served:
        yield served


@pytest.fixture(scope="module")
def modality(served: ServedWorklist) -> Iterator[Modality]:
    modality = Modality(served.port)
    yield modality
    modality.close()


# -- the tests -------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(identifier=identifiers())
def test_any_identifier_over_the_wire_gets_a_status_in_time(modality: Modality, identifier: bytes) -> None:
    answer = modality.ask(identifier)
    assert answer.handled, f"answer {[hex(s) if s is not None else s for s in answer.statuses]}"
    assert answer.ms < ANSWER_WITHIN * 1000


def test_an_identifier_pydicom_cannot_read_gets_identifier_does_not_match(modality: Modality) -> None:
    unreadable = element(0x00080005, "CS", b"ISO_IR\x00100") + valid_query()  # a NUL in the character set
    assert modality.ask(unreadable).statuses == [0xA900]
    assert modality.ask(valid_query()).statuses == [0xFF00, 0x0000]


def test_the_scp_still_answers_a_valid_query_after_the_fuzzing(modality: Modality) -> None:
    answer = modality.ask(valid_query())
    assert answer.statuses == [0xFF00, 0x0000]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(identifier=identifiers())
def test_any_identifier_is_matched_or_refused_by_the_store(served: ServedWorklist, identifier: bytes) -> None:
    """The same identifiers straight to the store: responses or a QueryError, in time."""
    started = time.perf_counter()
    try:
        query = as_received(identifier)
    except Exception:
        return
    try:
        found = list(served.store.find(query, deadline=time.monotonic() + ANSWER_WITHIN))
    except QueryError:
        found = []
    assert time.perf_counter() - started < ANSWER_WITHIN
    assert all(isinstance(ds, Dataset) for ds in found)
