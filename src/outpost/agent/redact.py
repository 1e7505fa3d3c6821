"""Removing secrets from what the support bundle collects, by name and by shape.

A value is a secret when its *name* is one (``token``, ``OUTPOST_ACCOUNT_KEY``,
``X-Outpost-Signature``, ``db_pwd``: a whole component of the name, split at ``_ - .`` and
camelCase, is a secret word) or when its *shape* is one (a PEM private key or the machine's
seed block, ``Bearer``/``Basic`` credentials, a password in a URL, Outpost's own API tokens
``opt_...``, job tokens ``ojt_ID.MAC``, webhook addresses ``/v1/hooks/SECRET``, and 32 random
bytes in base64, the shape of account keys and machine seeds), or when it is one of the
literal secret values found on the machine.

Substrings of ordinary words are not secrets: ``PWD`` (the shell's working directory),
``tokenizer``, ``keyboard``, ``monkey``, a directory named ``token-tests`` or ``secret-garden``
and ``key_path`` (a path, not a key) are kept as they are, so the paths a support engineer
needs stay readable.
"""

from __future__ import annotations

import json
import re
from typing import Any

REDACTED = "[redacted]"

# Whole components of a name that make its value a secret.
SECRET_WORDS = frozenset({
    "token", "tokens", "password", "passwords", "passwd", "passphrase", "pwd", "secret",
    "secrets", "key", "keys", "apikey", "privatekey", "accountkey", "seed", "credential",
    "credentials", "authorization", "cookie", "cookies", "signature", "auth",
})
# A last component that says the value is about a secret, not the secret itself.
NOT_SECRET_LAST = frozenset({
    "path", "paths", "file", "files", "dir", "directory", "name", "names", "id", "ids",
    "fingerprint", "expires", "at", "count", "type", "kind", "size", "bytes", "length",
    "interval", "seconds", "version", "header", "set", "mode", "format", "sock", "socket",
    "pid",
})
# The shell's working-directory variables: 'pwd' there is not a password.
NOT_SECRET_NAMES = frozenset({"pwd", "oldpwd"})

_COMPONENT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """Whether a field, setting, header or variable of this name holds a secret."""
    if name.lower() in NOT_SECRET_NAMES:
        return False
    parts = [p.lower() for p in _COMPONENT.split(name) if p]
    if not parts or parts[-1] in NOT_SECRET_LAST:
        return False
    return any(p in SECRET_WORDS for p in parts)


_URL_USER = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s@\"'<>]+@", re.I)
# A credential after a scheme word: long (no word of prose is 20 characters) or with a digit
# or a symbol of token alphabets, so that "bearer tokens" in prose stays prose.
_BEARER = re.compile(r"\b(bearer|basic)\s+(?:[A-Za-z0-9._~+/=-]{20,}|"
                     r"(?=[A-Za-z._~+/=-]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,})", re.I)
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*(?:PRIVATE KEY|SEED)-----"
                  r"(?:.*?-----END [A-Z0-9 ]*-----|.*\Z)", re.S)
_API_TOKEN = re.compile(r"\bopt_[A-Za-z0-9_-]{40,}")
_JOB_TOKEN = re.compile(r"\b(ojt_[A-Za-z0-9-]+\.)[A-Za-z0-9_-]{20,}")
_HOOK = re.compile(r"(/v1/hooks/)[A-Za-z0-9_-]{16,}")
# 32 bytes in standard base64 (the last character carries 2 bits, so it is one of 16).
_KEY32 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=(?![A-Za-z0-9+/=])")
# ``name=value``, ``name: value``, ``"name": "value"``; the name decides (is_secret_name).
_ASSIGNED = re.compile(
    r"(?<![\w.-])(?P<name>[A-Za-z_][\w.-]*)(?P<sep>\"?'?\s*[:=]\s*\"?'?)"
    r"(?P<scheme>(?:bearer|basic)\s+)?(?P<value>[^\s\"',;&}]+)", re.I)


class Redactor:
    """Removes secrets from text and from data. ``known`` holds literal secret values found
    on the machine; they are replaced wherever they appear, whatever surrounds them."""

    def __init__(self, known: list[str] | None = None) -> None:
        # The longest first, so a secret that contains another is replaced whole; values
        # this short would match ordinary text and are not secrets of ours anyway.
        self.known = sorted({k for k in known or [] if len(k) >= 6}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.known:
            value = value.replace(secret, REDACTED)
        value = _PEM.sub(REDACTED, value)
        value = _URL_USER.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)
        value = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
        value = _API_TOKEN.sub(REDACTED, value)
        value = _JOB_TOKEN.sub(lambda m: f"{m.group(1)}{REDACTED}", value)
        value = _HOOK.sub(lambda m: f"{m.group(1)}{REDACTED}", value)
        value = _KEY32.sub(REDACTED, value)
        return _assigned(value)

    def data(self, value: Any, name: str = "") -> Any:
        if name and is_secret_name(name) and value not in (None, "", False, [], {}):
            return REDACTED
        if isinstance(value, dict):
            return {k: self.data(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        if isinstance(value, str):
            return self.text(value)
        return value

    def log_line(self, line: str) -> str:
        """One line of the agent log: a JSON record is redacted field by field."""
        try:
            record = json.loads(line)
        except ValueError:
            return self.text(line)
        if not isinstance(record, dict):
            return self.text(line)
        return json.dumps(self.data(record), ensure_ascii=False)

    def log_text(self, raw: str) -> str:
        """A whole log file: JSON records one by one; a run of plain text lines (a traceback,
        a private key block written over several lines) as one text, so a secret that
        spans lines is found whole."""
        out: list[str] = []
        plain: list[str] = []
        for line in raw.splitlines():
            if line.lstrip().startswith("{"):
                if plain:
                    out.append(self.text("\n".join(plain)))
                    plain = []
                out.append(self.log_line(line))
            else:
                plain.append(line)
        if plain:
            out.append(self.text("\n".join(plain)))
        return "".join(line + "\n" for line in out)


def _assigned(text: str) -> str:
    """The values of secret names in free text; other names' values are searched on (a
    URL's query may hold ``token=...``)."""
    out: list[str] = []
    pos = 0
    while (match := _ASSIGNED.search(text, pos)) is not None:
        value = match["value"]
        if is_secret_name(match["name"]) and not value.startswith(REDACTED):
            out.append(text[pos:match.start("value")] + REDACTED)
            pos = match.end("value")
        else:
            out.append(text[pos:match.end("sep")])
            pos = match.end("sep")
    out.append(text[pos:])
    return "".join(out)
