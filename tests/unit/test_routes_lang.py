"""The route language of deployments (protocol/routes.py): what parses, where a route that
does not is wrong, and what a condition takes."""

from __future__ import annotations

import pytest

from outpost.protocol import routes
from outpost.protocol.routes import Message, RouteError, parse

HOT = ('FROM /messages/modules/sensor/outputs/* WHERE temperature > 30 AND unit = \'C\' '
       'INTO BrokeredEndpoint("/modules/filter/inputs/hot")')


def msg(module: str = "sensor", output: str = "out", body: bytes = b"", **props: object
        ) -> Message:
    return Message(module, output, props, {"content_type": "application/json",
                                           "message_id": "m-1"}, body)


def test_a_route_names_its_source_sink_and_condition() -> None:
    route = parse(HOT)
    assert route.source == routes.Source("sensor", None)
    assert route.sink == routes.Sink("filter", "hot")
    assert not route.sink.upstream
    assert str(route.sink) == 'BrokeredEndpoint("/modules/filter/inputs/hot")'
    assert route.takes(msg(temperature=31, unit="C"))
    assert not route.takes(msg(temperature=30, unit="C"))
    assert not route.takes(msg(module="other", temperature=31, unit="C"))


@pytest.mark.parametrize(("source", "module", "output"), [
    ("/messages/*", None, None),
    ("/messages/modules/*", None, None),
    ("/messages/modules/a/*", "a", None),
    ("/messages/modules/a/outputs/*", "a", None),
    ("/messages/modules/a/outputs/o1", "a", "o1"),
])
def test_every_source_form(source: str, module: str | None, output: str | None) -> None:
    route = parse(f"FROM {source} INTO $upstream")
    assert route.source == routes.Source(module, output)
    assert route.sink.upstream


def test_keywords_are_not_case_sensitive() -> None:
    route = parse("from /messages/* where a = 1 and not b = 2 into $UPSTREAM")
    assert route.sink.upstream
    assert route.takes(msg(a=1, b=3))
    assert not route.takes(msg(a=1, b=2))


def test_undefined_and_mismatched_types_never_take_a_message() -> None:
    route = parse("FROM /messages/* WHERE temperature > 30 INTO $upstream")
    assert not route.takes(msg())  # missing
    assert not route.takes(msg(temperature="31"))  # text against a number
    assert not route.takes(msg(temperature=True))
    negated = parse("FROM /messages/* WHERE NOT (temperature > 30) INTO $upstream")
    assert not negated.takes(msg())  # NOT undefined is undefined
    assert negated.takes(msg(temperature=3))


def test_or_and_three_valued_logic() -> None:
    route = parse("FROM /messages/* WHERE a = 1 OR b = 'x' INTO $upstream")
    assert route.takes(msg(a=1))  # b undefined, a true
    assert route.takes(msg(b="x"))
    assert not route.takes(msg(a=2))
    both = parse("FROM /messages/* WHERE a = 1 AND b = 'x' INTO $upstream")
    assert not both.takes(msg(a=1))


def test_system_properties_body_and_functions() -> None:
    route = parse("FROM /messages/* WHERE $connectionModuleId = 'sensor' AND "
                  "$outputName = 'out' AND $contentType = 'application/json' AND "
                  "$body.reading.value >= 2.5 AND STARTS_WITH($messageId, 'm-') AND "
                  "LENGTH(LOWER(site)) = 3 INTO $upstream")
    assert route.takes(msg(body=b'{"reading": {"value": 3}}', site="ABC"))
    assert not route.takes(msg(body=b'{"reading": {"value": 1}}', site="ABC"))
    assert not route.takes(msg(body=b"not json", site="ABC"))
    defined = parse("FROM /messages/* WHERE IS_DEFINED(x) AND CONTAINS(x, 'b') AND "
                    "ENDS_WITH(UPPER(x), 'C') INTO $upstream")
    assert defined.takes(msg(x="abc"))
    assert not defined.takes(msg(y="abc"))


def test_a_quoted_into_stays_in_the_condition() -> None:
    route = parse("FROM /messages/* WHERE note = 'goes INTO x' INTO $upstream")
    assert route.takes(msg(note="goes INTO x"))
    assert parse("FROM /messages/* WHERE note = 'it''s' INTO $upstream").takes(
        msg(note="it's"))


@pytest.mark.parametrize(("text", "column", "words"), [
    ("SELECT * INTO $upstream", 1, "starts with FROM"),
    ("FROM /x INTO $upstream", 6, "is not a source"),
    ("FROM /messages/modules/a/inputs/b INTO $upstream", 6, "is not a source"),
    ("FROM /messages/*", 17, "ends with INTO"),
    ("FROM /messages/* INTO somewhere", 23, "is not a sink"),
    ('FROM /messages/* INTO BrokeredEndpoint("/modules/a/outputs/b")', 23, "is not a sink"),
    ("FROM /messages/* junk INTO $upstream", 18, "expected WHERE or INTO"),
    ("FROM /messages/* WHERE INTO $upstream", 23, "WHERE needs a condition"),
    ("FROM /messages/* WHERE a > INTO $upstream", 27, "expected a property or a value"),
    ("FROM /messages/* WHERE a = 1 b INTO $upstream", 30, "join conditions"),
    ("FROM /messages/* WHERE a # 1 INTO $upstream", 26, "unexpected character"),
    ("FROM /messages/* WHERE NOPE(a) INTO $upstream", 24, "unknown function"),
    ("FROM /messages/* WHERE LOWER(a, b) = 'x' INTO $upstream", 24, "takes 1 argument"),
    ("FROM /messages/* WHERE $nope = 1 INTO $upstream", 24, "unknown system property"),
    ("FROM /messages/* WHERE $body = 1 INTO $upstream", 24, "$body needs a field"),
    ("FROM /messages/* WHERE (a = 1 INTO $upstream", 30, "expected ')'"),
])
def test_a_route_that_does_not_parse_says_what_and_where(text: str, column: int,
                                                        words: str) -> None:
    with pytest.raises(RouteError) as caught:
        parse(text)
    assert caught.value.column == column, caught.value
    assert words in caught.value.problem


def test_a_route_too_long_is_refused() -> None:
    with pytest.raises(RouteError, match="at most"):
        parse("FROM /messages/* WHERE " + "a = 1 AND " * 500 + "b = 1 INTO $upstream")
