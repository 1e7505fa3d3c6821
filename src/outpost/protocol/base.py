"""The wire models' base class and the error body, apart from models.py.

models.py builds every model of the hub's API (about 7 MB of pydantic's validators); the
extension models (extensions.py) and the work models (work.py) need only these two. The
agent builds none of them: it reads and writes its wire with readers.py, modreaders.py and
extreaders.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ErrorBody(Wire):
    """Every error answer of the hub (4xx and 5xx), whatever the route."""

    code: str = Field(description="The stable code, E1001 to E9999 (docs/errors.md).")
    reason: str = Field(description="The code's name, such as clock_skew.")
    message: str
    fix: str
    details: dict[str, Any] = Field(description="Facts of this error (names, limits, ids).")
