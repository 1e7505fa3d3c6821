"""What the agent's pydantic-free readers are held to: the fields and defaults of the hub's
models (tests/unit/test_modreaders.py, tests/unit/test_extreaders.py)."""

from __future__ import annotations

import dataclasses
from typing import Any


def plain(value: Any) -> Any:
    """A default as JSON: a nested model's and a nested dataclass's compare by fields."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def model_defaults(model: Any) -> dict[str, Any]:
    return {name: plain(info.default_factory() if info.default_factory  # type: ignore[call-arg]
                        else "required" if info.is_required() else info.default)
            for name, info in model.model_fields.items()}


def dataclass_defaults(cls: Any) -> dict[str, Any]:
    return {f.name: plain(f.default_factory() if f.default_factory is not dataclasses.MISSING
                          else "required" if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}
