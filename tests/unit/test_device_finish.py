"""Finishing on the device (sempart_core.device_finish, run here on CPU tensors) gives the
rows of the CPU path (postprocess.finish_raw): on the shipped photos through the tests'
tiny random model, and on hand-made masks with known components, against scipy."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from sempart_core.config import PostConfig
from sempart_core.device_finish import component_table, finish_on_device, label_components
from sempart_core.images import decode_image
from sempart_core.postprocess import (
    NON_FINITE_MAP,
    CompactPrediction,
    RawPrediction,
    compact,
    finish_raw,
    postprocess,
    rle_to_mask,
)
from sempart_core.predictor import load_predictor

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data" / "duts-te" / "images").glob("*.jpg"))


def row(pred: CompactPrediction) -> dict:
    """What the output table stores of a result (pipeline.labeler.prediction_columns)."""
    return {"status": pred.status, "mask_rle": pred.rle(), "mask_area": pred.mask_area, "box": pred.box,
            "boxes": pred.boxes, "score": pred.score, "ncut": pred.ncut}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def assert_same_row(got: CompactPrediction, want: CompactPrediction) -> None:
    """The issue's margins: masks IoU >= 0.999 (the same RLE when equal), boxes within a
    pixel, scores within 1e-3; none of them decided by rounding."""
    a, b = rle_to_mask(got.rle()), rle_to_mask(want.rle())
    assert mask_iou(a, b) >= 0.999
    if np.array_equal(a, b):
        assert got.rle() == want.rle() and got.mask_area == want.mask_area and got.status == want.status
    assert (got.box is None) == (want.box is None) and len(got.boxes) == len(want.boxes)
    for box, other in zip([got.box or []] + got.boxes, [want.box or []] + want.boxes):
        assert np.abs(np.subtract(box, other)).max(initial=0) <= 1
    assert abs(got.score - want.score) < 1e-3 and np.array_equal(got.ncut, want.ncut, equal_nan=True)


@pytest.mark.parametrize("method", ["sempart", "tokencut"])  # smooth maps; 0/1 maps with values on the threshold
def test_shipped_photos_give_the_cpu_rows(model: str, method: str) -> None:
    """The tests' model (32 px): maps enlarged ~10x, photos of several sizes per batch."""
    predictor = load_predictor(model, method=method)
    post = predictor.config.post
    by_shape = defaultdict(list)  # a batch holds one input shape
    for path in PHOTOS:
        rgb = decode_image(path.read_bytes())
        prepared = predictor.prepare(rgb)
        by_shape[prepared.shape].append((prepared, rgb.shape[:2]))
    results = []
    for group in by_shape.values():
        maps = predictor.infer_maps(np.stack([prepared for prepared, _ in group]))
        sizes = [size for _, size in group]
        on_device = finish_on_device(maps.fine, sizes, maps.ncut, post)
        raws = [RawPrediction(p, float(n)) for p, n in zip(maps.fine.numpy(), maps.ncut.numpy())]
        results += zip(on_device, [compact(finish_raw(raw, *size, post)) for raw, size in zip(raws, sizes)])
    assert len(results) == len(PHOTOS) >= 10
    assert any(len({size for _, size in group}) >= 2 for group in by_shape.values())  # padded batches
    for got, want in results:
        assert_same_row(got, want)
    assert sum(want.status == "ok" for _, want in results) >= 6


def test_maps_shrunk_or_resized_both_ways_give_the_cpu_rows() -> None:
    """A batch of smooth and of blocky 0/1 maps (TokenCut's kind: many values on the
    threshold after resizing) finished smaller, larger in one axis only, and as is."""
    rng = np.random.default_rng(3)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 1, 6, 8), size=(48, 64), mode="bilinear")[:, 0]
    blocky = torch.from_numpy(np.kron(rng.random((3, 6, 8)) > 0.5, np.ones((1, 8, 8))).astype(np.float32))
    maps = torch.cat([smooth, blocky])
    sizes = [(30, 40), (48, 20), (100, 50), (48, 64), (31, 44), (47, 90)]
    ncuts = [0.1, 0.2, 0.3, 0.4, 0.5, float("nan")]
    post = PostConfig()
    for got, prob, size, ncut in zip(finish_on_device(maps, sizes, ncuts, post), maps.numpy(), sizes, ncuts):
        want = compact(finish_raw(RawPrediction(prob, ncut), *size, post))
        assert_same_row(got, want)
        assert row(got) == row(want) or np.isnan(ncut)  # bit for bit, where nan != nan allows it


def snake(height: int, width: int) -> np.ndarray:
    """One component: rows joined at alternate ends (plain propagation needs a step per pixel)."""
    mask = np.zeros((height, width), bool)
    mask[::2] = True
    for i, r in enumerate(range(1, height - 1, 2)):
        mask[r, -1 if i % 2 == 0 else 0] = True
    return mask


