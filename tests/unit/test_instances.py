"""MaskCut instances (sempart_core/instances.py, fiedler.py and the finishing in
postprocess.py): the batched solver against scipy's generalised eigh, the whole
procedure against the published one (benchmarks/instances.py's reference), the rules
one by one, and what instances buy on synthetic scenes with several objects.

Why tau = 0.5 in the scene tests: a random ViT's keys are far more alike than DINO's
(see test_learning.py), so at MaskCut's tau = 0.15 most patches link to most others
and the cuts follow texture as much as objects. Measured with this file's settings
(vit_tiny_patch16_224 random, 256 px, 16 x 16 patches, 48 scenes, N = 3): recall at IoU
0.5 of 0.43 / 0.53 / 0.50 / 0.48 at tau 0.4 / 0.5 / 0.6 / 0.7 against 0.18 / 0.22 /
0.21 / 0.16 for the single mask.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import spearmanr

from scripts import load_script
from sempart_core.backbone import build_backbone
from sempart_core.config import BackboneConfig, InstanceConfig, SempartConfig
from sempart_core.fiedler import dense_fiedler, fiedler, fiedler_lobpcg
from sempart_core.graph import affinity
from sempart_core.images import decode_image
from sempart_core.instances import (
    Cut,
    PaintedGraph,
    _raw_instances,
    dropped,
    feature_links,
    foreground_side,
    maskcut_batch,
    seed_components,
)
from sempart_core.model import build_model
from sempart_core.postprocess import (
    RawInstances,
    RawPrediction,
    finish_instances,
    finish_raw,
    mask_box,
    refine_instance,
)
from sempart_core.predictor import Predictor
from sempart_core.synthetic import synthetic_instances
from sempart_core.tokencut import hard_ncut
from sempart_core.training import to_model_input

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO / "tests" / "data" / "duts-te" / "images").iterdir())
TINY = "vit_tiny_patch16_224"
bench = load_script(REPO / "benchmarks" / "instances.py", "instances_bench")


@pytest.fixture(scope="module")
def backbone():
    torch.set_num_threads(1)
    return build_backbone(BackboneConfig(name=TINY, weights="random"), 256).eval()


def keys_of(backbone, images: list[np.ndarray], size: int) -> torch.Tensor:
    """Features [B, N, C] of images resized to size x size, as the benchmark feeds them."""
    from PIL import Image

    square = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.LANCZOS)) for im in images])
    with torch.inference_mode():
        return backbone(to_model_input(square, backbone.mean, backbone.std, torch.device("cpu")))


def photos(n: int) -> list[np.ndarray]:
    return [decode_image(p.read_bytes()) for p in PHOTOS[:n]]


def scenes(seeds) -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthetic_instances(s) for s in seeds]


@pytest.fixture(scope="module")
def real_features(backbone) -> torch.Tensor:
    """4 shipped photos and 3 synthetic scenes, 20 x 20 patches (400 nodes: LOBPCG's side)."""
    images = photos(4) + [im for im, _ in scenes(range(3))]
    return keys_of(backbone, images, 320)


# ---------------------------------------------------------------- the solver


def scipy_fiedler(feats: torch.Tensor, painted: np.ndarray, tau: float, eps: float) -> tuple[np.ndarray, float]:
    """The reference's graph (features zeroed where painted) and its generalised eigh."""
    f = F.normalize(feats.float().T * torch.from_numpy(~painted).float(), p=2, dim=0)
    A = (f.T @ f).numpy() > tau
    A = np.where(A.astype(float) == 0, eps, A)
    D = np.diag(A.sum(axis=1))
    values, vectors = scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])
    return vectors[:, 0], float(values[0])


@pytest.mark.parametrize("paint", [False, True])
def test_lobpcg_gives_scipys_partition_on_photo_and_scene_graphs(real_features: torch.Tensor, paint: bool) -> None:
    """Same eigenvalue, same vector, same split at the mean, on the painted graph too
    (PaintedGraph = the graph of zeroed features)."""
    cfg = InstanceConfig()
    grid = (20, 20)
    painted = torch.zeros(real_features.shape[:2], dtype=torch.bool)
    if paint:  # a block of patches as if found by an earlier cut
        painted.view(-1, *grid)[:, 5:12, 4:13] = True
    links = feature_links(real_features, cfg.tau)
    ours = fiedler_lobpcg(PaintedGraph(links, painted, cfg.eps), grid=grid, tol=1e-10)
    assert bool((ours.residual < 1e-10).all())
    for b in range(len(real_features)):
        ref, value = scipy_fiedler(real_features[b], painted[b].numpy(), cfg.tau, cfg.eps)
        x = ours.vector[b].numpy()
        ref = ref * np.sign(ref @ x)
        assert ours.values[b, 0].item() == pytest.approx(value, abs=1e-9)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(x, ref, atol=1e-7 * scale)
        margin = np.abs(ref - ref.mean())
        decided = margin > 1e-6 * scale  # nodes no rounding can move across the mean
        assert decided.sum() >= len(x) - 2
        assert np.array_equal((x > x.mean())[decided], (ref > ref.mean())[decided])


