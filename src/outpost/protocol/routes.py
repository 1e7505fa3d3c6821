"""The message routes of a deployment: their language, parsed once and evaluated per message.

A route says which module outputs go where, in the form operators of edge runtimes know::

    FROM /messages/modules/sensor/outputs/* WHERE temperature > 30 AND unit = 'C'
        INTO BrokeredEndpoint("/modules/filter/inputs/hot")
    FROM /messages/* INTO $upstream

Sources: ``/messages/*`` and ``/messages/modules/*`` (every module's every output),
``/messages/modules/M/*`` and ``/messages/modules/M/outputs/*`` (every output of module M),
``/messages/modules/M/outputs/O`` (one output). Sinks: ``$upstream`` (the hub, through the
agent's store-and-forward) and ``BrokeredEndpoint("/modules/M/inputs/I")`` (input I of
module M). Keywords are not case-sensitive; names are.

A condition is over the message's properties (application properties by name, system
properties with a ``$``: ``$connectionModuleId`` (the sending module), ``$outputName``,
``$contentType``, ``$messageId``, ``$correlationId``), and over a JSON body with
``$body.a.b``. It has comparisons (``= != <> < <= > >=``), ``AND``, ``OR``, ``NOT``,
parentheses, literals ('text' with '' for a quote, numbers, ``true``, ``false``, ``null``)
and the functions ``IS_DEFINED(x)``, ``STARTS_WITH(x, 'p')``, ``ENDS_WITH``, ``CONTAINS``,
``LOWER``, ``UPPER`` and ``LENGTH``. A property that is missing, or a comparison between a
text and a number, is *undefined*, and a route whose condition is not true does not take the
message: ``temperature > 30`` never takes a message without a numeric ``temperature``.

``parse(text)`` gives a ``Route`` or raises ``RouteError`` with the 1-based column of the
problem; the hub refuses a deployment with such a route before any machine sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

UPSTREAM = "$upstream"
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_RE = re.compile(rf"^{NAME}$")
SYSTEM_PROPERTIES = ("$connectionModuleId", "$outputName", "$contentType", "$messageId",
                     "$correlationId")
FUNCTIONS = {"IS_DEFINED": 1, "STARTS_WITH": 2, "ENDS_WITH": 2, "CONTAINS": 2, "LOWER": 1,
             "UPPER": 1, "LENGTH": 1}
MAX_ROUTE_CHARS = 4096


class RouteError(ValueError):
    """A route that does not parse: what is wrong and where (1-based column)."""

    def __init__(self, problem: str, column: int) -> None:
        super().__init__(f"column {column}: {problem}")
        self.problem = problem
        self.column = column


class Undefined:
    """The value of a missing property, or of an operation on mismatched types."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "undefined"


UNDEFINED = Undefined()


@dataclass(frozen=True)
class Message:
    """What a condition sees of a message."""

    module: str
    output: str
    properties: Mapping[str, Any]
    system: Mapping[str, Any]  # content_type, message_id, correlation_id
    body: bytes = b""

    def value(self, path: tuple[str, ...]) -> Any:
        head = path[0]
        if head == "$connectionModuleId":
            return self.module
        if head == "$outputName":
            return self.output
        if head.startswith("$") and head != "$body":
            key = {"$contentType": "content_type", "$messageId": "message_id",
                   "$correlationId": "correlation_id"}[head]
            value = self.system.get(key)
            return UNDEFINED if value is None else value
        if head == "$body":
            try:
                current: Any = json.loads(self.body)
            except (ValueError, UnicodeDecodeError):
                return UNDEFINED
            rest = path[1:]
        else:
            current = self.properties
            rest = path
        for key in rest:
            if not isinstance(current, dict) or key not in current:
                return UNDEFINED
            current = current[key]
        if isinstance(current, (dict, list)):
            return UNDEFINED
        return current


Evaluate = Callable[[Message], Any]