def spiral(n: int) -> np.ndarray:
    """One component winding inwards, arms two pixels apart."""
    mask = np.zeros((n, n), bool)
    r, c, dr, dc = 0, 0, 0, 1
    mask[0, 0] = True
    while True:
        for _ in range(2):  # straight on, else turn right
            nr, nc = r + dr, c + dc
            ar, ac = nr + dr, nc + dc
            if 0 <= nr < n and 0 <= nc < n and not mask[nr, nc] and not (0 <= ar < n and 0 <= ac < n and mask[ar, ac]):
                r, c = nr, nc
                mask[r, c] = True
                break
            dr, dc = dc, -dr
        else:
            return mask


def hand_made() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ring = np.zeros((30, 40), bool)
    ring[5:25, 5:35] = True
    ring[8:22, 8:32] = False  # a hole
    ring[14:16, 18:20] = True  # an island in it
    dots = np.zeros((21, 31), bool)
    dots[::2, ::2] = True  # 176 components of one pixel: ties in area, kept in scan order
    corners = np.zeros((9, 7), bool)
    corners[0, 0] = corners[-1, -1] = corners[0, -1] = corners[-1, 0] = True
    blobs = ndimage.uniform_filter(rng.random((60, 80)), 5) > 0.52
    return {
        "diagonal": np.eye(6, dtype=bool) | np.eye(6, k=3, dtype=bool),  # touching diagonally: 2 components, not 9
        "anti-diagonal": np.eye(7, dtype=bool)[::-1].copy(),
        "ring with hole and island": ring,
        "dots": dots,
        "corners": corners,
        "empty": np.zeros((17, 23), bool),
        "full": np.ones((19, 13), bool),
        "snake": snake(61, 50),
        "spiral": spiral(41),
        "blobs": blobs,
        "noise": rng.random((40, 50)) > 0.55,
        "row": rng.random((1, 64)) > 0.5,
        "column": rng.random((64, 1)) > 0.5,
    }


def test_hand_made_masks_give_the_cpu_rows() -> None:
    """0/1 maps at the image's size (no resize): the same rows, runs included."""
    post = PostConfig(threshold=0.5, min_area_frac=0.01)
    for i, (name, mask) in enumerate(hand_made().items()):
        prob = mask.astype(np.float32)
        got = finish_on_device(torch.from_numpy(prob)[None], [mask.shape], [0.25 + i / 100], post)[0]
        want = compact(postprocess(prob, 0.25 + i / 100, post))
        assert row(got) == row(want), name
        np.testing.assert_array_equal(got.runs, want.runs)


def test_hand_made_masks_have_scipys_components_in_one_padded_batch() -> None:
    masks = list(hand_made().values())
    batch = np.zeros((len(masks), max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)), bool)
    for plane, mask in zip(batch, masks):
        plane[: mask.shape[0], : mask.shape[1]] = mask
    labels = label_components(torch.from_numpy(batch)).labels.numpy()
    for plane, mask in zip(labels, masks):
        got = plane[: mask.shape[0], : mask.shape[1]]
        want, count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert (plane[mask.shape[0]:] == 0).all() and (plane[:, mask.shape[1]:] == 0).all()
        assert (got[~mask] == 0).all() and (got[mask] > 0).all()
        assert len(set(zip(got[mask].tolist(), want[mask].tolist()))) == count == len(np.unique(got[mask]))


def test_long_thin_components_take_few_rounds() -> None:
    for mask in (snake(301, 400), spiral(301)):
        components = label_components(torch.from_numpy(mask)[None])
        assert len(np.unique(components.labels.numpy()[0][mask])) == 1
        assert components.rounds <= 8  # plain 3x3 propagation would need a round per pixel of the path


def test_component_table_rows() -> None:
    mask = np.zeros((2, 5, 6), bool)
    mask[0, 1:3, 1:4] = True  # image 0: a 2x3 block ...
    mask[0, 4, 5] = True  # ... and a pixel in the corner
    mask[1, 0, 0] = mask[1, 1, 1] = True  # image 1: two pixels touching diagonally
    table = component_table(label_components(torch.from_numpy(mask)).labels).tolist()
    # image, area, first pixel, x1, y1, x2, y2; in order of image, then last pixel
    assert table == [[0, 6, 7, 1, 1, 4, 3], [0, 1, 29, 5, 4, 6, 5], [1, 2, 0, 0, 0, 2, 2]]


def test_a_map_with_nan_is_that_images_error() -> None:
    maps = torch.rand(3, 8, 8)
    maps[1, 2, 3] = float("nan")
    post = PostConfig()
    got = finish_on_device(maps, [(20, 30)] * 3, torch.tensor([0.1, 0.2, 0.3]), post)
    assert isinstance(got[1], ValueError) and str(got[1]) == NON_FINITE_MAP
    for i in (0, 2):
        want = compact(finish_raw_of(maps[i].numpy(), 0.1 * (i + 1), post))
        assert row(got[i]) == row(want)
    with pytest.raises(ValueError, match="non-finite"):
        finish_raw_of(maps[1].numpy(), 0.2, post)
    assert finish_on_device(torch.zeros(0, 8, 8), [], [], post) == []


def finish_raw_of(prob: np.ndarray, ncut: float, post: PostConfig):
    return finish_raw(RawPrediction(prob, float(np.float32(ncut))), 20, 30, post)
