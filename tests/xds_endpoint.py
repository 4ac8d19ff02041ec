"""A loopback IHE XDS.b endpoint (repository ``/repository`` for ITI-41, registry ``/registry`` for ITI-57) for the
xds channel's tests, checking what a DMP would check before answering:

* HTTPS that requires a client certificate from the test CA (mutual TLS); refused handshakes are counted;
* the MTOM ``multipart/related`` body, split with the standard library's MIME parser (not the adapter's), the XOP
  attachments put back into their ``<Document>`` elements;
* the SOAP Body child against the XDS.b / ebRIM 3.0 schemas (``shared/standards/xds/xds-b-offline.xsd``, which
  imports the local ``xml.xsd`` first, so no catalog or network is needed);
* every document's bytes against its DocumentEntry's ``hash`` (SHA-1) and ``size``;
* the VIHF: the SAML assertion's XML signature against the seal certificate (signxml), its Issuer and attributes;
* the WS-Addressing Action against the path.

It records every request (:class:`Received`) and answers a RegistryResponse Success (MTOM for ITI-41, plain SOAP
for ITI-57), or what the test queued in ``replies``: a registry Failure, a SOAP fault, an HTTP status. A request
that fails a check gets a Failure ``XDSRegistryMetadataError`` listing the problems.
"""

from __future__ import annotations

import base64
import datetime
import email.parser
import email.policy
import hashlib
import ipaddress
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree
from signxml import XMLVerifier

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"
XOP = "{http://www.w3.org/2004/08/xop/include}Include"
ACTIONS = {
    "/repository": "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b",
    "/registry": "urn:ihe:iti:2010:UpdateDocumentSet",
}
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"


# -- test PKI -----------------------------------------------------------------------------------------------------


