"""The console's pages: login and logout, the dashboard, the message browser and one message."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

import structlog
from jinja2 import Environment
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from traboule import audit
from traboule.app.console.alerts import open_counts
from traboule.app.console.auth import Identity, LoginLimiter, Sessions
from traboule.app.console.labels import LABELS, LANGUAGES, language
from traboule.app.console.message import Mapper, lay_out
from traboule.app.console.reader import STATUSES, Reader
from traboule.stores.journal_search import SearchQuery

log = structlog.get_logger("traboule.app.console")

PAGE = 50  # messages per page of the browser
MAX_FORM = 8192  # bytes of a console form body read at most
MAX_FIELD = 200  # characters of one search field
MAX_FIELDS = 20  # fields of a login or logout form
TYPE = re.compile(r"[A-Za-z0-9]{3}(\^[A-Za-z0-9]{3})?")


class Console:
    """The pages, over one runtime: its configuration, its health, the console's journal reader."""

    def __init__(self, runtime: Any, sessions: Sessions, templates: Environment) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.templates = templates
        self.reader = Reader(runtime)
        self.mapper = Mapper(runtime.config)
        self.limiter = LoginLimiter()

    # -- plumbing ----------------------------------------------------------------------------------------------

    def path(self, request: Request, name: str, query: dict[str, Any] | None = None, **params: Any) -> str:
        """The path of a console route (``console:<name>``), with ``query`` URL-encoded."""
        path = str(request.app.url_path_for(f"console:{name}", **params))
        pairs = {k: v for k, v in (query or {}).items() if v not in ("", None, 0)}
        return f"{path}?{urlencode(pairs)}" if pairs else path

    def render(
        self, request: Request, template: str, identity: Identity | None, status: int = 200, **context: Any
    ) -> Response:
        key, new_key = self.sessions.browser_key(request)
        return self._response(request, self._body(request, key, template, identity, context), status, key, new_key)

    async def render_off_loop(
        self, request: Request, template: str, identity: Identity | None, status: int = 200, **context: Any
    ) -> Response:
        """`render` with the template rendered on a console thread (a page that may be large: one message)."""
        key, new_key = self.sessions.browser_key(request)
        body = await self.reader.run(self._body, request, key, template, identity, context)
        return self._response(request, body, status, key, new_key)

    def _body(self, request: Request, key: str, template: str, identity: Identity | None, context: Any) -> str:
        lang = language(request)
        return self.templates.get_template(template).render(
            t=LABELS[lang],
            lang=lang,
            other_lang=next(code for code in LANGUAGES if code != lang),
            identity=identity,
            csrf=self.sessions.csrf_token(key, request),
            path=lambda name, query=None, **params: self.path(request, name, query, **params),
            current=request.url.path,
            **context,
        )

    def _response(self, request: Request, body: str, status: int, key: str, new_key: bool) -> Response:
        lang = language(request)
        response = HTMLResponse(body, status_code=status)
        if new_key:
            self.sessions.set_browser_key(response, request, key)
        if request.query_params.get("lang") in LANGUAGES:
            response.set_cookie("lang", lang, path="/console", max_age=365 * 86400, samesite="strict")
        return response

    def record(self, event: audit.AuditEvent) -> None:
        """An event on the engine's audit trail (IHE ATNA)."""
        audit.trail_of(self.runtime).record(event)

    def requestor(self, request: Request, identity: Identity) -> audit.Actor:
        """Who is looking, for the audit trail: the session's token name and role, the browser's address."""
        return audit.actor(identity.name, request.client.host if request.client else "", user_name=identity.role)

    def to_login(self, request: Request) -> Response:
        return RedirectResponse(self.path(request, "login"), status_code=303)

    async def form(self, request: Request) -> dict[str, str] | None:
        """An ``application/x-www-form-urlencoded`` body, each field's first value; None when too large or with
        more than `MAX_FIELDS` fields."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return None
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except ValueError:  # more fields than that
            return None
        return {k: v[0] for k, v in fields.items()}

    # -- pages -------------------------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if self.sessions.identity(request) is not None and not self.sessions.open:
            return RedirectResponse(self.path(request, "dashboard"), status_code=303)
        return self.render(request, "login.html", None, open=self.sessions.open)

    async def login(self, request: Request) -> Response:
        peer = request.client.host if request.client else ""
        wait = self.limiter.attempt(peer)  # counted as failed from now on: before the body is read
        if wait:
            response = self.render(request, "login.html", None, status=429, error="too_many_logins")
            response.headers["retry-after"] = str(wait)
            return response
        try:
            form = await self.form(request)
        finally:
            self.limiter.done()
        if form is None:
            return self.render(request, "login.html", None, status=413, error="form_too_large")
        if not self.sessions.csrf_ok(request, form.get("csrf", "")):
            return self.render(request, "login.html", None, status=403, error="csrf_refused")
        opened = self.sessions.login(form.get("token", "")[:1024])
        if opened is None:
            log.warning("console.login_refused", peer=peer, blocked=self.limiter.refused_for(peer) > 0)
            refused = audit.authentication_failed(user=audit.actor("anonymous", peer), reason="console login refused")
            self.record(refused)
            return self.render(request, "login.html", None, status=401, error="token_refused")
        self.limiter.succeeded(peer)
        log.info("console.login", token=opened[0].name, role=opened[0].role, peer=peer)
        response = RedirectResponse(self.path(request, "dashboard"), status_code=303)
        self.sessions.set_session(response, request, opened[1])
        return response

    async def logout(self, request: Request) -> Response:
        form = await self.form(request)
        if form is None or not self.sessions.csrf_ok(request, form.get("csrf", "")):
            identity = self.sessions.identity(request)
            return self.render(request, "error.html", identity, status=403, error="csrf_refused")
        self.sessions.logout(request)
        response = RedirectResponse(self.path(request, "login"), status_code=303)
        self.sessions.clear_session(response)
        return response

    async def dashboard(self, request: Request) -> Response:
        identity = self.sessions.identity(request)
        if identity is None:
            return self.to_login(request)
        from traboule.app.http import _children_health

        runtime = self.runtime
        health = await runtime.health_report()
        processes = await _children_health(runtime) if runtime.processes else {}
        local = {c.name for c in runtime.channels}
        names = [str(c["name"]) for c in runtime.config.channels]
        activity = await self.reader.run(self.reader.activity, names)
        incidents = await open_counts(self.reader.stores)
        rows = []
        for cfg in runtime.config.channels:
            name, process = str(cfg["name"]), str(cfg.get("process", "main"))
            if name in local:
                state = health.get("channels", {}).get(name, {}).get("state", "running" if runtime.started else "")
            else:
                state = processes.get(process, {}).get("status", "unknown")
            windows = {w: _bars(counts[name]) for w, counts in activity["windows"].items()}
            rows.append(
                {
                    "name": name,
                    "kind": cfg["kind"],
                    "process": process,
                    "state": state,
                    "windows": windows,
                    "alerts": (incidents or {}).get(name, 0),
                    "rejected": activity["rejected"].get(name),
                    "health_error": _health_error(health.get("channels", {}).get(name, {})),
                }
            )
        return self.render(
            request,
            "dashboard.html",
            identity,
            health=health,
            channels=rows,
            outbox=activity["outbox"],
            processes=processes,
            incidents=incidents,
            open_incidents=sum((incidents or {}).values()),
        )

    async def messages(self, request: Request) -> Response:
        identity = self.sessions.identity(request)
        if identity is None:
            return self.to_login(request)
        params = {k: request.query_params.get(k, "")[:MAX_FIELD].strip() for k in FIELDS}
        errors: list[str] = []
        query = self._query(params, errors, LABELS[language(request)])
        before = request.query_params.get("before", "")
        before_id = int(before) if before.isdigit() and len(before) < 19 else 0
        page = None
        if not errors:
            try:
                page = await self.reader.run(self.reader.search, query, before_id, PAGE)
            except ValueError as exc:  # a query the index refuses (too short a text...): said on the form
                errors.append(str(exc))
        if page is not None and page.entries:  # patient data shown: the search on the audit trail
            # The page's rows do not give their patients (that would read each one's keys): the patient searched
            # for, when the search names one.
            patients = audit.patient_refs([(params["patient"], "")]) if params["patient"] else ()
            shown = urlencode({k: v for k, v in params.items() if v})
            self.record(audit.queried(requestor=self.requestor(request, identity), query=shown, patients=patients))
        channels = [str(c["name"]) for c in self.runtime.config.channels]
        return self.render(
            request,
            "messages.html",
            identity,
            status=400 if errors else 200,
            params=params,
            errors=errors,
            page=page,
            before=before_id,
            statuses=STATUSES,
            channels=channels,
            indexed=self.reader.indexed,
        )

    def _query(self, params: dict[str, str], errors: list[str], t: dict[str, str]) -> SearchQuery:
        query = SearchQuery(
            control_id=params["control_id"],
            accession=params["accession"],
            patient=params["patient"],
            text=params["text"],
        )
        for key in ("since", "until"):
            if params[key]:
                try:
                    setattr(query, key, utc(params[key]))
                except ValueError:
                    errors.append(f"{t[key]}: {t['bad_date']}")
        if params["status"] in STATUSES:
            query.statuses = [params["status"]]
        if params["channel"]:
            if params["channel"] in {str(c["name"]) for c in self.runtime.config.channels}:
                query.channels = [params["channel"]]
            else:  # not a configured channel: nothing to find, and no walk of the whole index to find it
                errors.append(f"{t['channel']}: {', '.join(str(c['name']) for c in self.runtime.config.channels)}")
        if params["type"]:
            if TYPE.fullmatch(params["type"]):
                query.types = [params["type"].upper()]
            else:
                errors.append(f"{t['type']}: ORM, ORM^O01…")
        return query

    async def message(self, request: Request) -> Response:
        identity = self.sessions.identity(request)
        if identity is None:
            return self.to_login(request)
        message_id = int(request.path_params["message_id"])
        entry, keys = await self.reader.run(self.reader.entry, message_id) if message_id < 2**63 else (None, {})
        if entry is None:
            return self.render(request, "error.html", identity, status=404, error="not_found")

        def view() -> Any:
            shown = lay_out(entry)
            self.mapper.events(entry, shown)
            return shown, self.reader.destinations(entry)

        shown, destinations = await self.reader.run(view)
        self.record(
            audit.read(
                requestor=self.requestor(request, identity),
                patients=audit.patient_refs(shown.patients),
                objects=_message_objects(entry),
            )
        )
        return await self.render_off_loop(
            request, "message.html", identity, entry=entry, keys=keys, view=shown, destinations=destinations
        )

    async def message_raw(self, request: Request) -> Response:
        """The journaled bytes of one message, as a download (never rendered by the browser)."""
        identity = self.sessions.identity(request)
        if identity is None:
            return self.to_login(request)
        message_id = int(request.path_params["message_id"])
        entry, keys = await self.reader.run(self.reader.entry, message_id) if message_id < 2**63 else (None, {})
        if entry is None:
            return self.render(request, "error.html", identity, status=404, error="not_found")
        patients = audit.patient_refs((value, "") for value in keys.get("patient", []))  # indexed: ids, no authority
        self.record(
            audit.read(requestor=self.requestor(request, identity), patients=patients, objects=_message_objects(entry))
        )
        return Response(
            entry.raw,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="message-{entry.id}.hl7"'},
        )


FIELDS = ("since", "until", "status", "type", "channel", "control_id", "accession", "patient", "text")


def utc(text: str) -> str:
    """A date or date-time typed in the form (UTC unless it says otherwise) as the journal writes times."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _message_objects(entry: Any) -> tuple[audit.ObjectRef, ...]:
    """A journaled message for the audit trail: its MSH-10, else its journal id."""
    return (audit.object_ref("message", entry.control_id or f"journal:{entry.id}"),)


def _health_error(health: dict[str, Any]) -> str:
    """The error a channel's health names (an exception's class name, never a text), or its first destination's."""
    if health.get("error"):
        return str(health["error"])[:80]
    for destination in health.get("destinations", []):
        if destination.get("state") == "down" and destination.get("last_error"):
            return str(destination["last_error"])[:80]
    return ""


def _bars(counts: dict[str, int]) -> list[dict[str, Any]]:
    """The bars of one channel's chart: received (every status), accepted, rejected; widths out of 100."""
    values = [("received", sum(counts.values())), ("accepted", counts["accepted"]), ("rejected", counts["rejected"])]
    top = max(1, *(v for _, v in values))
    return [{"label": label, "value": value, "width": round(100 * value / top, 1)} for label, value in values]
