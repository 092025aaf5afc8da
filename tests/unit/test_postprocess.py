"""Post-processing: RLE, components and boxes, foreground rule, score, Prediction."""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sempart_core.config import PostConfig
from sempart_core.postprocess import (
    Prediction,
    compact,
    confidence_score,
    connected_boxes,
    mask_runs,
    mask_to_rle,
    postprocess,
    resize_prob,
    rle_to_mask,
)

# ---------------------------------------------------------------- independent references


def brute_components(mask: np.ndarray) -> list[tuple[int, list[float]]]:
    """(area, exclusive xyxy box) of each 8-connected component, by BFS flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            pixels = []
            queue = deque([(r0, c0)])
            seen[r0, c0] = True
            while queue:
                r, c = queue.popleft()
                pixels.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            component = np.zeros_like(mask, dtype=bool)
            component[tuple(np.array(pixels).T)] = True
            rows, cols = np.where(component)
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
            out.append((len(pixels), box))
    return out


def brute_uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed counts: column-major runs, starting with a (possibly 0) zero run."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


def blob_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random blobs of assorted sizes, some touching only diagonally."""
    noise = rng.random((h, w))
    smooth = noise.copy()
    for axis in (0, 1):
        smooth = smooth + np.roll(noise, 1, axis=axis) + np.roll(noise, -1, axis=axis)
    return (smooth / 5.0 > 0.6) | (noise > 0.93)


# ---------------------------------------------------------------- RLE


@pytest.mark.parametrize(
    "mask",
    [
        np.ones((1, 1), bool),
        np.zeros((1, 1), bool),
        np.random.default_rng(0).random((7, 13)) > 0.5,
        np.random.default_rng(1).random((333, 211)) > 0.7,
        np.zeros((333, 211), bool),
        np.ones((333, 211), bool),
        blob_mask(np.random.default_rng(2), 64, 97),
    ],
    ids=["1x1-one", "1x1-zero", "7x13", "333x211", "all-zero", "all-one", "blobs"],
)
def test_rle_round_trip(mask: np.ndarray) -> None:
    rle = mask_to_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask)
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    as_bytes = {"size": np.array(rle["size"], np.int32), "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(rle_to_mask(as_bytes), mask)
    assert rle_to_mask(rle).dtype == bool
    # Column-major order, checked against a hand-made uncompressed RLE.
    h, w = mask.shape
    reference = mask_utils.frPyObjects(
        {"size": [h, w], "counts": brute_uncompressed_rle(mask)}, h, w
    )
    assert reference["counts"].decode() == rle["counts"]
    assert int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})) == mask.sum()


def test_rle_of_non_contiguous_and_non_bool_input() -> None:
    base = np.random.default_rng(3).random((40, 30)) > 0.5
    view = base[::2, ::3]  # strided view, neither C- nor F-contiguous
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(view)), view)
    as_uint8 = base.astype(np.uint8) * 255
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(as_uint8)), base)


# ---------------------------------------------------------------- components and boxes


@pytest.mark.parametrize("seed", range(6))
def test_connected_boxes_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
    mask = blob_mask(rng, h, w)
    reference = brute_components(mask)
    min_area = int(rng.integers(1, 6))
    box, boxes = connected_boxes(mask, min_area)
    if not reference:
        assert box is None and boxes == []
        return
    largest = max(area for area, _ in reference)
    assert box in [b for area, b in reference if area == largest]
    expected = [b for area, b in reference if area >= min_area]
    assert sorted(boxes) == sorted(expected)
    area_of = {tuple(b): area for area, b in reference}
    areas = [area_of[tuple(b)] for b in boxes]
    assert areas == sorted(areas, reverse=True)
    if boxes:
        assert boxes[0] == box


def test_rectangle_gives_exact_pixel_box() -> None:
    mask = np.zeros((80, 100), bool)
    mask[10:20, 30:45] = True  # rows 10..19, columns 30..44
    box, boxes = connected_boxes(mask, min_area=1)
    assert box == [30.0, 10.0, 45.0, 20.0]
    assert boxes == [box]
    x1, y1, x2, y2 = box
    assert (x2 - x1) * (y2 - y1) == mask.sum()  # width/height count pixels (COCO bbox)


