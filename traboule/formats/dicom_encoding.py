"""Explicit VR little endian encoding of the datasets this engine builds, without pydicom in the loop.

Why a second encoder: pydicom's writer is general (any VR, any transfer syntax, buffered values, character set
escapes...) and costs ~0.6 ms per worklist item on the ingest machine, plus ~0.5 ms to build the `Dataset` it
writes; the worklist consumer runs in the same process as ingest, so that CPU comes straight off ingest
throughput. This encoder handles only what the mappings emit: string values, empty values and sequences, in
ISO_IR 100 or ISO_IR 192. Anything else raises `EncodingError`, and the caller falls back to pydicom.

The input is an element tree: a list of ``(tag, VR, value)`` where value is a ``str``, ``None`` (zero length), or
for SQ a list of item trees. `encode` returns exactly the bytes `traboule.stores.worklist.encode_item` (pydicom
``write_dataset``: explicit VR little endian, no preamble, no file meta) writes for the equivalent dataset,
`to_dataset`. tests/test_dicom_encoding.py checks that property on random trees. What has to match pydicom:

* elements in tag order; even lengths (pad with a space, NUL for UI); 2-byte lengths except for the VRs in
  `LONG_LENGTH_VRS` (2 reserved bytes, 4-byte length);
* sequences and items with defined lengths (what pydicom writes for datasets it did not read);
* PN, LO, SH, LT, ST, UT, UC in the character set's codec; the other string VRs in Latin-1 whatever the
  character set (pydicom's ``write_string``); PN values lose their trailing empty component groups (``A==``);
* values pydicom would rewrite on assignment are refused rather than imitated: DS and IS are taken only in plain
  decimal form, UI only without surrounding white space.
"""

from __future__ import annotations

import re
import struct
from operator import itemgetter

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from traboule.errors import EncodingError

Value = str | None | list[list["Element"]]
Element = tuple[int, str, Value]

SPECIFIC_CHARACTER_SET = 0x00080005

# (0008,0005) value -> Python codec of the values in a character set VR. No element: pydicom's default, Latin-1.
CHARSET_CODECS: dict[str | None, str] = {None: "latin-1", "": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_CHARSET_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})  # encoded with the character set (PN apart)
_LATIN1_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR"})  # pydicom writes these in Latin-1
_NUMERIC_VRS = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})  # only None (no value) is supported
_PLAIN_VRS = _CHARSET_VRS | _LATIN1_VRS  # a str value is written as it is, in the character set's codec or Latin-1
SUPPORTED_VRS = _CHARSET_VRS | _LATIN1_VRS | _NUMERIC_VRS | {"PN", "UI", "DS", "IS", "SQ"}
# String VRs whose values pydicom does not split on backslashes into several values.
UNSPLIT_VRS = frozenset({"LT", "ST", "UT"})

_DS = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_IS = re.compile(r"[+-]?[0-9]+")
_ITEM = b"\xfe\xff\x00\xe0"
_U16 = struct.Struct("<H").pack
_U32 = struct.Struct("<I").pack


def encode(elements: list[Element], charset: str | None = None) -> bytes:
    """Explicit VR little endian bytes of a dataset, with (0008,0005) set to `charset` unless it is None."""
    codec = CHARSET_CODECS.get(charset)
    if codec is None:
        raise EncodingError(f"character set {charset!r} is not supported here")
    if config.datetime_conversion or config.settings.writing_validation_mode == config.RAISE:
        raise EncodingError("pydicom converts or validates values on assignment: it has to encode them itself")
    if charset is not None:
        elements = [*elements, (SPECIFIC_CHARACTER_SET, "CS", charset)]
    return _dataset(elements, codec, charset is not None)


def to_dataset(elements: list[Element], charset: str | None = None) -> Dataset:
    """The pydicom dataset a tree stands for (what `encode` output decodes to)."""
    ds = _to_dataset(elements)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    return ds


def _to_dataset(elements: list[Element]) -> Dataset:
    ds = Dataset()
    for tag, vr, value in elements:
        if vr == "SQ" and isinstance(value, list):
            value = [_to_dataset(item) for item in value]
        ds[tag] = DataElement(tag, vr, value)  # what `setattr(ds, keyword, value)` does for a new element
    return ds


_first = itemgetter(0)  # an element's tag

_HEADERS: dict[tuple[int, str], tuple[bytes, bool]] = {}


def _header(tag: int, vr: str) -> tuple[bytes, bool]:
    """Tag and VR bytes (with the 2 reserved bytes of 4-byte length VRs) and whether the length takes 4 bytes."""
    if vr not in SUPPORTED_VRS:
        raise EncodingError(f"({tag:08X}): VR {vr!r} is not supported here")
    if not 0 <= tag <= 0xFFFFFFFF or tag >> 16 in (0x0002, 0xFFFE) or (tag & 0xFFFF == 0 and tag >> 16 > 6):
        raise EncodingError(f"({tag:08X}): not an element pydicom writes in a dataset as it is")
    long = vr in LONG_LENGTH_VRS
    found = _HEADERS[tag, vr] = (struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode() + b"\0\0" * long, long)
    return found


