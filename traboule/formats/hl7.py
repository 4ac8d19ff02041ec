"""HL7 v2 ER7 reading and writing for the ingest hot path.

Written by hand on purpose: hl7apy's ``parse_message`` handles about 110 ORM messages/s and python-hl7 about
2,500/s on the reference 2-core machine, while durable ingest must sustain thousands of orders/s. This module is a
``str.split`` tokenizer (about 100,000 messages/s) that keeps each field raw (escaped) and unescapes only the
leaves a mapping reads. It also owns the charset policy (MSH-18), the HL7 escape sequences, the MSH fields by name
(`MSH`), batches (FHS/BHS split, the batch of ACKs) and original-mode acknowledgements, built (`build_ack`) and read
(`read_ack`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from traboule.errors import HL7Error

# MSH-18 values (HL7 table 0211) we accept, and the Python codec that reads them.
CHARSETS: dict[str, str] = {
    "": "ascii",
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
}

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


class _Field:
    """MSH-n of an `MSH` view, raw (still escaped); "" when the segment stops before it."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __get__(self, view: Any, owner: type | None = None) -> str:
        fields = view.fields
        return fields[self.n] if self.n < len(fields) else ""


class MSH:
    """The fields of an MSH segment by their HL7 v2.5 names; ``fields[n]`` is MSH-n (MSH-1 is the field
    separator itself). The one place that knows which MSH field is where."""

    __slots__ = ("fields",)

    field_separator = _Field(1)
    encoding_characters = _Field(2)
    sending_application = _Field(3)
    sending_facility = _Field(4)
    receiving_application = _Field(5)
    receiving_facility = _Field(6)
    date_time = _Field(7)
    security = _Field(8)
    message_type = _Field(9)
    control_id = _Field(10)
    processing_id = _Field(11)
    version = _Field(12)
    sequence_number = _Field(13)
    continuation_pointer = _Field(14)
    accept_ack_type = _Field(15)
    application_ack_type = _Field(16)
    country = _Field(17)
    charset = _Field(18)
    principal_language = _Field(19)
    alternate_charset_scheme = _Field(20)
    profile = _Field(21)

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = fields

    @classmethod
    def peek(cls, text: str) -> MSH:
        """The MSH segment ``text`` starts with (its first line, CR or LF ended), split on its own field separator
        without tokenizing the message: for bytes that may not parse (read as Latin-1, one character a byte). No
        fields when ``text`` does not start with MSH."""
        if not text.startswith("MSH") or len(text) < 4:
            return cls([])
        sep = text[3]
        first = text.split("\r", 1)[0].split("\n", 1)[0]
        return cls(["MSH", sep, *first.split(sep)[1:]])


# MSH field names → numbers (``MSH_FIELDS["control_id"] == 10``).
MSH_FIELDS: dict[str, int] = {name: f.n for name, f in vars(MSH).items() if isinstance(f, _Field)}


@dataclass
class Decoded:
    """Message text and how its bytes were read."""

    text: str
    codec: str  # Python codec used; the ACK is written with the same one
    declared: str  # MSH-18 as sent
    warnings: list[str] = field(default_factory=list)