def test_single_pixel_and_image_corners() -> None:
    mask = np.zeros((9, 11), bool)
    mask[0, 0] = True
    mask[8, 10] = True
    _, boxes = connected_boxes(mask, min_area=1)
    assert sorted(boxes) == [[0.0, 0.0, 1.0, 1.0], [10.0, 8.0, 11.0, 9.0]]


def test_diagonal_pixels_are_one_component() -> None:
    mask = np.eye(5, dtype=bool)
    box, boxes = connected_boxes(mask, min_area=1)
    assert box == [0.0, 0.0, 5.0, 5.0]
    assert boxes == [box]


def test_small_components_get_no_box_but_the_largest_stays_main() -> None:
    mask = np.zeros((50, 50), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[40:42, 40:42] = True  # 4 px
    box, boxes = connected_boxes(mask, min_area=10)
    assert box == [5.0, 5.0, 25.0, 25.0]
    assert boxes == [box]
    only_tiny = np.zeros((50, 50), bool)
    only_tiny[1:3, 1:3] = True
    box, boxes = connected_boxes(only_tiny, min_area=10)
    assert box == [1.0, 1.0, 3.0, 3.0]
    assert boxes == []


def test_empty_mask_has_no_boxes() -> None:
    assert connected_boxes(np.zeros((4, 6), bool), min_area=1) == (None, [])


# ---------------------------------------------------------------- score


def test_score_matches_its_documented_formula() -> None:
    rng = np.random.default_rng(4)
    prob = rng.random((37, 53)).astype(np.float32)
    ncut = 0.3
    expected = math.sqrt(np.mean(np.abs(2 * prob.astype(np.float64) - 1)) * (1 - ncut))
    assert confidence_score(prob, ncut) == pytest.approx(expected, rel=1e-6)


def test_score_prefers_decisive_maps_and_good_cuts() -> None:
    rng = np.random.default_rng(5)
    decisive = np.where(rng.random((40, 40)) > 0.5, 0.98, 0.02).astype(np.float32)
    unsure = (0.5 + 0.05 * (rng.random((40, 40)) - 0.5)).astype(np.float32)
    scores = [confidence_score(p, n) for p in (decisive, unsure) for n in (0.0, 0.2, 0.9)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert confidence_score(decisive, 0.2) > confidence_score(unsure, 0.2)
    assert confidence_score(decisive, 0.1) > confidence_score(decisive, 0.5)
    assert confidence_score(np.ones((3, 3), np.float32), 0.0) == pytest.approx(1.0)
    assert confidence_score(np.full((3, 3), 0.5, np.float32), 0.0) == 0.0


@pytest.mark.parametrize("ncut", [1.0, 1.7, 2.0, float("nan"), float("inf")])
def test_score_is_zero_for_cuts_no_better_than_random(ncut: float) -> None:
    assert confidence_score(np.ones((4, 4), np.float32), ncut) == 0.0


# ---------------------------------------------------------------- postprocess and Prediction


def test_postprocess_rectangle() -> None:
    prob = np.full((60, 90), 0.05, np.float32)
    prob[12:30, 40:71] = 0.97
    pred = postprocess(prob, ncut=0.1, config=PostConfig())
    assert isinstance(pred, Prediction)
    assert pred.status == "ok"
    assert pred.box == [40.0, 12.0, 71.0, 30.0]
    assert pred.boxes == [pred.box]
    assert pred.mask_area == 18 * 31
    assert pred.prob.dtype == np.float32 and pred.prob.shape == (60, 90)
    assert pred.mask.dtype == bool
    assert pred.ncut == pytest.approx(0.1)
    assert 0.0 < pred.score <= 1.0
    np.testing.assert_array_equal(rle_to_mask(pred.rle()), prob > 0.5)


def test_postprocess_empty_map() -> None:
    pred = postprocess(np.zeros((21, 17), np.float32), ncut=float("nan"), config=PostConfig())
    assert pred.status == "empty"
    assert pred.box is None
    assert pred.boxes == []
    assert pred.mask_area == 0
    assert pred.rle()["size"] == [21, 17]
    assert not rle_to_mask(pred.rle()).any()
    assert 0.0 <= pred.score <= 1.0


def test_postprocess_uses_threshold_and_min_area_from_config() -> None:
    prob = np.zeros((100, 100), np.float32)
    prob[10:40, 10:40] = 0.7  # 900 px
    prob[70:73, 70:73] = 0.9  # 9 px
    pred = postprocess(prob, 0.2, PostConfig(threshold=0.5, min_area_frac=0.001))  # 10 px
    assert pred.box == [10.0, 10.0, 40.0, 40.0]
    assert pred.boxes == [[10.0, 10.0, 40.0, 40.0]]
    pred = postprocess(prob, 0.2, PostConfig(threshold=0.5, min_area_frac=0.0009))  # 9 px
    assert pred.boxes == [[10.0, 10.0, 40.0, 40.0], [70.0, 70.0, 73.0, 73.0]]
    pred = postprocess(prob, 0.2, PostConfig(threshold=0.8, min_area_frac=0.001))
    assert pred.box == [70.0, 70.0, 73.0, 73.0]  # largest component, though below min area
    assert pred.boxes == []
    pred = postprocess(prob, 0.2, PostConfig(threshold=0.5, min_area_frac=0.0))
    assert len(pred.boxes) == 2  # min area is at least one pixel


def test_postprocess_rejects_bad_maps() -> None:
    with pytest.raises(ValueError):
        postprocess(np.zeros((2, 3, 4), np.float32), 0.1, PostConfig())
    bad = np.zeros((4, 4), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError):
        postprocess(bad, 0.1, PostConfig())


def test_min_area_is_not_raised_by_float_noise() -> None:
    prob = np.zeros((10, 10), np.float32)
    prob[0, 0:7] = 1.0  # exactly 7 px; 0.07 * 10 * 10 == 7.000000000000001 in floats
    pred = postprocess(prob, 0.1, PostConfig(min_area_frac=0.07))
    assert pred.boxes == [[0.0, 0.0, 7.0, 1.0]]


# ---------------------------------------------------------------- resize to the image


def test_resize_prob() -> None:
    prob = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = resize_prob(prob, (30, 40))
    assert out.shape == (30, 40) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert np.allclose(resize_prob(np.full((5, 7), 0.25), (11, 3)), 0.25)


def test_resize_prob_upscales_like_torch_bilinear() -> None:
    import torch
    prob = np.random.default_rng(0).random((40, 48), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(prob)[None, None], size=(300, 400), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(resize_prob(prob, (300, 400)), expected, atol=1e-5)


# ---------------------------------------------------------------- the compact record


@pytest.mark.parametrize("mask", [np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(3, 4, dtype=bool)])
def test_compact_record_keeps_the_rle(mask: np.ndarray) -> None:
    pred = postprocess(mask.astype(np.float32), 0.5, PostConfig())
    record = compact(pred)
    assert record.rle() == mask_to_rle(mask) == pred.rle()
    assert (record.height, record.width, record.mask_area, record.status) == (3, 4, pred.mask_area, pred.status)
    assert record.runs.sum() == 12 and (record.runs[0] == 0) == bool(mask[0, 0])


def test_mask_runs_are_cocos_uncompressed_counts() -> None:
    mask = np.array([[1, 0, 0, 1], [1, 1, 0, 1]], bool)  # column-major: 1 1 | 0 1 | 0 0 | 1 1
    assert mask_runs(mask).tolist() == [0, 2, 1, 1, 2, 2]
    encoded = mask_utils.frPyObjects({"size": [2, 4], "counts": mask_runs(mask)}, 2, 4)
    np.testing.assert_array_equal(mask_utils.decode(encoded).astype(bool), mask)
