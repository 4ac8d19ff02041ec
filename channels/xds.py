"""Channel ``xds``: ``document.*`` events → the DMP (or any IHE XDS.b registry/repository), as the CI-SIS volet
"Partage de documents de santé" profiles it.

* ``document.publish`` → ITI-41 Provide and Register Document Set-b to the repository: a SubmissionSet with the
  CDA's DocumentEntry (metadata from ``traboule.translate.xds_metadata``), the CDA as an MTOM attachment.
* ``document.replace`` → ITI-41 with the new version and an RPLC association to the entryUUID of the version it
  supersedes.
* ``document.delete`` → ITI-57 Update Document Set to the registry: availabilityStatus Approved →
  ``urn:asip:ci-sis:2010:StatusType:Deleted``.

Every request carries a VIHF SAML assertion signed with the structure's seal certificate and goes over mutual TLS
with its authentication certificate. A document whose sharing instructions say ``DESTDMP`` = N is not sent.

Not produced: the XAdES "document de signature" (a third DocumentEntry signing the SubmissionSet, IHE DSG) that
the ANS samples carry. Whether the DMP requires it, and its exact profile (signature policy, references, which
certificate), are not confirmed by a published ANS specification: only the ANS sample submissions carry it.

A document version's entryUUID is derived from its uniqueId (``traboule.translate.document_ids.entry_uuid``, UUID
v5): the
one its MHD DocumentReference carries, so a gateway sees one identity on both sides. It is kept in the channel's
`traboule.stores.SubmissionStore` (``<data_dir>/<name>.sqlite``, or the PostgreSQL database every node shares)
before the first attempt, so that a retry resends the same entry and a replacement or deletion names the one
registered (an entry already stored keeps its entryUUID). A replacement or deletion of a document not registered
yet (its publication still in retry) is retried. A redelivered event of a document already registered is skipped;
a retry whose first attempt was registered although its answer was lost (``XDSDuplicateUniqueIdInRegistry``)
counts as registered. A document is worked on by one delivery at a time, on every node (``claim``): a delivery
that finds it claimed goes back to the bus (``HeldElsewhere``) and is retried every 2 s without counting an attempt,
however long the other delivery's own retries last. The store's calls run in a worker thread: a slow or unreachable
database never stalls the event loop.

Failures: transport errors, HTTP 5xx / 429, SOAP ``Receiver`` faults, busy registries and unreadable 2xx answers are
retried in place (backoff 0.5 s doubling to 30 s) for ``retry_window``, keeping the order of the documents; then the
bus retries with backoff, and dead-letters to ``<name>.dlq`` after ``max_attempts``. A registry ``Failure`` (metadata,
patient, duplicate id errors...), a SOAP ``Sender`` fault or a document that cannot make DMP metadata is final: the
request is journaled as ``undelivered`` (the SOAP envelope, the registry's errors) and dead-lettered at once
(``traboule dlq replay`` sends it again once fixed).

Configuration::

    [[channels]]
    name = "dmp"
    kind = "xds"
    topics = ["document.#"]
    max_attempts = 8
    retry_window = 300                 # seconds an outage (transport, 5xx, busy) is waited out in place, in order
    repository = "https://dmp.example/si-dmp-server/v2/services/repository"  # ITI-41 endpoint (https)
    registry = "https://dmp.example/si-dmp-server/v2/services/registry"      # ITI-57 endpoint
    timeout = 30
    ca_file = "igc-sante-roots.pem"    # CAs trusted for the server certificate (system CAs when empty)
    cert_file = "auth.pem"             # the structure's authentication certificate (IGC-Santé ORG), PEM
    key_file = "auth.key"              # (or all three in tls = { ca_file, cert_file, key_file, min_version... })
    source_id = "1.2.250.1.999.1.1.8121"   # OID of the submitting system (SubmissionSet.sourceId)
    content_types = {I = "03", O = "07", R = "19", N = "97", E = "07"}  # PV1-2 → contentTypeCode (TRE_R209)
    default_content_type = "O"
    submission_author = {person = "", institution = ""}  # XCN / XON; empty: the document's author
    timezone = "Europe/Paris"          # CDA times without an offset
    event_codes = true                 # CCAM act, modality and anatomical region (serviceEvent) in eventCodeList
    ccam_scheme = "1.2.250.1.213.2.5"
    region_scheme = "1.2.250.1.213.1.1.5.695"  # JDV_RegionAnatomique_CISIS, as the DRIMbox searches regions

    [channels.vihf]
    cert_file = "seal.pem"             # the structure's seal (cachet) certificate and key, PEM: signs the VIHF
    key_file = "seal.key"
    key_password_env = ""              # environment variable holding the key's password, if any
    version = "3.0"                    # VIHF_Version
    structure_id = "1690781810"        # Identifiant_Structure (idNat_Struct)
    secteur_activite = "SA01^1.2.250.1.71.4.2.4"
    subject_id = ""                    # NameID; empty: the document author's idNat_PS
    subject_name = ""                  # subject-id; empty: the document author's name
    roles = []                         # [{code, system, display}]; empty: from the author's specialty (G15_10/SM44)
    authentication_mode = "INDIRECTE"
    lps_id = "<id>"                    # LPS_ID: the software's identifier (required: no start without it)
    lps_name = "traboule"              # LPS_Nom
    lps_version = ""                   # LPS_Version; empty: traboule's version
    lps_homologation = "<number>"      # LPS_ID_HOMOLOGATION_DMP: the software's DMP homologation number (required)
    lifetime = 300                     # seconds
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn
from urllib.parse import urlsplit

import structlog

from traboule import audit, metrics
from traboule.adapters import xds
from traboule.app.config import destination_tls, is_loopback
from traboule.app.health import DestinationHealth, channel_health
from traboule.bus import Delivery
from traboule.channel import ChannelRuntime, ConsumerChannel, Setting
from traboule.errors import ConfigError, HeldElsewhere, MetadataError, NotRegisteredYet, PermanentError
from traboule.formats import hl7
from traboule.model import Document, Envelope
from traboule.stores import journal
from traboule.stores.factory import stores_of
from traboule.stores.mpps_state import begin_in_thread, run_to_end
from traboule.stores.submissions import Submission
from traboule.translate import document_ids
from traboule.translate.xds_metadata import (
    Coded,
    DocumentEntry,
    MetadataSettings,
    deletion,
    submission,
)

log = structlog.get_logger("traboule.channels.xds")

PROFESSION_SYSTEM = "1.2.250.1.71.1.2.7"  # TRE_G15-ProfessionSante
SAVOIR_FAIRE_SYSTEM = "1.2.250.1.71.4.2.5"  # TRE_R38-SpecialiteOrdinale
PROFESSIONS = {"10": "Médecin", "21": "Pharmacien", "40": "Chirurgien-Dentiste", "50": "Sage-Femme", "60": "Infirmier"}
# The software's identity the DMP requires in the VIHF: setting → VIHF attribute.
LPS = {"lps_id": "LPS_ID", "lps_version": "LPS_Version", "lps_homologation": "LPS_ID_HOMOLOGATION_DMP"}


class XDSChannel(ConsumerChannel):
    kind = "xds"
    topics = Setting(list, ["document.#"])
    accepts = (Document,)
    max_attempts = Setting(int, 8, minimum=1)
    retry_window = Setting(float, 300.0, minimum=0)
    timeout = Setting(float, 30.0, minimum=0)
    ca_file = Setting(str, "")
    cert_file = Setting(str, "")
    key_file = Setting(str, "")
    lifetime = Setting(int, 300, minimum=1, key="vihf.lifetime")

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        super().__init__(config, runtime)
        vihf = config.get("vihf") or {}
        try:
            self.repository = _url(config, "repository", self.name)
            self.registry = _url(config, "registry", self.name)
            self.settings = MetadataSettings.from_config(config)
            for key in ("cert_file", "key_file", "structure_id", "secteur_activite"):
                if not vihf.get(key):
                    raise ConfigError(
                        f"channel {self.name}: vihf.{key} is needed (see the settings in channels/xds.py)"
                    )
            defaults = getattr(runtime.config, "tls", None)
            table = config.get("tls") if isinstance(config.get("tls"), dict) else {}
            for key in ("cert_file", "key_file"):  # the DMP authenticates the structure by its TLS certificate
                if not (config.get(key) or table.get(key) or getattr(defaults, key, "")):
                    raise ConfigError(
                        f"channel {self.name}: {key} is needed: mutual TLS with the structure's authentication "
                        "certificate"
                    )
            tls = destination_tls(config, f"channel {self.name}", defaults)
            vihf = {**vihf, "lps_version": str(vihf.get("lps_version", "") or _version())}
            missing = [f"vihf.{k} ({LPS[k]})" for k in LPS if not str(vihf.get(k, "") or "").strip()]
            if missing:
                raise ConfigError(
                    f"channel {self.name}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} needed: the "
                    "DMP requires the software's identity in the VIHF (see the settings in channels/xds.py)"
                )
            password = os.environ.get(str(vihf.get("key_password_env", "")), "")
            self.signer = xds.AssertionSigner(vihf["cert_file"], vihf["key_file"], password)
            self.roles = [
                Coded(str(r["code"]), str(r.get("system", "")), str(r.get("display", r["code"])))
                for r in vihf.get("roles", [])
            ]
            self.client = xds.XDSClient(timeout=self.timeout, tls=tls)
        except ConfigError:
            raise  # already names the channel
        except (ValueError, KeyError, OSError) as exc:  # OSError: a certificate or key file missing or unreadable
            raise ConfigError(f"channel {self.name}: {exc}") from exc
        self.vihf = vihf
        # The entryUUID of each version is kept before the first attempt: a power cut must not lose it.
        self.submissions = stores_of(runtime).submissions(self.name)
        self._log = log.bind(channel=self.name)
        self.destination = DestinationHealth(self.repository)

    async def stop(self) -> None:
        await self.client.close()
        self.submissions.close()

    def health(self) -> dict[str, Any]:
        return channel_health(self.destination)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "destinations": [self.repository, self.registry],
            "source_id": self.settings.source_id,
        }

    # -- events ----------------------------------------------------------------------------------------------

    async def on_event(self, env: Envelope, delivery: Delivery) -> None:
        doc = env.payload
        assert isinstance(doc, Document)
        bound = self._log.bind(document=doc.id, action=doc.action)
        if doc.report.flag("DESTDMP").split("^", 1)[0].strip().upper() == "N":
            metrics.events_processed.labels(self.name, "skipped").inc()
            bound.info("xds.skipped", reason="DESTDMP = N: not for the DMP")
            self.note(env, "skipped: DESTDMP = N")
            if doc.action != "delete":  # remembered, so that a later version knows it has no original there
                await asyncio.to_thread(self.submissions.skip, doc.id, doc.set_id)
            return
        async with self._claim(doc.id) as mine:
            if not mine:  # another delivery of this document is in progress (here or on another node)
                raise HeldElsewhere(f"document {doc.id} is being sent by another delivery: retried later")
            await self._submit(doc, env, delivery, bound)

    @asynccontextmanager
    async def _claim(self, unique_id: str) -> AsyncIterator[bool]:
        """The store's claim of a document, taken and released in a worker thread; a delivery cancelled while it is
        taken releases it before it goes."""
        claim = self.submissions.claim(unique_id)
        mine = await begin_in_thread(claim.__enter__, lambda _: claim.__exit__(None, None, None))
        try:
            yield mine
        finally:
            await run_to_end(asyncio.to_thread(claim.__exit__, None, None, None))

    async def _submit(self, doc: Document, env: Envelope, delivery: Delivery, bound: Any) -> None:
        deadline = time.monotonic() + self.retry_window
        backoff, retrying = 0.5, delivery.attempt > 1
        while True:  # in place, in order: a replacement or deletion must not overtake what it refers to
            try:
                if doc.action == "delete":
                    await self._delete(doc, env, delivery, bound, retrying)
                else:
                    await self._provide(doc, env, delivery, bound)
                self.destination.succeeded()
                return
            except xds.XDSError as exc:  # NotRegisteredYet goes to the bus: what it waits for is behind it
                self.destination.failed(exc)
                if not exc.retryable:
                    raise
                if time.monotonic() + backoff > deadline:
                    raise
                # Codes and status, not the text: a registry's message may quote the metadata's values.
                bound.warning("xds.wait", status=exc.status, codes=exc.codes, wait_s=backoff)
                await asyncio.sleep(backoff)
                backoff, retrying = min(backoff * 2, 30.0), True

    async def _provide(self, doc: Document, env: Envelope, delivery: Delivery, bound: Any) -> None:
        row = await asyncio.to_thread(self.entry, doc.id)
        if row is not None and row.status != "sending":
            metrics.events_processed.labels(self.name, "duplicate").inc()
            self.note(env, f"document {doc.id} already {row.status}", "duplicate")
            return
        replaces = ""
        if doc.replaces:
            old = await asyncio.to_thread(self.entry, doc.replaces)
            if old is None or old.status == "sending":
                raise NotRegisteredYet(f"document {doc.id} replaces {doc.replaces}, not registered by {self.name} yet")
            if old.status in ("refused", "skipped"):  # never in the DMP (refused, or not for it): a first version
                bound.info("xds.replaces_unsent", replaces=doc.replaces)
                doc = dataclasses.replace(doc, replaces="")
            else:
                replaces = old.entry_uuid
        # stable: the MHD one too; an entry already stored keeps its own
        entry_uuid = (
            await asyncio.to_thread(self.submissions.begin, doc.id, document_ids.entry_uuid(doc.id), doc.set_id)
        ).entry_uuid
        try:
            request_submission = submission(doc, self.settings, entry_uuid, replaces=replaces)
        except MetadataError as exc:
            await self._refused(env, delivery, "ITI-41", self.repository, str(exc), "metadata", delivery.body, exc)
        entry = request_submission.documents[0].entry
        request = await asyncio.to_thread(
            xds.provide_and_register_request, self.repository, request_submission, self._vihf(entry), self.signer
        )
        try:
            await self.client.send(request)
        except xds.XDSError as exc:
            if row is not None and "XDSDuplicateUniqueIdInRegistry" in exc.codes:
                bound.warning("xds.already_registered", codes=exc.codes, entry_uuid=entry_uuid)
            else:
                self._audit_export(doc, request_submission.submission_set.unique_id, exc)
                await self._failed(exc, env, delivery, "ITI-41", request, bound)
        ss = request_submission.submission_set.unique_id
        self._audit_export(doc, ss)
        await asyncio.to_thread(self.submissions.registered, doc.id, ss, replaced=doc.replaces)
        metrics.events_processed.labels(self.name, "delivered").inc()
        self.note(env, f"ITI-41 registered: document {doc.id}, submission set {ss}")
        bound.info(
            "xds.registered",
            entry_uuid=entry_uuid,
            submission_set=ss,
            replaces=replaces,
            attempt=delivery.attempt,
            wsa_message_id=request.message_id,
        )

    async def _delete(self, doc: Document, env: Envelope, delivery: Delivery, bound: Any, retrying: bool) -> None:
        row = await asyncio.to_thread(self.entry, doc.id)
        if row is not None and row.status in ("refused", "skipped"):  # never in the DMP: nothing to delete there
            bound.info("xds.delete_unsent")
            return
        if row is None or row.status == "sending":
            raise NotRegisteredYet(f"document {doc.id} to delete is not registered by {self.name} (yet)")
        if row.status == "deleted":
            metrics.events_processed.labels(self.name, "duplicate").inc()
            return
        try:
            update = deletion(doc, self.settings, row.entry_uuid)
        except MetadataError as exc:
            await self._refused(env, delivery, "ITI-57", self.registry, str(exc), "metadata", delivery.body, exc)
        assert update.entry is not None
        request = await asyncio.to_thread(
            xds.update_document_set_request, self.registry, update, self._vihf(update.entry), self.signer
        )
        try:
            await self.client.send(request)
        except xds.XDSError as exc:
            if retrying and "XDSMetadataUpdateError" in exc.codes:
                # An earlier attempt went through but its answer was lost: the entry is no longer Approved.
                bound.warning("xds.already_deleted", codes=exc.codes, entry_uuid=row.entry_uuid)
            else:
                await self._failed(exc, env, delivery, "ITI-57", request, bound)
        await asyncio.to_thread(self.submissions.deleted, doc.id)
        metrics.events_processed.labels(self.name, "delivered").inc()
        bound.info("xds.deleted", entry_uuid=row.entry_uuid, attempt=delivery.attempt)

    async def _failed(
        self, exc: xds.XDSError, env: Envelope, delivery: Delivery, transaction: str, request: xds.Request, bound: Any
    ) -> NoReturn:
        """A retryable failure raises for the bus to retry; a final one is journaled and dead-lettered."""
        if exc.retryable:
            bound.warning(
                "xds.retry", transaction=transaction, status=exc.status, codes=exc.codes, attempt=delivery.attempt
            )
            raise exc
        await self._refused(env, delivery, transaction, request.url, str(exc), ",".join(exc.codes), exc.request, exc)

    async def _refused(
        self,
        env: Envelope,
        delivery: Delivery,
        transaction: str,
        peer: str,
        error: str,
        code: str,
        raw: bytes,
        cause: Exception | None = None,
    ) -> NoReturn:
        entry = journal.JournalEntry(
            channel=self.name,
            raw=raw,
            status="undelivered",
            peer=peer,
            control_id=delivery.message_id,
            message_type=transaction,
            ack_code=code[:200],
            error=error,
            correlation_id=env.correlation_id or delivery.headers.get("correlation-id", ""),
        )
        recorded = await asyncio.to_thread(stores_of(self.runtime).record, entry)
        if isinstance(env.payload, Document) and env.payload.action != "delete":
            await asyncio.to_thread(self.submissions.refused, env.payload.id)
        metrics.events_processed.labels(self.name, "refused").inc()
        self._log.error("xds.refused", transaction=transaction, error=error, journal_id=recorded.id)
        raise PermanentError(f"{transaction} refused: {error} (journal entry {recorded.id})") from cause

    def _audit_export(self, doc: Document, submission_set: str, failure: xds.XDSError | None = None) -> None:
        """An ITI-41 submission on the audit trail (Export): the document and its submission set, to the repository's
        host; a failed one (retried: minor failure; refused for good: serious) with the HTTP status and the registry's
        error codes only."""
        outcome, description = audit.Outcome.SUCCESS, ""
        if failure is not None:
            outcome = audit.Outcome.MINOR_FAILURE if failure.retryable else audit.Outcome.SERIOUS_FAILURE
            codes = ",".join(failure.codes)[:200]
            description = f"ITI-41 not registered: HTTP {failure.status}" + (f", {codes}" if codes else "")
        host = urlsplit(self.repository).hostname or ""
        audit.trail_of(self.runtime).record(
            audit.exported(
                destination=audit.actor(host, host),
                patients=audit.patients_of(doc.report.patient),
                objects=(audit.object_ref("document", doc.id), audit.object_ref("submission-set", submission_set)),
                transaction="ITI-41",
                outcome=outcome,
                description=audit.bounded(description),
            )
        )

    # -- state ---------------------------------------------------------------------------------------------------

    def entry(self, unique_id: str) -> Submission | None:
        """What this channel registered under ``unique_id`` (its entryUUID and status)."""
        return self.submissions.get(unique_id)

    # -- VIHF --------------------------------------------------------------------------------------------------

    def _vihf(self, entry: DocumentEntry) -> xds.VIHF:
        """The VIHF of a request about ``entry``: configured subject and roles, else the document's author."""
        v = self.vihf
        author = entry.authors[0]
        parts = [hl7.unescape(p) for p in author.person.split("^")] + ["", "", ""]
        subject_name = " ".join(p for p in (parts[2], parts[1]) if p)
        return xds.VIHF(
            subject_id=str(v.get("subject_id", "") or parts[0]),
            subject_name=str(v.get("subject_name", "") or subject_name),
            structure_id=str(v["structure_id"]),
            secteur_activite=str(v["secteur_activite"]),
            patient_id=entry.patient_id,
            roles=self.roles or _roles(author.specialties),
            lps_id=str(v.get("lps_id", "")),
            lps_name=str(v.get("lps_name", "traboule")),
            lps_version=str(v.get("lps_version", "")),
            lps_homologation=str(v.get("lps_homologation", "")),
            version=str(v.get("version", "3.0")),
            authentication_mode=str(v.get("authentication_mode", "INDIRECTE")),
            lifetime=self.lifetime,
        )


