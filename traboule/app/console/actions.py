"""The console's operator actions: reprocessing journaled messages and handling dead letters.

Reprocess (role ``operate``) is ``traboule journal reprocess`` (`traboule.app.reprocess`: ``plan``, ``dry_run``,
``run``) driven from a form: the messages are one message's page or the browser's current result set (resolved to
journal ids when the form opens, at most `MAX_REPROCESS`: a larger selection is for the command line, whose runs
checkpoint and resume), the target channels and a reason are chosen, a dry run shows the diffs, a confirmation runs
it (bounded to the journal ids the dry run covered) and the counts are shown. It runs on a console thread, on a
bus connection of its own as the command does, so the engine's loop goes on acknowledging messages meanwhile.

Dead letters (role ``read`` to look, ``operate`` to act) are read and moved through the engine's own bus
(``runtime.bus``: the embedded bus file every engine process shares, or RabbitMQ), per channel queue: replay one or
all, discard one with a reason. Every action is recorded with its operator (the session's token name) and reason in
`traboule.app.console.audit` before it is carried out, and logged without the reason; the last ones are listed
(role ``read``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from traboule import audit
from traboule.app import reprocess
from traboule.app.console.audit import RECENT, Audit
from traboule.app.console.auth import Identity
from traboule.app.console.labels import LABELS, language
from traboule.app.runtime import channel_bindings
from traboule.bus import Delivery
from traboule.errors import ReprocessError
from traboule.stores.journal_search import MAX_LIMIT

log = structlog.get_logger("traboule.app.console")

MAX_REPROCESS = 200  # messages one console reprocess covers at most (more: the command line)
MAX_PAGES = 20  # pages of search results looked through for one reprocess form at most
MAX_REASON = 500  # characters of a reason
MAX_BODY = 200_000  # characters of a dead letter's payload shown
LETTERS = 100  # dead letters listed per queue (and replayed by "replay all" at a time)
MAX_FORM = 16_384  # bytes of an action form
MAX_FIELDS = 60  # fields of an action form
DISCARD_SCAN = 1000  # dead letters of a queue read to find every copy of the one discarded (more: refused)


@dataclass
class Selection:
    """The journal ids a reprocess form covers, and why some of the result set are left out."""

    ids: list[int]
    statuses: list[str]
    skipped: int = 0  # entries of the result set that are not reprocessable (outbound, another status)
    too_many: bool = False
    problem: str = ""


def compact(ids: list[int]) -> str:
    """``1,2,3,7`` → ``1-3,7`` (the syntax of ``traboule journal reprocess``'s ids)."""
    out: list[str] = []
    for n in sorted(set(ids)):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == n - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        elif out and "-" not in out[-1] and int(out[-1]) == n - 1:
            out[-1] = f"{out[-1]}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


def diff_lines(text: str) -> list[tuple[str, str]]:
    """The dry run's report as (css class, line) pairs for the template (it escapes them)."""
    out = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")):
            kind = "file"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith(("journal entry", "dry run:")):
            kind = "head"
        else:
            kind = ""
        out.append((kind, line))
    return out


def pretty(body: bytes) -> str:
    """A payload as indented JSON when it is JSON, else its text."""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)[:MAX_BODY]
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")[:MAX_BODY]


