"""Metrics: hand-computed cases, agreement with pysodmetrics on real DUTS-TE masks,
brute-force per-image max-F, folder evaluation, report/plot files and CorLoc."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.evaluate import (
    evaluate_dirs,
    evaluate_predictions,
    match_files,
    read_mask,
    read_prediction,
    write_pr_plot,
    write_report,
)
from sempart_core.metrics import SODMetrics, box_iou, corloc

DUTS_MASKS = Path(__file__).resolve().parents[1] / "data" / "duts-te" / "masks"


def scores(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    metrics = SODMetrics()
    for pred, gt in pairs:
        metrics.update(pred, gt)
    return metrics.result()


# ---------------------------------------------------------------- hand-computed cases
def test_acc_iou_mae_hand_computed_and_averaged_per_image() -> None:
    pred_a = np.array([[0.9, 0.2], [0.6, 0.4]])
    gt_a = np.array([[True, False], [False, True]])
    # binary [[1,0],[1,0]]: 2 of 4 pixels right, IoU 1/3, MAE (.1+.2+.6+.6)/4.
    pred_b = np.zeros((3, 3))
    gt_b = np.zeros((3, 3), dtype=np.uint8)  # both empty: Acc 1, IoU 1, MAE 0
    r = scores([(pred_a, gt_a), (pred_b, gt_b)])
    assert r["n_images"] == 2
    # Per-image means; pooled pixels would give Acc 11/13 and IoU 1/3.
    assert r["Acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["IoU"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert r["MAE"] == pytest.approx((1.5 / 4 + 0.0) / 2)


def test_maxf_hand_computed_binary_prediction() -> None:
    # Half the prediction is right whatever the threshold: P = R = F = 0.5 for any beta.
    pred = np.array([[1.0, 1.0], [0.0, 0.0]])
    gt = np.array([[255, 0], [255, 0]], dtype=np.uint8)
    r = scores([(pred, gt)])
    assert r["maxF_dataset"] == pytest.approx(0.5)
    assert r["maxF_image"] == pytest.approx(0.5)
    assert np.allclose(r["precision"], 0.5) and np.allclose(r["recall"], 0.5)
    assert len(r["precision"]) == len(r["recall"]) == len(r["thresholds"]) == 255
    assert r["maxF_image_beta2"] == pytest.approx(0.09)
    assert r["maxF_dataset_beta2"] == pytest.approx(0.3)


def test_perfect_prediction() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        gt = rng.random((17, 23)) > 0.6
        pairs.append((gt.astype(np.float32), gt))
    r = scores(pairs)
    for key in ("Acc", "IoU", "maxF_dataset", "maxF_image"):
        assert r[key] == pytest.approx(1.0), key
    assert r["MAE"] == 0.0


def test_update_rejects_bad_input() -> None:
    m = SODMetrics()
    with pytest.raises(ValueError, match="resize_prob"):
        m.update(np.zeros((4, 4)), np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(np.full((4, 4), 1.5), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="bool or uint8"):
        m.update(np.zeros((4, 4)), np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="no image"):
        m.result()


# ------------------------------------------------------- agreement with pysodmetrics
def real_masks(n: int = 30) -> list[np.ndarray]:
    paths = sorted(DUTS_MASKS.glob("*.png"))[:n]
    return [np.asarray(Image.open(p).convert("L")) > 127 for p in paths]


def stretch_u8(x: np.ndarray) -> np.ndarray:
    """Map to span exactly 0..255: pysodmetrics min-max normalises each map, we don't,
    so both libraries must see maps where that normalisation is the identity."""
    x = x.astype(np.float64)
    return np.round(255 * (x - x.min()) / (x.max() - x.min())).astype(np.uint8)


def perturbed(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible soft prediction: blurred GT, a shift, and pixel noise."""
    img = Image.fromarray(gt.astype(np.uint8) * 255)
    soft = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 15))), dtype=np.float64)
    soft = np.roll(soft, tuple(rng.integers(-15, 16, size=2)), axis=(0, 1))
    return stretch_u8(np.clip(soft + rng.normal(0, 40, gt.shape), 0, 255))