def test_lobpcg_batch_gives_what_each_graph_gives_alone(real_features: torch.Tensor) -> None:
    """Graphs converge at different iterations and leave the batch: no effect on the others."""
    links = feature_links(real_features, 0.15)
    painted = torch.zeros(real_features.shape[:2], dtype=torch.bool)
    batch = fiedler_lobpcg(PaintedGraph(links, painted, 1e-5), grid=(20, 20))
    iterations = []
    for b in range(len(links)):
        alone = fiedler_lobpcg(PaintedGraph(links[b : b + 1], painted[b : b + 1], 1e-5), grid=(20, 20))
        torch.testing.assert_close(batch.vector[b], alone.vector[0], atol=1e-12, rtol=0)
        iterations.append(alone.iterations)
    assert len(set(iterations)) > 1  # they did leave at different iterations


def separate_cliques(n_parts: int, size: int, seed: int) -> torch.Tensor:
    """W of n_parts cliques linked by eps only: its smallest eigenvalues crowd near 0."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_parts), size)
    rng.shuffle(labels)
    W = np.where(labels[:, None] == labels[None, :], 1.0, 1e-5)
    W[rng.random(W.shape) < 0.02] = 1e-5  # a few missing links, so parts differ
    W = np.minimum(W, W.T)
    return torch.from_numpy(W)[None]


def test_graphs_lobpcg_leaves_unconverged_are_solved_densely() -> None:
    W = torch.cat([separate_cliques(6, 60, s) for s in range(2)])
    short = fiedler_lobpcg(W, max_iter=2)
    assert bool((short.residual > 1e-9).all())
    exact = dense_fiedler(W, block=4)
    got = fiedler(W, dense_max_nodes=0, max_iter=2)
    torch.testing.assert_close(got.vector, exact.vector)
    torch.testing.assert_close(got.values, exact.values)


def test_small_graphs_take_the_dense_solver(real_features: torch.Tensor) -> None:
    W = affinity(real_features[:2, :200], 0.15, 1e-5)
    got = fiedler(W, dense_max_nodes=256)
    assert got.iterations == 0
    torch.testing.assert_close(got.vector, dense_fiedler(W).vector)


# ---------------------------------------------------------------- the procedure


@pytest.mark.parametrize("dense_max_nodes", [0, 256])
def test_maskcut_equals_the_published_procedure(backbone, dense_max_nodes: int) -> None:
    """Photos and scenes, 16 x 16 patches: every mask as the reference's, on every image
    whose cuts rounding cannot decide (no node at the mean, no tie for the seed; one
    photo here has a near-complete graph whose reversed side ties)."""
    images = photos(12) + [im for im, _ in scenes(range(10, 18))]
    feats = keys_of(backbone, images, 256)
    cfg = InstanceConfig(dense_max_nodes=dense_max_nodes)
    ours = maskcut_batch(feats, (16, 16), cfg)
    compared = total = 0
    for raw, f in zip(ours, feats):
        ref = bench.reference_maskcut(f, (16, 16), 16, cfg)
        if ref.ambiguous:
            continue
        assert np.array_equal(raw.masks, ref.masks)
        compared += 1
        total += len(raw.masks)
    assert compared >= 0.7 * len(images) and total > compared  # several instances per image


def test_foreground_is_the_seed_side_unless_it_holds_three_corners() -> None:
    grid = (4, 4)
    x = torch.full((1, 16), -1.0, dtype=torch.float64)
    x.view(4, 4)[:2, :2] = torch.tensor([[3.0, 2.0], [2.0, 2.0]])  # seed at the top-left corner
    fg, seed = foreground_side(x, grid, corner_flip=3)
    assert fg.view(4, 4)[:2, :2].all() and int(fg.sum()) == 4 and int(seed) == 0
    three = x.clone()
    three.view(4, 4)[0, 3] = three.view(4, 4)[3, 0] = 1.0  # the seed's side now holds 3 corners
    three.view(4, 4)[2, 2] = -2.0
    fg, seed = foreground_side(three, grid, corner_flip=3)
    assert not fg.view(4, 4)[0, 0] and int(fg.sum()) == 16 - 6 and int(seed) == 10  # argmin
    kept, _ = foreground_side(three, grid, corner_flip=0)  # rule off: the seed's side
    assert kept.view(4, 4)[0, 0] and int(kept.sum()) == 6
    two = x.clone()
    two.view(4, 4)[0, 3] = 1.0  # 2 corners: below the rule
    fg, _ = foreground_side(two, grid, corner_flip=3)
    assert fg.view(4, 4)[0, 0] and fg.view(4, 4)[0, 3]


def test_only_the_seeds_4_connected_component_is_kept() -> None:
    fg = np.zeros((6, 6), dtype=bool)
    fg[0:2, 0:2] = True  # holds the seed
    fg[2:4, 2:4] = True  # touches the first diagonally only: another component
    fg[5, :] = True
    kept = seed_components(torch.from_numpy(fg).view(1, -1), torch.tensor([7]), (6, 6))
    expected = np.zeros((6, 6), dtype=bool)
    expected[0:2, 0:2] = True
    assert np.array_equal(kept.view(6, 6).numpy(), expected)


def test_drop_rules_overlap_above_half_and_area_up_to_one_percent() -> None:
    cfg = InstanceConfig()
    n = 200
    prev = torch.zeros(n, dtype=torch.bool)
    prev[:60] = True

    def mask(lo: int, hi: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[lo:hi] = True
        return m

    masks = torch.stack([mask(20, 100), mask(0, 59), mask(150, 152), mask(150, 153)])
    # IoU 40/100 = 0.4 keep; 59/60 drop; 2/200 = 1 % drop; 3/200 keep
    got = dropped(masks, prev.expand(4, n), cfg).tolist()
    assert got == [False, True, True, False]
    half = torch.stack([mask(0, 30) | mask(100, 130)])  # IoU 30/90 < 0.5 keep
    exactly_half = torch.stack([mask(0, 40) | mask(100, 120)])  # IoU 40/80 = 0.5: not above
    assert dropped(torch.cat([half, exactly_half]), prev.expand(2, n), cfg).tolist() == [False, False]


def test_earlier_masks_are_subtracted_and_empty_ones_left_out() -> None:
    n, grid = 16, (4, 4)

    def cut(*idx: int) -> Cut:
        m = torch.zeros(1, n, dtype=torch.bool)
        m[0, list(idx)] = True
        return Cut(m, torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))

    raw = _raw_instances([cut(0, 1, 2), cut(), cut(1, 2, 3, 4), cut(3)], grid, first_is_model=False)[0]
    assert raw.masks.shape == (2, 4, 4)  # the empty second and the fully covered fourth are gone
    assert raw.masks[0].reshape(-1)[[0, 1, 2]].all() and raw.masks[0].sum() == 3
    assert raw.masks[1].reshape(-1)[[3, 4]].all() and raw.masks[1].sum() == 2
    assert raw.ncut.dtype == np.float32 and raw.score.tolist() == [0.5, 0.5]


def test_sempart_mode_starts_from_the_models_mask(backbone) -> None:
    images = [im for im, _ in scenes(range(20, 24))]
    feats = keys_of(backbone, images, 256)
    first = torch.zeros(4, 256, dtype=torch.bool)
    first.view(4, 16, 16)[:, 3:9, 4:10] = True
    first[3] = False  # no model foreground: the cuts start on the whole graph
    cfg = InstanceConfig(tau=0.5)
    out = maskcut_batch(feats, (16, 16), cfg, first)
    plain = maskcut_batch(feats[3:], (16, 16), InstanceConfig(tau=0.5, max_instances=2))[0]
    links = affinity(feats, cfg.tau, cfg.eps)
    expected_ncut = hard_ncut(first[:3].double(), links[:3])
    for b, raw in enumerate(out[:3]):
        assert raw.first_is_model and np.array_equal(raw.masks[0], first[b].view(16, 16).numpy())
        assert not (raw.masks[1:] & raw.masks[0]).any()
        assert raw.ncut[0] == pytest.approx(expected_ncut[b].item(), rel=1e-5)
    assert not out[3].first_is_model and np.array_equal(out[3].masks, plain.masks)


# ---------------------------------------------------------------- finishing


def test_raw_instances_pack_compactly_and_back_exactly() -> None:
    rng = np.random.default_rng(0)
    raw = RawInstances(rng.random((3, 40, 40)) > 0.7, np.array([0.1, 0.2, np.nan], dtype=np.float32),
                       np.array([0.9, 0.5, 0.0], dtype=np.float32), True)
    packed = raw.pack()
    assert len(packed["bits"]) == 3 * 40 * 40 // 8
    back = RawInstances.unpack(packed)
    assert np.array_equal(back.masks, raw.masks) and back.first_is_model
    np.testing.assert_array_equal(back.ncut, raw.ncut)
    np.testing.assert_array_equal(back.score, raw.score)


def test_refinement_modes() -> None:
    patch = np.zeros((4, 5), dtype=bool)
    patch[1:3, 1:4] = True
    nearest = refine_instance(patch, (40, 50), InstanceConfig(refine="nearest"))
    assert nearest.sum() == 2 * 3 * 100 and nearest[10:30, 10:40].all()
    bilinear = refine_instance(patch, (40, 50), InstanceConfig(refine="bilinear"))
    assert 0.8 < (bilinear & nearest).sum() / (bilinear | nearest).sum() < 1.0  # rounded corners
    with pytest.raises(ValueError, match="needs the image"):
        refine_instance(patch, (40, 50), InstanceConfig(refine="bilateral"))


def test_bilateral_refinement_snaps_to_the_object() -> None:
    """A coarse patch mask of a disc: the solver follows the disc's edge."""
    img, masks = synthetic_instances(5, size=(128, 128), n_objects=2, touching=False)
    gt = masks[0]
    patch = np.asarray(
        [[gt[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].mean() > 0.5 for c in range(8)] for r in range(8)])

    def iou(m: np.ndarray) -> float:
        return (m & gt).sum() / (m | gt).sum()

    plain = refine_instance(patch, gt.shape, InstanceConfig(refine="bilinear"))
    snapped = refine_instance(patch, gt.shape, InstanceConfig(refine="bilateral"), rgb=img)
    assert iou(snapped) > iou(plain) + 0.05 and iou(snapped) > 0.85


