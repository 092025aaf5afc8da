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


@pytest.mark.parametrize("method", ["sempart", "tokencut", "tokencut-bs"])
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
    # TokenCut as published picks its foreground by its own seed rule, named as such;
    # it has no border rule to switch on or off.
    own_rule = "border_rule_on" if method == "sempart" else "tokencut_seed_rule"
    expected_rules = ["border_rule_on", "border_rule_off"] if method == "sempart" else [own_rule]
    assert report["rules"] == expected_rules and report["foreground_rule"] == own_rule
    assert report[own_rule]["fine"]["IoU"] == report["IoU"]
    assert [r for r in ("border_rule_on", "border_rule_off", "tokencut_seed_rule") if r in report] == expected_rules
    assert own_rule in result.output


def test_eval_usage_error_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--gt", str(tmp_path)])
    assert result.exit_code == 2
    assert "give either --pred DIR" in result.output
    result = runner.invoke(app, ["eval", "--model", "m", "--images", str(tmp_path)])
    assert result.exit_code == 2 and "give --gt MASKS" in result.output


# ---- brute-force check of the model report: coarse and fine, both rules, CorLoc ----


def brute_sod(maps: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    """The metrics by their definitions: per image, at every threshold k/255, one by one."""
    acc, iou, mae, f_image, f_curves = [], [], [], [], []
    for prob, gt in zip(maps, gts):
        binary = prob > 0.5
        acc.append(np.mean(binary == gt))
        union = np.sum(binary | gt)
        iou.append(np.sum(binary & gt) / union if union else 1.0)
        mae.append(np.mean(np.abs(prob.astype(np.float64) - gt)))
        f03, f009 = [], []
        for k in range(255):
            positive = prob > np.float32(k) / np.float32(255)
            tp = np.sum(positive & gt)
            p = tp / positive.sum() if positive.sum() else 0.0
            r = tp / gt.sum() if gt.sum() else 0.0
            f03.append((1.3 * p * r) / (0.3 * p + r) if p * r > 0 else 0.0)
            f009.append((1.09 * p * r) / (0.09 * p + r) if p * r > 0 else 0.0)
        f_curves.append(f03)
        f_image.append(max(f009))
    return {"Acc": np.mean(acc), "IoU": np.mean(iou), "MAE": np.mean(mae),
            "maxF_dataset": np.mean(f_curves, axis=0).max(), "maxF_image": np.mean(f_image)}


def box_raster(box, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    out[y1:y2, x1:x2] = True
    return out


def brute_corloc(pred_boxes, gt_boxes, shapes) -> float:
    """IoU >= 0.5 with any GT box, the IoU counted in pixels of rasterised boxes."""
    hits = 0
    for pred, gts, shape in zip(pred_boxes, gt_boxes, shapes):
        if pred is None:
            continue
        p = box_raster(pred, shape)
        hits += any(np.sum(p & box_raster(g, shape)) / np.sum(p | box_raster(g, shape)) >= 0.5 for g in gts)
    return hits / len(gt_boxes)


def gt_boxes_for(preds, shapes) -> list[list[list[float]]]:
    """Per image a far-off box, plus for every other image one near its predicted box, so
    that CorLoc is neither 0 nor 1 and a wrong convention would change it."""
    out = []
    for i, (pred, (h, w)) in enumerate(zip(preds, shapes)):
        boxes = [[0.0, 0.0, 4.0, 4.0]]
        if pred.box is not None and i % 2 == 0:
            x1, y1, x2, y2 = pred.box
            boxes.append([x1 + 1, y1, min(w, x2 + 2), y2])
        out.append(boxes)
    return out


def test_eval_report_matches_brute_force(tiny_model, tmp_path):
    from sempart_core.postprocess import connected_boxes, resize_prob
    from tests.unit.test_annotations import write_coco, write_voc

    names = sorted(p.stem for p in (DATA / "images").iterdir())
    rgbs = [np.asarray(Image.open(DATA / "images" / f"{n}.jpg").convert("RGB")) for n in names]
    gts = [np.asarray(Image.open(DATA / "masks" / f"{n}.png").convert("L")) > 127 for n in names]
    shapes = [g.shape for g in gts]
    preds = load_predictor(str(tiny_model)).predict(rgbs)
    flipped = [p.border_flipped for p in preds]
    assert 0 < sum(flipped) < len(preds), "the test needs images flipped by the rule and not"
    gt_boxes = gt_boxes_for(preds, shapes)
    for name, boxes, shape in zip(names, gt_boxes, shapes):
        write_voc(tmp_path / "voc" / "Annotations", name, boxes, size=shape)
    write_coco(tmp_path / "coco.json", dict(zip(names, gt_boxes)), prefix="", sizes=dict(zip(names, shapes)))

    reports = {}
    for kind, boxes_arg in (("voc", tmp_path / "voc"), ("coco", tmp_path / "coco.json")):
        path = tmp_path / f"{kind}.json"
        result = runner.invoke(app, [
            "eval", "--model", str(tiny_model), "--images", str(DATA / "images"), "--gt", str(DATA / "masks"),
            "--boxes", str(boxes_arg), "--json", str(path),
        ])
        assert result.exit_code == 0, result.output
        reports[kind] = json.loads(path.read_text())
    report = reports["voc"]
    # Both readers give the same boxes.
    assert {**reports["coco"]["corloc"], "annotations": "VOC"} == report["corloc"]
    assert report["n_border_flipped"] == sum(flipped)

    for rule in ("border_rule_on", "border_rule_off"):
        undo = [rule == "border_rule_off" and f for f in flipped]
        fine = [1 - p.prob if u else p.prob for p, u in zip(preds, undo)]
        coarse = [resize_prob(1 - p.coarse if u else p.coarse, s) for p, u, s in zip(preds, undo, shapes)]
        for name, maps in (("fine", fine), ("coarse", coarse)):
            expected = brute_sod(maps, gts)
            for key, value in expected.items():
                assert report[rule][name][key] == pytest.approx(value, abs=1e-9), (rule, name, key)
        boxes = [connected_boxes(m > 0.5, 1)[0] for m in fine]
        assert report["corloc"][rule] == pytest.approx(brute_corloc(boxes, gt_boxes, shapes))
    assert 0 < report["CorLoc"] < 1
    assert report["CorLoc"] == report["corloc"]["border_rule_on"]
    assert report["IoU"] == report["border_rule_on"]["fine"]["IoU"]
    # The coarse map is a different prediction from the fine one.
    assert report["border_rule_on"]["coarse"]["MAE"] != report["border_rule_on"]["fine"]["MAE"]


# ---- issue 21: the datasets' pixel grid, GT binarisation, COCO20k, given maps, token budget ----


@pytest.fixture(scope="module")
def model_preds(tiny_model):
    """The shipped photos, their GT masks (> 127) and the tiny model's predictions."""
    names = sorted(p.stem for p in (DATA / "images").iterdir())
    rgbs = [np.asarray(Image.open(DATA / "images" / f"{n}.jpg").convert("RGB")) for n in names]
    gts = [np.asarray(Image.open(DATA / "masks" / f"{n}.png").convert("L")) > 127 for n in names]
    return names, gts, load_predictor(str(tiny_model)).predict(rgbs)


def test_eval_given_maps_scores_corloc_as_the_predictor_boxes_them(model_preds, tmp_path):
    """`--pred DIR --boxes ANN` scores another method's maps by the same code: the main box
    is the largest 8-connected component of map > 0.5 at the annotated size (issue 21)."""
    from sempart_core.postprocess import connected_boxes, resize_prob
    from tests.unit.test_annotations import write_voc

    names, gts, preds = model_preds
    shapes = [g.shape for g in gts]
    gt_boxes = gt_boxes_for(preds, shapes)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    expected = []
    for i, (name, pred, boxes, shape) in enumerate(zip(names, preds, gt_boxes, shapes)):
        write_voc(tmp_path / "voc", name, boxes, size=shape)
        # a third of the maps at half size: brought to the annotated size first
        prob = resize_prob(pred.prob, (shape[0] // 2, shape[1] // 2)) if i % 3 == 0 else pred.prob
        np.save(pred_dir / f"{name}.npy", prob)
        expected.append(connected_boxes(resize_prob(prob, shape) > 0.5, 1)[0])
        if i % 3:
            assert expected[-1] == pred.box  # full-size maps: exactly the predictor's box
    path = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--pred", str(pred_dir), "--boxes", str(tmp_path / "voc"), "--json", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["CorLoc"] == pytest.approx(brute_corloc(expected, gt_boxes, shapes))
    assert 0 < report["CorLoc"] < 1
    assert report["corloc"]["n_images"] == 12 and report["corloc"]["annotations"] == "VOC"
    assert "IoU" not in report  # boxes only: no mask metrics


def test_eval_gt_binarisation_is_a_flag_named_in_the_report(tmp_path):
    """`> 127` (classic SOD) or any non-zero pixel (TokenCut's code): DUTS masks have
    antialiased edges, so the two give different figures (issue 21)."""
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    masks = sorted((DATA / "masks").glob("*.png"))[:4]
    for mask in masks:
        Image.open(mask).convert("L").filter(ImageFilter.GaussianBlur(3)).save(pred_dir / mask.name)
    reports = {}
    for rule in ("half", "nonzero"):
        path = tmp_path / f"{rule}.json"
        result = runner.invoke(app, ["eval", "--pred", str(pred_dir), "--gt", str(DATA / "masks"),
                                     "--gt-binarize", rule, "--json", str(path)])
        assert result.exit_code == 0, result.output
        reports[rule] = json.loads(path.read_text())
        assert reports[rule]["gt_binarize"] == rule and f"({rule})" in result.output
        preds = [np.asarray(Image.open(pred_dir / m.name), dtype=np.float32) / 255 for m in masks]
        raw = [np.asarray(Image.open(m).convert("L")) for m in masks]
        gts = [g > 127 if rule == "half" else g > 0 for g in raw]
        for key, value in brute_sod(preds, gts).items():
            assert reports[rule][key] == pytest.approx(value, abs=1e-9), (rule, key)
    assert reports["half"]["IoU"] != reports["nonzero"]["IoU"]
    result = runner.invoke(app, ["eval", "--pred", str(pred_dir), "--gt", str(DATA / "masks"), "--gt-binarize", "x"])
    assert result.exit_code == 2 and "--gt-binarize" in result.output


def test_eval_scores_the_stored_pixels_of_an_exif_tagged_image(tiny_model, tmp_path):
    """Datasets draw masks and boxes on the stored pixels and read images without EXIF
    orientation: a photo tagged 'rotate 90' must score exactly as the same JPEG untagged,
    not be turned (issue 21)."""
    from tests.unit.test_annotations import write_voc

    stem = "ILSVRC2012_test_00000003"  # 400 x 302: turning it would change its shape
    rgb = np.asarray(Image.open(DATA / "images" / f"{stem}.jpg").convert("RGB"))
    gt = np.asarray(Image.open(DATA / "masks" / f"{stem}.png").convert("L"))
    rows, cols = np.nonzero(gt > 127)
    box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
    reports = []
    for orientation in (1, 6):
        root = tmp_path / f"o{orientation}"
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation
        Image.fromarray(rgb).save(root / "images" / f"{stem}.jpg", quality=95, exif=exif.tobytes())
        Image.fromarray(gt).save(root / "masks" / f"{stem}.png")
        write_voc(root / "voc", stem, [box], size=gt.shape)
        result = runner.invoke(app, ["eval", "--model", str(tiny_model), "--images", str(root / "images"),
                                     "--gt", str(root / "masks"), "--boxes", str(root / "voc"),
                                     "--json", str(root / "r.json")])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((root / "r.json").read_text()))
    with Image.open(tmp_path / "o6" / "images" / f"{stem}.jpg") as tagged:
        assert tagged.getexif()[0x0112] == 6
    for key in ("Acc", "IoU", "MAE", "maxF_dataset", "maxF_image", "CorLoc"):
        assert reports[1][key] == reports[0][key], key


def test_eval_coco20k_scores_exactly_the_listed_images(tiny_model, tmp_path):
    """With --coco20k-list the CorLoc set is the listed images, a crowd-only one a miss;
    a listed image missing from the folder is refused (issue 21)."""
    from tests.unit.test_annotations import write_coco

    names = sorted(p.stem for p in (DATA / "images").iterdir())
    images = tmp_path / "train2014"
    images.mkdir()
    for name in names:
        (images / f"COCO_train2014_{name}.jpg").symlink_to(DATA / "images" / f"{name}.jpg")
    sizes = {n: np.asarray(Image.open(DATA / "masks" / f"{n}.png")).shape[:2] for n in names}
    boxes = {n: ([] if i == 1 else [[0.0, 0.0, sizes[n][1] / 2, sizes[n][0] / 2]]) for i, n in enumerate(names)}
    write_coco(tmp_path / "instances_train2014.json", boxes, crowd={names[1]: [0, 0, 10, 10]}, sizes=sizes)
    listed = tmp_path / "coco_20k_filenames.txt"
    listed.write_text("".join(f"train2014/COCO_train2014_{n}.jpg\n" for n in names[:5]))
    args = ["eval", "--model", str(tiny_model), "--images", str(images),
            "--boxes", str(tmp_path / "instances_train2014.json"), "--json", str(tmp_path / "r.json")]
    result = runner.invoke(app, args + ["--coco20k-list", str(listed)])
    assert result.exit_code == 0, result.output
    corloc = json.loads((tmp_path / "r.json").read_text())["corloc"]
    assert corloc["annotations"] == "COCO20k" and corloc["n_images"] == 5
    assert corloc["n_without_box_counted_as_miss"] == 1
    assert "CorLoc on COCO20k (5 images, 1 without a box counted as misses)" in result.output
    # Without the list it is not COCO20k: every image with a box, the crowd-only one dropped.
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    corloc = json.loads((tmp_path / "r.json").read_text())["corloc"]
    assert corloc["annotations"] == "COCO" and corloc["n_images"] == 11 and corloc["n_dropped_without_box"] == 1
    (images / f"COCO_train2014_{names[0]}.jpg").unlink()
    result = runner.invoke(app, args + ["--coco20k-list", str(listed)])
    assert result.exit_code == 2 and "1 of the 5 COCO20k images" in result.output


def test_eval_keeps_the_token_budget(tiny_model, monkeypatch):
    """`sempart eval --max-batch-tokens` caps the backbone tokens of one model call, as
    `sempart label` does (issue 21)."""
    from sempart_core.predictor import Predictor

    calls = []  # (images, tokens) of each model call
    infer = Predictor.infer

    def recording(self, batch):
        calls.append((len(batch), len(batch) * (batch.shape[1] // self.patch) * (batch.shape[2] // self.patch)))
        return infer(self, batch)

    monkeypatch.setattr(Predictor, "infer", recording)
    args = ["eval", "--model", str(tiny_model), "--images", str(DATA / "images"), "--gt", str(DATA / "masks")]
    assert runner.invoke(app, args).exit_code == 0
    assert max(n for n, _ in calls) > 1  # several images per call by default
    calls.clear()
    result = runner.invoke(app, args + ["--max-batch-tokens", "20"])
    assert result.exit_code == 0, result.output
    # Every photo has 16-24 tokens at 64 px: two never fit in 20, one alone always runs.
    assert len(calls) == 12 and all(n == 1 for n, _ in calls)
