"""HL7 v2 batches (FHS/BHS ... BTS/FTS): split into messages, answered with a batch of ACKs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from traboule.formats import hl7

_TEXT = st.text(alphabet=st.characters(blacklist_characters="|^~\\&\r\n", blacklist_categories=("Cs",)), max_size=10)
_SEGMENT = st.tuples(st.sampled_from(["PID", "PV1", "ORC", "OBR", "OBX", "NTE", "ZDS"]), st.lists(_TEXT, max_size=5))


@st.composite
def _message(draw: st.DrawFn) -> str:
    control_id = draw(st.text(alphabet="ABC0123456789", min_size=1, max_size=8))
    segments = draw(st.lists(_SEGMENT, max_size=4))
    lines = [f"MSH|^~\\&|RIS|CHU|TRABOULE|CHU|20261125||ORM^O01|{control_id}|P|2.5"]
    lines += ["|".join([name, *fields]) for name, fields in segments]
    return "\r".join(lines) + "\r"


@given(
    st.lists(_message(), min_size=1, max_size=5),
    st.sampled_from([("FHS|^~\\&|RIS\rBHS|^~\\&|RIS\r", "BTS|{n}\rFTS|1\r"), ("BHS|^~\\&\r", "BTS|{n}\r"), ("", "")]),
    st.sampled_from(["\r", "\n", "\r\n"]),
)
def test_split_batch_gives_back_the_messages_sent(messages: list[str], envelope: tuple[str, str], end: str) -> None:
    head, tail = envelope
    batch = (head + "".join(messages) + tail.format(n=len(messages))).replace("\r", end)
    assert hl7.is_batch(batch) == bool(head)
    assert hl7.split_batch(batch) == messages  # segment ends as sent or not, each message comes back CR-ended


@given(st.lists(_message(), min_size=1, max_size=5))
def test_a_batch_of_acks_splits_into_one_ack_per_message_in_order(messages: list[str]) -> None:
    acks = [
        hl7.build_ack(hl7.parse(m), "AA", control_id=f"R{i}", timestamp="20261125090000").encode()
        for i, m in enumerate(messages)
    ]
    answer = hl7.batch_ack(acks, "utf-8", "20261125090001").decode()
    assert answer.startswith("BHS|^~\\&|||||20261125090001\r") and answer.endswith(f"\rBTS|{len(messages)}\r")
    assert hl7.is_batch(answer)
    replies = [hl7.parse(a) for a in hl7.split_batch(answer)]
    assert [r.segment("MSA").field(2) for r in replies] == [hl7.parse(m).control_id for m in messages]  # type: ignore[union-attr]


def test_the_messages_of_a_batch_keep_its_charset_and_warnings() -> None:
    data = "BHS|^~\\&\rMSH|^~\\&|A|B|C|D|2026||ADT^A08|1|P|2.5|||||FRA|8859/1\rPID|1||||DUPONT^RENÉ\rBTS|1\r"
    decoded = hl7.decode(data.encode("utf-8"))  # declared 8859/1, sent as UTF-8: read as UTF-8, a warning
    (message,) = hl7.batch_messages(decoded)
    assert message.codec == "utf-8" and message.declared == "8859/1" and message.warnings == decoded.warnings
    assert message.warnings and hl7.parse(message.text).segment("PID").field(5) == "DUPONT^RENÉ"  # type: ignore[union-attr]
