"""Durations: one parser for every option and API field that takes one, one error code.

``--timeout``, ``--spread``, ``--since``, ``machine ping --timeout``, the API's ``timeout``
and ``spread`` fields and the agent config's ``job_log_retention`` all read a duration here,
so they accept the same forms and refuse the same way (E7051, ``duration_invalid``):

    90  90s  1.5s  250ms  5m  10min  2h  1d  1w  1h30m  "1h 30m"

A bare number is seconds. Units: ms, s (sec, secs, second, seconds), m (min, mins, minute,
minutes), h (hr, hrs, hour, hours), d (day, days), w (week, weeks).
"""

from __future__ import annotations

import math
import re

from .errors import OutpostError

_UNITS: dict[str, float] = {"ms": 0.001}
for _names, _size in ((("s", "sec", "secs", "second", "seconds"), 1.0),
                      (("m", "min", "mins", "minute", "minutes"), 60.0),
                      (("h", "hr", "hrs", "hour", "hours"), 3600.0),
                      (("d", "day", "days"), 86400.0),
                      (("w", "week", "weeks"), 7 * 86400.0)):
    _UNITS.update(dict.fromkeys(_names, _size))
# Longest unit names first, so "10min" is ten minutes and not ten metres of "in".
_PART = re.compile(r"(\d+(?:\.\d+)?)(" + "|".join(sorted(_UNITS, key=len, reverse=True))
                   + r")")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
FORMS = "90, 90s, 250ms, 5m, 10min, 2h, 1d or 1h30m"


def seconds(value: str | float) -> float | None:
    """The seconds in ``value``, or None when it is not a duration (negative included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if _NUMBER.fullmatch(text):
            number = float(text)
        else:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                return None
            number = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return number


def parse(value: str | float, what: str = "duration", *, minimum: float = 0.0,
          maximum: float | None = None, positive: bool = False) -> float:
    """Seconds in ``value``; else E7051 naming ``what`` (``--timeout``, ``spread``) and the
    range. ``positive`` refuses zero."""
    number = seconds(value)
    shown = str(value)[:64]
    if number is None:
        raise OutpostError("duration_invalid", f"{what} '{shown}' is not a duration.",
                           fix=f"Give a duration such as {FORMS}.", setting=what,
                           value=shown)
    if number < minimum or (positive and number == 0) or (
            maximum is not None and number > maximum):
        low = "more than 0 s" if positive and not minimum else f"from {describe(minimum)}"
        high = f" to {describe(maximum)}" if maximum is not None else ""
        raise OutpostError("duration_invalid",
                           f"{what} '{shown}' is out of range: give {low}{high}.",
                           fix=f"Give a duration {low}{high}, such as {FORMS}.",
                           setting=what, value=shown)
    return number


def describe(number: float) -> str:
    """3725 -> '1h2m5s', 1.5 -> '1.5s', 604800 -> '7d'."""
    if number < 60:
        return f"{number:.3f}".rstrip("0").rstrip(".") + "s"
    whole, parts = round(number), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)