def _roles(specialties: list[str]) -> list[Coded]:
    """Profession and savoir-faire from an authorSpecialty ``G15_10/SM44^Médecin - Radio-diagnostic (SM)^…``."""
    for specialty in specialties:
        code, _, rest = specialty.partition("^")
        m = re.match(r"^G15_(\w+?)(?:/(\w+))?$", code)
        if not m:
            continue
        display = rest.partition("^")[0]
        roles = [Coded(m.group(1), PROFESSION_SYSTEM, PROFESSIONS.get(m.group(1), display.partition(" - ")[0]))]
        if m.group(2):
            roles.append(Coded(m.group(2), SAVOIR_FAIRE_SYSTEM, display.partition(" - ")[2] or m.group(2)))
        return roles
    return []


def _url(config: dict[str, Any], key: str, channel: str) -> str:
    """The endpoint: https (the VIHF and the documents must not travel in clear), http on loopback only."""
    url = str(config.get(key, ""))
    host = urlsplit(url).hostname or ""
    if not url.startswith("https://") and not (url.startswith("http://") and is_loopback(host)):
        raise ConfigError(f"channel {channel}: {key} must be the https URL of the XDS.b endpoint, not {url!r}")
    return url


def _version() -> str:
    """traboule's version (the default LPS_Version), "" when it is not installed as a package."""
    try:
        return importlib.metadata.version("traboule")
    except importlib.metadata.PackageNotFoundError:
        return ""
