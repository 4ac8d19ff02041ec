"""The identities of a document version besides its uniqueId, shared by every place that publishes it.

A version's entryUUID is derived from its uniqueId (UUID v5), so the MHD DocumentReference (``identifier``
official) and the XDS DocumentEntry sent to the DMP carry the same one: a gateway sees one identity on both sides.
XDS wants an entryUUID unique in the registry: a replacement (RPLC) is a new DocumentEntry with its own uniqueId,
hence its own entryUUID, and a resubmission of the same version (after a lost answer) is the same DocumentEntry.
SubmissionSet and Association ids stay random: each submission is a new one.
"""

from __future__ import annotations

import uuid

_ENTRY_UUIDS = uuid.UUID("6f1c7d0e-5a0b-5b8e-9c3e-747261626f75")  # namespace of traboule's document entryUUIDs


def entry_uuid(unique_id: str) -> str:
    """The entryUUID (``urn:uuid:``) of the document version ``unique_id``: stable, a UUID v5 of the uniqueId."""
    return f"urn:uuid:{uuid.uuid5(_ENTRY_UUIDS, unique_id)}"
