"""The package installs on the Pythons users have (3.11 to 3.13), while CI, the Makefile
and the Docker image stay on one of them: the lowest (tests/unit/test_infra.py checks
the image)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
SUPPORTED = ("3.11", "3.12", "3.13")


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requires_python() -> SpecifierSet:
    return SpecifierSet(project()["requires-python"])


def test_metadata_allows_python_3_11_to_3_13() -> None:
    spec = requires_python()
    for version in SUPPORTED:
        assert spec.contains(f"{version}.0") and spec.contains(f"{version}.9"), version
    assert not spec.contains("3.10.14")


def allowed_versions() -> list[str]:
    """The minor versions requires-python admits, lowest first."""
    spec = requires_python()
    return [f"3.{minor}" for minor in range(8, 30) if spec.contains(f"3.{minor}.0")]


def test_classifiers_name_exactly_the_allowed_versions() -> None:
    prefix = "Programming Language :: Python :: "
    named = [c[len(prefix):] for c in project().get("classifiers", []) if re.fullmatch(re.escape(prefix) + r"3\.\d+", c)]
    assert named == allowed_versions()


def test_ci_and_makefile_use_the_lowest_allowed_python() -> None:
    lowest = allowed_versions()[0]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^PYTHON \?= python{re.escape(lowest)}$", makefile, re.M)
    assert f"command -v python{lowest}" in (REPO / ".ci" / "run").read_text()
