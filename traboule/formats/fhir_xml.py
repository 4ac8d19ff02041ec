"""FHIR R4 XML for the ``/fhir`` API: a served JSON resource (a Bundle, an OperationOutcome...) as FHIR XML.

fhir.resources does the serialisation (``model_dump_xml``: primitives as ``value`` attributes, extensions on
primitives, the xhtml ``div``, repeated elements for arrays, resources inside ``contained`` / ``resource``, in the
element order of the specification), from its R4B models: R4B differs from R4 in none of the resources served here.
"""

from __future__ import annotations

import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

FHIR_XML = "application/fhir+xml"
XML_FORMATS = {"xml", "text/xml", "application/xml", FHIR_XML}
JSON_FORMATS = {"json", "application/json", "application/fhir+json"}
# What XML 1.0 cannot carry (its Char production: controls but tab, LF and CR, surrogates, U+FFFE and U+FFFF).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(value: Any) -> Any:
    """``value`` (FHIR JSON) with every character XML 1.0 cannot carry replaced by U+FFFD: a last resort, for what
    a request put in an answer (the API checks ids and names before they get there)."""
    if isinstance(value, str):
        return _NOT_XML.sub("\ufffd", value)
    if isinstance(value, dict):
        return {k: xml_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [xml_safe(v) for v in value]
    return value


def to_xml(resource: dict[str, Any]) -> bytes:
    """``resource`` (FHIR JSON) as a FHIR XML document, UTF-8 with its declaration. Raises ``ValueError`` when the
    resource does not conform to its model (a served resource always does: the tests validate every one)."""
    model = get_fhir_model_class(resource["resourceType"])
    return model.model_validate(xml_safe(resource)).model_dump_xml(xml_declaration=True)
