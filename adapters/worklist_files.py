"""Worklist files (`.wl`) for dcmtk wlmscpfs and Orthanc's worklist plugin.

`folder` is the called-AE sub-folder those servers read (wlmscpfs: `<-dfp dir>/<CALLED_AE>/`), holding one
DICOM file per item, as `dump2dcm +te` writes them (preamble, file meta, explicit VR little endian), and the
empty `lockfile` wlmscpfs insists on. Files are replaced atomically (temp file, fsync, rename), so a server
reading the folder meanwhile sees the old item or the new one, never half a file; temp names do not end in
`.wl`, which both servers require, so they are never read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import structlog
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

log = structlog.get_logger("traboule.adapters.worklist_files")

MWL_FIND_SOP_CLASS = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
SUFFIX = ".wl"
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:traboule:worklist-file")


@dataclass(frozen=True)
class SyncReport:
    written: int
    unchanged: int
    removed: int


def file_name(key: str) -> str:
    """A safe, stable file name for any key: sha1 hex of the key + `.wl`."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest() + SUFFIX


def encode_file(key: str, ds: Dataset) -> bytes:
    """The file bytes for an item. Deterministic (the instance UID derives from the key), so an unchanged item
    gives identical bytes and `sync` can skip it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MWL_FIND_SOP_CLASS
    # 2.25 + a name-based (v5) UUID: a valid UID (PS3.5 B.2), the same for the same key.
    meta.MediaStorageSOPInstanceUID = "2.25." + str(uuid.uuid5(_UID_NAMESPACE, key).int)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # FileDataset shares the caller's elements without copying them; writing does not modify them.
    wrapper = FileDataset(file_name(key), ds, file_meta=meta, preamble=b"\0" * 128)
    buffer = BytesIO()
    dcmwrite(buffer, wrapper, enforce_file_format=True)
    return buffer.getvalue()


def missing_for_wlmscpfs(ds: Dataset) -> list[str]:
    """Why wlmscpfs (default --enable-file-reject) would silently ignore this item; empty when complete.

    dcmtk's DatasetIsComplete (PS3.4 K.6 Type 1 return keys), as dcmtk 3.6.7 behaves here: exactly one SPS
    item with station AE, start date and time, modality and SPS ID; Requested Procedure ID, Study Instance UID,
    Patient's Name and ID; a description or a code sequence for the SPS and the requested procedure. A code
    sequence that is present must hold complete items (Code Value, Coding Scheme Designator): an EMPTY
    Scheduled Protocol Code Sequence gets the item rejected even when the description is there.
    """

    def empty(item: Dataset, keyword: str) -> bool:
        return item.get(keyword) in (None, "", [])

    def described(item: Dataset, description: str, codes: str, prefix: str = "") -> list[str]:
        if codes in item:
            entries = item.get(codes) or []
            complete = bool(entries) and all(
                not empty(c, "CodeValue") and not empty(c, "CodingSchemeDesignator") for c in entries
            )
            return [] if complete else [f"{prefix}{codes} (present, so it needs complete items)"]
        return [f"{prefix}{description}"] if empty(item, description) else []

    missing = [k for k in ("RequestedProcedureID", "StudyInstanceUID", "PatientName", "PatientID") if empty(ds, k)]
    missing += described(ds, "RequestedProcedureDescription", "RequestedProcedureCodeSequence")
    steps = ds.get("ScheduledProcedureStepSequence") or []
    if len(steps) != 1:
        return [*missing, "ScheduledProcedureStepSequence (exactly one item)"]
    sps, prefix = steps[0], "ScheduledProcedureStepSequence>"
    for keyword in (
        "ScheduledStationAETitle",
        "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepStartTime",
        "Modality",
        "ScheduledProcedureStepID",
    ):
        if empty(sps, keyword):
            missing.append(prefix + keyword)
    missing += described(sps, "ScheduledProcedureStepDescription", "ScheduledProtocolCodeSequence", prefix)
    return missing


class WorklistFileWriter:
    """Keeps a folder of `.wl` files in step with the worklist (one file per item key)."""

    def __init__(self, folder: str, *, durable: bool = True) -> None:
        self.folder = Path(folder)
        self.durable = durable  # fsync file and folder: a written item survives a power cut
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "lockfile").touch(exist_ok=True)  # wlmscpfs refuses a folder without it

    def path_for(self, key: str) -> Path:
        return self.folder / file_name(key)

    def write(self, key: str, ds: Dataset) -> Path:
        """Write (or replace) the item's file atomically."""
        missing = missing_for_wlmscpfs(ds)
        if missing:
            # Still written (Orthanc serves it), but wlmscpfs with file-reject will ignore it: say so, without
            # patient data.
            log.warning("worklist_file.incomplete", file=file_name(key), missing=missing)
        return self._write_bytes(self.path_for(key), encode_file(key, ds))

    def remove(self, key: str) -> bool:
        """Delete the item's file; False when there was none."""
        path = self.path_for(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        self._sync_folder()
        return True

    def sync(self, items: Iterable[tuple[str, Dataset]]) -> SyncReport:
        """Make the folder hold exactly these items: rewrite what changed, delete the rest (and stale temps)."""
        wanted: dict[str, bytes] = {file_name(key): encode_file(key, ds) for key, ds in items}
        written = unchanged = removed = 0
        for name, data in wanted.items():
            path = self.folder / name
            try:
                same = path.read_bytes() == data
            except FileNotFoundError:
                same = False
            if same:
                unchanged += 1
            else:
                self._write_bytes(path, data)
                written += 1
        for path in self.folder.iterdir():
            stale_temp = path.name.startswith(".") and path.name.endswith(".tmp")
            if (path.suffix == SUFFIX and path.name not in wanted) or stale_temp:
                path.unlink(missing_ok=True)
                removed += 0 if stale_temp else 1
        self._sync_folder()
        log.info("worklist_file.sync", folder=str(self.folder), written=written, unchanged=unchanged, removed=removed)
        return SyncReport(written, unchanged, removed)

    def _write_bytes(self, path: Path, data: bytes) -> Path:
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self.durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.chmod(temp, 0o644)  # mkstemp makes it 0600; the DICOM server may run as another user
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        self._sync_folder()
        return path

    def _sync_folder(self) -> None:
        if not self.durable:
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # makes the rename or unlink itself durable
        finally:
            os.close(fd)