def decode(data: bytes) -> Decoded:
    """Decode message bytes following MSH-18, with the documented leniencies.

    * A UTF-8 byte order mark before ``MSH`` is dropped.
    * MSH-18 ``8859/1`` (or empty / ASCII) over bytes that are valid UTF-8 with non-ASCII characters: read as
      UTF-8 (seen in real feeds: a RIS declaring Latin-1 and sending UTF-8). Latin-1 text almost never forms
      valid multi-byte UTF-8 sequences, so the guess is safe; a warning is journaled.
    * Empty MSH-18 (ASCII) with 8-bit bytes that are not UTF-8: read as Latin-1.
    * MSH-18 ``UNICODE UTF-8`` over invalid UTF-8: rejected (we would otherwise alter identity traits).
    """
    warnings: list[str] = []
    if data.startswith(BOM):
        data = data[len(BOM) :]
        warnings.append("UTF-8 byte order mark before MSH removed")
    data = data.lstrip(b"\r\n\t ")
    head = data
    if data.startswith((b"FHS", b"BHS")):  # a batch: the charset is that of its first message
        at = min((i for i in (data.find(b"\rMSH"), data.find(b"\nMSH")) if i >= 0), default=-1)
        head = data[at + 1 :] if at >= 0 else b""
    if not head.startswith(b"MSH") or len(head) < 8:
        raise HL7Error("message does not start with an MSH segment", location="MSH", code="100")
    end = min((i for i in (head.find(b"\r"), head.find(b"\n")) if i >= 0), default=len(head))
    # Read as Latin-1 (one character a byte) to split it; the charset name itself must be ASCII.
    declared = MSH.peek(head[: max(end, 4)].decode("latin-1")).charset
    declared = declared.encode("latin-1").decode("ascii", "replace").strip()
    # MSH-18 repeats (first repetition: the default character set); take its first component.
    repetition = head[5:6].decode("latin-1") or "~"
    component = head[4:5].decode("latin-1") or "^"
    charset = declared.split(repetition)[0].split(component)[0].strip().upper() if declared else ""
    codec = CHARSETS.get(charset)
    if codec is None:
        raise HL7Error(
            f"MSH-18 character set {declared!r} is not supported (ASCII, 8859/1, 8859/15, UNICODE UTF-8)",
            location="MSH-18",
            code="102",
        )
    if codec == "utf-8":
        try:
            return Decoded(data.decode("utf-8"), codec, declared, warnings)
        except UnicodeDecodeError as exc:
            raise HL7Error(
                f"MSH-18 declares UTF-8 but byte {exc.start} is not valid UTF-8", location="MSH-18", code="102"
            ) from exc
    if data.isascii():
        return Decoded(data.decode("ascii"), codec, declared, warnings)
    try:
        text = data.decode("utf-8")
        warnings.append(f"MSH-18 {declared or 'empty'} but the bytes are UTF-8: read as UTF-8")
        return Decoded(text, "utf-8", declared, warnings)
    except UnicodeDecodeError:
        pass
    if codec == "ascii":
        warnings.append("MSH-18 empty (ASCII) but 8-bit bytes present: read as 8859/1")
        codec = "latin-1"
    return Decoded(data.decode(codec), codec, declared, warnings)


_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")
# Most segments of one message: a long text report has hundreds; each costs microseconds on the ingest loop.
MAX_SEGMENTS = 10_000


