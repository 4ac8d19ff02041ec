"""Codes of the FHIR profiles that both the FHIR mapping (which writes them) and the FHIR store (which searches on
them) read."""

from __future__ import annotations

# PDSm's logical deletion of a DocumentReference (extension PDSm_IsDeleted, with status superseded; flux 03 of
# PDSm, "suppression logique"): such an entry is left out of every search.
IS_DELETED = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/pdsm-ext-is-deleted"
STUDY_UID_TYPE = "urn:ihe:iti:xds:2016:studyInstanceUID"  # a context.related identifier's type (XDS referenceIdList)
