"""IHE XDS.b client for the DMP: ITI-41 Provide and Register Document Set-b (to the repository) and ITI-57 Update
Document Set (to the registry), over SOAP 1.2 with WS-Addressing, MTOM/XOP, a signed VIHF SAML 2.0 assertion and
mutual TLS. Protocol I/O only: the metadata comes ready (``traboule.formats.xds`` values, made by
``traboule.translate.xds_metadata``).

* ebRIM 3.0: in every RegistryObject the Slots come first, then Name, Classifications, ExternalIdentifiers (the
  schema's sequence; the ANS DMP sample puts ``referenceIdList`` after its Classifications, which the XDS.b schema
  refuses). Every id is a ``urn:uuid:`` so that a later RPLC association or ITI-57 can name the DocumentEntry.
* MTOM: ``multipart/related; type="application/xop+xml"``, the SOAP envelope first, each document as a binary part
  referenced by ``<xop:Include href="cid:…"/>`` in its ``<Document>`` (ITI TF-2x Appendix V).
* VIHF (CI-SIS "Vecteur d'Identification et d'Habilitation Formelle"): a SAML 2.0 assertion in ``wsse:Security``,
  signed enveloped with the structure's seal certificate (XML-DSig, exclusive c14n, RSA-SHA256, ``Reference
  URI="#ID"``, the certificate in KeyInfo), its attributes as in the ANS DMP sample.
* Answers: a ``RegistryResponse`` Success returns; a Failure, a SOAP fault, an HTTP error or a broken connection
  raises :class:`XDSError`, whose ``retryable`` says whether a later attempt may succeed: transport errors, HTTP 5xx
  or 429 without a SOAP fault, ``Receiver`` faults and the registry's busy / out-of-resources codes are retryable;
  ``Sender`` faults and every other registry error (metadata, patient id, duplicate unique id...) are not.
"""

from __future__ import annotations

import email.message
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from lxml import etree
from signxml import SignatureConstructionMethod, XMLSigner

from traboule.errors import XDSError
from traboule.formats.xds import Author, Coded, DocumentEntry, StatusUpdate, Submission, SubmissionSet
from traboule.tls import TLSSettings, http_client_options

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
HL7V3 = "urn:hl7-org:v3"
XDSB = "urn:ihe:iti:xds-b:2007"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XOP = "http://www.w3.org/2004/08/xop/include"
XML_NS = "http://www.w3.org/XML/1998/namespace"

ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI57 = "urn:ihe:iti:2010:UpdateDocumentSet"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"

# ITI TF-3 Table 4.2.5-1 / 4.2.5-2: classification schemes and external identifiers of the XDS objects.
DOCUMENT_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"  # stable DocumentEntry objectType
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_EVENT = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_FACILITY = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SUBMISSION_SET = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
UPDATE_AVAILABILITY_STATUS = "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
ERROR_SEVERITY = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"

# Registry error codes that say "not now" rather than "not this" (ITI TF-3 Table 4.2.4.1-2).
RETRYABLE_CODES = {
    "XDSRegistryBusy",
    "XDSRepositoryBusy",
    "XDSRegistryOutOfResources",
    "XDSRepositoryOutOfResources",
    "XDSRegistryNotAvailable",
}

PURPOSE_NORMAL = Coded("normal", "1.2.250.1.213.1.1.4.248", "Acces normal")
TLS_CLIENT = "urn:oasis:names:tc:SAML:2.0:ac:classes:TLSClient"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass
class RegistryError:
    code: str
    severity: str
    context: str = ""
    location: str = ""


@dataclass
class RegistryResponse:
    status: str
    errors: list[RegistryError] = field(default_factory=list)  # warnings, on a Success


