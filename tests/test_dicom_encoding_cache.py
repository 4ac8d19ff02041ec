"""The encoder keeps the bytes of elements items share: what it writes is what it would write without them."""

from __future__ import annotations

import pytest

from traboule.formats import dicom_encoding
from traboule.formats.dicom_encoding import Element, EncodingError, encode, to_dataset
from traboule.formats.worklist_item import encode_item

TREE: list[Element] = [
    (0x00100010, "PN", "DUPONT^Hélène"),
    (0x00100020, "LO", "IPP1"),
    (0x00080050, "SH", ""),
    (0x001021C0, "US", None),
    (0x00400100, "SQ", [[(0x00080060, "CS", "CT"), (0x00400001, "AE", "CT01")]]),
]


def test_an_element_is_written_in_each_character_set_as_pydicom_writes_it() -> None:
    for charset in ["ISO_IR 100", "ISO_IR 192", "ISO_IR 100", "ISO_IR 192"]:  # the second round from the cache
        assert encode(TREE, charset) == encode_item(to_dataset(TREE, charset)), charset
    assert "Hélène".encode("latin-1") in encode(TREE, "ISO_IR 100")
    assert "Hélène".encode() in encode(TREE, "ISO_IR 192")


def test_a_full_cache_is_emptied_and_the_bytes_stay_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom_encoding, "_ENCODED", {})
    monkeypatch.setattr(dicom_encoding, "_ENCODED_MAX", 2)
    expected = encode_item(to_dataset(TREE, "ISO_IR 100"))
    for _ in range(3):
        assert encode(TREE, "ISO_IR 100") == expected
    assert len(dicom_encoding._ENCODED["latin-1"]) <= 2


def test_a_refused_element_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(EncodingError, match="only an empty value"):
            encode([(0x001021C0, "US", "")], "ISO_IR 100")
        with pytest.raises(EncodingError, match="appears twice"):
            encode([(0x00100020, "LO", "IPP1"), (0x00100020, "LO", "IPP1")], "ISO_IR 100")
        with pytest.raises(EncodingError, match="codec"):
            encode([(0x00100010, "PN", "Łukasz")], "ISO_IR 100")
