"""High-dimensional Gaussian filtering on the permutohedral lattice (Adams, Baek & Davis, "Fast High-Dimensional
Filtering Using the Permutohedral Lattice", Eurographics 2010), in vectorised torch on any device.

For points with features f_i (N x d, already divided by the kernel's standard deviations) and values v_i,
`PermutohedralLattice(f).filter(v)` approximates out_i = s sum_j exp(-|f_i - f_j|^2 / 2) v_j, where the
overall scale s is nearly constant (a normalisation by the filtered ones removes it). The approximation:

1. Features are multiplied by sqrt(2/3) (d + 1) (the scaling of the paper's section 3.1, as in Kraehenbuehl's
   dense-CRF code) and elevated onto the hyperplane sum_k x_k = 0 of R^(d+1) by the paper's matrix E, whose
   column k (k < d) is k + 1 ones, then -(k + 1), then zeros, divided by sqrt((k + 1)(k + 2)).
2. Each elevated point lies in one simplex of the lattice A*_d (integer points whose coordinates are all
   congruent modulo d + 1). Its remainder-0 vertex is the coordinate-wise rounding to multiples of d + 1,
   corrected by the sum of the rounded coordinates; the ranks of the residuals (elevated - vertex) give the
   other d vertices (vertex r adds r to coordinates of rank <= d - r and r - (d + 1) to the others), and the
   sorted residuals give the barycentric weights.
3. Splat: each value is added to its d + 1 vertices with its barycentric weights. Blur: along each of the d + 1
   lattice directions u_k = (d + 1) e_k - 1, every lattice point adds half of each neighbour's value
   (a [1/2, 1, 1/2] kernel; a neighbour missing from the lattice counts as zero). Slice: each point reads its
   vertices back with the same weights, times 1 / (1 + 2^-d) (Kraehenbuehl's constant).

Lattice points are identified by integer keys (their first d coordinates, the last being minus their sum,
plus an image index as the most significant digit), deduplicated with `torch.unique`; a point's blur
neighbours are looked up in the sorted keys with `torch.searchsorted`. Points of different images never
share lattice points, so one lattice filters a batch of images at once, each as if alone. Splat, each blur
and slice are stored as sparse CSR matrices, so a filter is d + 3 sparse-dense products (no atomic scatter).
This reproduces the filter of Kraehenbuehl's code (pydensecrf) to float32 round-off.
"""

import math
from typing import Optional

import torch

INT64_MAX = 2**63 - 1


