"""Every script in benchmarks/ is run by some test at a tiny size, so that none rots
unnoticed (a refactor once broke train_throughput.py and nothing ran it)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT_SUFFIXES = (".py", ".sh")


def test_every_benchmark_script_is_named_by_a_test() -> None:
    scripts = sorted(p.name for p in (REPO / "benchmarks").iterdir() if p.suffix in SCRIPT_SUFFIXES)
    assert "train_throughput.py" in scripts
    tests = [p for p in (REPO / "tests").rglob("test_*.py") if p.resolve() != Path(__file__).resolve()]
    text = "\n".join(p.read_text() for p in tests)
    untested = [name for name in scripts if f'"{name}"' not in text]
    assert not untested, f"benchmarks without a test that runs them: {untested}"