@dataclass
class PKI:
    """PEM files of a throw-away CA, the endpoint's server certificate, a client (authentication) certificate and
    the seal certificate that signs the VIHF."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    seal_cert: Path
    seal_key: Path


def _name(cn: str, **extra: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]
    if "o" in extra:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, extra["o"]))
    if "ou" in extra:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, extra["ou"]))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _write(folder: Path, stem: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def make_pki(folder: Path) -> PKI:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("traboule test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(name: x509.Name, key: Any, usage: x509.ObjectIdentifier | None, san: bool = False) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    seal_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # IGC-Santé seals are RSA
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server = _write(
        folder, "server", issue(_name("localhost"), server_key, ExtendedKeyUsageOID.SERVER_AUTH, True), server_key
    )
    client = _write(
        folder,
        "client",
        issue(
            _name("traboule auth", o="Hopital exemple", ou="1690781810"), client_key, ExtendedKeyUsageOID.CLIENT_AUTH
        ),
        client_key,
    )
    seal = _write(
        folder, "seal", issue(_name("traboule seal", o="Hopital exemple", ou="1690781810"), seal_key, None), seal_key
    )
    return PKI(ca_path, *server, *client, *seal)


# -- what the endpoint saw and answers --------------------------------------------------------------------------


@dataclass
class Reply:
    """A scripted answer: ``failure`` (a RegistryResponse Failure with ``code``), ``fault`` (SOAP fault ``code`` =
    Sender | Receiver) or ``http`` (a bare HTTP ``status``)."""

    kind: str
    code: str = ""
    status: int = 200


@dataclass
class Received:
    path: str
    action: str = ""
    message_id: str = ""
    envelope: etree._Element | None = None
    body: etree._Element | None = None  # the SOAP Body child, XOP attachments put back as base64
    documents: dict[str, bytes] = field(default_factory=dict)  # by Document id (the entryUUID)
    vihf: dict[str, list[str]] = field(default_factory=dict)  # VIHF attribute name → values (text or CE code)
    vihf_issuer: str = ""
    vihf_subject: str = ""
    signature_valid: bool = False
    errors: list[str] = field(default_factory=list)
    answered: str = ""  # success | failure:<code> | fault:<code> | http:<status>

    def objects(self, tag: str) -> list[etree._Element]:
        assert self.body is not None
        return list(self.body.iter(f"{{{RIM}}}{tag}"))


class XDSEndpoint:
    """A threaded HTTPS server; ``url(path)``, ``replies`` (FIFO, default Success), ``received``."""

    def __init__(self, pki: PKI, schema: Path) -> None:
        self.pki = pki
        self.schema = etree.XMLSchema(etree.parse(str(schema)))
        self._schema_lock = threading.Lock()  # an lxml XMLSchema is not safe across threads
        self.seal_pem = pki.seal_cert.read_bytes().decode()
        seal = x509.load_pem_x509_certificate(pki.seal_cert.read_bytes())
        self.seal_issuer = ", ".join(rdn.rfc4514_string() for rdn in reversed(seal.subject.rdns))
        self.replies: list[Reply] = []
        self.received: list[Received] = []
        self.refused_handshakes = 0
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        context.verify_mode = ssl.CERT_REQUIRED
        endpoint = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The TLS handshake in the connection's own thread: a client without a certificate fails here.
                try:
                    tls = context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    endpoint.refused_handshakes += 1
                    return
                try:
                    self.RequestHandlerClass(tls, client_address, self)
                finally:
                    tls.close()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, content_type, answer = endpoint.handle(self.path, self.headers.get("Content-Type", ""), data)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="xds-endpoint", daemon=True)

    def start(self) -> XDSEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.answered == "success"]

    # -- a request ---------------------------------------------------------------------------------------------

    def handle(self, path: str, content_type: str, data: bytes) -> tuple[int, str, bytes]:
        got = Received(path)
        self.received.append(got)
        try:
            self._check(got, content_type, data)
        except Exception as exc:  # a malformed request is a failed check, answered like a registry would
            got.errors.append(f"{type(exc).__name__}: {exc}")
        if got.errors:
            return self._answer(got, Reply("failure", "XDSRegistryMetadataError"), "; ".join(got.errors))
        reply = self.replies.pop(0) if self.replies else Reply("success")
        return self._answer(got, reply, f"scripted {reply.kind}")

    def _check(self, got: Received, content_type: str, data: bytes) -> None:
        root_xml, attachments = _split(content_type, data)
        envelope = etree.fromstring(root_xml)
        got.envelope = envelope
        header = envelope.find(f"{{{SOAP12}}}Header")
        assert header is not None, "no SOAP Header"
        got.action = header.findtext(f"{{{WSA}}}Action", "")
        got.message_id = header.findtext(f"{{{WSA}}}MessageID", "")
        if got.action != ACTIONS.get(got.path):
            got.errors.append(f"wsa:Action {got.action!r} on {got.path}")
        if header.findtext(f"{{{WSA}}}To", "") != self.url(got.path):
            got.errors.append(f"wsa:To {header.findtext(f'{{{WSA}}}To', '')!r}")
        self._check_vihf(got, header)
        body = envelope.find(f"{{{SOAP12}}}Body/*")
        assert body is not None, "empty SOAP Body"
        for include in list(body.iter(XOP)):
            cid = include.get("href", "").removeprefix("cid:")
            document = include.getparent()
            if cid not in attachments:
                got.errors.append(f"xop:Include {cid}: no such MIME part")
                continue
            got.documents[document.get("id", "")] = attachments[cid]
            document.remove(include)
            document.text = base64.b64encode(attachments[cid]).decode()
        got.body = body
        with self._schema_lock:
            if not self.schema.validate(body):
                got.errors.extend(f"schema line {e.line}: {e.message}" for e in self.schema.error_log)
        for entry in body.iter(f"{{{RIM}}}ExtrinsicObject"):
            content = got.documents.get(entry.get("id", ""))
            if content is None:
                got.errors.append(f"ExtrinsicObject {entry.get('id')}: no Document")
                continue
            slots = {
                s.get("name"): s.findtext(f"{{{RIM}}}ValueList/{{{RIM}}}Value") for s in entry.iter(f"{{{RIM}}}Slot")
            }
            if (slots.get("hash") or "").lower() != hashlib.sha1(content).hexdigest():
                got.errors.append(f"ExtrinsicObject {entry.get('id')}: hash {slots.get('hash')} does not match")
            if slots.get("size") != str(len(content)):
                got.errors.append(f"ExtrinsicObject {entry.get('id')}: size {slots.get('size')} is not {len(content)}")

    def _check_vihf(self, got: Received, header: etree._Element) -> None:
        assertion = header.find(f"{{{WSSE}}}Security/{{{SAML}}}Assertion")
        if assertion is None:
            got.errors.append("no VIHF (wsse:Security/saml2:Assertion)")
            return
        try:
            XMLVerifier().verify(assertion, x509_cert=self.seal_pem, id_attribute="ID")
            got.signature_valid = True
        except Exception as exc:  # signxml raises InvalidSignature / InvalidInput and friends
            got.errors.append(f"VIHF signature: {exc}")
        got.vihf_issuer = assertion.findtext(f"{{{SAML}}}Issuer", "")
        if got.vihf_issuer != self.seal_issuer:
            got.errors.append(f"VIHF Issuer {got.vihf_issuer!r} is not the seal certificate's {self.seal_issuer!r}")
        got.vihf_subject = assertion.findtext(f"{{{SAML}}}Subject/{{{SAML}}}NameID", "")
        for attribute in assertion.iter(f"{{{SAML}}}Attribute"):
            values = []
            for value in attribute.iter(f"{{{SAML}}}AttributeValue"):
                coded = next(iter(value), None)
                values.append(coded.get("code", "") if coded is not None else (value.text or ""))
            got.vihf[attribute.get("Name", "")] = values

    # -- answers -----------------------------------------------------------------------------------------------

    def _answer(self, got: Received, reply: Reply, context: str) -> tuple[int, str, bytes]:
        relates = got.message_id
        if reply.kind == "http":
            got.answered = f"http:{reply.status}"
            return reply.status, "text/plain", b"server error"
        if reply.kind == "fault":
            got.answered = f"fault:{reply.code}"
            status = 400 if reply.code == "Sender" else 500  # SOAP 1.2 HTTP binding
            return status, "application/soap+xml; charset=utf-8", _fault(reply.code, context)
        failed = reply.kind == "failure"
        got.answered = f"failure:{reply.code}" if failed else "success"
        response_action = (got.action or ACTIONS.get(got.path, "")) + "Response"
        envelope = _registry_response(response_action, relates, FAILURE if failed else SUCCESS, reply.code, context)
        if got.path == "/repository":  # like CXF with MTOM enabled: the answer is MTOM too
            boundary = f"uuid:{uuid.uuid4()}"
            body = (
                (
                    f'--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; type="application/soap+xml"\r\n'
                    f"Content-Transfer-Encoding: binary\r\nContent-ID: <root.message@cxf.apache.org>\r\n\r\n"
                ).encode()
                + envelope
                + f"\r\n--{boundary}--".encode()
            )
            content_type = (
                f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; '
                f'start="<root.message@cxf.apache.org>"; start-info="application/soap+xml"'
            )
            return 200, content_type, body
        return 200, "application/soap+xml; charset=utf-8", envelope


def _split(content_type: str, data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """(the SOAP envelope, the attachments by Content-ID) of an MTOM request, with the standard MIME parser."""
    if not content_type.lower().startswith("multipart/related"):
        return data, {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data
    )
    start = (message.get_param("start") or "").strip("<>")
    root, attachments = b"", {}
    for part in message.iter_parts():
        cid = str(part.get("Content-ID", "")).strip("<>")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if cid == start or (not start and not root):
            assert part.get_content_type() == "application/xop+xml", part.get_content_type()
            root = payload
        else:
            attachments[cid] = payload
    assert root, "no root part"
    return root, attachments


def _soap(action: str, relates_to: str, body: etree._Element) -> bytes:
    envelope = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"soap": SOAP12, "wsa": WSA})
    header = etree.SubElement(envelope, f"{{{SOAP12}}}Header")
    etree.SubElement(header, f"{{{WSA}}}Action").text = action
    etree.SubElement(header, f"{{{WSA}}}RelatesTo").text = relates_to
    etree.SubElement(envelope, f"{{{SOAP12}}}Body").append(body)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def _registry_response(action: str, relates_to: str, status: str, code: str, context: str) -> bytes:
    response = etree.Element(f"{{{RS}}}RegistryResponse", nsmap={"rs": RS}, status=status)
    if status == FAILURE:
        errors = etree.SubElement(response, f"{{{RS}}}RegistryErrorList")
        etree.SubElement(
            errors,
            f"{{{RS}}}RegistryError",
            errorCode=code,
            codeContext=context[:2000],
            severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error",
            location="xds-endpoint",
        )
    return _soap(action, relates_to, response)


def _fault(code: str, reason: str) -> bytes:
    envelope = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"soap": SOAP12})
    fault = etree.SubElement(etree.SubElement(envelope, f"{{{SOAP12}}}Body"), f"{{{SOAP12}}}Fault")
    etree.SubElement(etree.SubElement(fault, f"{{{SOAP12}}}Code"), f"{{{SOAP12}}}Value").text = f"soap:{code}"
    text = etree.SubElement(etree.SubElement(fault, f"{{{SOAP12}}}Reason"), f"{{{SOAP12}}}Text")
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    text.text = reason
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
