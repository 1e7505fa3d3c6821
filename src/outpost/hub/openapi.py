"""What ``/openapi.json`` says of callers and answers: the security schemes, and the
``responses`` of routes (their answer's model, and the error body for 4xx/5xx).

Four kinds of caller, each a scheme in ``components.securitySchemes``:

- ``operatorToken`` (HTTP bearer): an API token (``opt_...``), on ``/v1`` operator routes;
- ``jobToken`` (HTTP bearer): a running job's token (``ojt_...``), on ``/v1/job/*``;
- ``machineSignature`` (header ``X-Outpost-Signature``): an agent's request, signed with its
  machine key, on ``/v1/agent/*`` (with ``X-Outpost-Machine``, ``-Date`` and ``-Nonce``);
- ``accountSignature`` (header ``X-Outpost-Signature``): a registration, signed with the
  account key (with ``X-Outpost-Account``, ``-Date`` and ``-Nonce``).

Public routes (``/healthz``, ``/metrics``, ``/v1/ca``, ``/v1/hooks/...``) declare none. The
schemes only describe: the checks are ``auth.py``'s, which read the headers themselves, so
their error codes (E3001, E1008...) stay what they are.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from outpost.protocol.signing import H_SIGNATURE

_SIGNED = ("The request signed as docs/architecture.md says (method, path with query, "
           "timestamp, nonce, SHA-256 of the body), with headers X-Outpost-Date and "
           "X-Outpost-Nonce")
OPERATOR = HTTPBearer(scheme_name="operatorToken", auto_error=False, bearerFormat="opt_...",
                      description="An API token: 'Authorization: Bearer opt_...' ('outpost "
                                  "hub init' prints the admin's; accounts get their own).")
JOB = HTTPBearer(scheme_name="jobToken", auto_error=False, bearerFormat="ojt_...",
                 description="A running job's token (OUTPOST_JOB_TOKEN in its environment).")
MACHINE = APIKeyHeader(name=H_SIGNATURE, scheme_name="machineSignature", auto_error=False,
                       description=f"{_SIGNED}, and X-Outpost-Machine: an Ed25519 signature "
                                   "under the machine's key.")
ACCOUNT = APIKeyHeader(name=H_SIGNATURE, scheme_name="accountSignature", auto_error=False,
                       description=f"{_SIGNED}, and X-Outpost-Account: an HMAC-SHA256 under "
                                   "the account key (registration only).")

# For a dependency: declares the scheme; the value is not used (auth.py reads the header).
OperatorScheme = Annotated[HTTPAuthorizationCredentials | None, Security(OPERATOR)]
JobScheme = Annotated[HTTPAuthorizationCredentials | None, Security(JOB)]
MACHINE_SIGNED = Security(MACHINE)
ACCOUNT_SIGNED = Security(ACCOUNT)


def ok(model: Any, status: int = 200, description: str = "") -> dict[int | str, Any]:
    """A route's answer, for ``responses=`` (with ``response_model=None``: the route's dict
    is sent as it is, and this model documents it)."""
    return {status: {"model": model, "description": description or "The answer."}}


def json_errors(app: FastAPI) -> None:
    """Error answers are JSON on every route, plain-text ones (``/metrics``, ``/v1/ca``)
    included: FastAPI would declare them in the route's media type."""
    build = app.openapi

    def schema() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        built = build()
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        for operations in built.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    if status[0] in "45":
                        response["content"] = error
        return built

    app.openapi = schema  # type: ignore[method-assign]
