"""IHE XDS.b metadata as plain values: the DocumentEntry, SubmissionSet and submissions that `traboule.adapters.xds`
encodes as ebRIM (ITI-41, ITI-57) and `traboule.translate.xds_metadata` makes from a document. Values, not XML."""

from __future__ import annotations

from dataclasses import dataclass, field

APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
DELETED = "urn:asip:ci-sis:2010:StatusType:Deleted"


@dataclass(frozen=True)
class Coded:
    """An XDS coded value: code, coding scheme (OID or URN) and display name."""

    code: str
    scheme: str
    display: str


@dataclass
class Author:
    """An XDS author: person (XCN), institutions (XON), roles, specialties (CWE ``code^display^scheme``)."""

    person: str = ""
    institutions: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    specialties: list[str] = field(default_factory=list)


@dataclass
class DocumentEntry:
    """An XDSDocumentEntry (stable): every attribute traboule sends for a CR d'imagerie."""

    entry_uuid: str
    unique_id: str
    hash: str  # SHA-1, lowercase hex, of the exact bytes sent
    size: int
    title: str
    creation_time: str  # UTC DTM
    patient_id: str  # CX: INS^^^&OID&ISO^NH
    source_patient_id: str  # CX: IPP^^^&OID&ISO^PI
    class_code: Coded
    type_code: Coded
    format_code: Coded
    facility_type: Coded
    practice_setting: Coded
    confidentiality: list[Coded]
    authors: list[Author]
    legal_authenticator: str = ""  # XCN
    mime_type: str = "text/xml"
    language: str = "fr-FR"
    service_start: str = ""
    service_stop: str = ""
    source_patient_info: list[str] = field(default_factory=list)
    event_codes: list[Coded] = field(default_factory=list)
    reference_ids: list[str] = field(default_factory=list)  # CXi


@dataclass
class SubmissionSet:
    """An XDSSubmissionSet."""

    entry_uuid: str
    unique_id: str
    source_id: str
    submission_time: str  # UTC DTM
    patient_id: str
    content_type: Coded
    authors: list[Author]
    title: str = ""


@dataclass
class SubmittedDocument:
    """A DocumentEntry with its bytes; ``replaces`` is the entryUUID of the version it supersedes (RPLC)."""

    entry: DocumentEntry
    content: bytes
    replaces: str = ""


@dataclass
class Submission:
    """ITI-41 Provide and Register Document Set-b: a SubmissionSet and its documents."""

    submission_set: SubmissionSet
    documents: list[SubmittedDocument]


@dataclass
class StatusUpdate:
    """ITI-57 Update Document Set changing a DocumentEntry's availabilityStatus (the DMP's deletion)."""

    submission_set: SubmissionSet
    entry_uuid: str
    new_status: str = DELETED
    original_status: str = APPROVED
    entry: DocumentEntry | None = None  # the entry as registered (not sent: its author names the VIHF subject)
