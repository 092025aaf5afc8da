"""The package installs on the Pythons users have (3.11 to 3.13), while CI, the Makefile
and the Docker image stay on one of them: the lowest (tests/unit/test_infra.py checks
the image)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

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


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions `roots` need, to the end (this platform's markers,
    the extras they ask for)."""
    from importlib.metadata import requires

    seen, todo = set(), [(canonicalize_name(r), "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


def test_makefile_torch_closure_is_what_torch_needs() -> None:
    """`make` installs TORCH_CLOSURE with torch's pip and the rest of constraints.txt with
    another pip at the same time: a name in both would be written by two pips at once,
    one in neither would be missing."""
    pattern = re.search(r"^TORCH_CLOSURE := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    names = pinned()
    by_makefile = {n for n in names if re.match(pattern, f"{n}==", re.I)}
    assert by_makefile == requirement_closure(("torch", "torchvision")) & names


def pinned() -> set[str]:
    """The names constraints.txt pins (canonical)."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(line.split("==")[0]) for line in lines if "==" in line}


def test_constraints_pin_every_requirement_of_the_package() -> None:
    """`make` installs constraints.txt without resolving (`--no-deps`) and `pip check`
    does not look at extras: a requirement added to pyproject.toml, the s3 and dev extras
    included, must be pinned there too."""
    names = [Requirement(r).name for r in project()["dependencies"]]
    names += [Requirement(r).name for extra in ("s3", "dev") for r in project()["optional-dependencies"][extra]]
    assert {canonicalize_name(n) for n in names} - pinned() == set()