@dataclass
class Segment:
    """One segment; ``fields[0]`` is its name and ``fields[n]`` is field n (MSH is numbered as in the standard)."""

    name: str
    fields: list[str]

    def field(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""


class Message:
    """A tokenized message: segments split into raw (still escaped) fields."""

    __slots__ = ("segments", "separators", "text")

    def __init__(self, text: str, segments: list[Segment], separators: Separators):
        self.text = text
        self.segments = segments
        self.separators = separators

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def header(self, field: int | str, component: int = 0) -> str:
        """An MSH field (by number or by its `MSH` name), or one of its components, unescaped."""
        value = self.msh.field(MSH_FIELDS[field] if isinstance(field, str) else field)
        if component:
            parts = value.split(self.separators.component)
            value = parts[component - 1] if component <= len(parts) else ""
        return unescape(value, self.separators)

    @property
    def message_type(self) -> str:
        """``ORM^O01`` style type (MSH-9.1^MSH-9.2), whatever MSH-9.3 says."""
        return f"{self.header('message_type', 1).strip()}^{self.header('message_type', 2).strip()}"

    @property
    def control_id(self) -> str:
        return self.header("control_id").strip()

    @property
    def version(self) -> str:
        """MSH-12.1, trimmed (``2.5^FRA^2.11`` → ``2.5``)."""
        return self.header("version", 1).strip()

    def segment(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def all(self, name: str) -> Iterator[Segment]:
        return (s for s in self.segments if s.name == name)


def parse(text: str) -> Message:
    """Tokenize one message. Segment ends may be CR, LF or CRLF; empty lines are ignored."""
    if not text.startswith("MSH") or len(text) < 8:
        raise HL7Error("message does not start with an MSH segment", location="MSH", code="100")
    fsep = text[3]
    enc_end = text.find(fsep, 4)
    enc = text[4:enc_end] if enc_end > 0 else ""
    if enc == "^\\~\\&":
        enc = "^~\\&"  # seen from a real RIS: the repetition separator escaped in MSH-2 itself
    # MSH-2 is 4 characters (5 from v2.7 with the truncation character), all distinct delimiters.
    if (
        len(enc) not in (4, 5)
        or len(set(enc + fsep)) != len(enc) + 1
        or any(c.isalnum() or c.isspace() for c in enc + fsep)
    ):
        raise HL7Error("MSH-1/MSH-2 separators are not valid", location="MSH-2", code="102")
    seps = Separators(
        field=fsep,
        component=enc[0],
        repetition=enc[1],
        escape=enc[2] if len(enc) > 2 else "\\",
        subcomponent=enc[3] if len(enc) > 3 else "&",
    )
    # A line that does not start a segment continues the previous one: real senders wrap long Base64 or text
    # fields with bare line feeds. Joined without a separator, as the line break was not data; gathered first and
    # joined once (appending to the field line by line was quadratic: 4 MiB of wrapped Base64 took 2.6 s).
    lines: list[str] = []
    wrapped: dict[int, list[str]] = {}  # line index -> its pieces, for the (rare) wrapped segments only
    for line in _SEGMENT_SPLIT.split(text):
        if not line.strip():
            continue
        if lines and not (line[:3].isalnum() and (len(line.rstrip()) == 3 or line[3:4] == fsep)):
            wrapped.setdefault(len(lines) - 1, [lines[-1]]).append(line)
        else:
            lines.append(line)
    if len(lines) > MAX_SEGMENTS:
        raise HL7Error(f"{len(lines)} segments, more than the {MAX_SEGMENTS} a message may have", location="MSH")
    for index, pieces in wrapped.items():
        lines[index] = "".join(pieces)
    segments: list[Segment] = []
    for line in lines:
        parts = line.split(fsep)
        name = parts[0].strip()
        if name == "MSH" or name in ("FHS", "BHS"):
            # MSH-1 is the field separator itself: shift so that fields[n] is MSH-n.
            parts = [name, fsep, *parts[1:]]
        if len(name) != 3 or not name.isalnum():
            raise HL7Error(
                f"segment {len(segments) + 1} has no valid name ({name[:10]!r})",
                code="100",
                location=name[:3] or "MSH",
                reject=False,
            )
        segments.append(Segment(name, parts))
    if not segments or segments[0].name != "MSH":
        raise HL7Error("message does not start with an MSH segment", location="MSH", code="100")
    return Message(text, segments, seps)


def split_batch(text: str) -> list[str]:
    """Split an FHS/BHS batch (or several concatenated messages) into single messages."""
    messages: list[list[str]] = []
    for line in _SEGMENT_SPLIT.split(text):
        name = line[:3]
        if name in ("FHS", "BHS", "BTS", "FTS") or not line.strip():
            continue
        if name == "MSH":
            messages.append([])
        if messages:
            messages[-1].append(line)
    return ["\r".join(lines) + "\r" for lines in messages]


def is_batch(text: str) -> bool:
    return text.startswith(("FHS", "BHS"))


def batch_messages(batch: Decoded) -> list[Decoded]:
    """The messages of a decoded FHS/BHS batch, each read as the batch was (its charset and warnings)."""
    return [Decoded(m, batch.codec, batch.declared, batch.warnings) for m in split_batch(batch.text)]


def batch_ack(acks: list[bytes], codec: str, timestamp: str) -> bytes:
    """Answer a batch with a batch of ACKs (BHS ... BTS), one ACK per message, in order."""
    head = f"BHS|^~\\&|||||{timestamp}\r".encode(codec)
    tail = f"BTS|{len(acks)}\r".encode(codec)
    return head + b"".join(acks) + tail


# --- escape sequences (HL7 v2.5 §2.7) -------------------------------------------------------------------------

_FORMATTING = {".br": "\n", "H": "", "N": ""}


@dataclass
class Parties:
    """MSH-3 to MSH-6 of the messages a channel sends, from its settings (``sending_application``...)."""

    sending_application: str = "TRABOULE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], receiver: str) -> Parties:
        return cls(
            str(config.get("sending_application", "TRABOULE")),
            str(config.get("sending_facility", "")),
            str(config.get("receiving_application", receiver)),
            str(config.get("receiving_facility", "")),
        )

    def msh(
        self, message_type: str, control_id: str, timestamp: str, version: str, *, country: str = "", profile: str = ""
    ) -> str:
        """The MSH segment (UTF-8 declared in MSH-18; MSH-17 country, MSH-21 message profile when given)."""
        e = escape
        head = (
            f"MSH|^~\\&|{e(self.sending_application)}|{e(self.sending_facility)}|{e(self.receiving_application)}"
            f"|{e(self.receiving_facility)}|{timestamp}||{message_type}|{control_id}|P|{version}|||||{country}"
            "|UNICODE UTF-8"
        )
        return head + (f"|||{profile}" if profile else "")


def unescape(value: str, seps: Separators = Separators()) -> str:
    """Decode \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh..\\ and \\.br\\; other sequences are dropped (formatting)."""
    esc = seps.escape
    if esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        end = value.find(esc, i + 1) if ch == esc else -1
        if ch != esc or end < 0:
            out.append(ch)
            i += 1
            continue
        seq = value[i + 1 : end]
        if seq == "F":
            out.append(seps.field)
        elif seq == "S":
            out.append(seps.component)
        elif seq == "T":
            out.append(seps.subcomponent)
        elif seq == "R":
            out.append(seps.repetition)
        elif seq == "E":
            out.append(esc)
        elif seq.startswith("X") and len(seq) % 2 == 1:
            try:
                raw = bytes.fromhex(seq[1:])
                out.append(raw.decode("utf-8") if not raw.isascii() else raw.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                out.append(bytes.fromhex(seq[1:]).decode("latin-1") if _is_hex(seq[1:]) else "")
        elif seq in _FORMATTING:
            out.append(_FORMATTING[seq])
        elif seq.startswith((".", "C", "M", "Z")):
            pass  # formatting commands, charset switches and local escapes carry no text
        else:
            out.append(value[i : end + 1])  # not an escape sequence we know: keep the text as sent
        i = end + 1
    return "".join(out)


def _is_hex(s: str) -> bool:
    try:
        bytes.fromhex(s)
        return True
    except ValueError:
        return False


def escape(value: str, seps: Separators = Separators()) -> str:
    """Escape the delimiters so that ``unescape(escape(v)) == v``; CR/LF become \\X0D\\ / \\X0A\\."""
    esc = seps.escape
    table = {
        esc: f"{esc}E{esc}",
        seps.field: f"{esc}F{esc}",
        seps.component: f"{esc}S{esc}",
        seps.subcomponent: f"{esc}T{esc}",
        seps.repetition: f"{esc}R{esc}",
        "\r": f"{esc}X0D{esc}",
        "\n": f"{esc}X0A{esc}",
    }
    if not any(c in value for c in table):
        return value
    return "".join(table.get(c, c) for c in value)


# --- acknowledgements -----------------------------------------------------------------------------------------


@dataclass
class AckError:
    reason: str
    location: str = ""  # "PID-3", "OBR-18", "MSH-9"
    code: str = "207"  # HL7 table 0357
    severity: str = "E"


def build_ack(
    msg: Message | None,
    code: str,
    *,
    control_id: str,
    timestamp: str,
    error: AckError | None = None,
    header: MSH | None = None,
) -> str:
    """An original-mode ACK (MSH + MSA [+ ERR]) answering ``msg``.

    Built by hand rather than with hl7apy: it is on the hot path (one per message) and its shape is fixed.
    ``header`` serves when the message could not be tokenized but its MSH could be split (`peek_for_ack`).
    """
    seps = msg.separators if msg else Separators()
    h = MSH(msg.msh.fields) if msg else header or MSH([])
    trigger = h.message_type.split(seps.component)[1] if seps.component in h.message_type else ""
    version = h.version or "2.5"
    version_id = version.split(seps.component)[0].strip()
    # MSH-1..18 of the answer: the applications swapped, the sender's processing id, version, country and charset.
    msh = [
        "MSH",
        seps.encoding_characters,
        h.receiving_application,
        h.receiving_facility,
        h.sending_application,
        h.sending_facility,
        timestamp,
        "",
        f"ACK{seps.component}{trigger}{seps.component}ACK" if trigger else "ACK",
        control_id,
        h.processing_id or "P",
        version,
        "",
        "",
        "",
        "",
        h.country,
        h.charset,
    ]
    while msh and msh[-1] == "":
        msh.pop()
    fs = seps.field
    lines = [fs.join(msh)]
    text = escape(error.reason, seps)[:200] if error else ""
    lines.append(fs.join(["MSA", code, h.control_id, *([text] if text else [])]))
    if error:
        lines.append(_err_segment(error, version_id, seps))
    return "\r".join(lines) + "\r"


def peek_for_ack(text: str) -> MSH:
    """What an ACK to ``text`` that could not be tokenized can echo: its MSH fields when its delimiters are the
    usual ones (the ACK is written with them, so fields split with others would be misread); else none."""
    return MSH.peek(text) if text.startswith("MSH|^~\\&") else MSH([])


@dataclass(frozen=True)
class AckReading:
    """How a receiver answered a message we sent (`read_ack`)."""

    code: str  # MSA-1: AA or CA accepted; AE, AR, CE, CR refused; "" when there is none to read
    accepted: bool
    reason: str = ""  # why not accepted, for the operator (may quote the receiver's text)
    # The answer names another message (a late answer to an earlier one, after a timeout): the fate of this one is
    # unknown and the connection's answers are out of step with its messages.
    out_of_step: bool = False


def read_ack(sent: bytes, answer: bytes) -> AckReading:
    """Read the receiver's ``answer`` to the message ``sent``: MSA-1, MSA-2 against the sent MSH-10 (read from its
    first line, without tokenizing a message that may carry a CDA), MSA-3 or ERR-8 when refused."""
    try:
        ack = parse(decode(answer).text)
    except HL7Error as exc:
        return AckReading("", False, f"unreadable ACK: {exc}")
    msa = ack.segment("MSA")
    code = msa.field(1) if msa else ""
    sent_id = MSH.peek(sent.split(b"\r", 1)[0].decode("latin-1")).control_id
    if msa is not None and sent_id and msa.field(2) and msa.field(2) != sent_id:
        reason = f"the ACK is for message {msa.field(2)!r}, not {sent_id!r}"
        return AckReading(code, False, reason, out_of_step=True)
    if code not in ("AA", "CA"):
        text = msa.field(3) if msa else ""
        err = ack.segment("ERR")
        detail = text or (err.field(8) if err else "")
        return AckReading(code, False, f"receiver answered {code or 'no MSA'} {detail}".strip())
    return AckReading(code, True)


_ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}


def _err_segment(error: AckError, version: str, seps: Separators) -> str:
    """ERR in the shape of the sender's version: ERR-1 (ELD) before 2.5, ERR-2/3/4/8 from 2.5 on."""
    c, s, fs = seps.component, seps.subcomponent, seps.field
    loc = re.match(r"^([A-Z0-9]{3})(?:-(\d+))?(?:\.(\d+))?", error.location or "")
    seg, fld, comp = (loc.group(1), loc.group(2) or "", loc.group(3) or "") if loc else ("", "", "")
    label = _ERROR_TEXT.get(error.code, "Application error")
    reason = escape(error.reason, seps)[:250]
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
        modern = (major, minor) >= (2, 5)
    except ValueError:
        modern = True
    if not modern:
        return fs.join(["ERR", c.join([seg, "1" if seg else "", fld, f"{error.code}{s}{label}{s}HL70357"])])
    # ERL: segment ^ sequence ^ field ^ field repetition ^ component
    location = c.join([seg, "1" if seg else "", fld, "1" if comp else "", comp]).rstrip(c)
    return fs.join(["ERR", "", location, c.join([error.code, label, "HL70357"]), error.severity, "", "", "", reason])