class Actions:
    """The action pages, over the console's plumbing (`traboule.app.console.views.Console`)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.runtime = console.runtime
        self.audit = Audit(self.runtime.config.data_dir)

    # -- plumbing ----------------------------------------------------------------------------------------------

    def allowed(self, request: Request, role: str) -> Identity | Response:
        """The session's identity when its role allows ``role``; else the login form or a 403 page."""
        identity = self.console.sessions.identity(request)
        if identity is None:
            return self.console.to_login(request)
        if not identity.allows(role):
            return self.console.render(request, "error.html", identity, status=403, error="not_allowed")
        return identity

    async def posted(self, request: Request, role: str) -> tuple[Identity, dict[str, list[str]]] | Response:
        """A POSTed action form: its fields (every value) once the role and the CSRF token are checked."""
        allowed = self.allowed(request, role)
        if isinstance(allowed, Response):
            return allowed
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return self.console.render(request, "error.html", allowed, status=413, error="form_too_large")
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except ValueError:  # more fields than that
            return self.console.render(request, "error.html", allowed, status=400, error="form_too_large")
        if not self.console.sessions.csrf_ok(request, (fields.get("csrf") or [""])[0]):
            return self.console.render(request, "error.html", allowed, status=403, error="csrf_refused")
        return allowed, fields

    def takers(self) -> list[str]:
        """The channels a reprocess can deliver to: configured, consuming a queue of their own."""
        names = []
        for ch in self.runtime.config.channels:
            if ch["kind"] != "hl7-orders" and any(q == ch["name"] for q, _ in channel_bindings(ch)):
                names.append(str(ch["name"]))
        return names

    def queues(self) -> list[tuple[str, str]]:
        """(channel, queue) of every queue the configured channels consume."""
        return [(str(ch["name"]), q) for ch in self.runtime.config.channels for q, _ in channel_bindings(ch)]

    # -- reprocess ---------------------------------------------------------------------------------------------

    def _select(self, request: Request) -> tuple[Selection, dict[str, str], int]:
        """What the form covers: ``?message=ID`` (one message), else the browser's filters (its result set)."""
        from traboule.app.console.views import FIELDS, MAX_FIELD

        inbound = reprocess.inbound_channels(self.runtime.config)
        reader = self.console.reader
        message = request.query_params.get("message", "")
        if message.isdigit() and len(message) < 19:
            entry = reader.journal.get(int(message))
            if entry is None:
                return Selection([], [], problem="not_found"), {}, int(message)
            if entry.status not in reprocess.REPROCESSABLE or entry.channel not in inbound:
                return Selection([], [], problem="not_reprocessable"), {}, entry.id
            return Selection([entry.id], [entry.status]), {}, entry.id
        params = {k: request.query_params.get(k, "")[:MAX_FIELD].strip() for k in FIELDS}
        errors: list[str] = []
        query = self.console._query(params, errors, LABELS[language(request)])
        if errors:
            return Selection([], [], problem="; ".join(errors)), params, 0
        wanted = [params["status"]] if params["status"] in reprocess.REPROCESSABLE else ["accepted", "duplicate"]
        chosen = Selection([], wanted)
        before, pages = 0, 0
        while True:
            pages += 1
            try:
                page = reader.search(query, before, MAX_LIMIT)
            except ValueError as exc:
                return Selection([], [], problem=str(exc)), params, 0
            for entry in page.entries:
                if entry.status in wanted and entry.channel in inbound:
                    chosen.ids.append(entry.id)
                else:
                    chosen.skipped += 1
            if len(chosen.ids) > MAX_REPROCESS or (page.next_before and pages >= MAX_PAGES):
                chosen.too_many = True  # more than the console takes, or than it looks through
                break
            if not page.next_before:
                break
            before = page.next_before
        return chosen, params, 0

    async def reprocess_form(self, request: Request) -> Response:
        allowed = self.allowed(request, "operate")
        if isinstance(allowed, Response):
            return allowed
        selection, params, message = await self.console.reader.run(self._select, request)
        if selection.problem == "not_found":
            return self.console.render(request, "error.html", allowed, status=404, error="not_found")
        return self.console.render(
            request,
            "reprocess.html",
            allowed,
            status=400 if selection.problem or selection.too_many or not selection.ids else 200,
            selection=selection,
            ids=compact(selection.ids),
            params=params,
            message=message,
            takers=self.takers(),
            limit=MAX_REPROCESS,
            command=_command(params),
        )

    def _request(self, fields: dict[str, list[str]]) -> tuple[dict[str, Any], list[str]]:
        """The reprocess asked for by a posted form, and what is wrong with it."""
        problems = []
        ids = (fields.get("ids") or [""])[0][:4000]
        statuses = [s for s in (fields.get("statuses") or [""])[0].split(",") if s]
        to = [t for t in fields.get("to", []) if t in self.takers()]
        reason = " ".join((fields.get("reason") or [""])[0].split())[:MAX_REASON]
        upto = (fields.get("upto") or ["0"])[0]
        if not to:
            problems.append("choose_targets")
        if not reason:
            problems.append("reason_required")
        try:
            wanted, ranges = reprocess.parse_ids([ids])
        except ReprocessError:
            wanted, ranges = [], []
        if not wanted and not ranges:
            problems.append("no_messages")
        elif len(wanted) + sum(b - a + 1 for a, b in ranges) > MAX_REPROCESS:
            problems.append("too_many")
        asked = {
            "ids": ids,
            "statuses": [s for s in statuses if s in reprocess.REPROCESSABLE],
            "to": to,
            "reason": reason,
            "upto": int(upto) if upto.isdigit() and len(upto) < 19 else 0,
        }
        return asked, problems

    def _plan(self, asked: dict[str, Any], operator: str) -> reprocess.Plan:
        """On a console thread: the plan of ``asked``, bounded to the journal ids a dry run covered."""
        chosen = reprocess.plan(
            self.runtime.config,
            self.console.reader.journal,
            ids=[asked["ids"]],
            types=[],
            statuses=asked["statuses"],
            channels=[],
            since="",
            until="",
            to=asked["to"],
            resume=False,
            operator=operator,
            reason=asked["reason"],
        )
        if asked["upto"] and asked["upto"] < chosen.query.upto:
            chosen.query.upto = asked["upto"]
            chosen.state.query["upto"] = asked["upto"]
            chosen.total = self.console.reader.journal.count(chosen.query)
        return chosen

    def _dry_run(self, asked: dict[str, Any], operator: str) -> tuple[reprocess.Plan, int, str]:
        chosen = self._plan(asked, operator)
        out = io.StringIO()
        code = asyncio.run(reprocess.dry_run(self.runtime.config, self.console.reader.journal, chosen, out=out))
        return chosen, code, out.getvalue()

    def _run(self, asked: dict[str, Any], operator: str) -> tuple[reprocess.Plan, int, str]:
        chosen = self._plan(asked, operator)
        self.audit.record(
            operator,
            "reprocess",
            asked["reason"],
            ids=asked["ids"],
            statuses=chosen.query.statuses,
            upto=chosen.query.upto,
            to=asked["to"],
            messages=chosen.total,
        )
        out = io.StringIO()
        code = asyncio.run(reprocess.run(self.runtime.config, self.console.reader.journal, chosen, out=out))
        return chosen, code, out.getvalue()

    async def reprocess_dry_run(self, request: Request) -> Response:
        return await self._reprocess(request, confirm=False)

    async def reprocess_run(self, request: Request) -> Response:
        return await self._reprocess(request, confirm=True)

    async def _reprocess(self, request: Request, *, confirm: bool) -> Response:
        posted = await self.posted(request, "operate")
        if isinstance(posted, Response):
            return posted
        identity, fields = posted
        asked, problems = self._request(fields)
        render = self.console.render
        if problems:
            return render(request, "reprocess_result.html", identity, status=400, asked=asked, problems=problems)
        work = self._run if confirm else self._dry_run
        try:
            chosen, code, report = await self.console.reader.run(work, asked, identity.name)
        except ReprocessError as exc:
            status = 409 if "another reprocess" in str(exc) else 400
            return render(request, "reprocess_result.html", identity, status=status, asked=asked, failure=str(exc))
        if confirm:
            state = chosen.state
            log.info("console.reprocessed", token=identity.name, to=asked["to"], done=state.done, failed=state.failed)
            self.console.record(
                audit.operator_action(
                    "U",
                    operator=self.console.requestor(request, identity),
                    what="reprocess",
                    objects=(audit.object_ref("journal-entry", asked["ids"]),),
                    outcome=audit.Outcome.SUCCESS if code == 0 and not state.failed else audit.Outcome.MINOR_FAILURE,
                )
            )
        return render(
            request,
            "reprocess_result.html",
            identity,
            asked={**asked, "upto": chosen.query.upto},
            confirm=confirm,
            total=chosen.total,
            state=chosen.state,
            code=code,
            lines=diff_lines(report),
        )

    # -- the record of actions ---------------------------------------------------------------------------------

    async def history(self, request: Request) -> Response:
        """The last actions recorded (role ``read``), newest first; a discarded letter's body by its size only."""
        allowed = self.allowed(request, "read")
        if isinstance(allowed, Response):
            return allowed
        shown = await asyncio.to_thread(self.audit.recent, RECENT)
        return self.console.render(request, "actions_log.html", allowed, actions=shown)

    # -- dead letters ------------------------------------------------------------------------------------------

    async def dead_letters(self, request: Request) -> Response:
        allowed = self.allowed(request, "read")
        if isinstance(allowed, Response):
            return allowed
        rows = []
        for channel, queue in self.queues():
            try:
                count = len(await self.runtime.bus.dead_letters(queue, LETTERS + 1))
                rows.append({"channel": channel, "queue": queue, "count": count, "error": ""})
            except Exception as exc:  # the broker unreachable: said per queue, the page still shows
                rows.append({"channel": channel, "queue": queue, "count": None, "error": type(exc).__name__})
        return self.console.render(request, "dead_letters.html", allowed, rows=rows, limit=LETTERS)

    def _queue(self, request: Request) -> str | None:
        queue = str(request.path_params["queue"])
        return queue if any(q == queue for _, q in self.queues()) else None

    async def dead_letter_queue(self, request: Request) -> Response:
        allowed = self.allowed(request, "read")
        if isinstance(allowed, Response):
            return allowed
        queue = self._queue(request)
        if queue is None:
            return self.console.render(request, "error.html", allowed, status=404, error="no_queue")
        letters = await self.runtime.bus.dead_letters(queue, LETTERS)

        def lay_out() -> list[dict[str, Any]]:  # JSON parsed and indented on a console thread, not the loop
            return [
                {
                    "message_id": d.message_id,
                    "topic": d.topic,
                    "attempt": d.attempt,
                    "error": d.headers.get("x-error", ""),
                    "headers": {k: v for k, v in d.headers.items() if k != "x-error"},
                    "body": pretty(d.body),
                }
                for d in letters
            ]

        shown = await self.console.reader.run(lay_out)
        done = request.query_params.get("done", "")
        count = request.query_params.get("n", "")
        return await self.console.render_off_loop(
            request,
            "dead_letter_queue.html",
            allowed,
            queue=queue,
            letters=shown,
            limit=LETTERS,
            done=done if done in ("replayed", "discarded", "missing") else "",
            count=int(count) if count.isdigit() and len(count) < 6 else 0,
        )

    def _back(self, request: Request, queue: str, done: str, count: int) -> Response:
        where = self.console.path(request, "dead_letter_queue", {"done": done, "n": count}, queue=queue)
        return RedirectResponse(where, status_code=303)

    async def replay(self, request: Request) -> Response:
        posted = await self.posted(request, "operate")
        if isinstance(posted, Response):
            return posted
        identity, fields = posted
        queue = self._queue(request)
        if queue is None:
            return self.console.render(request, "error.html", identity, status=404, error="no_queue")
        bus = self.runtime.bus
        if (fields.get("all") or [""])[0] == "1":
            ids = list(dict.fromkeys(d.message_id for d in await bus.dead_letters(queue, LETTERS)))
        else:
            ids = [(fields.get("message_id") or [""])[0][:512]]
        reason = " ".join((fields.get("reason") or [""])[0].split())[:MAX_REASON]
        await asyncio.to_thread(self.audit.record, identity.name, "dead_letter.replay", reason, queue=queue, ids=ids)
        replayed = 0
        for message_id in ids:
            if message_id and await bus.replay_dead_letter(queue, message_id):
                replayed += 1
                log.info("console.dead_letter_replayed", token=identity.name, queue=queue, message_id=message_id)
                self.console.record(
                    audit.operator_action(
                        "U",
                        operator=self.console.requestor(request, identity),
                        what="dead-letter-replay",
                        objects=(audit.object_ref("bus-message", f"{queue}/{message_id}"),),
                    )
                )
        return self._back(request, queue, "replayed" if replayed else "missing", replayed)

    async def discard(self, request: Request) -> Response:
        posted = await self.posted(request, "operate")
        if isinstance(posted, Response):
            return posted
        identity, fields = posted
        queue = self._queue(request)
        if queue is None:
            return self.console.render(request, "error.html", identity, status=404, error="no_queue")
        message_id = (fields.get("message_id") or [""])[0][:512]
        reason = " ".join((fields.get("reason") or [""])[0].split())[:MAX_REASON]
        if not reason:
            return self.console.render(request, "error.html", identity, status=400, error="reason_required")
        bus = self.runtime.bus
        # The bus deletes every copy by that id: every copy is read (and archived) first. A queue holding more
        # than `DISCARD_SCAN` letters may hide copies beyond: refused, for the command line.
        listed = await bus.dead_letters(queue, DISCARD_SCAN + 1)
        if len(listed) > DISCARD_SCAN:
            return self.console.render(request, "error.html", identity, status=409, error="too_many_letters")
        letters: list[Delivery] = [d for d in listed if d.message_id == message_id]
        del listed
        if not letters:
            return self._back(request, queue, "missing", 0)
        # Kept whole in the audit file first (durable), then removed from the bus: discarding loses nothing. Copies
        # that arrived while the record was written are recorded too before the delete.
        recorded: list[Delivery] = []
        for _ in range(3):
            await asyncio.to_thread(
                self.audit.record,
                identity.name,
                "dead_letter.discard",
                reason,
                queue=queue,
                message_id=message_id,
                letters=[_kept(d) for d in letters[len(recorded) :]],
            )
            recorded = letters
            letters = [d for d in await bus.dead_letters(queue, DISCARD_SCAN) if d.message_id == message_id]
            if len(letters) <= len(recorded):
                break
        else:
            return self.console.render(request, "error.html", identity, status=409, error="too_many_letters")
        letters = recorded
        gone = await bus.discard_dead_letter(queue, message_id)
        log.info("console.dead_letter_discarded", token=identity.name, queue=queue, message_id=message_id)
        if gone:
            self.console.record(
                audit.operator_action(
                    "D",
                    operator=self.console.requestor(request, identity),
                    what="dead-letter-discard",
                    objects=(audit.object_ref("bus-message", f"{queue}/{message_id}"),),
                    patients=await asyncio.to_thread(_patients_of_letters, letters),
                )
            )
        return self._back(request, queue, "discarded" if gone else "missing", len(letters) if gone else 0)


