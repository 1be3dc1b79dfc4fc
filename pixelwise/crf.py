"""Fully connected CRF refinement of per-pixel class probabilities (DeepLab v1/v2 post-processing).

Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials",
NIPS 2011. Every pair of pixels (i, j) is connected by the pairwise potential

    mu(x_i, x_j) * [ w1 * exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2)   (appearance)
                   + w2 * exp(-|p_i - p_j|^2 / 2 theta_gamma^2) ]                                  (smoothness)

with p the pixel position and I its RGB colour. Mean-field inference replaces the sum over all N^2
pairs by Gaussian filtering: the appearance kernel (5-D features x, y, r, g, b) is filtered with the
permutohedral lattice (Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral
Lattice", Eurographics 2010); the smoothness kernel (2-D, on the pixel grid) with a separable,
truncated exact Gaussian convolution, which is exact where pydensecrf is approximate and cheaper in
tensor operations. On a CPU with numba installed, `pixelwise.crf_compiled` runs the same algorithm
as compiled loops (there the smoothness kernel is a 2-D lattice, as pydensecrf's, from theta_gamma 2 on).

Conventions follow pydensecrf (the Python binding of Krähenbühl's densecrf v2), so that the two give
the same labels: features are ``x / sxy``, ``rgb / srgb`` and the kernel ``exp(-|f_i - f_j|^2 / 2)``;
the filtered sum includes ``j = i``; kernels are normalised symmetrically
(``D^-1/2 K D^-1/2 Q`` with ``D = diag(K 1)``, pydensecrf's default ``NORMALIZE_SYMMETRIC``); the unary
is ``-log(p)`` with ``p`` clipped at 1e-5 (``pydensecrf.utils.unary_from_softmax``). See docs/crf.md.

Typical use from logits and a uint8 image::

    probs = dense_crf(logits.softmax(1), image, **crf_kwargs("deeplab_vgg"))  # (B, K, H, W)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import ArgumentError, UserError

# pydensecrf.utils.unary_from_softmax clips probabilities here before taking -log
PROB_FLOOR = 1e-5
# the separable smoothness kernel is cut where exp(-r^2 / 2 sigma^2) < 3.4e-4 of its peak
_TRUNCATE_SIGMAS = 4.0
# compiled (pixelwise.crf_compiled), the smoothness kernel is a 2-D lattice from this theta_gamma on,
# an exact convolution below (there the lattice has more vertices than pixels and costs more)
_LATTICE_MIN_SXY = 2.0
# pixels refined at once on a CPU: one 480x360 image, or a batch of small ones (see dense_crf)
_CPU_CHUNK_PIXELS = 2**18


@dataclass(frozen=True)
class CRFParams:
    """The dense CRF's parameters (names as pydensecrf's; the papers' symbols in the comments).

    One value for the library, the configs, every command, the service and the weights' metadata
    (`to_dict` / `from_dict`). Presets: `CRF_PRESETS`, `CRFParams.preset(name, **overrides)`.
    """

    iterations: int = 10  # mean-field iterations (DeepLab: 10)
    bilateral_weight: float = 4.0  # w1, the appearance kernel's weight
    bilateral_sxy: float = 121.0  # theta_alpha, its spatial standard deviation (pixels)
    bilateral_srgb: float = 5.0  # theta_beta, its colour standard deviation (RGB levels)
    gaussian_weight: float = 3.0  # w2, the smoothness kernel's weight
    gaussian_sxy: float = 3.0  # theta_gamma, its standard deviation (pixels)

    def __post_init__(self) -> None:
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, numbers.Integral) or it < 0:
            raise ArgumentError("iterations", it, "must be an integer >= 0 (DeepLab uses 10)")
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if f.name.endswith("weight") and (not number or value < 0):
                raise ArgumentError(
                    f.name,
                    value,
                    "must be a number >= 0 (0 switches the kernel off); use compat for other label interactions",
                )
            if not f.name.endswith("weight") and (not number or value <= 0):
                raise ArgumentError(
                    f.name,
                    value,
                    "must be a positive number of pixels / RGB levels, e.g. 3 (smoothness) or 80 and 13 (appearance)",
                )

    @classmethod
    def preset(cls, name: str, **overrides: float | int) -> CRFParams:
        """A named preset of `CRF_PRESETS`, with `overrides` (field names) applied."""
        if name not in CRF_PRESETS:
            raise ArgumentError("preset", name, f"unknown CRF preset; choose one of {', '.join(CRF_PRESETS)}")
        return CRF_PRESETS[name].replace(**overrides)

    def replace(self, **changes: float | int) -> CRFParams:
        """A copy with some fields changed; an unknown name is an ArgumentError."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ArgumentError(unknown[0], changes[unknown[0]], f"not a CRF parameter; use one of {', '.join(names)}")
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict[str, float | int]:
        """Keyword arguments of `dense_crf` / `DenseCRF`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    to_dict = kwargs  # the metadata form is the keyword form

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CRFParams:
        """From `to_dict`'s form (weights metadata, JSON); unknown keys are an ArgumentError."""
        return cls().replace(**values)

    def name(self) -> str:
        """The preset this equals, else "custom" (for logs and reports)."""
        return next((n for n, p in CRF_PRESETS.items() if p == self), "custom")


