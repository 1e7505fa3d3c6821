"""Fast tier: bad input never gets a bare 500 or a traceback. Generated requests against the
hub's app in this process, on both databases.

Every answer to a malformed request is JSON with a catalog code, a message and a fix, and a
status below 500. What these requests exercise is the app (its edge, its models, its
routes), so they run here; what only the process around it does (TLS, the socket, a body
refused before it is read) stays in tests/integration/test_body_limits.py and
test_bad_input.py.
"""

from __future__ import annotations

import base64
import os
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from outpost.protocol.errors import CATALOG
from tests.inproc import FAST, InprocHub

pytestmark = FAST

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)
runbook_bodies = st.fixed_dictionaries({}, optional={
    "name": json_values | st.text(max_size=140), "content": json_values | st.text(max_size=50),
    "type": json_values, "params": json_values | st.lists(st.text(max_size=20), max_size=4),
    "log_verbose": json_values, "description": json_values,
})
# "." and ".." are dot-segments: every client removes them from a path before sending
# (RFC 3986, 5.2.4), so they can never reach the hub as a name.
segments = st.text(min_size=1, max_size=80).filter(lambda s: s not in (".", ".."))

# Derandomized: CI sees the same examples on every run; widen max_examples when hunting.
# The hub fixture is shared by a test's examples, as a real hub would be.
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _assert_clean(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert body["code"] in CATALOG, body
    assert body["message"] and body["fix"], body


@FUZZ
@given(body=json_values | runbook_bodies)
async def test_generated_runbook_bodies(fast_hub_any: InprocHub, body: Any) -> None:
    response = await fast_hub_any.api("POST", "/v1/runbooks", json=body)
    if response.status_code in (200, 201):  # a generated body that happens to be valid
        return
    _assert_clean(response)


@FUZZ
@given(body=json_values, name=segments)
async def test_generated_account_bodies_and_paths(fast_hub_any: InprocHub, body: Any,
                                                  name: str) -> None:
    hub = fast_hub_any
    created = await hub.api("POST", "/v1/accounts", json=body)
    if created.status_code != 201:
        _assert_clean(created)
    for method, path in (("GET", f"/v1/machines/{quote(name, safe='')}"),
                         ("GET", f"/v1/runbooks/{quote(name, safe='')}"),
                         ("GET", f"/v1/accounts/{quote(name, safe='')}/keys"),
                         ("POST", f"/v1/accounts/{hub.init.account_id}/keys/"
                                  f"{quote(name, safe='')}/regenerate")):
        _assert_clean(await hub.api(method, path))


@FUZZ
@given(query=st.dictionaries(st.sampled_from(["version", "timeout", "wait"]),
                             st.text(max_size=12), max_size=2),
       name=segments)
async def test_generated_queries(fast_hub_any: InprocHub, query: dict[str, str],
                                 name: str) -> None:
    for method, path in (("GET", "/v1/runbooks/x"),
                         ("POST", f"/v1/machines/{quote(name, safe='')}/ping")):
        _assert_clean(await fast_hub_any.api(method, path, params=query))


@FUZZ
@given(body=st.binary(max_size=200),
       headers=st.dictionaries(
           st.sampled_from(["X-Outpost-Machine", "X-Outpost-Date", "X-Outpost-Nonce",
                            "X-Outpost-Signature", "X-Outpost-Account",
                            "X-Outpost-Agent-Version"]),
           # What a client can send at all: no surrounding white space in a header value.
           st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                   max_size=60).map(str.strip),
           max_size=6))
async def test_generated_agent_requests(fast_hub_any: InprocHub, body: bytes,
                                        headers: dict[str, str]) -> None:
    for path in ("/v1/agent/register", "/v1/agent/heartbeat", "/v1/agent/poll?wait=0"):
        # No bearer token: an agent's request carries only what the test generated.
        response = await fast_hub_any.http.post(path, content=body, headers=headers)
        assert response.status_code in (401, 403, 422, 426), response.text
        _assert_clean(response)