def test_refinement_far_from_the_patch_mask_is_dropped() -> None:
    patch = np.zeros((4, 4), dtype=bool)
    patch[0, 0] = True  # one corner patch: bilinear rounds its inner corner (IoU 0.91)
    cfg = InstanceConfig(refine="bilinear", refine_min_iou=0.95)
    assert refine_instance(patch, (64, 64), cfg) is None
    assert refine_instance(patch, (64, 64), InstanceConfig(refine="bilinear")) is not None


def test_finish_subtracts_at_full_resolution_and_sorts_largest_first() -> None:
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[1, 2:4, 0:4] = True
    masks[2, 0:2, 2:4] = True
    raw = RawInstances(masks, np.array([0.1, 0.2, 0.3], np.float32), np.array([0.9, 0.8, 0.7], np.float32), True)
    model_mask = np.zeros((40, 40), dtype=bool)
    model_mask[0:25, 0:25] = True  # the model's own mask reaches into the others
    out = finish_instances(raw, (40, 40), InstanceConfig(refine="nearest"), model_mask)
    # the second (800 px) and third (400 px) lose what the model's mask covers of them
    assert [i.area for i in out] == [800 - 5 * 25, 625, 400 - 20 * 5]
    assert [i.score for i in out] == pytest.approx([0.8, 0.9, 0.7])
    assert out[0].box == [0.0, 20.0, 40.0, 40.0] and out[1].box == [0.0, 0.0, 25.0, 25.0]
    union = np.zeros((40, 40), dtype=int)
    for inst in out:
        union += inst.mask
        assert inst.box == mask_box(inst.mask) and inst.area == inst.mask.sum()
    assert union.max() == 1
    with pytest.raises(ValueError, match="model_mask"):
        finish_instances(raw, (40, 40), InstanceConfig(refine="nearest"))