def center_prior(gt: np.ndarray) -> np.ndarray:
    """Cheap baseline: a centred Gaussian blob, whatever the image."""
    h, w = gt.shape
    y, x = np.mgrid[0:h, 0:w]
    d2 = ((y - h / 2) / (0.3 * h)) ** 2 + ((x - w / 2) / (0.3 * w)) ** 2
    return stretch_u8(np.exp(-0.5 * d2))


@pytest.mark.filterwarnings("ignore:This class will be removed")
@pytest.mark.parametrize("make_pred", [perturbed, center_prior], ids=["perturbed-gt", "center-prior"])
def test_agrees_with_pysodmetrics(make_pred) -> None:
    import py_sod_metrics
    rng = np.random.default_rng(1234)
    ref_f, ref_mae = py_sod_metrics.Fmeasure(), py_sod_metrics.MAE()
    ours = SODMetrics()
    for gt in real_masks():
        pred_u8 = make_pred(gt) if make_pred is center_prior else make_pred(gt, rng)
        gt_u8 = gt.astype(np.uint8) * 255
        ref_f.step(pred=pred_u8, gt=gt_u8)
        ref_mae.step(pred=pred_u8, gt=gt_u8)
        ours.update(pred_u8.astype(np.float32) / np.float32(255), gt)
    r = ours.result()
    ref = ref_f.get_results()
    assert r["n_images"] == 30
    assert r["maxF_dataset"] == pytest.approx(ref["fm"]["curve"].max(), abs=0.005)
    assert r["MAE"] == pytest.approx(ref_mae.get_results()["mae"], abs=0.005)
    # pysodmetrics' curves run over v >= 255..0; ours over v > 0..254 = v >= 1..255.
    assert np.allclose(r["precision"], ref["pr"]["p"][::-1][1:], atol=1e-9)
    assert np.allclose(r["recall"], ref["pr"]["r"][::-1][1:], atol=1e-9)
    assert np.allclose(r["f_measure"], ref["fm"]["curve"][::-1][1:], atol=1e-9)
    # Sanity on the inputs: neither case is trivially perfect or hopeless.
    assert 0.2 < r["maxF_dataset"] < 0.99


# ---------------------------------------------------------- brute-force maxF_image
def brute_force_maxf_image(preds: list[np.ndarray], gts: list[np.ndarray], thresholds) -> float:
    """SelfMask's definition, one binary mask per threshold; effective beta^2 = 0.09."""
    best = []
    for pred, gt in zip(preds, gts):
        fs = []
        for t in thresholds:
            binary = pred > t
            tp = np.logical_and(binary, gt).sum()
            p = tp / binary.sum() if binary.sum() else 0.0
            r = tp / gt.sum() if gt.sum() else 0.0
            fs.append(1.09 * p * r / (0.09 * p + r) if p * r > 0 else 0.0)
        best.append(max(fs))
    return float(np.mean(best))


def test_maxf_image_equals_brute_force() -> None:
    rng = np.random.default_rng(7)
    gts = [np.asarray(Image.fromarray(g).resize((80, 60))) for g in real_masks(8)]
    preds_u8 = [perturbed(g, rng) for g in gts]
    # 8-bit maps: threshold k/255 means v > k exactly.
    r = scores([(p.astype(np.float32) / np.float32(255), g) for p, g in zip(preds_u8, gts)])
    assert r["maxF_image"] == pytest.approx(
        brute_force_maxf_image(preds_u8, gts, range(255)), abs=1e-12
    )
    # Continuous maps (not on the 1/255 grid), compared with the same float32 thresholds.
    preds = [np.clip(p / 255 + rng.normal(0, 0.01, p.shape), 0, 1).astype(np.float32) for p in preds_u8]
    thresholds = [np.float32(k) / np.float32(255) for k in range(255)]
    r = scores(list(zip(preds, gts)))
    assert r["maxF_image"] == pytest.approx(brute_force_maxf_image(preds, gts, thresholds), abs=1e-12)


