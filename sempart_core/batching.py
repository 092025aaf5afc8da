"""Inference batches: images of one input shape within a token budget, split in halves
when memory runs out.

`infer_in_batches` is the one batching loop: `Predictor.predict` and the labelling
stage (`pipeline.labeler.Labeler`) both call it. torch is imported only where tensors
are met or memory has run out, so that the label driver and its CPU stages, which read
the default budget, need no torch.

Sizing the default token budget (ViT-S/8 on a 24 GB GPU). The backbone (flash
attention under bf16) and the heads grow linearly with the tokens of a batch; the
semantic graph (`graph.affinity`) does not: for each image it holds a float32
similarity of N x N token pairs, a boolean mask, two filler tensors and the result,
17 bytes per pair by count (peak RSS on CPU measured 18-19 bytes per pair at N = 3,000).
A batch of k images of N tokens each then peaks near 19 * k * N^2 = 19 * (k * N) * N
bytes, which a budget T on k * N bounds by 19 * T * N. The largest input at the default
320 px is 40 x 160 patches (4:1, the aspect cap), 6,400 tokens: 19 * 65,536 * 6,400 =
8.0 GB. At 480 px a 4:1 panorama has 14,400 tokens: four of them share a batch (57,600
tokens), about 15.8 GB, which leaves room on a 24 GB GPU for the model, the CUDA context
and the linear terms; 32 of them would need 126 GB. Eight 320 x 320 images (1,600 tokens
each) use 12,800 tokens. Where the estimate is wrong, the halving below still finishes
the batch.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

DEFAULT_MAX_BATCH_TOKENS = 65_536

# Messages of allocation failures that are not a torch.cuda.OutOfMemoryError: PyTorch's
# CPU allocator (Linux/macOS, Windows), and the CUDA solver libraries, whose workspace
# allocations fail with a status code, raised as RuntimeError or torch.linalg's
# LinAlgError (torch.linalg.eigh of TokenCut's graphs goes through cuSOLVER).
OOM_MESSAGES = (
    "DefaultCPUAllocator: can't allocate memory",
    "not enough memory",
    "CUSOLVER_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)

R = TypeVar("R")


class ImageOutOfMemory(MemoryError):
    """One image ran out of memory alone: it cannot be inferred on this device."""

    def __init__(self, width: int, height: int, tokens: int):
        super().__init__(f"out of memory: image {width}x{height} alone ({tokens:,} tokens)")
        self.tokens = tokens


def tokens_of(height: int, width: int, patch: int) -> int:
    """Backbone tokens (patches) of a prepared input of height x width pixels."""
    return (height // patch) * (width // patch)


def plan_batches(
    shapes: Sequence[tuple[int, int]], patch: int, batch_size: int, max_tokens: int = DEFAULT_MAX_BATCH_TOKENS
) -> list[list[int]]:
    """Indices of the images to infer together, given each prepared (height, width).

    A batch holds images of one shape (the backbone takes a stacked tensor), at most
    `batch_size` of them and at most `max_tokens` tokens in all, but at least one image.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (h, w) in enumerate(shapes):
        groups[(h, w)].append(i)
    batches = []
    for (h, w), idx in groups.items():
        per_batch = max(1, min(batch_size, max_tokens // max(1, tokens_of(h, w, patch))))
        batches += [idx[s : s + per_batch] for s in range(0, len(idx), per_batch)]
    return batches


def is_out_of_memory(exc: BaseException | None) -> bool:
    """CUDA out of memory, a failed CPU allocation (PyTorch's or Python's), or a cuSOLVER /
    cuBLAS allocation failure, also when an error raised from it wraps it."""
    import torch

    while exc is not None:
        if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES):
            return True
        exc = exc.__cause__
    return False


def infer_splitting(
    infer: Callable[[np.ndarray], Sequence[R]],
    batch: np.ndarray,
    patch: int,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[R | ImageOutOfMemory]:
    """`infer(batch)`, one result per image; when memory runs out, each half in turn,
    down to single images. An image out of memory alone gets an `ImageOutOfMemory`
    naming its size: `sizes` (width, height) per image, else the prepared input's.
    Other errors propagate."""
    try:
        return list(infer(batch))
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if not is_out_of_memory(exc):
            raise
    # Outside the except block: the exception and its frames (holding the failed
    # batch's tensors) are gone, so the cache can return their memory.
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    n, h, w = batch.shape[:3]
    if n == 1:
        width, height = sizes[0] if sizes is not None else (w, h)
        return [ImageOutOfMemory(width, height, tokens_of(h, w, patch))]
    half = n // 2
    first = infer_splitting(infer, batch[:half], patch, None if sizes is None else sizes[:half])
    return first + infer_splitting(infer, batch[half:], patch, None if sizes is None else sizes[half:])


def infer_in_batches(
    infer: Callable[[Any], Sequence[R]],
    images: Sequence[Any],
    patch: int,
    batch_size: int,
    max_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    sizes: Sequence[tuple[int, int]] | None = None,
    copier: Callable[[Any], Callable[[], Any]] | None = None,
    failed: Callable[[Exception], Any] | None = None,
) -> list[R | ImageOutOfMemory]:
    """`infer`'s result for each prepared image (uint8 [h_in, w_in, 3]: numpy arrays, or
    tensors already decoded on the device), in input order.

    Images of one shape are stacked into batches within `batch_size` and `max_tokens`
    (`plan_batches`); a batch out of memory is halved (`infer_splitting`), and an image
    out of memory alone gets an `ImageOutOfMemory` naming its `sizes` (width, height).
    With `copier` (`prefetch.DeviceCopier`), host batches go to the device from pinned
    memory while the previous batch computes. Other errors propagate, or, with
    `failed`, give each image of the failed batch `failed(error)`."""
    plans = plan_batches([im.shape[:2] for im in images], patch, batch_size, max_tokens)
    batches: Iterator[Any] = (_stack([images[i] for i in idx], copier is not None) for idx in plans)
    if copier is not None:
        from .prefetch import prefetch

        batches = prefetch(batches, copier)
    results: list[R | ImageOutOfMemory | None] = [None] * len(images)
    for idx, batch in zip(plans, batches):
        try:
            done = infer_splitting(infer, batch, patch, None if sizes is None else [sizes[i] for i in idx])
        except Exception as exc:  # noqa: BLE001 - re-raised unless the caller keeps going
            if failed is None:
                raise
            done = [failed(exc)] * len(idx)
        for i, result in zip(idx, done):
            results[i] = result
    return results  # type: ignore[return-value]


def _stack(images: list[Any], as_tensor: bool) -> Any:
    """One batch [B, h, w, 3]: a numpy array, or a tensor when the images are tensors or
    a copier will send the batch to the device."""
    if isinstance(images[0], np.ndarray) and not as_tensor:
        return np.stack(images)
    import torch

    if isinstance(images[0], np.ndarray):
        return torch.from_numpy(np.stack(images))
    return torch.stack(images)
