"""PIL's bilinear resize on torch tensors, on any device, bit for bit.

The CPU stages resize with PIL (`images.prepare_image` for the model's input,
`postprocess.resize_prob` for the map at the image's size); the device paths
(`gpu_decode`, `device_finish`) must give the same values, or masks differ where a
value sits on the threshold. torch's antialiased bilinear is the same filter in other
arithmetic: on uint8 images one level off on about a tenth of the values, on float maps
up to ~1e-5 off, which flips pixels that sit exactly on the threshold (TokenCut's 0/1
maps have many). So this module runs Pillow's own arithmetic (libImaging/Resample.c):

- the weights of `precompute_coeffs`, in the same double operations (on the host);
- one pass per axis, in the order the installed Pillow takes them (`_vertical_first`);
- uint8 ("8bpc"): weights rounded to 22 fraction bits, int32 sums from 2^21, the sum
  shifted right by 22 and clipped, each pass stored as uint8; integers, so exact;
- float32 maps ("32bpc", mode F): sums in float64 from 0, tap after tap, each pass
  stored as float32. Multiply and add are separate tensor ops (Pillow's C does not fuse
  them: an x86-64 build has no fused multiply-add), so every step rounds as in Pillow.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import PIL
import torch

# Pillow's fixed point for 8-bit samples: 32-bit sums of samples times weights with 22
# fraction bits (8 bits of sample, 2 of headroom).
PRECISION_BITS = 22
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def bilinear_uint8(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, height, width]: ``Image.resize((width, height),
    BILINEAR)`` of an 8-bit image."""
    def to_uint8(sums: torch.Tensor) -> torch.Tensor:
        return sums.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)

    return _resize(chw, height, width, _fixed_point_weights, 1 << (PRECISION_BITS - 1), to_uint8)


def bilinear_float32(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 [C, H, W] -> float32 [C, height, width]: ``Image.resize((width, height),
    BILINEAR)`` of a mode-F image (as `postprocess.resize_prob` does, before its clip)."""
    return _resize(chw.float(), height, width, _weights, 0.0, lambda sums: sums.to(torch.float32))


def _resize(x: torch.Tensor, height: int, width: int, weights: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
            start: float, store: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    passes = [(2, width), (1, height)]
    if _vertical_first(x.shape[1], x.shape[2], height, width):
        passes.reverse()
    for dim, size in passes:
        if x.shape[dim] != size:
            x = store(_pass(x, dim, weights(x.shape[dim], size), start))
    return x


def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Pillow 13 runs the vertical pass first when the height shrinks by more than twice
    as many pixels as the width (earlier releases always start horizontally)."""
    return _PILLOW_MAJOR >= 13 and in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)


def _pass(x: torch.Tensor, dim: int, weights: tuple[np.ndarray, np.ndarray], start: float) -> torch.Tensor:
    """One pass along `dim`: each output is `start` + the sum, tap after tap, of input
    sample * weight, in the weights' dtype (int32 or float64). The axis is moved to the
    front so that each tap gathers whole contiguous slices."""
    first, kernel = (torch.from_numpy(a).to(x.device) for a in weights)
    rows = x.movedim(dim, 0).contiguous()
    sums = torch.full((len(first), *rows.shape[1:]), start, dtype=kernel.dtype, device=x.device)
    per_row = (-1,) + (1,) * (rows.ndim - 1)
    for tap in range(kernel.shape[1]):
        taken = rows.index_select(0, (first + tap).clamp_(max=rows.shape[0] - 1))  # weight 0 past the end
        sums += taken * kernel[:, tap].view(per_row)  # rounded product, then rounded sum: no fused multiply-add
    return sums.movedim(0, dim)


@functools.lru_cache(maxsize=256)
def _weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear weights from `n_in` to `n_out` samples (precompute_coeffs, in
    the same double operations): the first input of each output [n_out] and the weights
    of the inputs from there [n_out, taps], float64. The triangle filter widens by the
    scale when shrinking (antialiasing) and is normalised per output."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle's support (1), widened when shrinking
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward 0
    count = np.minimum((center + support + 0.5).astype(np.int64), n_in) - first
    offset = np.arange(taps)
    distance = np.abs(((first[:, None] + offset) - center[:, None] + 0.5) * (1.0 / support))
    w = np.where((distance < 1.0) & (offset < count[:, None]), 1.0 - distance, 0.0)
    total = np.zeros(n_out)
    for tap in range(taps):  # summed in Pillow's order, so that the normalisation rounds alike
        total += w[:, tap]
    w /= np.where(total != 0.0, total, 1.0)[:, None]
    return first, w


@functools.lru_cache(maxsize=256)
def _fixed_point_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """`_weights` rounded to int32 with 22 fraction bits (normalize_coeffs_8bpc)."""
    first, w = _weights(n_in, n_out)
    return first, np.floor(0.5 + w * (1 << PRECISION_BITS)).astype(np.int32)