class PermutohedralLattice:
    """The lattice of N points with features (N x d float), built once and applied to any number of values.

    `image_index` (N integers >= 0, default all 0) keeps the points of different images apart: they are
    filtered together but never mix. Raises ValueError where the integer keys would not fit in int64 (features
    spanning too wide a range, in units of their standard deviations, for the number of images).
    """

    def __init__(self, features: torch.Tensor, image_index: Optional[torch.Tensor] = None):
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be N x d with N, d >= 1, got {tuple(features.shape)}")
        points, dims = features.shape
        if image_index is None:
            image_index = torch.zeros(points, dtype=torch.long, device=features.device)
        elif image_index.shape != (points,):
            raise ValueError(f"image_index must have one entry per point ({points}), got {tuple(image_index.shape)}")
        elevated = elevate(features.float())
        vertex_zero, rank = enclosing_simplex(elevated)
        weights = barycentric_weights(elevated, vertex_zero, rank)
        keys, strides = vertex_keys(vertex_zero, rank, image_index.long())
        keys, offsets = torch.unique(keys, sorted=True, return_inverse=True)
        self.size = keys.numel()
        self.splat = splat_matrix(offsets, weights, self.size)
        everywhere = torch.ones_like(offsets, dtype=torch.bool)
        self.slice = row_matrix(offsets, weights / (1 + 2.0**-dims), everywhere, self.size)
        self.blurs = [blur_matrix(keys, step) for step in direction_steps(strides)]

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian-filter values (N x C) over the points: splat, blur, slice; returns N x C float32 (also inside an
        autocast region, which the sparse products do not support)."""
        if values.shape[0] != self.slice.shape[0]:
            raise ValueError(f"values have {values.shape[0]} rows for {self.slice.shape[0]} points")
        with torch.autocast(values.device.type, enabled=False):
            lattice = self.splat @ values.float()
            for blur in self.blurs:
                lattice = blur @ lattice
            return self.slice @ lattice


def elevate(features: torch.Tensor) -> torch.Tensor:
    """Scaled features (N x d) projected onto the hyperplane sum x = 0 of R^(d+1) (the paper's E, section 3.1):
    with c_k = f_k sqrt(2/3) (d + 1) / sqrt((k + 1)(k + 2)), x_0 = sum_k c_k and x_j = sum_{k >= j} c_k - j c_(j-1)."""
    dims = features.shape[1]
    k = torch.arange(dims, device=features.device, dtype=features.dtype)
    scaled = features * (math.sqrt(2.0 / 3.0) * (dims + 1) / torch.sqrt((k + 1) * (k + 2)))
    suffix_sums = torch.cat([scaled.flip(1).cumsum(1).flip(1), scaled.new_zeros(scaled.shape[0], 1)], dim=1)
    lowered = torch.cat([scaled.new_zeros(scaled.shape[0], 1), (k + 1) * scaled], dim=1)
    return suffix_sums - lowered


def enclosing_simplex(elevated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The remainder-0 vertex (N x d+1, int64) of each elevated point's simplex and the rank of each coordinate's
    residual (0 = largest; ties go to the lower index), as in the paper's section 3.1."""
    dims = elevated.shape[1] - 1
    vertex_zero = torch.round(elevated / (dims + 1)) * (dims + 1)
    residual = elevated - vertex_zero
    larger = residual[:, None, :] > residual[:, :, None]
    tied_before = (residual[:, None, :] == residual[:, :, None]).tril(diagonal=-1)
    rank = (larger | tied_before).sum(dim=2)
    # A vertex_zero off the hyperplane (coordinate sum s (d + 1), s != 0) shifts every rank by s; wrap around.
    rank += (vertex_zero.sum(dim=1, keepdim=True) / (dims + 1)).round().long()
    below, above = rank < 0, rank > dims
    rank += (dims + 1) * (below.long() - above.long())
    vertex_zero += (dims + 1) * (below.float() - above.float())
    return vertex_zero.long(), rank


def barycentric_weights(elevated: torch.Tensor, vertex_zero: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Weights (N x d+1) of the simplex vertices by remainder (the paper's section 3.1): with the residuals
    y = (elevated - vertex_zero) / (d + 1), b[d - rank_k] += y_k, b[d - rank_k + 1] -= y_k, b_0 += 1 + b_(d+1)."""
    points, width = elevated.shape
    dims = width - 1
    residual = (elevated - vertex_zero) / (dims + 1)
    weights = residual.new_zeros(points, dims + 2)
    weights.scatter_add_(1, dims - rank, residual)
    weights.scatter_add_(1, dims - rank + 1, -residual)
    weights[:, 0] += 1 + weights[:, dims + 1]
    return weights[:, : dims + 1]


def vertex_keys(
    vertex_zero: torch.Tensor, rank: torch.Tensor, image_index: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """int64 keys (N x d+1) of each point's simplex vertices by remainder, and the strides of the d coordinates.

    Vertex r is vertex_zero + r - (d + 1) [rank + r > d] (the paper's canonical simplex), so its coordinates lie
    within d of vertex_zero's, and a blur neighbour's within 2 d. A key is the mixed-radix number of the first d
    coordinates (the last is minus their sum), each shifted to start at 0 with that margin, with the image
    index as the most significant digit; it is computed without listing the vertices' coordinates, as the key
    of vertex_zero plus r times the sum of the strides minus (d + 1) times the strides of the coordinates whose
    rank is at least d + 1 - r. Raises ValueError if the largest key would overflow int64.
    """
    points, width = vertex_zero.shape
    dims = width - 1
    low = vertex_zero[:, :dims].amin(dim=0) - 2 * dims
    strides = [1]
    for span in (vertex_zero[:, :dims].amax(dim=0) - low + 2 * dims + 1).tolist():
        strides.append(strides[-1] * span)
    images = int(image_index.max()) + 1
    if strides[-1] * images - 1 > INT64_MAX:
        raise ValueError(
            f"permutohedral lattice keys overflow int64: {images} image(s) x {strides[-1]} key values; "
            "filter fewer images at once or use features spanning fewer standard deviations"
        )
    coordinate_strides = torch.tensor(strides[:dims], device=vertex_zero.device)
    base = ((vertex_zero[:, :dims] - low) * coordinate_strides).sum(dim=1) + image_index * strides[dims]
    by_rank = vertex_zero.new_zeros(points, width).scatter_(1, rank[:, :dims], coordinate_strides.expand(points, dims))
    rank_at_least = by_rank.flip(1).cumsum(dim=1)  # column m: strides of coordinates of rank >= d - m
    wrapped = torch.cat([by_rank.new_zeros(points, 1), rank_at_least[:, :dims]], dim=1)
    remainders = torch.arange(width, device=vertex_zero.device)
    return base[:, None] + remainders * sum(strides[:dims]) - (dims + 1) * wrapped, strides[:dims]


def direction_steps(strides: list[int]) -> list[int]:
    """Key differences of the d + 1 lattice directions u_k = (d + 1) e_k - 1: on the first d coordinates, -1
    everywhere but d at k (k < d), or -1 everywhere (k = d)."""
    all_minus_one = -sum(strides)
    return [all_minus_one + (len(strides) + 1) * stride for stride in strides] + [all_minus_one]


def blur_matrix(keys: torch.Tensor, step: int) -> torch.Tensor:
    """The blur along one lattice direction as an M x M matrix: 1 on the diagonal and 1/2 for each neighbour
    key +- step present among the sorted lattice keys (found with searchsorted)."""
    size = keys.numel()
    own = torch.arange(size, device=keys.device)
    neighbours = torch.stack([keys - step, keys, keys + step], dim=1)
    position = torch.searchsorted(keys, neighbours).clamp_(max=size - 1)
    present = keys[position] == neighbours
    weights = torch.tensor([0.5, 1.0, 0.5], device=keys.device).expand(size, 3)
    return row_matrix(torch.where(present, position, own[:, None]), weights, present, size)


def splat_matrix(offsets: torch.Tensor, weights: torch.Tensor, size: int) -> torch.Tensor:
    """The M x N splat matrix from each point's d + 1 lattice points (offsets, N x d+1) and weights."""
    flat = offsets.flatten()
    order = torch.argsort(flat, stable=True)
    crow = torch.cat([flat.new_zeros(1), torch.bincount(flat, minlength=size).cumsum(0)])
    return csr(crow, order // offsets.shape[1], weights.flatten()[order], (size, len(offsets)))


def row_matrix(cols: torch.Tensor, weights: torch.Tensor, present: torch.Tensor, width: int) -> torch.Tensor:
    """A CSR matrix (R x width) whose row r holds weights[r, k] at columns cols[r, k] where present[r, k]
    (columns distinct within a row)."""
    cols, order = cols.sort(dim=1)
    weights, present = weights.gather(1, order), present.gather(1, order)
    crow = torch.cat([cols.new_zeros(1), present.sum(dim=1).cumsum(0)])
    return csr(crow, cols[present], weights[present], (len(cols), width))


def csr(crow: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from its row pointers and column-sorted entries; its product with a dense matrix is one sparse
    matrix multiplication (MKL on the CPU, cuSPARSE on CUDA) instead of an atomic scatter. Indices are int32
    where they fit, which those libraries take without a conversion per product."""
    if max(len(cols), *shape) <= torch.iinfo(torch.int32).max:
        crow, cols = crow.int(), cols.int()
    return torch.sparse_csr_tensor(crow, cols, weights, shape, check_invariants=False)