# --- assets ---------------------------------------------------------------------------------
asset_segments = st.text(min_size=1, max_size=60).filter(lambda s: s not in (".", ".."))
asset_bodies = st.fixed_dictionaries({}, optional={
    "value": st.none() | st.integers() | st.text(max_size=30),
    "secret": st.none() | st.text(max_size=5) | st.booleans(),
    "username": st.none() | st.text(max_size=10), "description": st.text(max_size=20),
    "data": st.text(max_size=40) | st.binary(max_size=60).map(
        lambda b: base64.b64encode(b).decode()),
    "password": st.none() | st.text(max_size=10)})


@settings(FUZZ, max_examples=30)
@given(kind=st.sampled_from(["variables", "credentials", "certificates"]) | asset_segments,
       name=asset_segments, body=asset_bodies)
# A name ending in '/' was answered with a bare 307 to the path without it (found by this
# test once): it must get the hub's 404 with a catalog code like any unknown path.
@example(kind="variables", name="0/", body={"value": "x"})
async def test_generated_asset_requests_get_clean_errors(fast_hub_any: InprocHub, kind: str,
                                                         name: str,
                                                         body: dict[str, Any]) -> None:
    path = f"/v1/assets/{quote(kind, safe='')}/{quote(name, safe='')}"
    for method, url, payload in (("PUT", path, body), ("GET", path, None),
                                 ("DELETE", path, None),
                                 ("GET", "/v1/job/" + path[4:], None)):
        response = await fast_hub_any.api(method, url, json=payload)
        if response.status_code < 300:
            continue
        assert response.status_code < 500, (method, url, response.text)
        assert response.json()["code"] in CATALOG and response.json()["fix"]


# --- schedules and webhooks -----------------------------------------------------------------
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)
_crons = st.lists(st.text("0123456789*/,-?LW#HRa@ MONJAN", max_size=6), min_size=1,
                  max_size=7).map(" ".join)
_schedule_bodies = st.fixed_dictionaries({"name": st.just("s"), "runbook": st.just("p"),
                                          "group": st.just("web")}, optional={
    "cron": _crons | _values, "timezone": _values | st.sampled_from(["UTC", "Europe/Berlin"]),
    "spread": _values | st.sampled_from(["10m", "1h30m", "7d"]), "params": _values,
    "expires": _values | st.sampled_from(["2001-01-01", "3000-01-01T00:00:00+01:00"])})


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")))
# A newline never matches a route, so such a path gets the hub's general 404 (E3002).
@given(body=_schedule_bodies, secret=st.text(min_size=1, max_size=60).filter(
    lambda s: s not in (".", "..") and "\n" not in s))
async def test_generated_schedule_and_webhook_requests(fast_hub_any: InprocHub,
                                                       body: dict[str, Any],
                                                       secret: str) -> None:
    hub = fast_hub_any
    published = await hub.api("POST", "/v1/runbooks", json={
        "name": "p", "content": "#!/bin/sh\ntrue\n", "params": ["body:string=", "n:int=1"]})
    # The first example stores version 1; the same content again stores nothing (200).
    assert published.status_code in (200, 201), published.text
    for path in ("/v1/schedules", "/v1/webhooks"):
        response = await hub.api("POST", path, json=body)
        if response.status_code == 201:  # generated and valid: remove it again
            assert (await hub.api("DELETE", f"{path}/s")).status_code == 200
            continue
        assert response.status_code < 500, (path, body, response.text)
        assert response.json()["code"] in CATALOG, response.text
    # A webhook's caller has no token.
    hook = await hub.http.post(f"/v1/hooks/{quote(secret, safe='')}", content=b"{}")
    if "\x00" in secret:  # refused at the edge, as NUL in any path
        assert hook.status_code == 422 and hook.json()["code"] == "E3003", hook.text
        return
    assert hook.status_code == 404 and hook.json()["code"] == "E6006", hook.text
