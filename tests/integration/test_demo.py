"""`sempart demo` end to end, as a user runs it: local S3, local Ray, train, label,
query, gallery; its output ends with the paths of the table, the gallery and the model."""
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo import TRAIN
from pipeline.schema import LABELS_SCHEMA
from sempart_core.predictor import load_predictor

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env["SEMPART_NUM_CPUS"] = "2"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--workdir", str(tmp_path / "demo")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("Parquet table:") and last[1].startswith("gallery:") and last[2].startswith("model:")
    table_dir = Path(last[0].split(":", 1)[1].strip()).parent
    table = pq.read_table(sorted(table_dir.glob("part-*.parquet")))
    assert table.schema.names == LABELS_SCHEMA.names
    n_samples = len(list((REPO / "pipeline" / "demo_images").glob("*.jpg")))
    assert table.num_rows == n_samples and set(table.column("status").to_pylist()) <= {"ok", "empty"}
    gallery = Path(last[1].split(":", 1)[1].strip())
    assert gallery.is_file() and len(list((gallery.parent / "thumbs").iterdir())) == n_samples
    predictor = load_predictor(last[2].split(":", 1)[1].strip())
    assert predictor.meta["steps"] == TRAIN["steps"]
    assert "RANDOM backbone" in proc.stderr or predictor.meta["random_backbone"] is False
