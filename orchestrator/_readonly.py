"""Checks for the commands that only read (``pareto``, ``fetch``): they never create a store,
and never wait on a server that does not answer."""

from __future__ import annotations

import os
import stat
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ._schema import ConfigError
from ._secrets import mask_text

PROBE_TIMEOUT_S = 5.0
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def bound_mlflow_http() -> None:
    """MLflow retries a request 7 times with backoff and waits 120 s for each: bound both."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_model_uri(uri: str) -> bool:
    """A registry or run URI (True), or a local model directory holding an MLmodel (False)."""
    if uri.startswith(MODEL_URI_SCHEMES) and len(uri.rstrip("/")) > len("runs:/"):
        return True
    if uri and "\0" not in uri and (Path(uri) / "MLmodel").is_file():
        return False
    raise ConfigError(
        f"uri: {mask_text(uri)[:200]!r} is not a registered model; give models:/NAME@ALIAS, "
        "models:/NAME/VERSION, runs:/RUN_ID/model or a model directory holding an MLmodel file"
    )


def check_tracking_readable(uri: str, field: str) -> None:
    """The tracking store exists (nothing is created to read it) and its server answers."""
    shown = mask_text(uri)
    scheme = urlparse(uri).scheme.lower()
    if scheme == "sqlite":
        path = uri.split("://", 1)[1]
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        path = path.split("?", 1)[0]
        _existing_file(Path(path), shown, field)
    elif scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme == "file" else uri)
        if not path.is_dir():
            raise ConfigError(
                f"{field}: {shown!r}: no MLflow store there (nothing has been tracked); run the "
                "search first or fix the URI"
            )
    elif scheme in ("http", "https"):
        _probe(uri, shown, field)


def _existing_file(path: Path, shown: str, field: str) -> None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        raise ConfigError(
            f"{field}: {shown!r}: no MLflow database there (nothing has been tracked); run the "
            "search first or fix the URI"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{field}: {shown!r} is not a database file; fix the URI")


def _probe(uri: str, shown: str, field: str) -> None:
    """Any HTTP answer will do (even 401): only silence or a refused connection is refused."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):  # noqa: S310 (http/https only)
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"{field}: no MLflow server answers at {shown} ({mask_text(str(reason))[:120]}) within "
            f"{PROBE_TIMEOUT_S:g} s; start it or fix the URI"
        ) from None
