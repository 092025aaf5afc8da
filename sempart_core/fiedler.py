"""Fiedler vectors of many graphs at once: a batched block eigen-solver (LOBPCG).

TokenCut and MaskCut need one eigenvector per cut, the second smallest of the
generalised problem ``(D - W) x = lambda D x``. A dense ``eigh`` computes all N of them
(O(N^3) per image, and scipy's ``eigh(..., subset_by_index=[1, 2])`` still reduces the
whole matrix to tridiagonal form); ``torch.lobpcg`` finds a few but solves one matrix
per call. Here the images of one model call are solved together, as one stack of
graphs (a `Graph`: anything that gives degrees and products W v), with the locally
optimal block preconditioned conjugate gradient method (Knyazev 2001) on the
normalised Laplacian

    L = I - D^-1/2 W D^-1/2,   x = D^-1/2 v,

whose smallest eigenvector ``sqrt(d)`` is known and projected out, so the smallest
eigenpair left is the Fiedler pair. Each iteration costs one product of every graph
with a block of ``block`` vectors: a batched matrix product whose cost is set by
reading W once, so a block of a few vectors costs about what one does; a block of 4
converged in 7 to 10 iterations on ViT-S/8 graphs at 320 px (docs/method.md).

Float64 throughout: the split at the mean must land
where a float64 dense solver puts it. Numerically robust form: the search directions
are orthonormalised against the current vectors (twice, classical Gram-Schmidt), the
Rayleigh-Ritz step runs on an orthonormal basis, and the conjugate directions are
orthonormal combinations of that basis (Hetmaniuk and Lehoucq 2006; Duersch et al.
2018), so no Gram matrix is ever inverted. Each graph's result is taken when its
residual first falls below ``tol`` (or at ``max_iter``), whatever the other graphs in
the batch do, so a batch gives what its images give alone.

Small graphs (a few hundred nodes) are as fast with a dense ``eigh``, which is exact:
``fiedler`` picks the solver by size, ``dense_fiedler`` is the dense one (TokenCut's).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class Graph(Protocol):
    """What the solver needs of a stack of B graphs on N nodes (float64 on one device)."""

    def degree(self) -> torch.Tensor:
        """d = W 1, [B, N]."""

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        """W v for v [B, N, k]."""

    def dense(self) -> torch.Tensor:
        """W itself, [B, N, N]."""

    def __getitem__(self, index: torch.Tensor) -> "Graph":
        """The graphs at ``index`` (a bool mask or indices over B)."""


class DenseGraph:
    """A `Graph` held as its matrix W [B, N, N]."""

    def __init__(self, W: torch.Tensor):
        self.W = W.to(torch.float64)

    def degree(self) -> torch.Tensor:
        return self.W.sum(-1)

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return self.W @ v

    def dense(self) -> torch.Tensor:
        return self.W

    def __getitem__(self, index: torch.Tensor) -> "DenseGraph":
        return DenseGraph(self.W[index])


@dataclass
class FiedlerResult:
    """Fiedler vectors of a stack of graphs.

    ``vector`` [B, N] float64: x with ``x^T D x = 1``, its largest-magnitude entry
    positive (an eigenvector has no sign of its own; this one makes results
    reproducible). ``values`` [B, k]: the smallest eigenvalues of L after 0
    (``values[:, 0]`` is lambda_2; from LOBPCG the others are Ritz values, upper
    estimates). ``basis`` [B, N, k]: their eigenvectors of L (v = D^1/2 x), a start
    for a graph that differs a little. ``residual`` [B]: ``||L v - lambda_2 v||`` for
    unit v (0 when dense).
    """

    vector: torch.Tensor
    values: torch.Tensor
    basis: torch.Tensor
    residual: torch.Tensor
    iterations: int


def _canonical_sign(x: torch.Tensor) -> torch.Tensor:
    """x with its largest-magnitude entry positive, per row."""
    peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    return x * torch.where(peak < 0, -1.0, 1.0).to(x.dtype)


def fiedler(graph: Graph | torch.Tensor, *, block: int = 4, dense_max_nodes: int = 256, tol: float = 1e-9,
            max_iter: int = 100, grid: tuple[int, int] | None = None,
            start: torch.Tensor | None = None) -> FiedlerResult:
    """Fiedler vectors of a `Graph` (or of W [B, N, N]), each as exact as a dense solver's.

    Graphs of up to ``dense_max_nodes`` nodes use ``dense_fiedler``; larger ones
    ``fiedler_lobpcg``, and the few it leaves above ``tol`` after ``max_iter``
    iterations (graphs split into many nearly separate parts, whose smallest eigenvalues
    crowd within ~1e-4 of each other) are solved again densely.
    """
    if isinstance(graph, torch.Tensor):
        graph = DenseGraph(graph)
    if graph.degree().shape[-1] <= dense_max_nodes:
        return dense_fiedler(graph.dense(), block=block)
    result = fiedler_lobpcg(graph, block=block, tol=tol, max_iter=max_iter, grid=grid, start=start)
    slow = (result.residual >= tol).nonzero().flatten()
    if slow.numel():
        logger.debug("LOBPCG left %d graph(s) above tol %.1e: dense eigh for those", slow.numel(), tol)
        dense = dense_fiedler(graph[slow].dense(), block=result.values.shape[-1])
        result.vector[slow], result.values[slow], result.residual[slow] = dense.vector, dense.values, dense.residual
        result.basis[slow] = dense.basis
    return result


def dense_fiedler(W: torch.Tensor, *, block: int = 1, compute_dtype: torch.dtype = torch.float64) -> FiedlerResult:
    """Fiedler vectors of W [B, N, N] from a full ``torch.linalg.eigh`` of L.

    Float64 by default: on graphs with nearly separate parts the two smallest
    eigenvalues differ by about ``eps`` and float32 would mix their eigenvectors.
    """
    Wd = W.to(compute_dtype)
    inv_sqrt_d = Wd.sum(-1).rsqrt()  # [B, N]
    normalised = Wd * inv_sqrt_d.unsqueeze(-1) * inv_sqrt_d.unsqueeze(-2)
    laplacian = torch.eye(Wd.shape[-1], dtype=compute_dtype, device=Wd.device) - normalised
    values, vectors = torch.linalg.eigh(_symmetric(laplacian))  # ascending
    vector = _canonical_sign(vectors[..., 1] * inv_sqrt_d)
    residual = torch.zeros(Wd.shape[0], dtype=compute_dtype, device=Wd.device)
    return FiedlerResult(vector, values[:, 1 : 1 + block], vectors[..., 1 : 1 + block], residual, 0)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def _project_out(x: torch.Tensor, bases: list[torch.Tensor]) -> torch.Tensor:
    """x minus its components in the orthonormal ``bases``, twice (CGS2)."""
    for _ in range(2):
        for q in bases:
            x = x - q @ (q.mT @ x)
    return x


def _initial_block(n: int, block: int, grid: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """Deterministic start vectors [N, block], the same on every device.

    On a patch grid the Fiedler vector is mostly smooth, so the first vectors are the
    lowest cosine modes of the grid; a fixed pseudo-random part keeps every eigenvector
    represented. Generated on the CPU, so a GPU starts from the same numbers.
    """
    gen = torch.Generator().manual_seed(0)
    start = torch.rand(n, block, generator=gen, dtype=torch.float64) - 0.5
    if grid is not None and grid[0] * grid[1] == n:
        h, w = grid
        rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
        cols = torch.arange(w, dtype=torch.float64).repeat(h)
        modes = [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2)]
        for j, (a, b) in enumerate(modes[: max(0, block - 1)]):
            smooth = torch.cos(torch.pi * a * (rows + 0.5) / h) * torch.cos(torch.pi * b * (cols + 0.5) / w)
            start[:, j] = smooth + 0.1 * start[:, j]
    return start.to(device)


def fiedler_lobpcg(
    graph: Graph | torch.Tensor,
    *,
    block: int = 4,
    tol: float = 1e-9,
    max_iter: int = 100,
    grid: tuple[int, int] | None = None,
    start: torch.Tensor | None = None,
) -> FiedlerResult:
    """Fiedler vectors of a `Graph` (or of W [B, N, N], symmetric, positive degrees) by LOBPCG.

    ``block`` vectors are iterated per graph (at least 1, at most (N - 1) // 3 so that
    the search space fits); ``tol`` bounds the residual norm of the Fiedler pair (unit
    v), ``max_iter`` the iterations (``residual`` tells which graphs stayed above
    ``tol``). The start is ``start`` [B, N, block] (a previous ``basis``) when given,
    else a deterministic block shaped by the patch ``grid`` (h, w).
    """
    if isinstance(graph, torch.Tensor):
        if graph.ndim != 3 or graph.shape[1] != graph.shape[2]:
            raise ValueError(f"fiedler_lobpcg expects W [B, N, N], got {tuple(graph.shape)}")
        graph = DenseGraph(graph)
    d = graph.degree()
    n_graphs, n = d.shape
    if n < 4:
        raise ValueError(f"fiedler_lobpcg needs at least 4 nodes, got {n}")
    block = max(1, min(block, (n - 1) // 3))
    if start is None or start.shape != (n_graphs, n, block):
        start = _initial_block(n, block, grid, d.device).expand(n_graphs, n, block)
    vector = torch.empty(n_graphs, n, dtype=torch.float64, device=d.device)
    values = torch.empty(n_graphs, block, dtype=torch.float64, device=d.device)
    basis = torch.empty(n_graphs, n, block, dtype=torch.float64, device=d.device)
    residual = torch.empty(n_graphs, dtype=torch.float64, device=d.device)
    state = _Lobpcg(graph, d, start)
    active = torch.arange(n_graphs, device=d.device)  # graph of each row of the state
    pending = torch.ones(n_graphs, dtype=torch.bool, device=d.device)  # rows not yet recorded
    iterations = 0
    while True:
        res = state.residual_norms()
        done = pending & ((res < tol) if iterations < max_iter else torch.ones_like(pending))
        if bool(done.any()):  # record each graph when it first converges
            idx = active[done]
            vector[idx] = state.X[done][..., 0] * state.inv_sqrt_d[done][..., 0]
            values[idx], basis[idx], residual[idx] = state.theta[done], state.X[done], res[done]
            pending = pending & ~done
            if not bool(pending.any()):
                break
            # Dropping rows copies the graphs: only once half of them are finished.
            if 2 * int(pending.sum()) <= pending.numel():
                state.keep(pending)
                active, pending = active[pending], pending[pending]
        state.step()
        iterations += 1
    return FiedlerResult(_canonical_sign(vector), values, basis, residual, iterations)


class _Lobpcg:
    """The iteration state of the graphs still running: X (Ritz vectors of L), L X,
    and the conjugate directions P with L P, all [b, N, block]."""

    def __init__(self, graph: Graph, degree: torch.Tensor, start: torch.Tensor):
        self.graph = graph
        self.inv_sqrt_d = degree.rsqrt().unsqueeze(-1)  # [b, N, 1]
        trivial = degree.sqrt().unsqueeze(-1)
        self.trivial = trivial / trivial.norm(dim=1, keepdim=True)  # eigenvalue 0, projected out
        X = _orthonormal(_project_out(start, [self.trivial]))
        LX = self.apply(X)
        self.theta, C = torch.linalg.eigh(_symmetric(X.mT @ LX))
        self.X, self.LX = X @ C, LX @ C
        self.P: torch.Tensor | None = None
        self.LP: torch.Tensor | None = None

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """L v = v - D^-1/2 W D^-1/2 v."""
        return v - self.inv_sqrt_d * self.graph.matmul(self.inv_sqrt_d * v)

    def residual_norms(self) -> torch.Tensor:
        return (self.LX[..., 0] - self.X[..., 0] * self.theta[:, :1]).norm(dim=-1)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the rows where ``mask`` is True."""
        self.graph = self.graph[mask]
        for name in ("inv_sqrt_d", "trivial", "theta", "X", "LX", "P", "LP"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[mask])

    def step(self) -> None:
        block = self.X.shape[-1]
        R = self.LX - self.X * self.theta.unsqueeze(1)
        known = [self.trivial, self.X] + ([self.P] if self.P is not None else [])
        Wdir = _orthonormal(_project_out(R, known))
        Wdir = _orthonormal(_project_out(Wdir, known))  # R may be tiny: orthonormalise again
        S = torch.cat([self.X, Wdir] + ([self.P] if self.P is not None else []), dim=-1)
        LS = torch.cat([self.LX, self.apply(Wdir)] + ([self.LP] if self.LP is not None else []), dim=-1)
        theta, C = torch.linalg.eigh(_symmetric(S.mT @ LS))
        Cx = C[..., :block]
        # Conjugate directions: the new vectors' part outside the old X, made orthogonal
        # to the new X inside the (orthonormal) coefficient space.
        Cp = Cx.clone()
        Cp[:, :block] = 0.0
        Cp = _orthonormal(Cp - Cx @ (Cx.mT @ Cp))
        self.X, self.LX, self.theta = S @ Cx, LS @ Cx, theta[..., :block]
        self.P, self.LP = S @ Cp, LS @ Cp


def _symmetric(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)