def test_postprocess_stays_free_of_torch() -> None:
    code = "import sys, sempart_core.postprocess; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_config_rejects_unknown_mode_and_refinement() -> None:
    with pytest.raises(ValueError, match="mode"):
        InstanceConfig(mode="cutler")
    with pytest.raises(ValueError, match="refinement"):
        InstanceConfig(refine="crf")


# ---------------------------------------------------------------- the predictor


def tokencut_predictor(tau: float, instances: InstanceConfig | None, method: str = "tokencut") -> Predictor:
    cfg = SempartConfig.from_dict({"backbone": {"name": TINY, "weights": "random"},
                                   "data": {"image_size": 256}, "graph": {"tau": tau}})
    backbone, heads = build_model(cfg, seed=0)
    return Predictor(backbone, heads, cfg, method=method, instances=instances, batch_size=8)


def test_predictions_have_no_instances_unless_asked() -> None:
    images = [im for im, _ in scenes(range(2))]
    plain = tokencut_predictor(0.5, None)
    assert all(p.instances == [] for p in plain.predict(images))
    assert plain.infer(np.stack([plain.prepare(im) for im in images]))[0].instances is None


def test_predictor_instances_full_resolution_and_through_packing() -> None:
    images = [im for im, _ in scenes(range(30, 34))]
    predictor = tokencut_predictor(0.5, InstanceConfig(tau=0.5, refine="bilinear"))
    preds = predictor.predict(images)
    raws = predictor.infer(np.stack([predictor.prepare(im) for im in images]))
    assert sum(len(p.instances) for p in preds) > len(images)
    for pred, raw, im in zip(preds, raws, images):
        areas = [i.area for i in pred.instances]
        assert areas == sorted(areas, reverse=True)
        stacked = np.stack([i.mask for i in pred.instances])
        assert stacked.shape[1:] == im.shape[:2] and stacked.sum(0).max() == 1
        assert all(0.0 <= i.score <= 1.0 and i.box == mask_box(i.mask) for i in pred.instances)
        shipped = RawPrediction(raw.prob, raw.ncut, instances=RawInstances.unpack(raw.instances.pack()))
        again = finish_raw(shipped, *im.shape[:2], predictor.config.post, predictor.instances)
        assert [i.rle() for i in again.instances] == [i.rle() for i in pred.instances]