CRF_PRESETS: dict[str, CRFParams] = {
    # DeepLab v1 (Chen et al., ICLR 2015), released VGG-16 LargeFOV setting:
    # w1=4, theta_alpha=121, theta_beta=5, w2=3, theta_gamma=3, 10 iterations
    "deeplab_vgg": CRFParams(10, 4.0, 121.0, 5.0, 3.0, 3.0),
    # DeepLab v2 (Chen et al., TPAMI 2017), released ResNet-101 setting:
    # w1=4, theta_alpha=67, theta_beta=3, w2=3, theta_gamma=1, 10 iterations
    "deeplab_resnet": CRFParams(10, 4.0, 67.0, 3.0, 3.0, 1.0),
    # pydensecrf's README example: addPairwiseGaussian(sxy=3, compat=3),
    # addPairwiseBilateral(sxy=80, srgb=13, compat=10); 5 iterations as in its inference example
    "pydensecrf": CRFParams(5, 10.0, 80.0, 13.0, 3.0, 3.0),
}


def crf_kwargs(preset: str, **overrides: float | int) -> dict[str, float | int]:
    """Keyword arguments of `dense_crf` / `DenseCRF` for a named preset, with `overrides` applied.

    Example: ``dense_crf(probs, image, **crf_kwargs("deeplab_vgg", iterations=5))``.
    """
    return CRFParams.preset(preset, **overrides).kwargs()


# --------------------------------------------------------------------------------------------------
# Permutohedral lattice (Adams, Baek & Davis 2010), following densecrf's permutohedral.cpp
# --------------------------------------------------------------------------------------------------


class PermutohedralLattice:
    """Approximate Gaussian filtering ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` in O(N d^2).

    Points are embedded in the hyperplane ``sum = 0`` of R^{d+1} (scaled so that the blur below has
    the right width), each point is splatted onto the d+1 vertices of its enclosing simplex with
    barycentric weights, the lattice values are blurred with [1 2 1]/2 along each of the d+1 lattice
    directions, and sliced back with the same weights. This follows densecrf's permutohedral.cpp
    step by step, so the results agree with pydensecrf to float rounding.

    densecrf finds vertices with a hash table; here the table is a sort: every vertex gets an int64
    key, equal keys are one vertex, and neighbours are found by ``searchsorted`` in the sorted keys.
    Points in the same simplex share all d+1 vertices, so simplices are deduplicated first and only
    their vertices are sorted. The lattice is stored as sparse CSR matrices (splat: vertices x points,
    one blur per direction: vertices x vertices, slice: points x vertices), so one build serves all
    mean-field iterations. Points of different groups (images of a batch) never share a vertex.
    Like densecrf, the result carries an overall scale (its "alpha" factor included) that the
    symmetric normalisation of the CRF cancels.

    Args:
        features: ``(P, d)`` float point features, already divided by their standard deviations.
        group: ``(P,)`` int64 group index (image of the batch) of every point, or None for one group.

    Shape:
        ``filter``: values ``(P, C)`` -> ``(P, C)``.
    """

    def __init__(self, features: torch.Tensor, group: torch.Tensor | None = None) -> None:
        num_points, d = features.shape
        device = features.device
        self.d = d
        self.num_points = num_points
        group = torch.zeros(num_points, dtype=torch.long, device=device) if group is None else group.long()
        num_groups = int(group.max()) + 1 if num_points else 1
        rounded, rank, bary = _simplices(features, d)
        simplex_of, vertex_of_simplex, unique_keys, block_sizes, codec = _vertices(
            rounded[:d].long(), rank[:d].long(), group, num_groups, d
        )
        num_vertices = unique_keys.numel()
        self.num_vertices = num_vertices
        index_dtype = torch.int32 if max(num_points, num_vertices) * (d + 1) < 2**31 else torch.long
        self._build_splat_slice(bary, simplex_of, vertex_of_simplex, index_dtype)
        self._blur = _blur_matrices(unique_keys, block_sizes, codec, d, index_dtype)
        self.set_point_scale(None, None)

    def _build_splat_slice(
        self, bary: torch.Tensor, simplex_of: torch.Tensor, vertex_of_simplex: torch.Tensor, index_dtype: torch.dtype
    ) -> None:
        """The splat (vertices x points) and slice (points x vertices) matrices' structure and weights."""
        d, num_points, num_vertices = self.d, self.num_points, self.num_vertices
        device = bary.device
        num_simplices = vertex_of_simplex.shape[1]
        vertex_of = vertex_of_simplex.to(index_dtype)[:, simplex_of]  # (d+1, P)
        # Sparse matrices in CSR form; int32 indices avoid a conversion on every product.
        # splat rows are vertices: each k's points sorted by vertex (stable: ascending columns)
        point_sorted = torch.cat([torch.sort(vertex_of[k], stable=True)[1] for k in range(d + 1)])  # (P*(d+1),)
        counts = torch.zeros(num_vertices, dtype=torch.long, device=device)
        counts.index_add_(
            0, vertex_of_simplex.reshape(-1), torch.bincount(simplex_of, minlength=num_simplices).repeat(d + 1)
        )
        self._splat_crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(index_dtype)
        self._splat_col = point_sorted.to(index_dtype)
        self._splat_point = point_sorted
        self._splat_bary = torch.gather(bary, 1, point_sorted.view(d + 1, num_points)).reshape(-1)
        # slice rows are points, columns their d+1 vertices; densecrf's "magic" 1 / (1 + 2^-d) scale
        self._slice_crow = torch.arange(0, num_points * (d + 1) + 1, d + 1, device=device, dtype=index_dtype)
        self._slice_col = vertex_of.T.reshape(-1)
        self._slice_bary = (bary.T / (1.0 + 2.0**-d)).reshape(-1)

    def set_point_scale(self, splat_scale: torch.Tensor | None, slice_scale: torch.Tensor | None) -> None:
        """Scale every point's value by ``splat_scale`` (P,) before splatting and by ``slice_scale`` after slicing."""
        splat_vals = self._splat_bary
        if splat_scale is not None:
            splat_vals = splat_vals * splat_scale[self._splat_point]
        slice_vals = self._slice_bary
        if slice_scale is not None:
            slice_vals = (slice_vals.view(self.num_points, -1) * slice_scale[:, None]).reshape(-1)
        n, m = self.num_points, self.num_vertices
        self._splat = _csr(self._splat_crow, self._splat_col, splat_vals, (m, n))
        self._slice = _csr(self._slice_crow, self._slice_col, slice_vals, (n, m))

    def filter(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussian-filter ``values`` (P, C) over the point features; returns (P, C), or adds it to ``out``."""
        lattice = self._splat @ values  # (M, C)
        for blur in self._blur:
            lattice = blur @ lattice
        if out is None:
            return self._slice @ lattice  # (P, C)
        return out.addmm_(self._slice, lattice)


def _simplices(features: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's enclosing simplex on the permutohedral lattice: the remainder-0 vertex (rounded,
    (d+1, P)), the coordinates' ranks ((d+1, P)) and the barycentric weights of its d+1 vertices."""
    num_points = features.shape[0]
    device = features.device
    f = features.float().T  # (d, P)
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)  # the lattice blur then has std 1 (Adams et al. p.6)
    cf = [f[i] * (inv_std / math.sqrt((i + 2) * (i + 1))) for i in range(d)]
    # Elevate onto the hyperplane (E in Adams et al. p.5): e_j = sum_{k>=j} cf_k - j cf_{j-1}.
    elevated = torch.empty(d + 1, num_points, device=device)
    suffix = torch.zeros(num_points, device=device)
    for j in range(d, 0, -1):
        elevated[j] = suffix - j * cf[j - 1]
        suffix = suffix + cf[j - 1]
    elevated[0] = suffix

    # Closest remainder-0 lattice point by rounding (half to even, as densecrf's SSE build) ...
    # Integers are kept in float32 (exact here) while they are per point: it vectorises best.
    rounded = torch.round(elevated * (1.0 / (d + 1)))  # (d+1, P): remainder-0 point / (d+1)
    diff = elevated - rounded * (d + 1)
    # ... and the simplex from the order of the remainders, counted pair by pair as densecrf does.
    rank = torch.zeros(d + 1, num_points, device=device)
    for i in range(d):
        for j in range(i + 1, d + 1):
            less = diff[i] < diff[j]
            rank[i] += less
            rank[j] += ~less
    rank += rounded.sum(0)
    # bring points whose rounded coordinates do not sum to 0 back onto the plane
    wrap = (rank < 0).float() - (rank > d).float()
    rank += wrap * (d + 1)
    rounded += wrap

    # Barycentric coordinates (p.10): vertex k of the simplex gets weight bary[k].
    v = (elevated - rounded * (d + 1)) * (1.0 / (d + 1))
    slot = (d - rank).long()
    bary = torch.zeros(d + 2, num_points, device=device)
    bary.scatter_add_(0, slot, v)
    bary.scatter_add_(0, slot + 1, -v)
    bary[0] += 1.0 + bary[d + 1]
    bary = bary[: d + 1]  # (d+1, P)
    return rounded, rank, bary