# Encoded elements (header, length and value) by codec and element, for the short values items share (empty ones,
# literals, codes, names, station titles). Measured on the ingest benchmark's orders: 27 -> 14 us an item; with
# every text value unique, 5-10% slower. Emptied when full.
_ENCODED: dict[str, dict[Element, bytes]] = {}
_ENCODED_MAX = 4096  # elements per codec
_ENCODED_VALUE = 64  # characters: a longer value is not kept


def _dataset(elements: list[Element], codec: str, with_charset: bool = False) -> bytes:
    out: list[bytes] = []
    previous = -1
    encoded = _ENCODED.get(codec)
    if encoded is None:
        encoded = _ENCODED.setdefault(codec, {})
    for tag, vr, value in sorted(elements, key=_first):
        if tag <= previous:
            raise EncodingError(f"({tag:08X}) appears twice")
        previous = tag
        if tag == SPECIFIC_CHARACTER_SET and not with_charset:  # only the one encode() adds, at the top level
            raise EncodingError("give the character set to encode(), not as an element")
        # Only exact str and None values are looked up: equal elements are then written the same.
        key = (tag, vr, value) if value is None or (value.__class__ is str and len(value) <= _ENCODED_VALUE) else None
        if key is not None:
            found = encoded.get(key)
            if found is not None:
                out.append(found)
                continue
        try:
            header, long = _HEADERS[tag, vr]
        except KeyError:
            header, long = _header(tag, vr)
        if value.__class__ is str and value and vr in _PLAIN_VRS:
            # The values most elements carry, encoded here rather than in `_text` (a call per element shows).
            try:
                body = value.encode(codec if vr in _CHARSET_VRS else "latin-1")
            except UnicodeEncodeError as exc:
                raise EncodingError(f"({tag:08X}) {vr}: {exc}") from exc
            if len(body) & 1:
                body += b" "
        elif vr == "SQ":
            if value is None:
                body = b""
            elif isinstance(value, list):
                parts = []
                for item in value:
                    if not isinstance(item, list):
                        raise EncodingError(f"({tag:08X}): a sequence item must be a list of elements")
                    item_bytes = _dataset(item, codec)
                    parts.append(_ITEM + _U32(len(item_bytes)) + item_bytes)
                body = b"".join(parts)
            else:
                raise EncodingError(f"({tag:08X}) SQ: expected a list of items, got {type(value).__name__}")
        elif value is None or (value == "" and vr not in _NUMERIC_VRS):
            body = b""
        elif not isinstance(value, str):
            raise EncodingError(f"({tag:08X}) {vr}: expected a str, got {type(value).__name__}")
        else:
            body = _text(tag, vr, value, codec)
        if long:
            data = header + _U32(len(body)) + body
        elif len(body) > 0xFFFF:
            raise EncodingError(f"({tag:08X}) {vr}: {len(body)} bytes do not fit a 2-byte length")
        else:
            data = header + _U16(len(body)) + body
        if key is not None:
            if len(encoded) >= _ENCODED_MAX:
                encoded.clear()
            encoded[key] = data
        out.append(data)
    return b"".join(out)


def _text(tag: int, vr: str, value: str, codec: str) -> bytes:
    """The padded bytes of a non-empty string value."""
    pad = b" "
    try:
        if vr in _CHARSET_VRS:
            body = value.encode(codec)
        elif vr == "PN":
            # pydicom drops empty component groups at the end of each value: `A==` is written `A`
            body = "\\".join(v.rstrip("=") for v in value.split("\\")).encode(codec)
        elif vr in _LATIN1_VRS:
            body = value.encode("latin-1")
        elif vr == "UI":
            if any(v != v.strip() for v in value.split("\\")):
                raise EncodingError(f"({tag:08X}) UI: pydicom strips white space around {value!r}")
            body = value.encode("latin-1")
            pad = b"\0"
        elif vr in ("DS", "IS"):
            pattern, limit = (_DS, 16) if vr == "DS" else (_IS, 12)
            if any(len(v) > limit or not pattern.fullmatch(v) for v in value.split("\\") if v):
                raise EncodingError(f"({tag:08X}) {vr}: {value!r} is not a plain {vr} value")
            body = value.encode("ascii")
        else:
            raise EncodingError(f"({tag:08X}) {vr}: only an empty value (None) is supported here, got {value!r}")
    except UnicodeEncodeError as exc:
        raise EncodingError(f"({tag:08X}) {vr}: {exc}") from exc
    return body + pad if len(body) & 1 else body


__all__ = ["CHARSET_CODECS", "SUPPORTED_VRS", "UNSPLIT_VRS", "Element", "EncodingError", "encode", "to_dataset"]