def _patients_of_letters(letters: list[Delivery]) -> tuple[audit.PatientRef, ...]:
    """The patients of dead letters holding canonical events (an order's, a document's report's), for the audit
    trail; none for a body that is not one."""
    from traboule.model import Envelope

    patients = []
    for letter in letters:
        try:
            payload = Envelope.from_json(letter.body).payload
        except Exception:  # not an event of ours: it names no patient we can read
            continue
        patient = getattr(payload, "patient", None) or getattr(getattr(payload, "report", None), "patient", None)
        if patient is not None:
            patients.append(patient)
    return audit.patients_of(*patients)


def _kept(letter: Delivery) -> dict[str, Any]:
    """A dead letter as the audit file keeps it (its body in base64)."""
    return {
        "topic": letter.topic,
        "headers": letter.headers,
        "attempt": letter.attempt,
        "body": base64.b64encode(letter.body).decode(),
    }


def _command(params: dict[str, str]) -> str:
    """The ``traboule journal reprocess`` command for the filters it knows (a selection too large for the
    console)."""
    if not params:
        return ""
    parts = ["traboule journal reprocess"]
    for key, option in (("since", "--since"), ("until", "--until"), ("type", "--type"), ("channel", "--channel")):
        if params.get(key):
            parts.append(f"{option} {params[key]}")
    if params.get("status") in reprocess.REPROCESSABLE:
        parts.append(f"--status {params['status']}")
    parts.append("--to CHANNEL --dry-run")
    return " ".join(parts)
