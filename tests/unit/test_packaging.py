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


def dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions `roots` need, to the end (this platform's markers,
    the extras they ask for)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    seen, todo = set(), [(dist_name(r), "") for r in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(dist_name(req.name), e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


def test_makefile_torch_closure_is_what_torch_needs() -> None:
    """`make` installs TORCH_CLOSURE with torch's pip and the rest of constraints.txt with
    another pip at the same time: a name in both would be written by two pips at once,
    one in neither would be missing."""
    pattern = re.search(r"^TORCH_CLOSURE := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    pinned = [line.split("==")[0] for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line]
    by_makefile = {dist_name(n) for n in pinned if re.match(pattern, f"{n}==", re.I)}
    needed = requirement_closure(("torch", "torchvision")) & {dist_name(n) for n in pinned}
    assert by_makefile == needed
