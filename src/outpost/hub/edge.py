"""The hub's edge: what every request passes before a route sees it.

One plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which hides a client's
hang-up from a long-poll) does, in order:

1. **Text in the path and query.** A NUL character is refused (422, naming ``path`` or the
   query parameter) on both databases: PostgreSQL cannot store it and SQLite would.
2. **The body's size, before it is read.** Each route has a limit (``body_limits`` in
   ``hub.yaml``): a declared ``Content-Length`` over it is refused at once with 413, and a
   chunked body is counted as it arrives and refused once it passes the limit. Nothing is
   kept beyond the limit. The server throws away what still comes of the body after the
   answer, so a client that sends its whole body before it reads (most do) still reads the
   refusal; a body declared larger than DRAIN_MAX is not worth that, and the connection is
   closed instead.
3. **Who is calling, before the body is read.** The signature needs the body, but the
   caller's headers and that their principal exists do not: an unknown operator token,
   machine, account or webhook address is refused before a byte of the body is read. When
   that look-up itself fails (the database is down) the route decides, as it would anyway,
   so such an answer comes from the one error-handler table. The backup store's protocol
   (``/v1/backup/``) checks its token itself, also before it reads a byte of the body, and
   streams the body: the edge hands those requests on after step 1 and the declared size.
4. **JSON text the hub will not store.** A body is scanned for the escapes that need a
   closer look (``\\u0000``, a lone UTF-16 surrogate such as ``\\ud800``, the non-JSON
   constants ``NaN`` and ``Infinity``); only a body that has one is parsed, and the first
   such value is refused with 422 naming its field. Output records' text is the exception:
   a runbook may print NUL, and refusing the report would lose the job's output, so the
   record keeps U+FFFD in its place (``protocol.models.OutputRecord``).

Checking here covers every route, present and future; a body without any of those escapes
(nearly all) costs one regular-expression scan.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outpost.protocol.errors import OutpostError
from outpost.protocol.extensions import PACKAGE_MAX_BYTES

from .config import BodyLimits
from .webhooks import MAX_BODY as WEBHOOK_BODY_MAX
from .webhooks import PATH as WEBHOOK_PATH

# Who a route's caller must be, checked before its body is read: an operator token, a
# registered machine, an existing account (registration), a live webhook, or anyone.
Check = Callable[[Scope, Headers], Awaitable[None]]
Render = Callable[[OutpostError], Response]


@dataclass(frozen=True)
class Rule:
    kind: str  # what the limit is called in hub.yaml and in the refusal
    limit: int
    caller: str  # "operator", "machine", "account", "webhook" or "" (anyone)
    # The route reads its body as it streams in (the backup store's files, any size up to
    # the machine's quota): nothing is buffered or scanned here.
    stream: bool = False


# Up to this size a refused body is left for the server to read and throw away after the
# answer (uvicorn discards a finished request's body), so the client can read the answer;
# a larger one closes the connection, and the client may see a reset instead.
DRAIN_MAX = 64 * 1024 * 1024

# restic's files through the backup store (hub/routes/restic.py): bounded by each
# machine's quota, not here.
BACKUP_PATH = "/v1/backup/"
BACKUP_BODY_MAX = 1 << 62

_REPORTS = re.compile(r"^/v1/agent/(?:reports|jobs/[^/]+/report)$")


def rule_for(path: str, limits: BodyLimits) -> Rule:
    """The body limit and the caller check of the route at ``path``."""
    if path == "/v1/agent/register":
        return Rule("registration", limits.registration, "account")
    if _REPORTS.match(path):
        return Rule("reports", limits.reports, "machine")
    if path == "/v1/agent/messages":
        return Rule("messages", limits.messages, "machine")
    if path.startswith("/v1/agent/"):
        return Rule("agent", limits.agent, "machine")
    if path.startswith(WEBHOOK_PATH):
        return Rule("webhook", WEBHOOK_BODY_MAX, "webhook")
    if path == "/v1/extensions":  # a package, read whole (protocol.extensions)
        return Rule("extension package", PACKAGE_MAX_BYTES, "operator")
    if path == "/v1/modules":  # a module package: the same format and limit
        return Rule("module package", PACKAGE_MAX_BYTES, "operator")
    if path.startswith(BACKUP_PATH):
        return Rule("backup", BACKUP_BODY_MAX, "backup", stream=True)
    if path.startswith("/v1/job/"):  # a running job's token; these routes take no body
        return Rule("registration", limits.registration, "")
    if path.startswith("/v1/"):
        return Rule("operator", limits.operator, "operator")
    return Rule("registration", limits.registration, "")  # /healthz, /metrics, /v1/ca, docs


def too_large(rule: Rule, size: int | None) -> OutpostError:
    details: dict[str, Any] = {"limit": rule.limit}
    if size is not None:
        details["size"] = size
    if rule.kind == "webhook":
        return OutpostError("webhook_body_too_large", **details)
    told = f"{size} bytes" if size is not None else "more than the limit"
    return OutpostError(
        "body_too_large", f"The request body is larger than the hub accepts for this route: "
        f"{told}, at most {rule.limit} bytes ({rule.kind} requests).",
        route_kind=rule.kind, **details)


# What needs a closer look: NUL and half of a UTF-16 pair (escaped, as JSON must), the
# constants Python's json reads but JSON does not allow, and numbers too large for a float
# (1e999 reads as Infinity): a NaN stored in a JSON column fails PostgreSQL, and no answer
# quoting it is JSON. Literal searches first: a regular expression scans a few MB a
# second slower than ``in``, and a report may be megabytes.
_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_BIG_NUMBER = re.compile(rb"[:\[,]\s*-?\d+(?:\.\d+)?[eE]\+?\d{3}")


def _suspect(body: bytes, reports: bool) -> bool:
    if b"\\u" in body and _ESCAPE.search(body):
        return True
    if b"NaN" in body or b"Infinity" in body:
        return True
    # A report's numbers are all typed fields, each refused there when not finite.
    return not reports and (b"e" in body or b"E" in body) and bool(_BIG_NUMBER.search(body))


class _Constant:
    def __init__(self, text: str) -> None:
        self.text = text


def _number(text: str) -> float | _Constant:
    number = float(text)
    return number if math.isfinite(number) else _Constant(text)  # 1e999 reads as inf


def _printable(key: str) -> str:
    return key.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode()


def _problem(value: Any, path: str, allow_nul: Callable[[str], bool]
             ) -> tuple[str, str] | None:
    """The first (field, what is wrong) in a parsed JSON value, depth first."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, "surrogate"
        if "\x00" in value and not allow_nul(path):
            return path, "nul"
        return None
    if isinstance(value, _Constant):
        return path, value.text
    if isinstance(value, dict):
        for key, item in value.items():
            found = _problem(key, f"{path}.{_printable(key)}", allow_nul)
            if found is None:
                found = _problem(item, f"{path}.{_printable(key)}", allow_nul)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _problem(item, f"{path}.{index}", allow_nul)
            if found is not None:
                return found
    return None


