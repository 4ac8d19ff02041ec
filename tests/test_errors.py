"""The engine's one exception tree (traboule/errors.py): where each error is defined, what each branch carries,
and the builtin bases callers catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from traboule import errors
from traboule.errors import (
    CDAError,
    ConfigError,
    DeliveryError,
    DICOMwebError,
    FHIRServerError,
    HL7Error,
    MappingError,
    MappingFailure,
    MetadataError,
    NotificationError,
    QueryError,
    Refused,
    RemoteError,
    ReportRefused,
    SearchError,
    TrabouleError,
    XDSError,
)

# Raised and caught inside one module (a worklist scan stopped by its bounds), never seen by a caller.
CONTROL_FLOW = {"ScanStopped"}


def _engine_modules() -> list[str]:
    names = []
    for package in map(importlib.import_module, ("traboule", "traboule.channels", "traboule.adapters")):
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return [name for name in names if name != errors.__name__]


def _tree() -> list[type[BaseException]]:
    return [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, BaseException)]


def test_every_public_exception_of_the_engine_is_defined_in_errors():
    elsewhere = []
    for name in _engine_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
                and attr not in CONTROL_FLOW
            ):
                elsewhere.append(f"{name}.{attr}")
    assert elsewhere == []


def test_every_error_is_a_traboule_error():
    assert len(_tree()) > 20
    assert [c.__name__ for c in _tree() if not issubclass(c, TrabouleError)] == []


def test_former_import_paths_name_the_same_classes():
    """Import paths the documentation gives (plug-ins use them) keep working: the class is the one in errors."""
    from traboule.app import config
    from traboule.bus import PermanentError
    from traboule.formats import hl7
    from traboule.translate import mapping

    assert PermanentError is errors.PermanentError
    assert mapping.MappingError is MappingError
    assert config.ConfigError is ConfigError
    assert hl7.HL7Error is HL7Error


# One instance of each refusal, built as the code that raises it does.
REFUSALS = [
    HL7Error("MSH-9 is empty", location="MSH-9", code="101", reject=False),
    MappingFailure("no patient identifier", "PID-3"),
    ReportRefused("the INS does not match", "PID-3", code="205"),
    CDAError("procedure code 'X' has no LOINC act code"),
    MetadataError("document 1.2.3: the patient has no INS"),
    QueryError("(0008,0050): value cannot be decoded", 0x00080050),
    SearchError("date", "date: 'x' is not a FHIR date", "invalid"),
    NotificationError("StudyInstanceUID", "not a DICOM UID"),
]


def test_each_kind_of_refusal_is_checked_here():
    refusals = {c for c in _tree() if issubclass(c, Refused) and c is not Refused}
    assert {type(r) for r in REFUSALS} == refusals


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: type(r).__name__)
def test_each_refusal_carries_reason_location_and_code(refusal):
    assert isinstance(refusal, Refused)
    assert refusal.reason and refusal.reason in str(refusal)
    assert isinstance(refusal.location, str)
    assert isinstance(refusal.code, str)
    assert not isinstance(refusal, DeliveryError | ConfigError)


def test_refusal_fields_keep_their_former_names_and_defaults():
    hl7 = HL7Error("not HL7")
    assert (hl7.location, hl7.code, hl7.reject) == ("MSH", "102", True)
    failure = MappingFailure("no such code", "OBR-4", code="103")
    assert (failure.reason, failure.location, failure.code) == ("no such code", "OBR-4", "103")
    assert (ReportRefused("no study").location, ReportRefused("no study").code) == ("", "101")
    search = SearchError("_offset", "_offset must be an integer")
    assert (search.param, search.location, search.code) == ("_offset", "_offset", "not-supported")
    assert str(search) == "_offset must be an integer"
    notice = NotificationError("AccessionNumber", "longer than 64 characters")
    assert (notice.field, notice.location, notice.reason) == ("AccessionNumber", "AccessionNumber", notice.reason)
    assert str(notice) == "AccessionNumber: longer than 64 characters"
    assert QueryError("(0010,0010): bad", 0x00100010).location == "(0010,0010)"
    assert (QueryError("bad").tag, QueryError("bad").location) == (None, "")
    with pytest.raises(TypeError):
        MappingFailure("a mapping failure always says where")  # type: ignore[call-arg]


def test_builtin_bases_that_callers_catch():
    assert issubclass(HL7Error, ValueError)  # ``except ValueError`` around parsing (code usage, channel settings)
    for cls in (CDAError, MetadataError, QueryError, SearchError, NotificationError, errors.EncodingError):
        assert issubclass(cls, ValueError), cls
    assert issubclass(errors.DiskFull, OSError)
    assert issubclass(errors.BusUnavailableError, ConnectionError)
    assert issubclass(errors.BusClosedError, RuntimeError)
    assert issubclass(errors.NotPublished, LookupError)
    disk = errors.DiskFull("less than 64 MiB free on the journal's disk")
    assert str(disk) == "less than 64 MiB free on the journal's disk" and disk.errno is None


def test_branches_do_not_overlap():
    """An operator reads the branch: configuration (the engine does not start), refusal (the sender is answered
    no), delivery (retried, then dead-lettered), unavailable (send again later), operator command."""
    branches = [ConfigError, MappingError, Refused, DeliveryError, errors.Unavailable, errors.CommandError]
    for cls in _tree():
        assert sum(issubclass(cls, b) for b in branches) <= 1, cls
    assert not issubclass(MappingError, ConfigError)  # ``traboule check`` says which of the two it is
    for cls in (errors.PermanentError, errors.NotAccepted, errors.NotRegisteredYet, RemoteError):
        assert issubclass(cls, DeliveryError)


def test_remote_errors_carry_status_and_retryable():
    archive = DICOMwebError("archive unreachable")
    assert (archive.status, archive.retryable) == (0, True)
    registry = XDSError("XDSRegistryError", retryable=False, status=200, codes=["XDSRegistryError"], request=b"<x/>")
    assert (registry.status, registry.retryable, registry.codes, registry.request) == (
        200,
        False,
        ["XDSRegistryError"],
        b"<x/>",
    )
    assert XDSError("timeout", retryable=True).codes == []
    outcome = {"resourceType": "OperationOutcome", "issue": []}
    server = FHIRServerError("422", status=422, operation_outcome=outcome, retryable=False)
    assert (server.status, server.operation_outcome, server.retryable) == (422, outcome, False)
    for error in (archive, registry, server):
        assert isinstance(error, RemoteError)
    with pytest.raises(TypeError):
        XDSError("says nothing about a retry")  # type: ignore[call-arg]