@dataclass
class VIHF:
    """The VIHF attributes of one request (TRV2 mapping.md + the ANS DMP sample)."""

    subject_id: str  # NameID: idNat of the practitioner, or of the person responsible for the automated process
    subject_name: str  # xspa subject-id: "Given FAMILY"
    structure_id: str  # Identifiant_Structure: idNat of the structure (1 + FINESS...)
    secteur_activite: str  # Secteur_Activite: "SA01^1.2.250.1.71.4.2.4" (JDV_J61)
    patient_id: str  # resource-id: the INS, INS^^^&OID&ISO^NH
    roles: list[Coded]  # profession (TRE_G15), then savoir-faire (JDV_J65)
    lps_id: str = ""
    lps_name: str = "traboule"
    lps_version: str = ""
    lps_homologation: str = ""  # LPS_ID_HOMOLOGATION_DMP
    version: str = "3.0"  # VIHF_Version: the ANS DMP sample says 3.0, TRV2 (2026) 4.0
    authentication_mode: str = "INDIRECTE"
    purpose_of_use: Coded = PURPOSE_NORMAL
    lifetime: int = 300  # seconds the assertion is valid (Conditions NotOnOrAfter)


@dataclass
class Request:
    """A SOAP request ready to send: the envelope (for the journal) and the HTTP body (MTOM multipart)."""

    url: str
    action: str
    message_id: str
    envelope: bytes
    content_type: str
    body: bytes


# -- ebRIM ---------------------------------------------------------------------------------------------------------


def _el(parent: etree._Element, ns: str, tag: str, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, f"{{{ns}}}{tag}")
    for key, value in attrs.items():
        element.set(key, value)
    return element


def _slot(parent: etree._Element, name: str, values: list[str]) -> None:
    values = [v for v in values if v]
    if not values:
        return
    value_list = _el(_el(parent, RIM, "Slot", name=name), RIM, "ValueList")
    for value in values:
        _el(value_list, RIM, "Value").text = value


def _name(parent: etree._Element, text: str) -> None:
    if text:
        string = _el(_el(parent, RIM, "Name"), RIM, "LocalizedString", value=text, charset="UTF-8")
        string.set(f"{{{XML_NS}}}lang", "fr-FR")


def _new_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _coded(parent: etree._Element, scheme: str, obj: str, code: Coded) -> None:
    cl = _el(
        parent,
        RIM,
        "Classification",
        id=_new_id(),
        classificationScheme=scheme,
        classifiedObject=obj,
        nodeRepresentation=code.code,
    )
    _slot(cl, "codingScheme", [code.scheme])
    _name(cl, code.display or code.code)


def _author(parent: etree._Element, scheme: str, obj: str, author: Author) -> None:
    cl = _el(parent, RIM, "Classification", id=_new_id(), classificationScheme=scheme, classifiedObject=obj)
    cl.set("nodeRepresentation", "")
    _slot(cl, "authorPerson", [author.person])
    _slot(cl, "authorInstitution", author.institutions)
    _slot(cl, "authorRole", author.roles)
    _slot(cl, "authorSpecialty", author.specialties)


def _external_id(parent: etree._Element, scheme: str, obj: str, value: str, name: str) -> None:
    ei = _el(parent, RIM, "ExternalIdentifier", id=_new_id(), identificationScheme=scheme, registryObject=obj)
    ei.set("value", value)
    _name(ei, name)


def _submission_set(parent: etree._Element, ss: SubmissionSet) -> None:
    package = _el(parent, RIM, "RegistryPackage", id=ss.entry_uuid)
    _slot(package, "submissionTime", [ss.submission_time])
    _name(package, ss.title)
    for author in ss.authors:
        _author(package, SS_AUTHOR, ss.entry_uuid, author)
    _coded(package, SS_CONTENT_TYPE, ss.entry_uuid, ss.content_type)
    _el(package, RIM, "Classification", id=_new_id(), classifiedObject=ss.entry_uuid, classificationNode=SUBMISSION_SET)
    _external_id(package, SS_PATIENT_ID, ss.entry_uuid, ss.patient_id, "XDSSubmissionSet.patientId")
    _external_id(package, SS_SOURCE_ID, ss.entry_uuid, ss.source_id, "XDSSubmissionSet.sourceId")
    _external_id(package, SS_UNIQUE_ID, ss.entry_uuid, ss.unique_id, "XDSSubmissionSet.uniqueId")


