"""Finish a batch of foreground maps where the model ran, into `CompactPrediction`s.

The CPU path (`postprocess.finish_raw`) takes each map off the device at the model's
input size and, on a CPU, resizes it to the image, thresholds it, labels its components
and encodes the mask as RLE: about 3 CPU-ms per photo, more than the rest of a
`--decode gpu` pipeline's CPU work. `finish_on_device` does that work on the maps'
device, batched, and gives per image a small record (`postprocess.CompactPrediction`:
the mask as column-major run lengths, area, boxes, score, ncut); the CPU then only
compresses the runs (`CompactPrediction.rle`) and writes. The rows are those of the CPU
path (tests/unit/test_device_finish.py):

- resize: PIL's bilinear filter in PIL's arithmetic (`pil_resize`), so the full-size
  map is `postprocess.resize_prob`'s, bit for bit, and so are the mask, its runs and
  its boxes (torch's antialiased bilinear, the same filter in float32, is up to ~1e-5
  off, which flips pixels that sit on the threshold);
- components: 8-connected, labelled by label equivalence on int32 pixel ids (exact on
  every device, see `label_components`); boxes, their order and the minimum area as
  `postprocess.connected_boxes`;
- score: `postprocess.score_of` of mean |2p - 1| summed in float64.

Use, from an actor holding a batch of maps [B, h_in, w_in] on its device::

    maps = predictor.infer_maps(batch)
    results = finish_on_device(maps.fine, sizes, maps.ncut, predictor.config.post)

with `sizes` each image's original (height, width). Not for ``tokencut-bs``, which
refines each mask on its image in `Predictor.finish`.

Measured (`benchmarks/device_finish.py`: 502 ground-truth masks of DUTS-TE photos made
into 320 px maps, batches of 8, torch on 1 thread of a 2-core Xeon shared with other
work, no GPU at hand): the CPU path takes 2.6 CPU-ms per image; this function on CPU
tensors 25 CPU-ms (about half labelling components, a fifth the exact resize), so it
is for GPUs, where each step is a few kernels over the batch; what is left for the CPU,
compressing the runs, takes 0.009 ms. The labelling takes a median of 4 rounds and 16
pointer jumps per image (at most 6 and 21), and at most 6 rounds and 23 jumps for a
batch of 8; each round and jump costs one device sync. All 502 rows equal the CPU
path's. On an H200 (30 masks, batches of 8): 3.9 ms per image, as much CPU time as
wall time (the thread launches kernels and syncs once per round and jump), against 4.3
CPU-ms for the CPU path there; rows equal. So on a GPU it moves the work into the
inference actor's thread more than it removes it; fewer syncs are the next step.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import PostConfig
from .pil_resize import bilinear_float32
from .postprocess import (
    NON_FINITE_MAP,
    CompactPrediction,
    min_component_area,
    rank_components,
    runs_from_starts,
    score_of,
)

logger = logging.getLogger(__name__)

# Pixel ids are int32: a padded batch plane of more pixels cannot be labelled.
MAX_PLANE_PIXELS = 2**31 - 1


@torch.inference_mode()
def finish_on_device(
    maps: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    ncuts: torch.Tensor | Sequence[float],
    post: PostConfig,
) -> list[CompactPrediction | ValueError]:
    """Each map [B, h_in, w_in] finished at its image's (height, width), as
    `postprocess.finish_raw` would (module docstring); a map with a non-finite value
    gives the ValueError `postprocess` raises for it instead."""
    if len(maps) != len(sizes) or len(maps) != len(ncuts):
        raise ValueError(f"{len(maps)} maps, {len(sizes)} sizes and {len(ncuts)} ncuts")
    ncut_values = ncuts.float().tolist() if isinstance(ncuts, torch.Tensor) else [float(n) for n in ncuts]
    maps = maps.float()
    finite = torch.isfinite(maps).flatten(1).all(1).tolist() if len(maps) else []
    done = iter(_finish([maps[i] for i in range(len(maps)) if finite[i]],
                        [(int(h), int(w)) for (h, w), ok in zip(sizes, finite) if ok],
                        [n for n, ok in zip(ncut_values, finite) if ok], post))
    return [next(done) if ok else ValueError(NON_FINITE_MAP) for ok in finite]


def _finish(maps: list[torch.Tensor], sizes: list[tuple[int, int]], ncuts: list[float],
            post: PostConfig) -> list[CompactPrediction]:
    """The batch's work on the device, then a few small arrays to the host."""
    if not maps:
        return []
    probs = [resize_map(m, size) for m, size in zip(maps, sizes)]
    masks = [p > post.threshold for p in probs]
    decisiveness = torch.stack([(2.0 * p - 1.0).abs_().sum(dtype=torch.float64) / p.numel() for p in probs])
    components = label_components(pad_masks(masks))
    logger.debug("components of %d maps: %d rounds, %d jumps", len(masks), components.rounds, components.jumps)
    starts, firsts = _run_starts(masks)
    return _records(sizes, ncuts, post, component_table(components.labels).cpu().numpy(), starts.cpu().numpy(),
                    firsts.cpu().tolist(), decisiveness.tolist())


