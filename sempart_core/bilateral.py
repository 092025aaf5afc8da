"""The bilateral solver (Barron and Poole, ECCV 2016), as TokenCut uses it to refine masks.

This is the post-inference refinement that SEMPART's fine branch replaces: TokenCut's
patch-level mask is snapped to the image's colour edges by solving, in a coarse
"bilateral grid" over (x, y, luma, chroma u, chroma v),

    minimise  lam * sum_ij  B_ij (s_i - s_j)^2  +  sum_i c_i (s_i - t_i)^2

where t is the target mask, c its confidence and B the grid's blur between neighbouring
vertices, made bistochastic so that a constant target gives a constant result. Pixels are
splatted onto grid vertices (S), the linear system is solved there with conjugate
gradients and a Jacobi preconditioner, and the result is sliced back (S^T). Defaults are
those of TokenCut's saliency evaluation (``unsupervised_saliency_detection``): sigmas
16 / 16 / 8, lambda 256, confidence 0.999, 25 CG iterations at tolerance 1e-5.
Numpy/scipy on the CPU, as in TokenCut; scipy is imported where used, as this module is
imported wherever postprocess is (see there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ITU-R BT.601 full-range RGB -> YUV (JPEG's YCbCr), chroma centred on 128.
_RGB_TO_YUV = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
])
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])
_BISTOCHASTIC_ITERATIONS = 10


@dataclass(frozen=True)
class BilateralConfig:
    sigma_spatial: float = 16.0  # pixels per grid cell in x and y
    sigma_luma: float = 16.0  # luma levels per cell
    sigma_chroma: float = 8.0  # chroma levels per cell
    lam: float = 256.0  # smoothness against fidelity to the target
    confidence: float = 0.999  # the target's confidence, the same at every pixel
    cg_tol: float = 1e-5
    cg_maxiter: int = 25
    diag_min: float = 1e-5  # floor of the Jacobi preconditioner's diagonal


class BilateralGrid:
    """Splat, blur and slice operators of one image's bilateral grid."""

    def __init__(self, rgb: np.ndarray, config: BilateralConfig):
        from scipy import sparse

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"bilateral grid needs an RGB image [H, W, 3], got {rgb.shape}")
        h, w = rgb.shape[:2]
        yuv = rgb.reshape(-1, 3).astype(np.float64) @ _RGB_TO_YUV.T + _YUV_OFFSET
        rows, cols = np.divmod(np.arange(h * w), w)
        coords = np.column_stack([
            cols / config.sigma_spatial,
            rows / config.sigma_spatial,
            yuv[:, 0] / config.sigma_luma,
            yuv[:, 1:] / config.sigma_chroma,
        ])
        coords = np.floor(coords).astype(np.int64)
        coords -= coords.min(axis=0) - 1  # >= 1, so neighbours at -1 stay >= 0
        self._radix = coords.max(axis=0) + 2  # neighbours at +1 stay below the radix
        keys = self._key(coords)
        vertex_keys, first, pixel_vertex = np.unique(keys, return_index=True, return_inverse=True)
        self.n_pixels = h * w
        self.n_vertices = len(vertex_keys)
        self.dim = coords.shape[1]
        # S [vertices, pixels]: each pixel adds into its vertex.
        self.splat_matrix = sparse.csr_matrix(
            (np.ones(self.n_pixels), (pixel_vertex.ravel(), np.arange(self.n_pixels))),
            shape=(self.n_vertices, self.n_pixels),
        )
        vertex_coords = coords[first]
        neighbours = sparse.csr_matrix((self.n_vertices, self.n_vertices))
        for axis in range(self.dim):
            for step in (-1, 1):
                moved = vertex_coords.copy()
                moved[:, axis] += step
                found, where = self._lookup(vertex_keys, self._key(moved))
                neighbours = neighbours + sparse.csr_matrix(
                    (np.ones(len(found)), (found, where)), shape=(self.n_vertices, self.n_vertices)
                )
        # [1 2 1] blur along each grid dimension, the centre counted once per dimension.
        self.blur_matrix = (2 * self.dim * sparse.identity(self.n_vertices) + neighbours).tocsr()

    def _key(self, coords: np.ndarray) -> np.ndarray:
        """One int64 per grid cell (mixed radix over the dimensions)."""
        key = np.zeros(len(coords), dtype=np.int64)
        for axis in range(coords.shape[1]):
            key = key * self._radix[axis] + coords[:, axis]
        return key

    @staticmethod
    def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices of `keys` present in `sorted_keys`, and their positions there."""
        pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
        found = np.flatnonzero(sorted_keys[pos] == keys)
        return found, pos[found]

    def splat(self, values: np.ndarray) -> np.ndarray:
        return self.splat_matrix @ values

    def slice(self, values: np.ndarray) -> np.ndarray:
        return self.splat_matrix.T @ values

    def blur(self, values: np.ndarray) -> np.ndarray:
        return self.blur_matrix @ values


def _bistochastize(grid: BilateralGrid) -> tuple[np.ndarray, np.ndarray]:
    """Vertex scalings n and masses m with n * blur(n) = m = pixel count per vertex."""
    m = grid.splat(np.ones(grid.n_pixels))
    n = np.ones(grid.n_vertices)
    for _ in range(_BISTOCHASTIC_ITERATIONS):
        n = np.sqrt(n * m / grid.blur(n))
    return n, n * grid.blur(n)


def bilateral_solve(rgb: np.ndarray, target: np.ndarray, config: BilateralConfig = BilateralConfig()) -> np.ndarray:
    """Edge-aware smoothing of `target` [H, W] guided by `rgb` [H, W, 3]: float64 [H, W]."""
    target = np.asarray(target, dtype=np.float64)
    if target.shape != np.asarray(rgb).shape[:2]:
        raise ValueError(f"target {target.shape} and image {np.asarray(rgb).shape[:2]} differ in size")
    from scipy import sparse
    from scipy.sparse.linalg import cg

    grid = BilateralGrid(rgb, config)
    n, m = _bistochastize(grid)
    confidence = np.full(grid.n_pixels, config.confidence)
    weighted = target.ravel() * confidence
    n_diag = sparse.diags(n)
    smooth = sparse.diags(m) - n_diag @ grid.blur_matrix @ n_diag
    data_weight = grid.splat(confidence)
    system = (config.lam * smooth + sparse.diags(data_weight)).tocsr()
    rhs = grid.splat(weighted)
    preconditioner = sparse.diags(1.0 / np.maximum(system.diagonal(), config.diag_min))
    start = rhs / data_weight
    solution, _ = cg(system, rhs, x0=start, M=preconditioner, maxiter=config.cg_maxiter, rtol=config.cg_tol)
    return grid.slice(solution).reshape(target.shape)


def refine_mask(rgb: np.ndarray, mask: np.ndarray, config: BilateralConfig = BilateralConfig()) -> np.ndarray:
    """TokenCut + BS: a binary mask [H, W] snapped to `rgb`'s edges, float32 in [0, 1].

    The solver's soft output is what TokenCut scores (its ``output_solver``); it can
    overshoot [0, 1] slightly and is clipped so that it reads as a probability map.
    """
    soft = bilateral_solve(rgb, np.asarray(mask, dtype=np.float64), config)
    return np.clip(soft, 0.0, 1.0).astype(np.float32)