def _document_entry(parent: etree._Element, de: DocumentEntry) -> None:
    eo = _el(parent, RIM, "ExtrinsicObject", id=de.entry_uuid, mimeType=de.mime_type, objectType=DOCUMENT_ENTRY)
    _slot(eo, "creationTime", [de.creation_time])
    _slot(eo, "hash", [de.hash])
    _slot(eo, "languageCode", [de.language])
    _slot(eo, "legalAuthenticator", [de.legal_authenticator])
    _slot(eo, "serviceStartTime", [de.service_start])
    _slot(eo, "serviceStopTime", [de.service_stop])
    _slot(eo, "size", [str(de.size)])
    _slot(eo, "sourcePatientId", [de.source_patient_id])
    _slot(eo, "sourcePatientInfo", de.source_patient_info)
    _slot(eo, "urn:ihe:iti:xds:2013:referenceIdList", de.reference_ids)
    _name(eo, de.title)
    for author in de.authors:
        _author(eo, DE_AUTHOR, de.entry_uuid, author)
    _coded(eo, DE_CLASS, de.entry_uuid, de.class_code)
    for code in de.confidentiality:
        _coded(eo, DE_CONFIDENTIALITY, de.entry_uuid, code)
    for code in de.event_codes:
        _coded(eo, DE_EVENT, de.entry_uuid, code)
    _coded(eo, DE_FORMAT, de.entry_uuid, de.format_code)
    _coded(eo, DE_FACILITY, de.entry_uuid, de.facility_type)
    _coded(eo, DE_PRACTICE, de.entry_uuid, de.practice_setting)
    _coded(eo, DE_TYPE, de.entry_uuid, de.type_code)
    _external_id(eo, DE_PATIENT_ID, de.entry_uuid, de.patient_id, "XDSDocumentEntry.patientId")
    _external_id(eo, DE_UNIQUE_ID, de.entry_uuid, de.unique_id, "XDSDocumentEntry.uniqueId")


def _association(
    parent: etree._Element, kind: str, source: str, target: str, slots: dict[str, str] | None = None
) -> None:
    association = _el(parent, RIM, "Association", id=_new_id(), associationType=kind)
    association.set("sourceObject", source)
    association.set("targetObject", target)
    for name, value in (slots or {}).items():
        _slot(association, name, [value])


def provide_and_register_body(submission: Submission) -> tuple[etree._Element, dict[str, bytes]]:
    """``ProvideAndRegisterDocumentSetRequest`` (its ``Document``s as ``xop:Include``) and the parts by Content-ID."""
    root = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap={"xdsb": XDSB, "lcm": LCM})
    objects = _el(_el(root, LCM, "SubmitObjectsRequest"), RIM, "RegistryObjectList")
    ss = submission.submission_set
    _submission_set(objects, ss)
    for doc in submission.documents:
        _document_entry(objects, doc.entry)
    for doc in submission.documents:
        _association(objects, HAS_MEMBER, ss.entry_uuid, doc.entry.entry_uuid, {"SubmissionSetStatus": "Original"})
        if doc.replaces:
            _association(objects, RPLC, doc.entry.entry_uuid, doc.replaces)
    parts: dict[str, bytes] = {}
    for doc in submission.documents:
        content_id = f"{uuid.uuid4().hex}@traboule"
        parts[content_id] = doc.content
        document = _el(root, XDSB, "Document", id=doc.entry.entry_uuid)
        _el(document, XOP, "Include", href=f"cid:{content_id}")
    return root, parts


def update_document_set_body(update: StatusUpdate) -> etree._Element:
    """ITI-57 ``SubmitObjectsRequest``: the SubmissionSet and an UpdateAvailabilityStatus association."""
    root = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap={"lcm": LCM})
    objects = _el(root, RIM, "RegistryObjectList")
    _submission_set(objects, update.submission_set)
    slots = {"OriginalStatus": update.original_status, "NewStatus": update.new_status}
    _association(objects, UPDATE_AVAILABILITY_STATUS, update.submission_set.entry_uuid, update.entry_uuid, slots)
    return root


# -- VIHF ----------------------------------------------------------------------------------------------------------