def _vertices(
    base: torch.Tensor, rank: torch.Tensor, group: torch.Tensor, num_groups: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, _MixedRadix]:
    """The lattice vertices the points touch: each point's simplex id, each simplex's d+1 vertex ids,
    the vertices' sorted keys, the number of vertices of each remainder, and the key codec."""
    device = base.device
    # Deduplicate simplices: (group, base_i, rank_i for i < d) fixes all d+1 vertices.
    simplex_codec = _MixedRadix([num_groups] + [_span(base[i]) for i in range(d)] + [(0, d)] * d)
    simplex_keys = simplex_codec.encode([group] + list(base) + list(rank))  # (P,)
    simplex_of, first = _unique(simplex_keys)  # (P,), (U,)
    num_simplices = first.numel()
    base_u, rank_u, group_u = base[:, first], rank[:, first], group[first]  # (d, U), (d, U), (U,)

    # Vertex k of a simplex: coordinates (d+1) * base_i + canonical_k(rank_i), all congruent to k
    # mod (d+1), with canonical_k(r) = k if r <= d - k else k - (d+1). Keyed as (k, group, z) with
    # z_i = (c_i - k) / (d+1) over the first d coordinates (the last is minus their sum). k is the
    # most significant field: the vertices of remainder k form one block of ids, so a point's
    # vertex ids increase with k (sorted CSR columns) and every block can be sorted on its own.
    spans = [_span(base[i]) for i in range(d)]
    codec = _MixedRadix([d + 1, num_groups] + [(lo - 2, hi + 1) for lo, hi in spans])  # blur moves z by <= 1
    # Vertex 0 is the remainder-0 point itself; vertex k adds k and takes 1 from z_i where
    # rank_i > d - k, i.e. from one more coordinate (the one ranked d - k + 1) at every step.
    key0 = codec.encode([torch.zeros_like(group_u), group_u] + list(base_u))  # (U,)
    z_strides = torch.tensor(codec.strides[2:], device=device)  # (d,)
    stride_of_rank = torch.zeros(d + 1, num_simplices, dtype=torch.long, device=device)
    stride_of_rank.scatter_(0, rank_u, z_strides[:, None].expand(-1, num_simplices))  # coordinate d: 0
    taken = torch.cumsum(stride_of_rank.flip(0), 0)[:d]  # (d, U): strides of ranks d .. d-k+1
    ks = torch.arange(d + 1, device=device)
    vertex_keys = key0 + ks[:, None] * codec.strides[0]  # (d+1, U)
    vertex_keys[1:] -= taken
    vertex_of_simplex = torch.empty(d + 1, num_simplices, dtype=torch.long, device=device)
    unique_keys = []
    for k in range(d + 1):
        ids, firsts = _unique(vertex_keys[k])
        vertex_of_simplex[k] = ids + sum(u.numel() for u in unique_keys)
        unique_keys.append(vertex_keys[k, firsts])
    block_sizes = torch.tensor([u.numel() for u in unique_keys], device=device)
    unique_keys = torch.cat(unique_keys)  # (M,), sorted
    return simplex_of, vertex_of_simplex, unique_keys, block_sizes, codec


