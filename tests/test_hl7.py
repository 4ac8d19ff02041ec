"""HL7 v2 tokenizer, escapes, charsets and ACKs."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT, shared_path
from traboule.formats import hl7

ORM = (
    "MSH|^~\\&|RIS|CHU|TRABOULE|CHU|20261125083000||ORM^O01|C1|P|2.3.1\r"
    "PID|1||IPP1^^^CHU^PI||DOE^JOHN\r"
    "ORC|NW|PLC1\r"
    "OBR|1|PLC1\r"
)


@given(st.text())
def test_unescape_inverts_escape(text: str) -> None:
    assert hl7.unescape(hl7.escape(text)) == text


@given(st.text(alphabet=st.characters(blacklist_characters="|^~\\&\r\n")))
def test_escape_leaves_plain_text_alone(text: str) -> None:
    assert hl7.escape(text) == text


@given(st.text(alphabet="|^~\\&\r\nab"))
def test_escaped_text_has_no_delimiters(text: str) -> None:
    escaped = hl7.escape(text)
    assert not set(escaped) & set("|^~&\r\n")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("a\\F\\b", "a|b"),
        ("a\\S\\b\\T\\c\\R\\d\\E\\e", "a^b&c~d\\e"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("\\X48454C4C4F\\", "HELLO"),
        ("\\XC3A9\\t\\XC3A9\\", "été"),
        ("\\H\\bold\\N\\", "bold"),
        ("unknown \\Q\\ stays", "unknown \\Q\\ stays"),
        ("lone \\ escape", "lone \\ escape"),
    ],
)
def test_unescape_sequences(raw: str, text: str) -> None:
    assert hl7.unescape(raw) == text


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
def test_segment_endings_cr_lf_crlf(ending: str) -> None:
    msg = hl7.parse(ORM.replace("\r", ending))
    assert [s.name for s in msg.segments] == ["MSH", "PID", "ORC", "OBR"]
    assert msg.message_type == "ORM^O01"
    assert msg.control_id == "C1"
    assert msg.msh.field(12) == "2.3.1"


def test_composite_version_and_trailing_space() -> None:
    msg = hl7.parse(ORM.replace("|2.3.1", "|2.5^FRA^2.11 "))
    assert msg.version == "2.5"


def test_bom_is_dropped_and_noted() -> None:
    decoded = hl7.decode(b"\xef\xbb\xbf" + ORM.encode())
    assert decoded.text.startswith("MSH")
    assert any("byte order mark" in w for w in decoded.warnings)


def test_latin1_declared_latin1_bytes() -> None:
    data = ORM.replace("|2.3.1", "|2.3.1||||||8859/1").replace("JOHN", "Hélène").encode("latin-1")
    decoded = hl7.decode(data)
    assert "Hélène" in decoded.text
    assert decoded.codec == "latin-1"
    assert not decoded.warnings


def test_latin1_declared_over_utf8_bytes_reads_utf8() -> None:
    data = ORM.replace("|2.3.1", "|2.3.1||||||8859/1").replace("JOHN", "Hélène – x").encode("utf-8")
    decoded = hl7.decode(data)
    assert "Hélène – x" in decoded.text
    assert decoded.codec == "utf-8"
    assert decoded.warnings


def test_utf8_declared_over_invalid_bytes_is_rejected() -> None:
    data = ORM.replace("|2.3.1", "|2.5||||||UNICODE UTF-8").replace("JOHN", "Hélène").encode("latin-1")
    with pytest.raises(hl7.HL7Error) as exc:
        hl7.decode(data)
    assert exc.value.location == "MSH-18"


def test_unknown_charset_is_rejected() -> None:
    with pytest.raises(hl7.HL7Error) as exc:
        hl7.decode(ORM.replace("|2.3.1", "|2.5||||||ISO IR87").encode())
    assert exc.value.code == "102" and exc.value.location == "MSH-18"


def test_msh18_repetitions_use_the_message_separator() -> None:
    data = ORM.replace("|2.3.1", "|2.5||||||UNICODE UTF-8~8859/1").replace("JOHN", "Zoë").encode("utf-8")
    assert hl7.decode(data).codec == "utf-8"


def test_err_location_with_component() -> None:
    msg = hl7.parse(ORM.replace("|2.3.1", "|2.5"))
    err = hl7.AckError("given name empty", "PID-5.2", "101")
    ack = hl7.parse(hl7.build_ack(msg, "AE", control_id="X4", timestamp="20261125090000", error=err))
    assert ack.segment("ERR").field(2) == "PID^1^5^1^2"  # type: ignore[union-attr]


@pytest.mark.parametrize("data", [b"", b"PID|1", b"HELLO WORLD", b"MSH", b"\x00\x01\x02"])
def test_not_hl7_is_an_error_not_a_crash(data: bytes) -> None:
    with pytest.raises(hl7.HL7Error):
        hl7.parse(hl7.decode(data).text)


@given(st.binary(max_size=300))
def test_fuzz_decode_and_parse_raise_only_hl7error(data: bytes) -> None:
    with contextlib.suppress(hl7.HL7Error):
        hl7.parse(hl7.decode(b"MSH|^~\\&|" + data).text)


def test_split_batch() -> None:
    batch = "FHS|^~\\&|RIS\rBHS|^~\\&|RIS\r" + ORM + ORM.replace("C1", "C2") + "BTS|2\rFTS|1\r"
    assert hl7.is_batch(batch)
    parts = hl7.split_batch(batch)
    assert [hl7.parse(p).control_id for p in parts] == ["C1", "C2"]


def test_ack_aa_echoes_control_id_and_swaps_applications() -> None:
    msg = hl7.parse(ORM)
    ack = hl7.parse(hl7.build_ack(msg, "AA", control_id="X1", timestamp="20261125090000"))
    assert ack.message_type == "ACK^O01"
    assert ack.header(3) == "TRABOULE" and ack.header(5) == "RIS"
    msa = ack.segment("MSA")
    assert msa is not None and msa.fields[1:3] == ["AA", "C1"]


def test_ack_error_v25_has_err_location_and_code() -> None:
    msg = hl7.parse(ORM.replace("|2.3.1", "|2.5"))
    err = hl7.AckError("PID-3 empty", "PID-3", "101")
    ack = hl7.parse(hl7.build_ack(msg, "AE", control_id="X2", timestamp="20261125090000", error=err))
    seg = ack.segment("ERR")
    assert seg is not None
    assert seg.field(2) == "PID^1^3"
    assert seg.field(3).startswith("101^Required field missing^HL70357")
    assert seg.field(4) == "E"


def test_ack_error_v231_uses_err1() -> None:
    msg = hl7.parse(ORM)
    err = hl7.AckError("OBR-18 empty", "OBR-18", "101")
    ack = hl7.parse(hl7.build_ack(msg, "AE", control_id="X3", timestamp="20261125090000", error=err))
    seg = ack.segment("ERR")
    assert seg is not None and seg.field(1).startswith("OBR^1^18^101")


def test_corpus_messages_tokenize() -> None:
    folder = shared_path("corpus", "hl7v2")
    for path in sorted(folder.iterdir()):
        decoded = hl7.decode(path.read_bytes())
        text = decoded.text
        messages = hl7.split_batch(text) if hl7.is_batch(text) else [text]
        for m in messages:
            msg = hl7.parse(m)
            assert msg.message_type.count("^") == 1, path.name


def test_wrapped_lines_continue_their_segment() -> None:
    """Senders wrap long Base64 fields with bare line feeds; the rest of the segment follows the break."""
    text = "MSH|^~\\&|RIS|CHU||TRABOULE|20261125||ORU^R01|C9|P|2.5\rOBX|1|ED|X||^AP^PDF^Base64^JVBER\nA0KJ==||||F|\r"
    msg = hl7.parse(text)
    obx = msg.segment("OBX")
    assert obx is not None
    assert obx.field(5) == "^AP^PDF^Base64^JVBERA0KJ=="
    assert obx.field(9) == "F"
    wrapped_msh = hl7.parse("MSH|^~\\&|R\rIS|CHU|TRABOULE|CHU|20261125||ORM^O01|C8|P|2.3.1\rPID|1\r")
    assert wrapped_msh.header(3) == "RIS" and wrapped_msh.control_id == "C8"


def test_escaped_msh2_from_a_real_ris_is_understood() -> None:
    msg = hl7.parse(ORM.replace("MSH|^~\\&|", "MSH|^\\~\\&|"))
    assert msg.separators.repetition == "~" and msg.message_type == "ORM^O01"


def test_a_wrapped_base64_field_is_joined_in_linear_time() -> None:
    """Continuation lines were appended to the field one by one: 4 MiB of wrapped Base64 took 2.6 s, 16 MiB
    would have taken a minute of the ingest loop."""
    import time

    body = "\n".join(["QUJD" * 19] * (16 * 1024 * 1024 // 77))
    text = "MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5\rOBX|1|ED|x||^AP^^Base64^" + body + "\rOBX|2|ST|y||z\r"
    started = time.perf_counter()
    msg = hl7.parse(text)
    assert time.perf_counter() - started < 5  # ~0.2 s; the quadratic join took minutes
    assert msg.segments[1].field(5).endswith("QUJD" * 19) and "\n" not in msg.segments[1].field(5)
    assert [s.name for s in msg.segments] == ["MSH", "OBX", "OBX"]


def test_a_message_of_too_many_segments_is_refused() -> None:
    text = "MSH|^~\\&|A|B|C|D|20260101||ORM^O01|1|P|2.5\r" + "NTE|1|x\r" * (hl7.MAX_SEGMENTS + 1)
    with pytest.raises(hl7.HL7Error, match="segments, more than"):
        hl7.parse(text)


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("PID|1||IPP0001", "PID|1||" + "X^^^A^PI~" * 1200 + "IPP0001", "PID-3"),
        ("ZDS|", "ORC|NW|P2\r" * 1200 + "ZDS|", "ORC"),
    ],
)
def test_repetitions_and_orders_beyond_the_bound_are_refused(old: str, new: str, where: str) -> None:
    from traboule.translate.hl7_mapping import HL7InboundMapping, MappingFailure

    text = (ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1").replace(old, new, 1)
    with pytest.raises(MappingFailure) as exc:
        HL7InboundMapping().map(hl7.parse(text))
    assert exc.value.location == where and "more than the 1000" in exc.value.reason


# --- MSH fields by name ---------------------------------------------------------------------------------------

# Raw field values without the delimiters, escapes or line breaks (what a field holds between two separators).
_FIELD = st.text(alphabet=st.characters(blacklist_characters="|^~\\&#\r\n", blacklist_categories=("Cs",)), max_size=12)
_NAMES = [name for name in hl7.MSH_FIELDS if name not in ("field_separator", "encoding_characters")]


def test_msh_names_are_the_hl7_v2_5_field_numbers() -> None:
    assert hl7.MSH_FIELDS["sending_application"] == 3 and hl7.MSH_FIELDS["control_id"] == 10
    assert hl7.MSH_FIELDS["charset"] == 18 and hl7.MSH_FIELDS["profile"] == 21
    assert sorted(hl7.MSH_FIELDS.values()) == list(range(1, 22))


@given(st.lists(_FIELD, min_size=1, max_size=21), st.sampled_from("|#"))
def test_msh_fields_are_read_by_name_as_sent(values: list[str], fsep: str) -> None:
    line = fsep.join(["MSH", "^~\\&", *values])
    by_number = {n: values[n - 3] if n - 3 < len(values) else "" for n in range(3, 22)}
    msh = hl7.MSH.peek(line + "\rPID|1\r")
    assert msh.field_separator == fsep and msh.encoding_characters == "^~\\&"
    for name in _NAMES:
        assert getattr(msh, name) == by_number[hl7.MSH_FIELDS[name]]
    # The tokenizer's segment and the peek agree; Message.header reads the same field by name or number.
    msg = hl7.parse(line + "\r")
    for name in _NAMES:
        assert getattr(hl7.MSH(msg.msh.fields), name) == getattr(msh, name)
        assert msg.header(name) == msg.header(hl7.MSH_FIELDS[name]) == getattr(msh, name)


@given(st.sampled_from(["\r", "\n", "\r\n"]), _FIELD)
def test_msh_peek_stops_at_the_first_line_break(end: str, value: str) -> None:
    msh = hl7.MSH.peek(f"MSH|^~\\&|A|B|C|D|2026||ORM^O01|{value}{end}PID|1|X|Y|Z|W|V|U|T|S|R|Q|P|O|N")
    assert msh.control_id == value and msh.processing_id == "" and msh.profile == ""


@pytest.mark.parametrize("text", ["", "MSH", "PID|1|2", "\rMSH|^~\\&|A"])
def test_msh_peek_of_what_is_not_an_msh_has_no_fields(text: str) -> None:
    assert hl7.MSH.peek(text).fields == [] and hl7.MSH.peek(text).control_id == ""


def test_an_ack_echoes_only_an_msh_split_with_the_usual_delimiters() -> None:
    usual = hl7.peek_for_ack("MSH|^~\\&|RIS|CHU|PACS|CHU|2026||ORM^O01|C7|P|2.5\rPID|broken")
    assert usual.control_id == "C7" and usual.sending_application == "RIS"
    assert hl7.peek_for_ack("MSH#^~\\&#RIS#CHU#PACS#CHU#2026##ORM^O01#C7#P#2.5\r").fields == []
    ack = hl7.parse(hl7.build_ack(None, "AR", control_id="X9", timestamp="20261125090000", header=usual))
    assert ack.header("receiving_application") == "RIS" and ack.header("sending_application") == "PACS"
    assert ack.segment("MSA").fields[1:3] == ["AR", "C7"]  # type: ignore[union-attr]


@pytest.mark.parametrize("charset", ["", "ASCII", "8859/1", "8859/15", "UNICODE UTF-8", "UTF-8"])
def test_decode_reads_the_charset_by_name(charset: str) -> None:
    decoded = hl7.decode(f"MSH|^~\\&|A|B|C|D|2026||ADT^A08|1|P|2.5|||||FRA|{charset}|FR\rPID|1\r".encode())
    assert decoded.declared == charset and decoded.codec == hl7.CHARSETS[charset]


# --- ACKs read (the answers to what the engine sends) ----------------------------------------------------------

SENT = b"MSH|^~\\&|TRABOULE|CHU|RIS|CHU|20261125100000||ORU^R01|MINE|P|2.5\rPID|1\r"


def _answer(code: str, *, control_id: str = "MINE", error: hl7.AckError | None = None) -> bytes:
    msg = hl7.parse(SENT.decode())
    ack = hl7.build_ack(msg, code, control_id="R1", timestamp="20261125100001", error=error)
    return ack.replace(f"MSA|{code}|MINE", f"MSA|{code}|{control_id}").encode()


@pytest.mark.parametrize("code", ["AA", "CA"])
def test_read_ack_accepts_aa_and_ca(code: str) -> None:
    assert hl7.read_ack(SENT, _answer(code)) == hl7.AckReading(code, True)


def test_read_ack_says_why_a_refusal_was_given() -> None:
    refused = hl7.read_ack(SENT, _answer("AE", error=hl7.AckError("PID-3 empty", "PID-3", "101")))
    assert (refused.code, refused.accepted, refused.out_of_step) == ("AE", False, False)
    assert refused.reason == "receiver answered AE PID-3 empty"
    no_msa = hl7.read_ack(SENT, b"MSH|^~\\&|RIS|CHU|TRABOULE|CHU|2026||ACK|R2|P|2.5\r")
    assert not no_msa.accepted and no_msa.reason == "receiver answered no MSA"


def test_read_ack_finds_an_answer_for_another_message_out_of_step() -> None:
    late = hl7.read_ack(SENT, _answer("AA", control_id="EARLIER"))
    assert not late.accepted and late.out_of_step and "'EARLIER', not 'MINE'" in late.reason


@given(st.binary(max_size=200))
def test_read_ack_of_any_bytes_is_a_reading_never_an_exception(answer: bytes) -> None:
    reading = hl7.read_ack(SENT, b"MSH|^~\\&|" + answer)
    assert reading.accepted == (reading.code in ("AA", "CA") and not reading.out_of_step)
    assert reading.accepted or reading.reason