class AssertionSigner:
    """Signs VIHF assertions with the structure's seal certificate and key (PEM files)."""

    def __init__(self, cert_file: str | Path, key_file: str | Path, password: str = "") -> None:
        self.cert_pem = Path(cert_file).read_bytes()
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password.encode() or None)
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "rsa-sha256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            self.algorithm = "ecdsa-sha256"
        else:
            raise ValueError(f"{key_file}: the VIHF is signed with an RSA or EC key, not {type(key).__name__}")
        self._key = key
        # The DN the way the ANS sample writes it (most specific first, ", " between RDNs).
        self.issuer = ", ".join(rdn.rfc4514_string() for rdn in reversed(cert.subject.rdns))

    def sign(self, assertion: etree._Element) -> etree._Element:
        signer = XMLSigner(
            method=SignatureConstructionMethod.enveloped,
            signature_algorithm=self.algorithm,
            digest_algorithm="sha256",
            c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#",
        )
        return signer.sign(
            assertion, key=self._key, cert=self.cert_pem.decode(), reference_uri=f"#{assertion.get('ID')}"
        )


def vihf_assertion(vihf: VIHF, signer: AssertionSigner, *, now: datetime | None = None) -> etree._Element:
    """The signed SAML 2.0 assertion (the signature sits after ``Issuer``, as the SAML schema orders it)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    instant = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    until = (now + timedelta(seconds=vihf.lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assertion_id = f"_{uuid.uuid4().hex}"  # xs:ID is an NCName: it cannot start with a digit
    root = etree.Element(f"{{{SAML}}}Assertion", nsmap={"saml2": SAML, "ds": DS, "xsi": XSI})
    root.set("ID", assertion_id)
    root.set("IssueInstant", instant)
    root.set("Version", "2.0")
    issuer = _el(root, SAML, "Issuer", Format="urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName")
    issuer.text = signer.issuer
    _el(root, DS, "Signature", Id="placeholder")
    subject = _el(root, SAML, "Subject")
    name_id = _el(subject, SAML, "NameID", Format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified")
    name_id.text = vihf.subject_id
    _el(root, SAML, "Conditions", NotOnOrAfter=until)  # no NotBefore: a clock a little ahead of the DMP's is no error
    authn = _el(root, SAML, "AuthnStatement", AuthnInstant=instant)
    _el(_el(authn, SAML, "AuthnContext"), SAML, "AuthnContextClassRef").text = TLS_CLIENT
    statement = _el(root, SAML, "AttributeStatement")

    def attribute(name: str, *values: str) -> None:
        if any(values):
            element = _el(statement, SAML, "Attribute", Name=name)
            for value in values:
                _el(element, SAML, "AttributeValue").text = value

    def coded(name: str, tag: str, codes: list[Coded], system_name: str = "") -> None:
        element = _el(statement, SAML, "Attribute", Name=name)
        for code in codes:
            value = _el(element, SAML, "AttributeValue")
            ce = etree.SubElement(value, f"{{{HL7V3}}}{tag}", nsmap={None: HL7V3})
            ce.set("code", code.code)
            ce.set("codeSystem", code.scheme)
            if system_name:
                ce.set("codeSystemName", system_name)
            ce.set("displayName", code.display)
            ce.set(f"{{{XSI}}}type", "CE")

    attribute("VIHF_Version", vihf.version)
    attribute("Identifiant_Structure", vihf.structure_id)
    attribute("Secteur_Activite", vihf.secteur_activite)
    attribute("urn:oasis:names:tc:xspa:1.0:subject:subject-id", vihf.subject_name)
    coded("urn:oasis:names:tc:xacml:2.0:subject:role", "Role", vihf.roles)
    coded(
        "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse", "PurposeOfUse", [vihf.purpose_of_use], "mode acces VIHF 1.0"
    )
    attribute("urn:oasis:names:tc:xacml:2.0:resource:resource-id", vihf.patient_id)
    attribute("Authentification_Mode", vihf.authentication_mode)
    attribute("Ressource_URN", "urn:dmp")
    attribute("LPS_ID", vihf.lps_id)
    attribute("LPS_Nom", vihf.lps_name)
    attribute("LPS_Version", vihf.lps_version)
    attribute("LPS_ID_HOMOLOGATION_DMP", vihf.lps_homologation)
    return signer.sign(root)


# -- SOAP and MTOM -------------------------------------------------------------------------------------------------


def soap_envelope(action: str, to: str, message_id: str, body: etree._Element, assertion: etree._Element) -> bytes:
    """The SOAP 1.2 envelope with WS-Addressing and WS-Security headers. Serialized without pretty printing: added
    whitespace inside the signed assertion would break its signature."""
    envelope = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"soap": SOAP12, "wsa": WSA})
    header = _el(envelope, SOAP12, "Header")
    must = f"{{{SOAP12}}}mustUnderstand"
    _el(header, WSA, "Action", **{must: "true"}).text = action
    _el(header, WSA, "MessageID").text = message_id
    _el(_el(header, WSA, "ReplyTo"), WSA, "Address").text = ANONYMOUS
    _el(header, WSA, "To", **{must: "true"}).text = to
    security = etree.SubElement(header, f"{{{WSSE}}}Security", nsmap={"wsse": WSSE})
    security.set(must, "true")
    security.append(assertion)
    _el(envelope, SOAP12, "Body").append(body)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def mtom(envelope: bytes, parts: dict[str, bytes], action: str) -> tuple[str, bytes]:
    """MTOM/XOP ``multipart/related`` body: the envelope (root part), then each binary part by its Content-ID."""
    boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
    root_id = f"root.{uuid.uuid4().hex}@traboule"
    soap_type = f'application/soap+xml; action=\\"{action}\\"'
    chunks = [
        f'--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type="{soap_type}"\r\n'
        f"Content-Transfer-Encoding: binary\r\nContent-ID: <{root_id}>\r\n\r\n".encode(),
        envelope,
    ]
    for content_id, data in parts.items():
        chunks.append(
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{content_id}>\r\n\r\n".encode()
        )
        chunks.append(data)
    chunks.append(f"\r\n--{boundary}--\r\n".encode())
    content_type = (
        f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; start="<{root_id}>"; '
        f'start-info="application/soap+xml"; action="{action}"'
    )
    return content_type, b"".join(chunks)


def _params(content_type: str) -> email.message.Message:
    message = email.message.Message()
    message["Content-Type"] = content_type
    return message


def split_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a ``multipart/related`` body: (headers with lowercase names, exact bytes)."""
    boundary = _params(content_type).get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError(f"multipart without a boundary: {content_type!r}")
    delimiter = b"\r\n--" + boundary.encode()
    parts = []
    for chunk in (b"\r\n" + body).split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, data))
    return parts


