"""What ``prunesearch submit`` uploads: an explicit allow-list, never the directory.

The job's package holds the config, the task module and its package (source and small config
files), and the files the user names with ``--include``; nothing else. Never: hidden files and
directories (``.ssh``, ``.aws``, ``.git``, ``.env``, ``.envrc``), files that usually hold
credentials (keys, ``credentials``, service-account JSON), and nothing reached through a symlink
that leaves the project. The list is staged in a temporary directory, which Ray packs.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from workers import task_source

from ._config import Config
from ._schema import ConfigError

# Inside a task's package, files of these kinds travel; anything else is named with --include.
PACKAGE_SUFFIXES = (
    ".py",
    ".pyi",
    ".yaml",
    ".yml",
    ".json",
    ".toml",
    ".txt",
    ".cfg",
    ".ini",
    ".csv",
)
CREDENTIAL_NAMES = (
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.kdbx",
    "credentials",
    "credentials.*",
    "*-credentials*",
    "*_credentials*",
    "*service-account*.json",
    "*service_account*.json",
    "secret*.json",
    "secrets.*",
    "token",
    "*.token",
    "token.json",
    "auth_token",
    "*.netrc",
    "netrc",
    "*.pgpass",
    "pgpass",
    "*.htpasswd",
    "*.envrc",
    "*.env",
)
MAX_FILE_BYTES = 100 << 20  # Ray's package limit is 500 MiB in all; one file this big is a mistake


def upload_list(
    config: Config, config_path: Path, root: Path, includes: Sequence[str] = ()
) -> list[Path]:
    """Paths (relative to ``root``, the project directory) the job's package holds, sorted."""
    root = root.resolve()
    found: set[Path] = {inside_project(root, config_path, "config")}
    source = task_source(config.task)
    if source is not None and _within(root, source):
        found |= set(_package_files(root, config.task, source))
    for item in includes:
        path = inside_project(root, Path(item), "--include")
        full = root / path
        if full.is_dir():
            found |= {p for p in _walk(root, full, suffixes=None)}
        else:
            _refuse_credential(path, "--include")
            found.add(path)
    return sorted(found)


def _package_files(root: Path, ref: str, source: Path) -> Iterator[Path]:
    """The task module and its own package: the deepest package directory, with the
    ``__init__.py`` of each package above it."""
    parts = ref.partition(":")[0].split(".")
    if source.is_file():
        yield source.resolve().relative_to(root)
        return
    package = source
    for part in parts[1:-1]:
        package = package / part
        init = package.parent / "__init__.py"
        if init.is_file():
            yield init.resolve().relative_to(root)
    if len(parts) > 1 and (package / f"{parts[-1]}").is_dir():
        package = package / parts[-1]  # the module is itself a package
    yield from _walk(root, package, suffixes=PACKAGE_SUFFIXES)


def _walk(root: Path, top: Path, suffixes: tuple[str, ...] | None) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or _looks_credential(name):
                continue
            if suffixes is not None and not name.endswith(suffixes):
                continue
            if not _within(root, path) or not path.is_file():
                continue  # a symlink out of the project, a socket or a FIFO
            yield path.resolve().relative_to(root)


def _within(root: Path, path: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def inside_project(root: Path, path: Path, field: str) -> Path:
    full = (root / path) if not path.is_absolute() else path
    if not full.exists():
        raise ConfigError(f"{field}: {str(path)!r} does not exist; name a file in the project")
    if not _within(root, full):
        raise ConfigError(
            f"{field}: {str(path)!r} is outside the project directory {str(root)!r} (or reached "
            "through a symlink out of it), which is what travels; run submit from your project"
        )
    rel = full.resolve().relative_to(root)
    if any(part.startswith(".") for part in rel.parts):
        raise ConfigError(f"{field}: {str(path)!r} is a hidden file; hidden files never travel")
    return rel


def _looks_credential(name: str) -> bool:
    return any(fnmatch.fnmatch(name.lower(), pattern) for pattern in CREDENTIAL_NAMES)


def _refuse_credential(path: Path, field: str) -> None:
    if _looks_credential(path.name):
        raise ConfigError(
            f"{field}: {str(path)!r} looks like a credential file; the cluster reads credentials "
            "from its own environment: leave it out"
        )


@contextmanager
def staged(root: Path, files: Sequence[Path]) -> Iterator[Path]:
    """A temporary directory holding exactly ``files`` (copied, relative paths kept)."""
    with tempfile.TemporaryDirectory(prefix="prunesearch-job-") as tmp:
        for rel in files:
            src = root / rel
            if src.stat().st_size > MAX_FILE_BYTES:
                raise ConfigError(
                    f"--include: {str(rel)!r} is over {MAX_FILE_BYTES >> 20} MiB; keep large files "
                    "where the cluster can read them (object store, shared disk)"
                )
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        yield Path(tmp)
