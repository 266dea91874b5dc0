"""Packaging: what pyproject.toml asks for, and the Makefile's install and system-package steps."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from nbhelpers import profiles

ROOT = profiles.repo_root()
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_dependencies_allow_any_torch_build_and_declare_what_is_imported():
    project = _pyproject()["project"]
    torch = [r for r in project["dependencies"] if _names([r]) == {"torch"}]
    assert torch and "==" not in torch[0] and ">=" in torch[0]  # a user's CUDA build must satisfy it
    assert {"pandas", "nbformat", "numpy", "pyyaml"} <= _names(project["dependencies"])


def test_dev_extra_builds_on_the_book_extra():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "nbhelpers[book]" in extras["dev"]
    assert not _names(extras["dev"]) & _names(extras["book"])  # no copies of the book extra's entries


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_installs_the_cpu_wheel_before_the_package(tmp_path):
    out = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), f"VENV={tmp_path / 'venv'}", "setup"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    torch = [i for i, line in enumerate(lines) if "pip install" in line and "torch==2.13.0" in line]
    package = [i for i, line in enumerate(lines) if "pip install -e" in line]
    assert torch and package and torch[0] < package[0], out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_system_deps_skips_apt_when_the_packages_are_installed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    stubs = {
        "dpkg-query": "#!/bin/sh\nfor p in dataset-fashion-mnist chromium; do echo installed; done\n",
        "npm": "#!/bin/sh\nexit 0\n",
        "apt-get": f'#!/bin/sh\necho "$@" >> {log}\n',
        "id": "#!/bin/sh\necho 0\n",
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = subprocess.run(["make", "-C", str(ROOT), "system-deps"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "present" in out.stdout and not log.exists()
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\necho installed\n")  # chromium missing: apt runs
    out = subprocess.run(["make", "-C", str(ROOT), "system-deps"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "install" in log.read_text()


def test_every_module_is_importable_as_an_attribute_of_the_package():
    import nbhelpers

    modules = {p.stem for p in (ROOT / "nbhelpers").glob("*.py")} - {"__init__", "__main__"}
    assert nbhelpers._SUBMODULES == modules | {"experiments"}


def test_make_help_lists_every_target():
    if shutil.which("make") is None:
        pytest.skip("no make")
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    phony = re.search(r"^\.PHONY: (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    listed = re.findall(r"^  make (\S+)", out, re.M)
    assert listed and sorted(listed) == sorted(phony)
