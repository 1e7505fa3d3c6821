"""The one reading of a CA fingerprint, for the CLI and the agent alike.

A fingerprint is the SHA-256 of the CA certificate's DER: 64 hex digits. People paste it as
``hub init`` printed it (``abcd...``), as browsers and OpenSSL show it (``AB:CD:...``,
``SHA256 Fingerprint=AB:CD:...``) or with a ``sha256=``/``SHA256:`` prefix; all read the same.
A value that is not 64 hex digits is malformed (E8001), which says more than a mismatch
with the hub's CA would ("a proxy may be intercepting TLS").
"""

from __future__ import annotations

import re

from .errors import OutpostError, entry

_PREFIX = re.compile(r"^(?:sha-?256(?:\s+fingerprint)?)\s*[=:]?\s*", re.IGNORECASE)
_SEPARATORS = re.compile(r"[:\s-]")
_HEX = re.compile(r"[0-9a-f]*")
LENGTH = 64


def parse(text: str) -> str:
    """The fingerprint in ``text`` as 64 lower-case hex digits; E8001 if it is not one."""
    value = _PREFIX.sub("", text.strip(), count=1)
    digits = _SEPARATORS.sub("", value).lower()
    if not digits:
        problem = "it is empty"
    elif not _HEX.fullmatch(digits):
        bad = list(dict.fromkeys(c for c in value.lower() if c not in "0123456789abcdef:- "))
        problem = "it holds characters that are not hexadecimal digits (" + \
            " ".join(repr(c) for c in bad[:5]) + ")"
    elif len(digits) != LENGTH:
        problem = f"it has {len(digits)} hexadecimal digits where a SHA-256 has {LENGTH}"
    else:
        return digits
    shown = text.strip()
    shown = shown if len(shown) <= 100 else shown[:97] + "..."
    raise OutpostError("fingerprint_malformed", entry("fingerprint_malformed").message.format(
        value=f"'{shown}'" if shown else "(empty)", problem=problem), value=shown)