def soap_part(content_type: str, body: bytes) -> bytes:
    """The SOAP envelope of a response: the body itself, or the root part of an MTOM response."""
    if not content_type.lower().startswith("multipart/"):
        return body
    parts = split_multipart(content_type, body)
    start = _params(content_type).get_param("start")
    wanted = start.strip("<>") if isinstance(start, str) else ""
    for headers, data in parts:
        if not wanted or (headers.get("content-id") or "").strip("<>") == wanted:
            return data
    if parts:  # a start parameter naming no part: the root part is the first one (XOP)
        return parts[0][1]
    raise ValueError(f"no part with Content-ID {start}")


def read_response(status: int, content_type: str, body: bytes) -> RegistryResponse:
    """The RegistryResponse of an HTTP answer; raises ``XDSError`` for a Failure, a SOAP fault or an HTTP error."""
    overloaded = status >= 500 or status == 429
    try:
        root = etree.fromstring(soap_part(content_type, body), _PARSER)
    except (ValueError, etree.XMLSyntaxError):
        root = None
    if root is None or root.tag != f"{{{SOAP12}}}Envelope":
        # A 2xx we cannot read (a proxy's page, a cut body): the outcome is unknown, so retry; the registry
        # then says whether it holds the document (duplicate unique id) and the retry settles it.
        text = body[:200].decode("utf-8", "replace")
        unknown = 200 <= status < 300
        raise XDSError(
            f"HTTP {status}, not a SOAP 1.2 answer: {text!r}", retryable=overloaded or unknown, status=status
        )
    fault = root.find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    if fault is not None:
        value = fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Value", "") or ""
        code = value.rpartition(":")[2]
        sub = fault.findtext(f"{{{SOAP12}}}Code/{{{SOAP12}}}Subcode/{{{SOAP12}}}Value", "") or ""
        reason = fault.findtext(f"{{{SOAP12}}}Reason/{{{SOAP12}}}Text", "") or ""
        detail = f" ({sub})" if sub else ""
        raise XDSError(
            f"SOAP fault {code}{detail}: {reason}".strip(), retryable=code == "Receiver", status=status, codes=[code]
        )
    if status >= 400:
        raise XDSError(f"HTTP {status} without a SOAP fault", retryable=overloaded, status=status)
    found = root.find(f"{{{SOAP12}}}Body/{{{RS}}}RegistryResponse")
    if found is None:
        raise XDSError(f"HTTP {status}: the SOAP body holds no RegistryResponse", retryable=True, status=status)
    errors = [
        RegistryError(
            e.get("errorCode", ""),
            e.get("severity", ERROR_SEVERITY),
            e.get("codeContext", "") or (e.text or "").strip(),
            e.get("location", ""),
        )
        for e in found.iterfind(f"{{{RS}}}RegistryErrorList/{{{RS}}}RegistryError")
    ]
    response = RegistryResponse(found.get("status", ""), errors)
    if response.status == SUCCESS:
        return response
    if response.status.endswith(":PartialSuccess") and not any(e.severity == ERROR_SEVERITY for e in errors):
        return response  # warnings only: the submission was taken
    blocking = [e for e in errors if e.severity == ERROR_SEVERITY] or errors
    codes = [e.code for e in blocking]
    summary = "; ".join(f"{e.code}: {e.context}" if e.context else e.code for e in blocking) or "no RegistryError"
    raise XDSError(
        f"{response.status.rpartition(':')[2] or 'no status'}: {summary}",
        retryable=bool(codes) and all(c in RETRYABLE_CODES for c in codes),
        status=status,
        codes=codes,
    )