def _blur_matrices(
    unique_keys: torch.Tensor, block_sizes: torch.Tensor, codec: _MixedRadix, d: int, index_dtype: torch.dtype
) -> list[torch.Tensor]:
    """One sparse matrix I + (N1 + N2) / 2 per lattice direction (see below)."""
    device = unique_keys.device
    num_vertices = unique_keys.numel()
    # Blur along direction j: new_v = v + (v[n1] + v[n2]) / 2 with n1 = c - 1 in every coordinate
    # and + (d+1) in coordinate j, n2 the reverse move; missing neighbours count as 0. The key
    # encoding is linear with a margin for these moves, so n1's key is the vertex's key plus a
    # constant of its remainder k; n2 is the inverse relation of n1. Each direction is a sparse
    # matrix I + (N1 + N2) / 2, applied with one product.
    remainder = torch.repeat_interleave(torch.arange(d + 1, device=device), block_sizes)  # (M,)
    strides = codec.strides
    all_z = sum(strides[2:])
    blur = []
    for j in range(d + 1):
        e_j = strides[2 + j] if j < d else 0
        # k >= 1: (k - 1, z + e_j); k = 0: (d, z - 1 + e_j)
        delta = torch.tensor([d * strides[0] - all_z + e_j] + [-strides[0] + e_j] * d, device=device)
        n1_keys = unique_keys + delta[remainder]
        pos = torch.searchsorted(unique_keys, n1_keys).clamp_(max=num_vertices - 1)
        found = unique_keys[pos] == n1_keys
        n1 = torch.where(found, pos, -1)  # (M,), -1: no such vertex
        n2 = torch.full_like(n1, -1)
        n2[pos[found]] = torch.nonzero(found)[:, 0]
        # row i holds (n1, i, n2) with weights (1/2, 1, 1/2), columns sorted, missing ones dropped
        cols, order = torch.sort(torch.stack([n1, torch.arange(num_vertices, device=device), n2], 1), dim=1)
        vals = torch.tensor([0.5, 1.0, 0.5], device=device).expand(num_vertices, 3).gather(1, order)
        keep = cols >= 0  # (M, 3)
        crow = torch.cat([cols.new_zeros(1), torch.cumsum(keep.sum(1), 0)]).to(index_dtype)
        blur.append(_csr(crow, cols[keep].to(index_dtype), vals[keep], (num_vertices, num_vertices)))
    return blur


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix; the indices are valid by construction, so torch's checks and beta notice are skipped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _span(x: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor as Python ints; (0, 0) when empty."""
    if x.numel() == 0:
        return 0, 0
    return int(x.min()), int(x.max())


