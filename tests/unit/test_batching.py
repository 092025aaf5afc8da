"""Inference batches (sempart_core/batching.py): one shape per batch within a token
budget, and out-of-memory errors injected by monkeypatching `Predictor.infer`: a batch
is split in halves, and only an image out of memory alone fails, naming its size."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.label import DECODED_SCHEMA, Infer
from sempart_core.artifact import read_artifact_info
from sempart_core.batching import (
    ImageOutOfMemory,
    infer_splitting,
    is_out_of_memory,
    plan_batches,
    tokens_of,
)
from sempart_core.predictor import Predictor, load_predictor

PANORAMA = (480, 1920)  # a 4:1 panorama at 480 px: 60 x 240 patches of 8 px
SQUARE = (320, 320)


def test_a_panorama_is_not_batched_with_31_others() -> None:
    assert tokens_of(*PANORAMA, 8) == 14_400
    shapes = [SQUARE, PANORAMA] * 16 + [(40, 48)]
    batches = plan_batches(shapes, patch=8, batch_size=32, max_tokens=65_536)
    assert sorted(i for b in batches for i in b) == list(range(len(shapes)))  # each image once
    for batch in batches:
        (shape,) = {shapes[i] for i in batch}  # one shape per batch
        assert len(batch) * tokens_of(*shape, 8) <= 65_536
    assert sorted(len(b) for b in batches if shapes[b[0]] == PANORAMA) == [4, 4, 4, 4]
    assert sorted(len(b) for b in batches if shapes[b[0]] == SQUARE) == [16]  # 25,600 tokens
    assert plan_batches([PANORAMA, PANORAMA], patch=8, batch_size=8, max_tokens=1_000) == [[0], [1]]  # >= 1 image
    assert plan_batches([SQUARE] * 5, patch=8, batch_size=2, max_tokens=10**9) == [[0, 1], [2, 3], [4]]


def wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    """`outer` as raised by `raise outer from cause`."""
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "exc, oom",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.2 GiB"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                      "you tried to allocate 829440000 bytes. Error code 12 (Cannot allocate memory)"), True),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 829440000 bytes."), True),
        (MemoryError(), True),
        # The CUDA solver libraries report a failed workspace allocation as a status code.
        (torch.linalg.LinAlgError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling "
                                  "`cusolverDnCreate(handle)`"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (wrapped(ValueError("eigh failed"), RuntimeError("CUSOLVER_STATUS_ALLOC_FAILED")), True),
        (RuntimeError("cusolver error: CUSOLVER_STATUS_INVALID_VALUE"), False),
        (wrapped(ValueError("bad input"), RuntimeError("mat1 and mat2 shapes")), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("not enough values to unpack"), False),
    ],
)
def test_out_of_memory_is_recognised(exc: BaseException, oom: bool) -> None:
    assert is_out_of_memory(exc) is oom


def test_a_batch_out_of_memory_is_split_down_to_single_images() -> None:
    calls = []

    def infer(batch: np.ndarray) -> list[int]:
        calls.append(len(batch))
        if len(batch) > 2 or 7 in batch[:, 0, 0, 0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return [int(v) * 10 for v in batch[:, 0, 0, 0]]

    images = np.arange(8, dtype=np.uint8).reshape(8, 1, 1, 1) * np.ones((1, 16, 24, 3), np.uint8)
    sizes = [(48 + i, 32) for i in range(8)]
    results = infer_splitting(infer, images, patch=8, sizes=sizes)
    assert results[:7] == [0, 10, 20, 30, 40, 50, 60]
    assert isinstance(results[7], ImageOutOfMemory)
    assert str(results[7]) == "out of memory: image 55x32 alone (6 tokens)"
    assert calls == [8, 4, 2, 2, 4, 2, 2, 1, 1]  # halves, then the failing pair one by one

    with pytest.raises(ValueError, match="shapes"):  # other errors are not swallowed
        infer_splitting(lambda b: (_ for _ in ()).throw(ValueError("shapes")), images, patch=8)


@pytest.fixture(scope="module")
def predictor(model: str) -> Predictor:
    return load_predictor(model, batch_size=8)


def fail_when(monkeypatch, too_big) -> list[int]:
    """Make Predictor.infer raise out of memory for the batches `too_big` picks; returns
    the sizes of the batches tried."""
    real, tried = Predictor.infer, []

    def infer(self: Predictor, batch: np.ndarray):
        tried.append(len(batch))
        if too_big(batch):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")
        return real(self, batch)

    monkeypatch.setattr(Predictor, "infer", infer)
    return tried


def pictures(n: int, h: int = 40, w: int = 56) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_predict_splits_a_batch_out_of_memory(predictor: Predictor, monkeypatch) -> None:
    images = pictures(6)
    expected = predictor.predict(images)
    tried = fail_when(monkeypatch, lambda batch: len(batch) > 2)
    got = predictor.predict(images)
    assert tried == [6, 3, 1, 2, 3, 1, 2]  # halves of halves until each call holds <= 2
    for a, b in zip(expected, got):
        assert np.allclose(a.prob, b.prob, atol=1e-5)

    fail_when(monkeypatch, lambda batch: True)
    with pytest.raises(ImageOutOfMemory, match=r"out of memory: image 56x40 alone \(\d+ tokens\)"):
        predictor.predict(images[:1])


def test_tokencut_splits_a_batch_whose_eigen_solve_runs_out_of_memory(model: str, monkeypatch) -> None:
    """cuSOLVER failing to allocate in TokenCut's batched eigh takes the halve-and-retry path
    of a CUDA out-of-memory (issue 21), with the same results as without the failure."""
    import sempart_core.tokencut as tokencut

    predictor = load_predictor(model, method="tokencut", batch_size=8)
    images = pictures(6)
    expected = predictor.predict(images)
    real_eigh, sizes = torch.linalg.eigh, []

    def eigh(matrix):
        sizes.append(len(matrix))
        if len(matrix) > 2:
            raise torch.linalg.LinAlgError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling "
                                           "`cusolverDnXsyevd_bufferSize(...)`")
        return real_eigh(matrix)

    monkeypatch.setattr(tokencut.torch.linalg, "eigh", eigh)
    got = predictor.predict(images)
    assert sizes == [6, 3, 1, 2, 3, 1, 2]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.prob, b.prob)


def decoded_block(predictor: Predictor, images: list[np.ndarray]) -> pa.Table:
    """Rows as the decode stage yields them (one failed decode among them)."""
    rows = []
    for i, rgb in enumerate(images):
        prepared = np.ascontiguousarray(predictor.prepare(rgb))
        rows.append({"row": i, "image_id": f"id{i}", "uri": f"mem://{i}", "width": rgb.shape[1],
                     "height": rgb.shape[0], "in_h": prepared.shape[0], "in_w": prepared.shape[1],
                     "pixels": prepared.tobytes()})
    rows.append({"row": len(images), "image_id": "bad", "uri": "mem://bad", "error": "NotAnImageError: text"})
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def test_label_actor_gives_an_error_row_only_to_an_image_out_of_memory_alone(
    predictor: Predictor, model: str, monkeypatch
) -> None:
    images = pictures(5) + [np.full((40, 224, 3), 200, np.uint8)]  # the last one: wider, its own shape
    block = decoded_block(predictor, images)
    actor = Infer(model, model_id=read_artifact_info(model).model_id, device="cpu", batch_size=8)
    clean = actor(block).to_pylist()

    tried = fail_when(monkeypatch, lambda batch: len(batch) > 2)
    rows = actor(block).to_pylist()
    assert [r["error"] for r in rows] == [None] * 6 + ["NotAnImageError: text"]
    assert same_probs(rows, clean)
    assert sorted(tried) == [1, 1, 2, 2, 3, 5]  # five 40x56 images: 5 -> 2 + 3, 3 -> 1 + 2; the wide one alone

    wide = images[-1]
    fail_when(monkeypatch, lambda batch: batch.shape[2] > 100)  # only the wide input runs out of memory
    rows = actor(block).to_pylist()
    assert [r["error"] is None for r in rows] == [True] * 5 + [False, False]
    assert rows[5]["error"] == f"out of memory: image 224x40 alone ({tokens_of(*predictor.prepare(wide).shape[:2], 16):,} tokens)"
    assert rows[5]["prob"] is None and same_probs(rows[:5], clean[:5])


def same_probs(rows: list[dict], expected: list[dict]) -> bool:
    def prob(r: dict) -> np.ndarray:
        return np.frombuffer(r["prob"], np.float32) if r["prob"] is not None else np.zeros(0, np.float32)

    return all(np.allclose(prob(a), prob(b), atol=1e-5) and len(prob(a)) == len(prob(b)) for a, b in zip(rows, expected))


def test_label_actor_keeps_the_token_budget(predictor: Predictor, model: str, monkeypatch) -> None:
    images = pictures(6)
    per_image = tokens_of(*predictor.prepare(images[0]).shape[:2], predictor.patch)
    actor = Infer(model, model_id=read_artifact_info(model).model_id, device="cpu", batch_size=8,
                  max_batch_tokens=2 * per_image)
    tried = fail_when(monkeypatch, lambda batch: False)
    rows = actor(decoded_block(predictor, images)).to_pylist()
    assert tried == [2, 2, 2] and all(r["prob"] is not None for r in rows[:6])
