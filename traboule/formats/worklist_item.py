"""A Modality Worklist item as it is stored and indexed: its bytes and its index columns.

The bytes are explicit VR little endian DICOM (no preamble, no file meta): `encode_item` / `decode_item`. The index
columns are the values a C-FIND prefilter compares (status, patient, accession, study, first SPS item's modality,
station, start date and time), normalised as `traboule.formats.dicom_match` compares them, in this order::

    status, patient_id, issuer_of_patient_id, patient_name, patient_name_upper, accession_number,
    requested_procedure_id, study_uid, modality, station_aet, start_date, start_time, exact

``exact`` is 0 when the columns cannot stand for the whole item (several SPS items, a multi-valued key): the
matcher must then look at the item whatever the prefilter says. `dataset_columns` reads them from a pydicom
Dataset, `item_columns` from an element tree (`traboule.formats.dicom_encoding`), so that an `EncodedItem` (the
MWL mapping's fast path) reaches the store with both already computed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from io import BytesIO
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from traboule.errors import EncodingError
from traboule.formats.dicom_encoding import UNSPLIT_VRS, Element
from traboule.formats.dicom_match import normalized_texts, parse_da, stored_texts

PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
PATIENT_NAME = 0x00100010
ACCESSION_NUMBER = 0x00080050
REQUESTED_PROCEDURE_ID = 0x00401001
STUDY_INSTANCE_UID = 0x0020000D
SPS_SEQUENCE = 0x00400100
MODALITY = 0x00080060
STATION_AET = 0x00400001
SPS_START_DATE = 0x00400002
SPS_START_TIME = 0x00400003
SPS_STATUS = 0x00400020


def encode_item(ds: Dataset) -> bytes:
    """Explicit VR little endian encoding of a dataset, without preamble or file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def decode_item(data: bytes) -> Dataset:
    """The inverse of `encode_item` (elements are converted lazily, on first access)."""
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


class EncodedItem:
    """An item ready for the store: its bytes as `encode_item` writes them and its index columns as
    `dataset_columns` gives them (see `item_columns`), so that storing it does not touch pydicom. `dataset` is the
    item as a pydicom Dataset, built on first use (for callers that read or edit the item, e.g. a batch view or the
    worklist files)."""

    __slots__ = ("_build", "_dataset", "columns", "data")

    def __init__(self, data: bytes, columns: tuple[object, ...], build: Callable[[], Dataset]) -> None:
        self.data = data
        self.columns = columns  # the index columns, from status to exact
        self._build = build
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    def __repr__(self) -> str:
        return f"EncodedItem({len(self.data)} bytes, columns={self.columns!r})"


def dataset_columns(ds: Dataset) -> tuple[object, ...]:
    """Index columns (status to exact, in the order above) exactly as the matcher normalizes values."""
    sps_elem = ds.get(SPS_SEQUENCE)
    sps_items = list(sps_elem.value) if sps_elem is not None and sps_elem.VR == "SQ" and sps_elem.value else []
    sps = sps_items[0].get if sps_items else None
    return _columns(ds.get, sps, len(sps_items), lambda elem, fold: stored_texts(elem, fold=fold))


# VRs whose str values pydicom keeps as they are (UI stripped, PN tidied) and `element_values` returns as they are.
_TEXT_COLUMN_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})


def item_columns(elements: list[Element]) -> tuple[object, ...]:
    """`dataset_columns` of the dataset an element tree stands for (`traboule.formats.dicom_encoding.to_dataset`),
    computed on the tree. Raises `EncodingError` for values it cannot read like pydicom (the caller falls back)."""
    top = {elem[0]: elem for elem in elements}
    sps_elem = top.get(SPS_SEQUENCE)
    sps_items = sps_elem[2] if sps_elem is not None and sps_elem[1] == "SQ" and sps_elem[2] else []
    if not isinstance(sps_items, list):
        raise EncodingError("the SPS sequence must be a list of items")
    sps = {elem[0]: elem for elem in sps_items[0]}.get if sps_items else None
    return _columns(top.get, sps, len(sps_items), _tree_texts)


_E = TypeVar("_E")


def _columns(
    top: Callable[[int], _E | None],
    sps: Callable[[int], _E | None] | None,
    sps_count: int,
    texts: Callable[[_E, bool], list[str]],
) -> tuple[object, ...]:
    """The index columns of an item, whichever form it takes: `top` and `sps` find an element of the item and of
    its first SPS item by tag (None when absent), `texts` gives an element's `stored_texts` (folded or not)."""
    # Sequence matching may succeed on any SPS item, the columns describe only the first.
    exact = sps_count == 1

    def column(find: Callable[[int], _E | None] | None, tag: int, *, fold: bool = False) -> str | None:
        nonlocal exact
        elem = None if find is None else find(tag)
        if elem is None:
            return None
        values = texts(elem, fold)
        if len(values) > 1:
            exact = False  # one column cannot hold several values: let the matcher decide
        return values[0] if values else ""

    start_date = column(sps, SPS_START_DATE)
    if start_date:
        with suppress(ValueError):
            start_date = parse_da(start_date)  # legacy YYYY.MM.DD becomes comparable
    status = column(sps, SPS_STATUS) or ""
    return (
        status,
        column(top, PATIENT_ID),
        column(top, ISSUER_OF_PATIENT_ID),
        column(top, PATIENT_NAME),
        column(top, PATIENT_NAME, fold=True),
        column(top, ACCESSION_NUMBER),
        column(top, REQUESTED_PROCEDURE_ID),
        column(top, STUDY_INSTANCE_UID),
        column(sps, MODALITY),
        column(sps, STATION_AET),
        start_date,
        column(sps, SPS_START_TIME),
        int(exact),
    )


def _tree_texts(element: Element, fold: bool) -> list[str]:
    """`stored_texts` of a tree element (its `element_values`: the text's values, UI values stripped)."""
    tag, vr, value = element
    if value is None or value == "":
        return []
    if vr not in _TEXT_COLUMN_VRS or not isinstance(value, str):
        raise EncodingError(f"({tag:08X}) {vr}: not a text value an index column can take from the tree")
    values = [value] if vr in UNSPLIT_VRS else value.split("\\")
    if vr == "UI":
        values = [v.strip() for v in values]  # as pydicom's UID does
    return normalized_texts(values, vr, fold=fold)