@dataclass(frozen=True)
class Source:
    module: str | None  # None: every module
    output: str | None  # None: every output

    def takes(self, module: str, output: str) -> bool:
        return ((self.module is None or self.module == module)
                and (self.output is None or self.output == output))


@dataclass(frozen=True)
class Sink:
    module: str | None  # None: $upstream
    input: str | None

    @property
    def upstream(self) -> bool:
        return self.module is None

    def __str__(self) -> str:
        if self.module is None:
            return UPSTREAM
        return f'BrokeredEndpoint("/modules/{self.module}/inputs/{self.input}")'


@dataclass(frozen=True)
class Route:
    text: str
    source: Source
    sink: Sink
    condition: Evaluate | None

    def takes(self, message: Message) -> bool:
        if not self.source.takes(message.module, message.output):
            return False
        if self.condition is None:
            return True
        try:
            return self.condition(message) is True
        except (TypeError, ValueError, ArithmeticError):
            return False


# --- the tokenizer ------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<op><>|!=|<=|>=|=|<|>)
  | (?P<punct>[(),])
  | (?P<name>\$?[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*)
""", re.VERBOSE)


@dataclass
class _Tok:
    kind: str
    text: str
    column: int


def _tokens(text: str, offset: int) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise RouteError(f"unexpected character {text[pos]!r} in the condition",
                             offset + pos + 1)
        kind = match.lastgroup or ""
        if kind != "space":
            out.append(_Tok(kind, match.group(), offset + pos + 1))
        pos = match.end()
    out.append(_Tok("end", "", offset + len(text) + 1))
    return out


# --- comparisons: undefined unless both sides are of one kind ------------------------------
def _kind(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    return None


def _compare(op: str, left: Any, right: Any) -> Any:
    kind = _kind(left)
    if kind is None or kind != _kind(right):
        return UNDEFINED
    if op in ("=",):
        return left == right
    if op in ("!=", "<>"):
        return left != right
    if kind in ("null", "bool"):
        return UNDEFINED
    return {"<": left < right, "<=": left <= right, ">": left > right,
            ">=": left >= right}[op]


def _truth(value: Any) -> bool | Undefined:
    return value if isinstance(value, bool) else UNDEFINED


def _and(left: Evaluate, right: Evaluate) -> Evaluate:
    def run(message: Message) -> Any:
        a = _truth(left(message))
        if a is False:
            return False
        b = _truth(right(message))
        if b is False:
            return False
        return True if a is True and b is True else UNDEFINED
    return run


def _or(left: Evaluate, right: Evaluate) -> Evaluate:
    def run(message: Message) -> Any:
        a = _truth(left(message))
        if a is True:
            return True
        b = _truth(right(message))
        if b is True:
            return True
        return False if a is False and b is False else UNDEFINED
    return run


def _not(inner: Evaluate) -> Evaluate:
    def run(message: Message) -> Any:
        value = _truth(inner(message))
        return UNDEFINED if value is UNDEFINED else not value
    return run


def _text_function(name: str, args: list[Evaluate]) -> Evaluate:
    def run(message: Message) -> Any:
        values = [a(message) for a in args]
        if name == "IS_DEFINED":
            return values[0] is not UNDEFINED
        if not all(isinstance(v, str) for v in values):
            return UNDEFINED
        if name == "STARTS_WITH":
            return values[0].startswith(values[1])
        if name == "ENDS_WITH":
            return values[0].endswith(values[1])
        if name == "CONTAINS":
            return values[1] in values[0]
        if name == "LOWER":
            return values[0].lower()
        if name == "UPPER":
            return values[0].upper()
        return len(values[0])  # LENGTH
    return run


class _Parser:
    def __init__(self, tokens: list[_Tok]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> _Tok:
        return self.tokens[self.at]

    def take(self) -> _Tok:
        tok = self.tokens[self.at]
        self.at += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok.kind == "name" and tok.text.upper() == word:
            self.at += 1
            return True
        return False

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            found = f"'{tok.text}'" if tok.text else "the end"
            raise RouteError(f"expected '{text}', found {found}", tok.column)

    def condition(self) -> Evaluate:
        result = self.disjunction()
        tok = self.peek()
        if tok.kind != "end":
            raise RouteError(f"unexpected '{tok.text}' in the condition: join conditions "
                             "with AND or OR", tok.column)
        return result

    def disjunction(self) -> Evaluate:
        left = self.conjunction()
        while self.keyword("OR"):
            left = _or(left, self.conjunction())
        return left

    def conjunction(self) -> Evaluate:
        left = self.negation()
        while self.keyword("AND"):
            left = _and(left, self.negation())
        return left

    def negation(self) -> Evaluate:
        if self.keyword("NOT"):
            return _not(self.negation())
        return self.comparison()

    def comparison(self) -> Evaluate:
        left = self.operand()
        tok = self.peek()
        if tok.kind != "op":
            return left
        self.take()
        right = self.operand()
        op = tok.text
        return lambda m: _compare(op, left(m), right(m))

    def operand(self) -> Evaluate:
        tok = self.take()
        if tok.kind == "punct" and tok.text == "(":
            inner = self.disjunction()
            self.expect(")")
            return inner
        if tok.kind == "string":
            text = tok.text[1:-1].replace("''", "'")
            return lambda m: text
        if tok.kind == "number":
            number = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
            return lambda m: number
        if tok.kind == "name":
            word = tok.text.upper()
            if word in ("TRUE", "FALSE"):
                flag = word == "TRUE"
                return lambda m: flag
            if word == "NULL":
                return lambda m: None
            if word in ("AND", "OR", "NOT"):
                raise RouteError(f"expected a property or a value, found '{tok.text}'",
                                 tok.column)
            if self.peek().text == "(":
                return self.function(tok)
            path = tuple(tok.text.split("."))
            if path[0].startswith("$"):
                if path[0] != "$body" and path[0] not in SYSTEM_PROPERTIES:
                    raise RouteError(
                        f"unknown system property '{path[0]}': use one of "
                        f"{', '.join(SYSTEM_PROPERTIES)} or $body.FIELD", tok.column)
                if path[0] == "$body" and len(path) == 1:
                    raise RouteError("$body needs a field: $body.FIELD", tok.column)
                if path[0] != "$body" and len(path) > 1:
                    raise RouteError(f"'{path[0]}' has no fields", tok.column)
            return lambda m: m.value(path)
        found = f"'{tok.text}'" if tok.text else "the end"
        raise RouteError(f"expected a property or a value, found {found}", tok.column)

    def function(self, name_tok: _Tok) -> Evaluate:
        name = name_tok.text.upper()
        if name not in FUNCTIONS:
            raise RouteError(f"unknown function '{name_tok.text}': use one of "
                             f"{', '.join(FUNCTIONS)}", name_tok.column)
        self.expect("(")
        args = [self.disjunction()]
        while self.peek().text == ",":
            self.take()
            args.append(self.disjunction())
        self.expect(")")
        if len(args) != FUNCTIONS[name]:
            raise RouteError(f"{name} takes {FUNCTIONS[name]} argument(s), not {len(args)}",
                             name_tok.column)
        return _text_function(name, args)


# --- the route's frame: FROM source [WHERE condition] INTO sink ---------------------------
_FRAME = re.compile(r"^\s*FROM\s+(?P<source>\S+)(?:\s+(?P<where>WHERE)(?=\s))?", re.I)
_INTO = re.compile(r"\s+INTO\s+(?P<sink>.+?)\s*$", re.I | re.S)
_SOURCE = re.compile(
    rf"^/messages(?:/\*|/modules/\*|/modules/(?P<module>{NAME})"
    rf"(?:/\*|/outputs/\*|/outputs/(?P<output>{NAME})))$")
_SINK = re.compile(rf'^BrokeredEndpoint\(\s*"/modules/(?P<module>{NAME})/inputs/'
                   rf'(?P<input>{NAME})"\s*\)$', re.I)


def parse(text: str) -> Route:
    """The route in ``text``, or RouteError naming what is wrong and its column."""
    if len(text) > MAX_ROUTE_CHARS:
        raise RouteError(f"a route is at most {MAX_ROUTE_CHARS} characters", 1)
    frame = _FRAME.match(text)
    if frame is None:
        first = len(text) - len(text.lstrip()) + 1
        raise RouteError("a route starts with FROM /messages/...", first)
    # The last INTO is the route's (a quoted text in the condition may hold the word).
    into = _last_into(text, frame.end("source"))
    if into is None:
        raise RouteError("a route ends with INTO $upstream or INTO "
                         'BrokeredEndpoint("/modules/NAME/inputs/NAME")', len(text) + 1)
    source_text = frame.group("source")
    source_match = _SOURCE.match(source_text)
    if source_match is None:
        raise RouteError(
            f"'{source_text}' is not a source: use /messages/*, /messages/modules/NAME/* or "
            "/messages/modules/NAME/outputs/NAME (or /outputs/*)", frame.start("source") + 1)
    source = Source(source_match.group("module"), source_match.group("output"))
    condition: Evaluate | None = None
    if frame.group("where"):
        start = frame.end("where")
        body = text[start:into.start()]
        if not body.strip():
            raise RouteError("WHERE needs a condition", start + 1)
        condition = _Parser(_tokens(body, start)).condition()
    elif text[frame.end("source"):into.start()].strip():
        junk = frame.end("source") + len(text[frame.end("source"):into.start()]) \
            - len(text[frame.end("source"):into.start()].lstrip()) + 1
        raise RouteError("expected WHERE or INTO after the source", junk)
    sink_text = into.group("sink")
    if sink_text.lower() == UPSTREAM.lower():
        sink = Sink(None, None)
    else:
        sink_match = _SINK.match(sink_text)
        if sink_match is None:
            raise RouteError(f"'{sink_text}' is not a sink: use $upstream or "
                             'BrokeredEndpoint("/modules/NAME/inputs/NAME")',
                             into.start("sink") + 1)
        sink = Sink(sink_match.group("module"), sink_match.group("input"))
    return Route(text=text.strip(), source=source, sink=sink, condition=condition)


def _last_into(text: str, start: int) -> re.Match[str] | None:
    """The INTO that is not inside a quoted text."""
    quoted = False
    found: re.Match[str] | None = None
    pos = start
    while pos < len(text):
        char = text[pos]
        if char == "'":
            quoted = not quoted
        elif not quoted and char.isspace():
            match = _INTO.match(text, pos)
            if match is not None:
                found = match
        pos += 1
    return found


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


class RouteProblem(ValueError):
    """A deployment's route that does not compile: its name and the column in it."""

    def __init__(self, name: str, problem: str, column: int) -> None:
        super().__init__(problem)
        self.name = name
        self.column = column


def compile_all(routes: Mapping[str, str], modules: Container[str]) -> dict[str, Route]:
    """Every route (name to text) parsed, and checked against the deployment's module
    names: RouteProblem otherwise. The hub's manifest model and the agent's dataclass
    both compile through here (the agent without pydantic)."""
    compiled: dict[str, Route] = {}
    for name, text in routes.items():
        try:
            route = parse(text)
        except RouteError as exc:
            raise RouteProblem(name, exc.problem, exc.column) from None
        for module, column in ((route.source.module, text.find("/messages") + 1),
                               (route.sink.module, text.rfind("/modules/") + 1)):
            if module is not None and module not in modules:
                raise RouteProblem(name, f"no module '{module}' in this deployment", column)
        compiled[name] = route
    return compiled
