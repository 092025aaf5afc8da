"""benchmarks/decode_agreement.py runs end to end at its quick size; on the CPU the two
decode paths prepare equal inputs, so the masks agree."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_agreement.py"

decode_agreement = load_script(BENCH, "decode_agreement_bench")


def test_quick_run_ends_with_json_line_of_figures(capsys: pytest.CaptureFixture) -> None:
    figures = decode_agreement.main(["--quick", "--threads", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["n_images"] == 4 and last["device"] == "cpu" and last["threads"] == 1
    assert last == json.loads(json.dumps(figures.__dict__))
    assert last["decoded_equal_frac"] >= 0.999 and last["prepared_equal_frac"] >= 0.999
    assert last["iou_mean_sempart"] >= 0.98 and last["iou_mean_tokencut"] >= 0.98


def test_excluded_names_are_skipped(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpeg", "c.png", "d.JPG"):
        (tmp_path / name).write_bytes(b"")
    held = tmp_path / "held"
    held.mkdir()
    (held / "b.jpeg").write_bytes(b"")
    assert [p.name for p in decode_agreement.photos(tmp_path, 10, held)] == ["a.jpg", "d.JPG"]
    assert [p.name for p in decode_agreement.photos(tmp_path, 1, None)] == ["a.jpg"]