def _unique(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ``keys``: (id of every key (N,), index of the first occurrence of each id (U,))."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    is_new = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    ids = torch.empty_like(perm)
    ids[perm] = torch.cumsum(is_new, 0) - 1
    return ids, perm[is_new]


class _MixedRadix:
    """Packs a tuple of bounded integers into one int64 key; the first field is the most significant.

    Every field is given as a count ``n`` (values 0..n-1) or an inclusive span ``(low, high)``.
    """

    def __init__(self, fields: Sequence[int | tuple[int, int]]) -> None:
        self.lows = [0 if isinstance(f, int) else f[0] for f in fields]
        self.sizes = [f if isinstance(f, int) else f[1] - f[0] + 1 for f in fields]
        # key = sum_i (value_i - low_i) * strides_i
        self.strides = [math.prod(self.sizes[i + 1 :]) for i in range(len(self.sizes))]
        capacity = math.prod(self.sizes)
        if capacity >= 2**62:
            raise UserError(
                f"dense CRF: the permutohedral lattice would need {capacity:.3g} cells, too many to "
                "index; increase the kernel's sxy / srgb or refine fewer images at once"
            )

    def encode(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        key = values[0] - self.lows[0]
        for value, low, size in zip(values[1:], self.lows[1:], self.sizes[1:], strict=True):
            key = key * size + (value - low)
        return key


# --------------------------------------------------------------------------------------------------
# Kernels: normalised Gaussian filters over the valid pixels, built once per batch
# --------------------------------------------------------------------------------------------------


class _LatticeKernel:
    """``weight * D^-1/2 K D^-1/2`` with the permutohedral K and ``D = diag(K 1)`` (NORMALIZE_SYMMETRIC)."""

    def __init__(self, features: torch.Tensor, group: torch.Tensor, weight: float) -> None:
        self.lattice = _lattice_class(features.device)(features, group)
        ones = torch.ones(features.shape[0], 1, device=features.device)
        norm = torch.rsqrt(self.lattice.filter(ones)[:, 0] + 1e-20)  # (P,)
        self.lattice.set_point_scale(norm, norm * weight)
        self.row_sums = self.lattice.filter(ones)  # (P, 1): the kernel applied to all-ones

    def accumulate(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """out += kernel @ values, both (P, K)."""
        self.lattice.filter(values, out=out)


def _compiled(device: torch.device) -> Any:
    """`pixelwise.crf_compiled` where it serves ``device`` (a CPU, numba installed, PIXELWISE_CRF_COMPILED
    not 0), else None: the tensor implementation runs (CPU and CUDA)."""
    if device.type != "cpu" or os.environ.get("PIXELWISE_CRF_COMPILED", "1") == "0":
        return None
    from pixelwise import crf_compiled  # imports numba (~1 s): only when a CRF runs on a CPU

    return crf_compiled if crf_compiled.available() else None


def _lattice_class(device: torch.device) -> type:
    """The permutohedral lattice for ``device``: numba's `CompiledLattice` or `PermutohedralLattice`."""
    compiled = _compiled(device)
    return PermutohedralLattice if compiled is None else compiled.CompiledLattice


def exact_gaussian_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Brute-force ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` in float64: the reference for the lattice.

    O(P^2) time and memory: tiny point sets only (tests, a 64 x 64 image at most).

    Shape:
        features ``(P, d)``, values ``(P, C)`` -> ``(P, C)`` in the dtype of ``values``.
    """
    f = features.double()
    kernel = torch.exp(-0.5 * torch.cdist(f, f).square())  # (P, P)
    return (kernel @ values.double()).to(values.dtype)


class _ExactKernel:
    """Brute-force ``weight * D^-1/2 K D^-1/2``, one dense kernel matrix per image (tests, tiny images)."""

    def __init__(self, features: torch.Tensor, group: torch.Tensor, weight: float) -> None:
        self.blocks = []
        for g in torch.unique(group):
            index = torch.nonzero(group == g)[:, 0]
            f = features[index].double()
            k = exact_gaussian_filter(f, torch.eye(f.shape[0], dtype=torch.float64, device=f.device))  # (P_g, P_g)
            norm = torch.rsqrt(k.sum(1) + 1e-20)
            self.blocks.append((index, (weight * norm[:, None] * k * norm[None, :]).float()))
        self.row_sums = torch.zeros(features.shape[0], 1, device=features.device)
        for index, k in self.blocks:
            self.row_sums[index] = k.sum(1, keepdim=True)

    def accumulate(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """out += kernel @ values, both (P, K)."""
        for index, k in self.blocks:
            out[index] += k @ values[index]


class _GridGaussianKernel:
    """``weight * D^-1/2 K D^-1/2`` for the position-only Gaussian, as two exact 1-D convolutions.

    The kernel exp(-(dx^2 + dy^2) / 2 sxy^2) factorises into a horizontal and a vertical pass, cut at
    4 sxy. Depthwise convolutions on the pixel-major (P, K) values seen as a channels-last (B, K, H, W)
    tensor need no copies. Pixels outside the image or ignored simply do not exist: they are zeros
    in both the filtered values and the normaliser.
    """

    def __init__(self, valid: torch.Tensor, sxy: float, weight: float) -> None:
        self.valid = valid  # (B, H, W) bool
        self.flat_valid = None if bool(valid.all()) else valid.reshape(-1)
        # taps beyond the image would only ever meet the zero padding
        radius = max(1, min(math.ceil(_TRUNCATE_SIGMAS * sxy), max(valid.shape[1:]) - 1))
        t = torch.arange(-radius, radius + 1, device=valid.device, dtype=torch.float64)
        self.taps = torch.exp(-0.5 * (t / sxy).square()).float()  # (T,)
        ones = torch.ones(int(valid.sum()), 1, device=valid.device)
        self.norm_in = torch.rsqrt(self._blur(ones) + 1e-20)  # (P, 1)
        self.norm_out = self.norm_in * weight
        self.row_sums = self._blur(self.norm_in) * self.norm_out  # (P, 1): the kernel applied to all-ones

    def _blur(self, values: torch.Tensor) -> torch.Tensor:
        """Unnormalised Gaussian filter of the valid pixels' values (P, C) -> (P, C)."""
        b, h, w = self.valid.shape
        c = values.shape[1]
        if self.flat_valid is not None:
            grid = values.new_zeros(b * h * w, c)
            grid[self.flat_valid] = values
            values = grid
        compiled = _compiled(values.device)
        if compiled is not None:
            x = compiled.separable_blur(values.view(b, h, w, c), self.taps).view(b * h * w, c)
            return x if self.flat_valid is None else x[self.flat_valid]
        r = self.taps.numel() // 2
        x = values.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        x = F.conv2d(x, self.taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)  # along W
        x = F.conv2d(x, self.taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)  # along H
        x = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B*H*W, C), a view: the output is channels-last
        return x if self.flat_valid is None else x[self.flat_valid]  # (P, C)

    def accumulate(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """out += kernel @ values, both (P, K)."""
        out.addcmul_(self._blur(values * self.norm_in), self.norm_out)


def _exp_normalize_(x: torch.Tensor) -> torch.Tensor:
    """In place: rows of exp(x), each divided by its sum (a softmax without the max, for bounded x)."""
    # torch's exp, vectorised, also on the compiled path: numba's loops call the C library's expf
    return _normalize_rows_(x.exp_())


# --------------------------------------------------------------------------------------------------
# Mean-field inference
# --------------------------------------------------------------------------------------------------

FILTERINGS: tuple[str, ...] = ("lattice", "exact")


def dense_crf(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    iterations: int = 10,
    gaussian_sxy: float,
    gaussian_weight: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_weight: float,
    compat: torch.Tensor | None = None,
    ignore_mask: torch.Tensor | None = None,
    filtering: str = "lattice",
) -> torch.Tensor:
    """Refine class probabilities with the fully connected CRF (Krähenbühl & Koltun, NIPS 2011).

    Runs ``iterations`` mean-field updates
    ``Q_i(l) ∝ exp(-U_i(l) - sum_l' mu(l, l') sum_m w_m sum_j k_m(f_i, f_j) Q_j(l'))``
    from ``Q = p``, with unary ``U = -log(max(p, 1e-5))``, the appearance kernel ``m = bilateral``
    (features ``x / bilateral_sxy, y / bilateral_sxy, rgb / bilateral_srgb``) and the smoothness kernel
    ``m = gaussian`` (features ``x / gaussian_sxy, y / gaussian_sxy``), each normalised symmetrically
    as pydensecrf does. Presets: ``crf_kwargs("deeplab_vgg")`` and friends.

    Args:
        probs: class probabilities (softmax of logits); rows need not sum to 1, they are normalised.
        image: the RGB image the scores were computed for, uint8 0..255.
        iterations: mean-field iterations (DeepLab: 10; 0 returns the normalised input).
        gaussian_sxy: theta_gamma, the smoothness kernel's standard deviation in pixels.
        gaussian_weight: w2, its weight (pydensecrf's Potts ``compat`` of ``addPairwiseGaussian``).
        bilateral_sxy: theta_alpha, the appearance kernel's standard deviation in pixels.
        bilateral_srgb: theta_beta, its standard deviation in RGB levels.
        bilateral_weight: w1, its weight (pydensecrf's ``compat`` of ``addPairwiseBilateral``).
        compat: label compatibility ``mu`` (K, K), the cost of labels (l, l') at two connected pixels;
            None is the Potts model ``mu = 1 - I``. Like pydensecrf, it is symmetrised as
            ``(mu + mu^T) / 2``; pydensecrf's ``compat=M`` matrix equals ``weight * mu`` here.
        ignore_mask: optional (B, H, W) bool, True at pixels left out of the CRF: their output is their
            input unchanged and they send no messages, i.e. the CRF runs on the other pixels alone
            (use it for padding when batching images of different sizes; the result then equals
            running on the cropped image).
        filtering: ``"lattice"`` (permutohedral lattice for the appearance kernel, exact separable
            convolution for the smoothness kernel) or ``"exact"`` (both by brute force, O(N^2):
            tiny images and tests only).

    Returns:
        Refined probabilities, same shape, dtype and device as ``probs``; every pixel sums to 1
        except ignored ones, which are returned unchanged.

    Shape:
        probs ``(B, K, H, W)``, image ``(B, 3, H, W)``, ignore_mask ``(B, H, W)`` -> ``(B, K, H, W)``.
    """
    crf = CRFParams(iterations, bilateral_weight, bilateral_sxy, bilateral_srgb, gaussian_weight, gaussian_sxy)
    _check_inputs(probs, image, ignore_mask, compat, filtering)
    params = {
        **crf.kwargs(),
        "filtering": filtering,
        "compat": None if compat is None else torch.as_tensor(compat, dtype=torch.float32, device=probs.device),
    }
    b, _, h, w = probs.shape
    # On a CPU the arrays of one 480x360 image stay in cache and those of a whole batch do not (a
    # batch of 8 at once measured 1.35x slower per image), so images go through in chunks of about
    # _CPU_CHUNK_PIXELS; a GPU takes the whole batch at once.
    step = b if probs.device.type != "cpu" else max(1, _CPU_CHUNK_PIXELS // (h * w))
    with torch.no_grad():
        chunks = [
            _mean_field(
                probs[i : i + step],
                image[i : i + step],
                None if ignore_mask is None else ignore_mask[i : i + step],
                **params,
            )
            for i in range(0, b, step)
        ]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _mean_field(
    probs: torch.Tensor,
    image: torch.Tensor,
    ignore_mask: torch.Tensor | None,
    *,
    iterations: int,
    compat: torch.Tensor | None,
    **kernel_params: object,
) -> torch.Tensor:
    """`dense_crf` on checked inputs, one chunk of the batch."""
    p, valid = _points(probs, ignore_mask)  # (P, K), (B, H, W): a tensor of its own
    logp = torch.log(p)  # -U
    q = _normalize_rows_(p)  # p itself is not needed any more
    if iterations > 0 and q.shape[0] > 0:
        kernels = _build_kernels(image, valid, **kernel_params)
        # With the Potts model the message m_i(l) = sum_m w_m sum_j k_m(i, j) Q_j(l) lies in
        # [0, s_i] with s_i the kernels' row sums (Q sums to 1), so log p - s <= logits - s <= 0:
        # shifting the unary by s once spares the per-iteration max of a stable softmax.
        shift = sum(kernel.row_sums for kernel in kernels)  # (P, 1)
        stable = compat is None and float(shift.max()) < 70.0  # exp(-11.5 - 70) is still a normal float
        if stable:
            logp = logp - shift
        mu = None if compat is None else 0.5 * (compat + compat.T)  # pydensecrf symmetrises mu too
        spare = [torch.empty_like(logp), torch.empty_like(logp)]  # the update's two buffers, taken in turn
        for i in range(iterations):
            if mu is None:
                # Potts: -sum_l' (1 - [l = l']) m_l' = m_l + const, and the constant cancels
                logits = spare[i % 2].copy_(logp)  # not q's buffer, which the kernels read
                for kernel in kernels:
                    kernel.accumulate(logits, q)
            else:
                message = torch.zeros_like(q)
                for kernel in kernels:
                    kernel.accumulate(message, q)
                logits = logp - message @ mu
            if not stable:
                logits -= logits.amax(1, keepdim=True)
            q = _exp_normalize_(logits)
    return _images(q, probs, ignore_mask)


def _points(probs: torch.Tensor, ignore_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CRF's pixels: their probabilities clipped as pydensecrf's unary_from_softmax clips them (a new tensor),
    (P, K) float32 pixel-major, and the (B, H, W) mask of the pixels that take part."""
    b, k, h, w = probs.shape
    device = probs.device
    compiled = _compiled(device)
    if ignore_mask is None:
        valid = torch.ones(b, h, w, dtype=torch.bool, device=device)
        if compiled is not None:  # one pass instead of a transposing copy and a clamp
            return compiled.to_points(probs, PROB_FLOOR), valid
        p = probs.float().permute(0, 2, 3, 1).reshape(b * h * w, k)
    else:
        valid = ~ignore_mask.to(device=device, dtype=torch.bool)
        p = probs.float().permute(0, 2, 3, 1)[valid]
    p = p.clamp(min=PROB_FLOOR, max=1.0)
    return (p.contiguous() if compiled is not None else p), valid  # the compiled loops read rows


def _normalize_rows_(p: torch.Tensor) -> torch.Tensor:
    """In place: every row of ``p`` (P, K) divided by its sum."""
    compiled = _compiled(p.device)
    if compiled is not None and p.dtype == torch.float32 and p.is_contiguous():
        return compiled.normalize_rows_(p)  # torch's sum over a row of 11 is slow on a CPU
    return p.div_(p.sum(1, keepdim=True))


def _images(q: torch.Tensor, probs: torch.Tensor, ignore_mask: torch.Tensor | None) -> torch.Tensor:
    """The refined pixels ``q`` (P, K) back as (B, K, H, W) in ``probs``' dtype; ignored pixels keep ``probs``."""
    b, k, h, w = probs.shape
    compiled = _compiled(q.device)
    if ignore_mask is None and compiled is not None and q.is_contiguous():
        return compiled.to_images(q, (b, k, h, w)).to(probs.dtype)
    if ignore_mask is None:
        pixels = q.view(b, h, w, k)
    else:
        pixels = probs.float().permute(0, 2, 3, 1).clone()
        pixels[~ignore_mask.to(device=q.device, dtype=torch.bool)] = q
    return pixels.permute(0, 3, 1, 2).to(probs.dtype, memory_format=torch.contiguous_format)  # (B, K, H, W)


def _build_kernels(
    image: torch.Tensor,
    valid: torch.Tensor,
    *,
    gaussian_sxy: float,
    gaussian_weight: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_weight: float,
    filtering: str,
) -> tuple[_LatticeKernel | _ExactKernel | _GridGaussianKernel, ...]:
    """The weighted smoothness and appearance kernels over the valid pixels of the batch."""
    index = torch.nonzero(valid)  # (P, 3): b, y, x in raster order
    group = index[:, 0]
    xy = index[:, [2, 1]].float()  # (P, 2): x, y as densecrf orders them
    rgb = image.to(valid.device).permute(0, 2, 3, 1)  # (B, H, W, 3)
    rgb = (rgb.reshape(-1, 3) if bool(valid.all()) else rgb[valid]).float()  # (P, 3)
    bilateral = torch.cat([xy / bilateral_sxy, rgb / bilateral_srgb], 1)  # (P, 5)
    if filtering == "exact":
        return (
            _ExactKernel(xy / gaussian_sxy, group, gaussian_weight),
            _ExactKernel(bilateral, group, bilateral_weight),
        )
    return _smoothness_kernel(valid, xy, group, gaussian_sxy, gaussian_weight), _LatticeKernel(
        bilateral, group, bilateral_weight
    )


def _smoothness_kernel(
    valid: torch.Tensor, xy: torch.Tensor, group: torch.Tensor, sxy: float, weight: float
) -> _LatticeKernel | _GridGaussianKernel:
    """The smoothness kernel over the valid pixels. It depends on the pixel grid alone, not on the
    image, so with every pixel valid it is kept and used again for a grid of the same size and
    parameters: the images of a data set (and the chunks of a batch, see `dense_crf`) share it."""
    compiled = _compiled(valid.device) is not None
    key = (tuple(valid.shape), str(valid.device), float(sxy), float(weight), compiled)
    everywhere = bool(valid.all())
    with _SMOOTHNESS_LOCK:
        if everywhere and key in _SMOOTHNESS_CACHE:
            _SMOOTHNESS_CACHE.move_to_end(key)
            return _SMOOTHNESS_CACHE[key]
    if compiled and sxy >= _LATTICE_MIN_SXY:
        # compiled, a 2-D lattice costs 3 vertices per pixel where the exact convolution costs 2 x 8
        # gaussian_sxy taps; it is pydensecrf's own approximation (docs/crf.md)
        kernel = _LatticeKernel(xy / sxy, group, weight)
    else:
        kernel = _GridGaussianKernel(valid, sxy, weight)
    if everywhere and valid.numel() <= _SMOOTHNESS_MAX_POINTS:
        with _SMOOTHNESS_LOCK:
            _SMOOTHNESS_CACHE[key] = kernel
            while len(_SMOOTHNESS_CACHE) > _SMOOTHNESS_KEPT or _kept_points() > _SMOOTHNESS_MAX_POINTS:
                _SMOOTHNESS_CACHE.popitem(last=False)  # the least recently used
    return kernel


def _kept_points() -> int:
    """Pixels of all the grids whose smoothness kernels are kept (the key's first item is (B, H, W))."""
    return sum(math.prod(key[0]) for key in _SMOOTHNESS_CACHE)


# the smoothness kernels last used over a whole grid (see _smoothness_kernel): at most _SMOOTHNESS_KEPT of
# them, over at most _SMOOTHNESS_MAX_POINTS pixels in all (a 480x360 lattice holds ~10 MB, so ~0.5 GB at
# most: a GPU batch goes through as one grid and is kept only below that); kernels are read-only once
# built, and the compiled lattice's scratch buffers are used under crf_compiled's lock
_SMOOTHNESS_KEPT = 4
_SMOOTHNESS_MAX_POINTS = 2**23
_SMOOTHNESS_CACHE: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_SMOOTHNESS_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the smoothness kernels kept for the last image sizes (~10 MB each for 480x360)."""
    with _SMOOTHNESS_LOCK:
        _SMOOTHNESS_CACHE.clear()


def _check_inputs(probs: object, image: object, ignore_mask: object, compat: object, filtering: object) -> None:
    """One ValueError naming the argument, its value and the fix, for every kind of bad input."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        got = f"{tuple(probs.shape)} {probs.dtype}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"dense_crf: probs must be a float tensor (B, K, H, W), got {got}; pass logits.softmax(1)")
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"dense_crf: image must be an RGB tensor (B, 3, H, W), got {got}; "
            "convert grayscale with image.expand(-1, 3, -1, -1)"
        )
    if image.dtype != torch.uint8:
        raise ValueError(
            f"dense_crf: image must be uint8 0..255, got {image.dtype}; "
            "pass the image before normalisation, e.g. (x * 255).round().to(torch.uint8)"
        )
    b, _, h, w = probs.shape
    if image.shape[0] != b or image.shape[2:] != probs.shape[2:]:
        raise ValueError(
            f"dense_crf: image of size {tuple(image.shape)} does not match probs of size "
            f"{tuple(probs.shape)}; resize the scores to the image (B, K, H, W) first"
        )
    if probs.shape[1] < 1:
        raise ValueError("dense_crf: probs has 0 classes; it needs K >= 1 channels")
    # NaN fails ">= 0"; once all are >= 0, an infinity makes the sum infinite
    if not bool((probs >= 0).all()) or not math.isfinite(float(probs.double().sum())):
        bad = ~torch.isfinite(probs) | (probs < 0)
        raise ValueError(
            f"dense_crf: probs contains {probs[bad][0].item()} (NaN, infinite or negative); "
            "pass probabilities, e.g. logits.softmax(1)"
        )
    if ignore_mask is not None and (not isinstance(ignore_mask, torch.Tensor) or ignore_mask.shape != (b, h, w)):
        got = tuple(ignore_mask.shape) if isinstance(ignore_mask, torch.Tensor) else type(ignore_mask).__name__
        raise ValueError(f"dense_crf: ignore_mask must be a bool tensor of shape {(b, h, w)}, got {got}")
    if compat is not None:
        k = probs.shape[1]
        mu = torch.as_tensor(compat)
        if mu.shape != (k, k) or not bool(torch.isfinite(mu.double()).all()):
            raise ValueError(
                f"dense_crf: compat must be a finite ({k}, {k}) matrix for {k} classes, "
                f"got shape {tuple(mu.shape)}; or None for the Potts model"
            )
    if filtering not in FILTERINGS:
        raise ValueError(f"dense_crf: filtering={filtering!r} is not supported; choose one of {', '.join(FILTERINGS)}")


class DenseCRF(nn.Module):
    """Fully connected CRF as a module: ``DenseCRF(**crf_kwargs("deeplab_vgg"))(probs, image)``.

    Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge Potentials",
    NIPS 2011; parameters and conventions as in `dense_crf`. It has no trainable parameters; the
    compatibility matrix, if given, is a buffer so that ``.to(device)`` moves it.

    Shape:
        probs ``(B, K, H, W)`` float, image ``(B, 3, H, W)`` uint8, ignore_mask ``(B, H, W)`` bool
        -> ``(B, K, H, W)`` probabilities.
    """

    def __init__(
        self,
        *,
        compat: torch.Tensor | Sequence[Sequence[float]] | None = None,
        filtering: str = "lattice",
        **params: float | int,
    ) -> None:
        """`params`: the fields of `CRFParams` (all of them, or use `from_preset`)."""
        super().__init__()
        missing = [f.name for f in fields(CRFParams) if f.name not in params and f.name != "iterations"]
        if missing:
            raise TypeError(f"DenseCRF() missing {', '.join(missing)}; give every CRFParams field or use from_preset")
        self.params = CRFParams().replace(**params)
        self.filtering = filtering
        self.register_buffer("compat", None if compat is None else torch.as_tensor(compat, dtype=torch.float32))

    @classmethod
    def from_preset(cls, preset: str, **overrides: float | int) -> DenseCRF:
        """``DenseCRF.from_preset("deeplab_resnet", iterations=5)``; see `CRF_PRESETS`."""
        return cls(**crf_kwargs(preset, **overrides))

    def forward(
        self, probs: torch.Tensor, image: torch.Tensor, ignore_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Refined probabilities (B, K, H, W); see `dense_crf`."""
        return dense_crf(
            probs, image, **self.params.kwargs(), compat=self.compat, ignore_mask=ignore_mask, filtering=self.filtering
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.kwargs().items()) + f", filtering={self.filtering!r}"
