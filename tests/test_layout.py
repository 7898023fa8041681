"""The repository's layout: no module reaches into another package's private (underscore) names."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "search_space", "workers")
SCANNED = (*PACKAGES, "tests", "benchmarks", "examples")

# Imports in files another engineer is editing right now; each is removed here once its file
# imports the public name (the stale check below says when).
PENDING: set[tuple[str, str]] = set()  # (file, name) still to move to a public name


def _python_files() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


def _imports(rel: Path, source: str) -> Iterator[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in the source, nested ones too."""
    for node in ast.walk(ast.parse(source, filename=str(rel))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's own package, one level up per extra dot
                base = list(rel.parent.parts)
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            yield node.lineno, module, [alias.name for alias in node.names]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _violations(rel: Path, source: str) -> Iterator[tuple[int, str]]:
    """(line, what) for each underscore module or name of another of our packages imported."""
    for line, module, names in _imports(rel, source):
        parts = module.split(".")
        if parts[0] not in PACKAGES or rel.parts[0] == parts[0]:
            continue  # not one of ours, or inside its own package
        private_module = any(_private(p) for p in parts[1:])
        if private_module and not names:
            yield line, module
        for name in names:
            if private_module or _private(name):
                yield line, f"{module}.{name}"


def _found() -> dict[tuple[str, str], int]:
    found = {}
    for path in _python_files():
        rel = path.relative_to(ROOT)
        for line, what in _violations(rel, path.read_text(encoding="utf-8")):
            found[(rel.as_posix(), what)] = line
    return found


def test_no_module_imports_a_private_name_of_another_package():
    bad = [
        f"{path}:{line}: {what}"
        for (path, what), line in _found().items()
        if (path, what) not in PENDING
    ]
    assert not bad, "imports of another package's private names:\n" + "\n".join(sorted(bad))


def test_pending_exceptions_are_still_needed():
    stale = PENDING - set(_found())
    assert not stale, (
        f"no longer imported, remove from PENDING in tests/test_layout.py: {sorted(stale)}"
    )


def test_the_check_sees_every_form_of_a_private_import():
    source = (
        "import orchestrator._study\n"
        "from workers._trial import run_trial\n"
        "from search_space import _space, SearchSpace\n"
        "from workers import (\n    Task,\n    _cached_task,\n)\n"
        "from orchestrator import config_from_dict\n"
        "from ..workers import apply_plan\n"
        "from .. import _helpers\n"
        "def f():\n    from .._internal import thing\n"
    )
    assert list(_violations(Path("tests/orchestrator/sample.py"), source)) == [
        (1, "orchestrator._study"),
        (2, "workers._trial.run_trial"),
        (3, "search_space._space"),
        (4, "workers._cached_task"),
    ]
    # Inside its own package, a module uses its siblings' private names freely.
    own = "from ._trial import _cached_task\nfrom workers._io import pruned_bytes\n"
    assert list(_violations(Path("workers/_screen.py"), own)) == []
    # From a sibling package, relative imports resolve to the other package and are caught.
    assert list(_violations(Path("orchestrator/_x.py"), "from ..workers._trial import a\n")) == [
        (1, "workers._trial.a")
    ]


def _readme_layout() -> dict[str, set[str]]:
    """The modules README.md's Layout section lists, per package (its one code block)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        head = re.match(r"^(\w+)/\s", line)
        if head:
            package = head[1]
            listed.setdefault(package, set())
        module = re.match(r"^\s+(\w+\.py)\s", line)
        if module and package is not None:
            listed[package].add(module[1])
    return listed


def test_the_readme_layout_lists_every_module_and_only_those():
    listed = _readme_layout()
    problems = []
    for package in PACKAGES:
        tree = {p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"}
        named = listed.get(package, set())
        problems += [
            f"{package}/{m} is missing from README.md's Layout" for m in sorted(tree - named)
        ]
        problems += [
            f"README.md's Layout names {package}/{m}, which does not exist"
            for m in sorted(named - tree)
        ]
    assert not problems, "\n".join(problems)