_RECORD_TEXT = re.compile(r"^body(?:\.reports\.\d+)?\.records\.\d+\.text$")


def text_problem(body: bytes, path: str) -> OutpostError | None:
    """A refusal for JSON text the hub will not take, or None (also for a body that is not
    JSON: the route says what is wrong with it)."""
    reports = bool(_REPORTS.match(path))
    if not _suspect(body, reports):
        return None
    try:
        parsed = json.loads(body, parse_constant=_Constant, parse_float=_number)
    except ValueError:
        return None
    found = _problem(parsed, "body", lambda at: reports and bool(_RECORD_TEXT.match(at)))
    if found is None:
        return None
    field, what = found
    if what == "surrogate":
        return OutpostError(
            "invalid_request", f"{field}: a text value contains a lone UTF-16 surrogate (such "
            "as \\ud800), which is not a valid Unicode character.",
            fix="Send valid Unicode text: encode files as UTF-8, and escape a character "
                "outside the basic plane as a surrogate pair.", field=field)
    if what == "nul":
        return nul_refused(field)
    return OutpostError(
        "invalid_request", f"{field}: {what} is not a number JSON allows.",
        fix=f"Send a finite number in {field} (or null where the field allows it).",
        field=field)


def nul_refused(field: str) -> OutpostError:
    return OutpostError(
        "invalid_request", f"{field}: the text contains the NUL character (\\u0000), which "
        "the hub does not store.",
        fix=f"Remove the NUL character from {field} and send the request again.",
        field=field)


def _address_problem(scope: Scope) -> OutpostError | None:
    if "\x00" in scope.get("path", ""):
        return nul_refused("path")
    query: bytes = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return nul_refused(f"query.{name.replace(chr(0), '?')}")
    return None


class Edge:
    """The checks above, as a plain ASGI middleware."""

    def __init__(self, app: ASGIApp, limits: Callable[[], BodyLimits],
                 checks: dict[str, Check], render: Render,
                 lean: dict[tuple[str, str], ASGIApp] | None = None) -> None:
        self.app = app
        self.limits = limits
        self.checks = checks
        self.render = render
        # (method, path) -> the handler that serves it once its body passed these checks,
        # in place of the app (routes/lean.py: the agents' most frequent requests); ("*",
        # BACKUP_PATH) -> the one that serves every path under it, whose bodies it streams.
        self.lean = lean or {}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, err: OutpostError,
                      declared: int | None = None) -> None:
        response = self.render(err)
        if declared is not None and declared > DRAIN_MAX:
            response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = _address_problem(scope)
        headers = Headers(scope=scope)
        declared_text = headers.get("content-length", "")
        declared = int(declared_text) if declared_text.isdigit() else None
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        has_body = bool(declared) or chunked
        if refused is not None:
            await self._refuse(scope, receive, send, refused, declared)
            return
        rule = rule_for(scope["path"], self.limits())
        if declared is not None and declared > rule.limit:
            await self._refuse(scope, receive, send, too_large(rule, declared), declared)
            return
        if rule.stream:
            # The backup store's protocol checks its caller before it reads a body, and
            # streams it (routes/restic.py): nothing to check or buffer here.
            await self.lean.get(("*", BACKUP_PATH), self.app)(scope, receive, send)
            return
        app = self.lean.get((scope["method"], scope["path"]), self.app)
        if not has_body:
            await app(scope, receive, send)
            return
        check = self.checks.get(rule.caller)
        if check is not None:
            try:
                await check(scope, headers)
            except OutpostError as exc:
                if exc.entry.http_status in (401, 403, 404):
                    await self._refuse(scope, receive, send, exc)
                    return
                # Anything else (the database unreachable): the route checks again, reads
                # at most the limit, and its error handlers answer as they do everywhere.
            except Exception:  # noqa: BLE001 - as above
                pass
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)  # the route takes none
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, receive, send)  # the client left: let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > rule.limit:
                await self._refuse(scope, receive, send, too_large(rule, None))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        refused = text_problem(body, scope["path"])
        if refused is not None:
            await self._refuse(scope, receive, send, refused)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