def _records(sizes: list[tuple[int, int]], ncuts: list[float], post: PostConfig, table: np.ndarray,
             starts: np.ndarray, firsts: list[bool], decisiveness: list[float]) -> list[CompactPrediction]:
    """Each image's record from the batch's `component_table` and `_run_starts`."""
    table = table[np.lexsort((table[:, 2], table[:, 0]))]  # by image, then first pixel: scipy's order
    per_image = np.searchsorted(table[:, 0], np.arange(len(sizes) + 1))
    offsets = np.cumsum([0] + [h * w for h, w in sizes])
    run_bounds = np.searchsorted(starts, offsets)
    results = []
    for i, ((h, w), ncut) in enumerate(zip(sizes, ncuts)):
        rows = table[per_image[i]:per_image[i + 1]]
        box, boxes = rank_components(rows[:, 1], rows[:, 3:7].astype(np.float64), min_component_area(h, w, post))
        runs = runs_from_starts(starts[run_bounds[i]:run_bounds[i + 1]] - offsets[i], h * w, firsts[i])
        results.append(CompactPrediction(h, w, runs, int(rows[:, 1].sum()), box, boxes,
                                         score_of(decisiveness[i], ncut), ncut))
    return results


def resize_map(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A float32 map [h_in, w_in] at `size` (height, width): `postprocess.resize_prob`'s
    values, bit for bit (PIL's arithmetic, `pil_resize`)."""
    if tuple(prob.shape) == tuple(size):
        return prob
    return bilinear_float32(prob[None], *size)[0].clamp_(0.0, 1.0)


def pad_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """Masks of different sizes as one bool batch [B, H, W], background around each."""
    height, width = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    batch = torch.zeros((len(masks), height, width), dtype=torch.bool, device=masks[0].device)
    for plane, mask in zip(batch, masks):
        plane[: mask.shape[0], : mask.shape[1]] = mask
    return batch


class Components(NamedTuple):
    """`label_components`' labels [B, H, W] and the work it took: propagation rounds and
    pointer-jumping steps (each a few tensor ops and one device sync)."""

    labels: torch.Tensor
    rounds: int
    jumps: int


def label_components(masks: torch.Tensor) -> Components:
    """The 8-connected components of bool masks [B, H, W].

    Labels are int32: 0 on background, else 1 + the flat (raster) index of the
    component's last pixel, so a label names a pixel of its component. Label
    equivalence: each round every pixel takes the largest label of its 3x3
    neighbourhood, and so does the root its label names (a pixel whose label is its own
    id), which merges whole trees at once; then pointer jumping (label <- the label of the
    pixel it names) until every label names a root. A round that changes nothing ends it.
    Masks of photos take 2 to 6 rounds, a 45,000-pixel spiral 3: no per-pixel steps.
    """
    masks = masks.contiguous()
    batch, height, width = masks.shape
    pixels = height * width
    if pixels > MAX_PLANE_PIXELS:
        raise ValueError(f"cannot label {height}x{width} masks: more than {MAX_PLANE_PIXELS} pixels")
    ids = torch.arange(1, pixels + 1, dtype=torch.int32, device=masks.device).view(1, height, width)
    zero = torch.zeros((), dtype=torch.int32, device=masks.device)
    inside = masks.view(batch, pixels)
    labels = torch.where(masks, ids, zero).view(batch, pixels)
    rounds = jumps = 0
    while True:
        rounds += 1
        seen = torch.where(masks, _max_3x3(labels.view(batch, height, width)), zero).view(batch, pixels)
        if torch.equal(seen, labels):
            return Components(labels.view(batch, height, width), rounds, jumps)
        labels = torch.maximum(labels.scatter_reduce(1, _named(labels), seen, "amax"), seen)
        while True:  # pointer jumping
            jumps += 1
            jumped = torch.where(inside, labels.gather(1, _named(labels)), zero)
            if torch.equal(jumped, labels):
                break
            labels = jumped


def _named(labels: torch.Tensor) -> torch.Tensor:
    """The flat index of the pixel each label names (0 on background, which gives 0)."""
    return (labels - 1).clamp_(min=0).long()


def _max_3x3(x: torch.Tensor) -> torch.Tensor:
    """Max over each pixel's 3x3 neighbourhood of non-negative ints [B, H, W] (separable,
    integer: exact where float max-pooling is not, and on every device)."""
    padded = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def component_table(labels: torch.Tensor) -> torch.Tensor:
    """One int64 row per component of `label_components`' labels [B, H, W]: image, area,
    first pixel (flat index in raster order), and box x1, y1, x2, y2 (x2, y2 exclusive);
    rows in order of image, then last pixel."""
    batch, height, width = labels.shape
    flat = labels.view(batch, -1)
    pixel = torch.arange(flat.shape[1], device=labels.device)
    roots = flat == pixel + 1
    image, last = roots.nonzero(as_tuple=True)
    component_of_root = roots.view(-1).cumsum(0) - 1  # [B * H * W], valid at roots
    on_b, on_p = (flat > 0).nonzero(as_tuple=True)
    component = component_of_root[on_b * flat.shape[1] + flat[on_b, on_p].long() - 1]
    count = len(image)
    area = torch.bincount(component, minlength=count)
    first = _reduce(component, on_p, count, "amin")
    cols = on_p % width
    x1, x2 = _reduce(component, cols, count, "amin"), _reduce(component, cols, count, "amax") + 1
    return torch.stack([image, area, first, x1, first // width, x2, last // width + 1], dim=1)


def _reduce(index: torch.Tensor, values: torch.Tensor, count: int, how: str) -> torch.Tensor:
    return torch.zeros(count, dtype=values.dtype, device=values.device).scatter_reduce_(
        0, index, values, how, include_self=False)


def _run_starts(masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the runs of the masks' column-major pixels start, in one flat index over
    all masks one after the other (each mask's first pixel starts a run), and each
    mask's first pixel."""
    flat = torch.cat([m.t().reshape(-1) for m in masks])
    offsets = torch.tensor(np.cumsum([0] + [m.numel() for m in masks[:-1]]), device=flat.device)
    change = torch.ones_like(flat)
    change[1:] = flat[1:] != flat[:-1]
    change[offsets] = True
    return change.nonzero().squeeze(1), flat[offsets]
