"""Secrets never shown: one place that knows what a secret looks like, and masks it.

A value is masked wherever prunesearch shows or logs it (the terminal, MLflow params and tags,
the ``config.yaml`` artifact, error lines): the password of any URL (``scheme://user:pw@``,
``scheme://:pw@``), secret-named query parameters (``?password=``, ``&token=``), and the value
of every key whose name looks secret (``hf_token``, ``api_key``, ``db_password``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SECRET_PARTS = {
    "password",
    "passwd",
    "passphrase",
    "pass",
    "pw",
    "secret",
    "token",
    "key",
    "apikey",
    "credential",
    "credentials",
    "auth",
    "authorization",
    "cookie",
    "session",
    "signature",
    "sig",
    "private",
}
_SECRET_PREFIXES = ("aws", "azure", "google", "databricks")
# scheme://[user]:password@ -> scheme://[user]:***@ (any scheme, any case, password may hold ':')
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/:@'\"]*):[^\s/@'\"]*@")
# ?password=... / &api_key=... (the value up to the next separator)
_QUERY_SECRET = re.compile(r"(?i)([?&;]([a-z0-9_.\-]+)=)([^&;#\s'\"]*)")


# password=..., api_key: ..., HF_TOKEN=... in free text (an error message, a repr)
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b([a-z0-9_.\-]*(?:password|passwd|secret|token|api_?key)[a-z0-9_.\-]*)(\s*[=:]\s*)"
    r"(?!\*\*\*)[^\s&;,'\")\]}]+"
)


def looks_secret(name: str) -> bool:
    """Whether a key or variable name says its value is a credential."""
    parts = [p for p in re.split(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])", _snake(name).lower()) if p]
    if not parts or name.upper() == "PWD":
        return False
    return any(_secret_part(p) for p in parts) or "".join(parts) in _SECRET_PARTS


def _secret_part(part: str) -> bool:
    return (
        part in _SECRET_PARTS
        or any(w in part for w in ("password", "passwd", "secret", "credential"))
        or part.endswith(("token", "apikey", "accesskey", "privatekey"))
    )


def looks_secret_var(name: str) -> bool:
    """Whether an environment variable holds a credential by its name or its family (AWS_...)."""
    family = name.split("_", 1)[0].lower()
    return looks_secret(name) or family in _SECRET_PREFIXES


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)


def mask_text(text: str) -> str:
    """Mask every URL password and secret-named query value in free text."""
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)

    def query(m: re.Match[str]) -> str:
        return m.group(1) + (MASK if looks_secret(m.group(2)) and m.group(3) else m.group(3))

    text = _QUERY_SECRET.sub(query, text)
    return _ASSIGNED_SECRET.sub(rf"\1\2{MASK}", text)


def has_secret(text: str) -> bool:
    """Whether ``text`` (a URL) carries a password or secret query value."""
    return mask_text(text) != text


def mask(value: Any, key: str = "") -> Any:
    """A plain value tree (dicts, lists, strings) with every secret masked."""
    if key and looks_secret(key) and value not in (None, "", {}, []):
        return MASK if not isinstance(value, Mapping) else {k: MASK for k in value}
    if isinstance(value, Mapping):
        return {k: mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value
