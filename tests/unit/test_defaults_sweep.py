"""benchmarks/defaults_sweep.py runs end to end at its smallest settings, resumes from its
results file, and ranks scores as documented."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "defaults_sweep.py"
sweep = load_script(BENCH, "defaults_sweep_bench")


def test_score_ranking_by_hand() -> None:
    # Scores in the order of the IoUs but one swap: rho = 1 - 6 * 2 / (5 * 24) = 0.9.
    r = sweep.score_ranking([0.9, 0.7, 0.8, 0.2, 0.1], [1.0, 0.8, 0.6, 0.4, 0.2])
    assert r["spearman"] == pytest.approx(0.9)
    assert r["top20_iou"] == 1.0 and r["bottom20_iou"] == 0.2  # one image each: 20 % of 5


def test_exactly_one_candidate_is_the_shipped_defaults() -> None:
    assert [name for name, c in sweep.CANDIDATES.items() if c.shipped] == ["shipped"]


def test_quick_run_prints_table_and_json_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs.jsonl"
    threads = torch.get_num_threads()
    try:
        assert sweep.main(["--quick", "--out", str(out)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        figures = json.loads(lines[-1])
        assert "| **shipped** |" in "\n".join(lines[:-1])
        (row,) = figures["rows"]
        assert row["shipped"] and row["seeds"] == [0] and 0 <= row["iou"][0] <= 1 and 0 <= row["tokencut_iou"][0] <= 1
        assert len(out.read_text().splitlines()) == 1
        assert sweep.main(["--quick", "--out", str(out)]) == 0  # nothing left to run: read back
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == [row]
        assert len(out.read_text().splitlines()) == 1
    finally:
        torch.set_num_threads(threads)