def test_sempart_mode_first_instance_is_the_methods_mask() -> None:
    """Mode ``sempart`` takes the predictor's own mask first (here TokenCut's, whose mask
    is an object; untrained heads would give the whole image) and cuts the rest."""
    images = [im for im, _ in scenes(range(40, 44))]
    predictor = tokencut_predictor(0.5, InstanceConfig(tau=0.5, mode="sempart", refine="bilinear"))
    later = 0
    for pred in predictor.predict(images):
        first = [i for i in pred.instances if np.array_equal(i.mask, pred.mask)]
        assert len(first) == 1 and first[0].area == pred.mask_area
        others = [i for i in pred.instances if i is not first[0]]
        assert not any((i.mask & pred.mask).any() for i in others)
        later += len(others)
    assert later >= len(images)


def recall(pred_masks: list[np.ndarray], objects: np.ndarray) -> float:
    """Share of the objects matched at IoU >= 0.5 by some predicted mask."""
    def best(obj: np.ndarray) -> float:
        return max([(m & obj).sum() / (m | obj).sum() for m in pred_masks] or [0.0])
    return float(np.mean([best(o) >= 0.5 for o in objects]))


def components(mask: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(mask, np.ones((3, 3)))
    return [labels == i for i in range(1, count + 1)]


@pytest.mark.parametrize("first_seed", [100, 200, 300])
def test_instances_recall_more_objects_than_the_single_mask(first_seed: int) -> None:
    """16 scenes of 2 to 5 objects, touching and apart. The single mask counts as its
    own instance or as its connected components, whichever recalls more. Measured
    (recall at IoU 0.5, instances / single): 0.585 / 0.299, 0.621 / 0.320, 0.492 / 0.267
    for these seeds (and 0.510 / 0.258, 0.465 / 0.280 for 400 and 600), the same with
    1 and 2 threads; the bound leaves 4 objects or more of margin."""
    data = scenes(range(first_seed, first_seed + 16))
    predictor = tokencut_predictor(0.5, InstanceConfig(tau=0.5, refine="bilinear"))
    preds = predictor.predict([im for im, _ in data])
    ours = np.mean([recall([i.mask for i in p.instances], objs) for p, (_, objs) in zip(preds, data)])
    single = np.mean([max(recall([p.mask], objs), recall(components(p.mask), objs))
                      for p, (_, objs) in zip(preds, data)])
    assert ours >= single + 0.15, f"instances {ours:.3f} vs single mask {single:.3f}"


def test_score_ranks_instances_by_quality() -> None:
    """Spearman's rho between score and IoU with the best-matching object, 48 scenes.
    Measured 0.421 here (0.490 and 0.508 on scenes 700-747 and 900-947), 110-114
    instances; the normalised cut as the score ranked at 0.22-0.31 (docs/method.md)."""
    data = scenes(range(500, 548))
    predictor = tokencut_predictor(0.5, InstanceConfig(tau=0.5, refine="nearest"))
    scores, ious = [], []
    for pred, (_, objs) in zip(predictor.predict([im for im, _ in data]), data):
        for inst in pred.instances:
            scores.append(inst.score)
            ious.append(max((inst.mask & o).sum() / (inst.mask | o).sum() for o in objs))
    rho = spearmanr(scores, ious).statistic
    assert len(scores) > 80 and rho > 0.3, f"rho {rho:.3f} over {len(scores)} instances"