# ------------------------------------------------------------- folder evaluation
def write_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def test_read_prediction_formats(tmp_path: Path) -> None:
    prob = np.random.default_rng(3).random((9, 13)).astype(np.float32)
    u8, u16 = np.round(prob * 255).astype(np.uint8), np.round(prob * 65535).astype(np.uint16)
    write_png(tmp_path / "a.png", u8)
    write_png(tmp_path / "b.png", u16)
    np.save(tmp_path / "c.npy", prob[None])
    assert np.array_equal(read_prediction(tmp_path / "a.png"), u8 / np.float32(255))
    assert np.allclose(read_prediction(tmp_path / "b.png"), prob, atol=1e-5)
    assert np.array_equal(read_prediction(tmp_path / "c.npy"), prob)
    np.save(tmp_path / "d.npy", prob * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        read_prediction(tmp_path / "d.npy")
    mask = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    write_png(tmp_path / "m.png", mask)
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, True, True]]


def test_evaluate_dirs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    expected = []
    for i, gt in enumerate(real_masks(4)):
        write_png(gt_dir / f"img{i}.png", gt.astype(np.uint8) * 255)
        pred = perturbed(gt, rng)
        if i == 0:  # a prediction at half resolution is resized to the GT
            pred = np.asarray(Image.fromarray(pred).resize((gt.shape[1] // 2, gt.shape[0] // 2)))
        if i < 3:  # img3 has no prediction
            write_png(pred_dir / f"img{i}.png", pred)
            expected.append((f"img{i}", pred.astype(np.float32) / np.float32(255), gt))
    (pred_dir / "notes.txt").write_text("ignored: not an image")

    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate"):
        report = evaluate_dirs(pred_dir, gt_dir)
    assert "1 of 4 ground-truth masks have no prediction" in caplog.text
    assert [m[0] for m in match_files(pred_dir, gt_dir)] == ["img0", "img1", "img2"]
    assert report["n_images"] == 3 and report["n_gt"] == 4 and report["n_predictions"] == 3
    assert report["n_missing"] == 1 and report["missing_examples"] == ["img3"]
    in_memory = evaluate_predictions(expected)
    for key in ("Acc", "IoU", "MAE", "maxF_dataset", "maxF_image"):
        assert report[key] == pytest.approx(in_memory[key], abs=1e-12), key

    json_path = write_report(report, tmp_path / "out" / "report.json")
    assert json.loads(json_path.read_text())["maxF_dataset"] == pytest.approx(report["maxF_dataset"])
    png_path = write_pr_plot(report, tmp_path / "out" / "pr.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png_path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_match_files_errors(tmp_path: Path) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    write_png(gt_dir / "a.png", np.zeros((4, 4), np.uint8))
    write_png(pred_dir / "b.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(1 files\).*\(1 files\)"):
        match_files(pred_dir, gt_dir)
    write_png(pred_dir / "a.png", np.zeros((4, 4), np.uint8))
    np.save(pred_dir / "a.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="two files for 'a'"):
        match_files(pred_dir, gt_dir)
    with pytest.raises(ValueError, match="does not exist"):
        match_files(tmp_path / "nope", gt_dir)


# ------------------------------------------------------------------------- CorLoc
def test_box_iou_and_corloc() -> None:
    assert box_iou([0, 0, 10, 10], [[5, 0, 15, 10], [20, 20, 30, 30]]).tolist() == [[1 / 3, 0.0]]
    a = np.array([[0, 0, 4, 4], [1, 1, 3, 5]])
    assert np.allclose(box_iou(a, a), box_iou(a, a).T) and np.allclose(np.diag(box_iou(a, a)), 1)
    pred = [[0, 0, 10, 10]] * 4 + [None]
    gts = [
        [[0, 0, 10, 10]],  # IoU 1: hit
        [[5, 0, 15, 10]],  # IoU 1/3: miss
        [[20, 20, 30, 30], [0, 0, 10, 8]],  # second box IoU 0.8: hit
        [[0, 0, 10, 5]],  # IoU exactly 0.5: hit (>=)
        [[0, 0, 10, 10]],  # no prediction: miss
    ]
    assert corloc(pred, gts) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        corloc(pred[:2], gts)
