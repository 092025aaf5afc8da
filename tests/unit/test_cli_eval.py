"""`sempart init-model` and `sempart eval` end to end (issue 3, acceptance 7, 8, 10)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from pipeline.cli import app
from sempart_core.predictor import load_predictor

DATA = Path(__file__).resolve().parents[1] / "data" / "duts-te"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    result = runner.invoke(
        app,
        ["init-model", "--out", str(out), "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "64"],
    )
    assert result.exit_code == 0, result.output
    return out


def test_init_model_records_random_backbone_and_loads(tiny_model):
    meta = json.loads((tiny_model / "sempart.json").read_text())
    assert meta["random_backbone"] is True
    assert meta["image_size"] == 64 and meta["backbone"] == "vit_tiny_patch16_224" and meta["patch_size"] == 16
    predictor = load_predictor(str(tiny_model))
    assert predictor.model_id == meta["model_id"]
    rgb = np.asarray(Image.open(next((DATA / "images").iterdir())).convert("RGB"))
    (pred,) = predictor.predict([rgb])
    assert pred.prob.shape == rgb.shape[:2] and pred.mask.shape == rgb.shape[:2]
    # Same artifact, same backbone weights: predictions are reproducible across loads.
    (again,) = load_predictor(str(tiny_model)).predict([rgb])
    np.testing.assert_array_equal(pred.prob, again.prob)


def test_artifact_with_changed_weights_is_refused(tiny_model, tmp_path):
    import shutil

    from sempart_core.artifact import ArtifactError, read_artifact, read_artifact_info

    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(blob))
    assert read_artifact_info(str(copy)).model_id == read_artifact(str(tiny_model)).model_id
    with pytest.raises(ArtifactError, match="is not the one its sempart.json records"):
        read_artifact(str(copy))


def test_eval_pred_dir_writes_report_and_plot(tmp_path):
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for mask in sorted((DATA / "masks").glob("*.png"))[:10]:
        Image.open(mask).convert("L").filter(ImageFilter.GaussianBlur(3)).save(pred_dir / mask.name)
    report_path, plot = tmp_path / "r.json", tmp_path / "pr.png"
    result = runner.invoke(
        app, ["eval", "--pred", str(pred_dir), "--gt", str(DATA / "masks"), "--json", str(report_path), "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    for key in ("Acc", "IoU", "MAE", "maxF_dataset", "maxF_image"):
        assert 0 <= report[key] <= 1
    assert report["n_images"] == 10
    assert report["IoU"] > 0.8  # a blurred GT still overlaps well
    assert Image.open(plot).format == "PNG"


@pytest.mark.parametrize("method", ["sempart", "tokencut"])
def test_eval_with_model_on_images(tiny_model, tmp_path, method):
    report_path = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "eval", "--model", str(tiny_model), "--images", str(DATA / "images"), "--gt", str(DATA / "masks"),
            "--method", method, "--json", str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["n_images"] == 12 and report["method"] == method and report["random_backbone"] is True
    assert 0 <= report["maxF_dataset"] <= 1


def test_eval_usage_error_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--gt", str(tmp_path)])
    assert result.exit_code == 2
    assert "give either --pred DIR" in result.output