# -- requests ------------------------------------------------------------------------------------------------------


def provide_and_register_request(
    url: str, submission: Submission, vihf: VIHF, signer: AssertionSigner, *, now: datetime | None = None
) -> Request:
    """ITI-41 to the repository ``url``."""
    body, parts = provide_and_register_body(submission)
    return _request(url, ITI41, body, parts, vihf, signer, now)


def update_document_set_request(
    url: str, update: StatusUpdate, vihf: VIHF, signer: AssertionSigner, *, now: datetime | None = None
) -> Request:
    """ITI-57 to the registry ``url``."""
    return _request(url, ITI57, update_document_set_body(update), {}, vihf, signer, now)


def _request(
    url: str,
    action: str,
    body: etree._Element,
    parts: dict[str, bytes],
    vihf: VIHF,
    signer: AssertionSigner,
    now: datetime | None,
) -> Request:
    message_id = f"urn:uuid:{uuid.uuid4()}"
    envelope = soap_envelope(action, url, message_id, body, vihf_assertion(vihf, signer, now=now))
    content_type, data = mtom(envelope, parts, action)
    return Request(url, action, message_id, envelope, content_type, data)


class XDSClient:
    """Sends XDS.b requests over mutual TLS (``tls``: `traboule.tls.http_client_options` of the destination's settings;
    without it, ``cert_file`` + ``key_file``, trusting ``ca_file``)."""

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        tls: TLSSettings | None = None,
    ) -> None:
        tls = tls or TLSSettings(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._client = httpx.AsyncClient(timeout=timeout, **http_client_options(tls))

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, request: Request) -> RegistryResponse:
        """POST ``request``; the RegistryResponse on Success, else ``XDSError`` (its ``request`` = the envelope)."""
        headers = {"Content-Type": request.content_type, "Accept": "multipart/related, application/soap+xml"}
        try:
            response = await self._client.post(request.url, content=request.body, headers=headers)
        except httpx.TimeoutException as exc:
            raise XDSError(
                f"POST {request.url}: timeout ({type(exc).__name__})", retryable=True, request=request.envelope
            ) from exc
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:  # httpcore lets some TLS alerts through unwrapped
            raise XDSError(
                f"POST {request.url}: {type(exc).__name__}: {exc}", retryable=True, request=request.envelope
            ) from exc
        try:
            return read_response(response.status_code, response.headers.get("content-type", ""), response.content)
        except XDSError as exc:
            exc.request = request.envelope
            raise
