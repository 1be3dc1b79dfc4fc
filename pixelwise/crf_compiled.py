"""The dense CRF's CPU loops compiled with numba: densecrf's hash-table lattice build and a fused filter.

The same lattice as `pixelwise.crf.PermutohedralLattice` (Adams, Baek & Davis 2010, following
densecrf's permutohedral.cpp step by step), but built the way densecrf builds it: every point's
enclosing simplex in one parallel pass, then open-addressing hash tables: one lookup per point finds
its simplex (none when it shares the previous point's), and only a simplex seen for the first time
looks up its d+1 vertices, which the points then take in a parallel pass; the blur neighbours are
looked up in parallel. Filtering is one compiled call: a splat into one private lattice per thread,
the d+1 blurs, and the slice added straight into the output. Beside the lattice: the exact separable
Gaussian blur, the (B, K, H, W) <-> (pixels, K) layout changes and the row normalisation, each one
pass. On a CPU this replaces ~150 tensor operations and 8 sparse products per lattice by a few loops
over the points (docs/crf.md, "Speed"); on CUDA the tensor implementation runs.

numba is optional (the ``crf`` extra): `available()` says whether this module can be used; the
first call compiles the loops (~30 s on 2 cores) and numba caches them on disk.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

from pixelwise.errors import UserError

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None


def available() -> bool:
    """Whether numba is installed, so that `CompiledLattice` can be used."""
    return numba is not None


if numba is not None:

    @njit(cache=True, parallel=True)
    def _simplices(features, elevated, rem0, rank, bary):  # pragma: no cover - compiled
        """Each point's remainder-0 vertex ``rem0`` (P, d+1, in units of d+1), its coordinates' ranks
        (P, d+1) and the barycentric weights of the simplex's d+1 vertices (P, d+1); ``elevated`` is
        scratch. float32 arithmetic in the order of `pixelwise.crf._simplices`: both find the same simplices.
        """
        num_points, d = features.shape
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        scale = np.empty(d, np.float32)
        for i in range(d):
            scale[i] = inv_std / math.sqrt((i + 2) * (i + 1))
        up = np.float32(d + 1)
        down = np.float32(1.0 / (d + 1))
        for p in prange(num_points):
            e = elevated[p]
            suffix = np.float32(0.0)
            for j in range(d, 0, -1):
                cf = features[p, j - 1] * scale[j - 1]
                e[j] = suffix - np.float32(j) * cf
                suffix = suffix + cf
            e[0] = suffix
            total = 0
            for i in range(d + 1):
                r = np.int32(np.rint(e[i] * down))  # half to even, as densecrf's SSE build
                rem0[p, i] = r
                total += r
                e[i] -= np.float32(r) * up  # from here on: the remainder
            for i in range(d + 1):
                # densecrf's pairwise count: for i < j, the larger remainder's rank goes up (ties: j's)
                count = total  # branch-free: the comparisons are unpredictable
                for j in range(i):
                    count += np.int32(e[j] >= e[i])
                for j in range(i + 1, d + 1):
                    count += np.int32(e[j] > e[i])
                rank[p, i] = count
            for i in range(d + 1):
                # bring points whose rem0 does not sum to 0 back onto the plane (branch-free, as above)
                wrap = np.int32(rank[p, i] < 0) - np.int32(rank[p, i] > d)
                rank[p, i] += wrap * (d + 1)
                rem0[p, i] += wrap
                bary[p, rank[p, i]] = (e[i] - np.float32(wrap) * up) * down  # the remainders by rank
            for r in range(d + 1):
                e[r] = bary[p, r]
            # Barycentric weights (Adams et al. p.10): vertex s gets v(rank d - s) - v(rank d - s + 1),
            # vertex 0 wraps around: 1 + v(rank d) - v(rank 0).
            bary[p, 0] = np.float32(1.0) + e[d] - e[0]
            for s in range(1, d + 1):
                bary[p, s] = e[d - s] - e[d - s + 1]

    @njit(cache=True, inline="always")
    def _mix(h, v):  # pragma: no cover - compiled
        """One more integer into the hash ``h`` (a multiply-xorshift step)."""
        h = (h ^ np.uint64(np.int64(v) & 0xFFFFFFFF)) * np.uint64(0x9E3779B97F4A7C15)
        return h ^ (h >> np.uint64(32))

    # Hash tables: open addressing, linear probing, at most half full. A slot holds -1 (empty) or
    # fingerprint << 32 | id, the fingerprint being 31 bits of the key's hash: a probe compares the
    # full key (a random read elsewhere) only when the fingerprints match.

    @njit(cache=True, inline="always")
    def _start(h, table):  # pragma: no cover - compiled
        """First slot and fingerprint of hash ``h``."""
        return h & np.uint64(table.size - 1), np.int64(h >> np.uint64(33))

    @njit(cache=True)
    def _find_vertex(table, vertex_keys, key):  # pragma: no cover - compiled
        """The slot of ``key`` (a vertex) in ``table``, holding its entry or -1 if absent, and its fingerprint."""
        h = np.uint64(0)
        for v in key:
            h = _mix(h, v)
        slot, fingerprint = _start(h, table)
        while True:
            entry = table[slot]
            if entry < 0:
                return slot, fingerprint
            if entry >> 32 == fingerprint:
                vertex = entry & 0xFFFFFFFF
                same = True
                for i in range(key.size):
                    if vertex_keys[vertex, i] != key[i]:
                        same = False
                        break
                if same:
                    return slot, fingerprint
            slot = (slot + np.uint64(1)) & np.uint64(table.size - 1)

    @njit(cache=True)
    def _find_simplex(table, rem0, rank, group, p):  # pragma: no cover - compiled
        """The slot of point p's simplex in ``table``, holding the first point seen in it or -1 if new,
        and its fingerprint."""
        h = _mix(np.uint64(0), group[p])
        for i in range(rem0.shape[1] - 1):
            h = _mix(_mix(h, rem0[p, i]), rank[p, i])
        slot, fingerprint = _start(h, table)
        while True:
            entry = table[slot]
            if entry < 0:
                return slot, fingerprint
            if entry >> 32 == fingerprint and _same_simplex(rem0, rank, group, p, entry & 0xFFFFFFFF):
                return slot, fingerprint
            slot = (slot + np.uint64(1)) & np.uint64(table.size - 1)

    @njit(cache=True, inline="always")
    def _same_simplex(rem0, rank, group, p, q):  # pragma: no cover - compiled
        """Whether points p and q lie in the same simplex (the last coordinate and rank follow from the others)."""
        if group[p] != group[q]:
            return False
        for i in range(rem0.shape[1] - 1):
            if rem0[q, i] != rem0[p, i] or rank[q, i] != rank[p, i]:
                return False
        return True

    @njit(cache=True)
    def _distinct_simplices(rem0, rank, group, simplex_of, firsts):  # pragma: no cover - compiled
        """Numbers the simplices in order of first appearance: ``simplex_of`` (P,) gets every point's, ``firsts``
        (>= U,) the first point of each; returns their count U."""
        num_points = rem0.shape[0]
        table = np.full(max(16, 1 << int(math.ceil(math.log2(2 * num_points + 1)))), -1, np.int64)
        count = 0
        for p in range(num_points):
            if p > 0 and _same_simplex(rem0, rank, group, p, p - 1):  # common in raster order: no lookup
                simplex_of[p] = simplex_of[p - 1]
                continue
            slot, fingerprint = _find_simplex(table, rem0, rank, group, p)
            if table[slot] >= 0:
                simplex_of[p] = simplex_of[table[slot] & 0xFFFFFFFF]
                continue
            table[slot] = fingerprint << 32 | p
            simplex_of[p] = count
            firsts[count] = p
            count += 1
        return count

    @njit(cache=True)
    def _insert_vertices(rem0, rank, group, firsts, corners):  # pragma: no cover - compiled
        """The d+1 vertex ids of every simplex into ``corners`` (U, d+1), ``firsts`` (U,) giving a point of each;
        returns the vertices' keys (M, d+1) and their hash table. A key is (group, the first d coordinates):
        groups never share a vertex.
        """
        d1 = rem0.shape[1]
        d = d1 - 1
        capacity = 1024
        vertex_keys = np.empty((capacity, d1), np.int32)
        table = np.full(4096, -1, np.int64)
        count = 0
        key = np.empty(d1, np.int32)
        for s in range(corners.shape[0]):
            p = firsts[s]
            key[0] = group[p]
            for k in range(d1):
                # vertex k: (d+1) rem0_i + canonical_k(rank_i), canonical_k(r) = k if r <= d - k else k - (d+1)
                for i in range(d):
                    key[i + 1] = rem0[p, i] * d1 + k - (d1 if rank[p, i] > d - k else 0)
                slot, fingerprint = _find_vertex(table, vertex_keys, key)
                if table[slot] >= 0:
                    corners[s, k] = table[slot] & 0xFFFFFFFF
                    continue
                if count == capacity:
                    capacity *= 2
                    grown = np.empty((capacity, d1), np.int32)
                    grown[:count] = vertex_keys[:count]
                    vertex_keys = grown
                vertex_keys[count] = key
                table[slot] = fingerprint << 32 | count
                corners[s, k] = count
                count += 1
                if 2 * count > table.size:
                    table = np.full(table.size * 2, -1, np.int64)
                    for v in range(count):
                        slot, fingerprint = _find_vertex(table, vertex_keys, vertex_keys[v])
                        table[slot] = fingerprint << 32 | v
        return vertex_keys[:count].copy(), table

    @njit(cache=True, parallel=True)
    def _point_vertices(simplex_of, corners, offsets):  # pragma: no cover - compiled
        """``offsets`` (P, d+1): every point's vertex ids, those of its simplex."""
        for p in prange(offsets.shape[0]):
            s = simplex_of[p]
            for k in range(offsets.shape[1]):
                offsets[p, k] = corners[s, k]

    @njit(cache=True, parallel=True)
    def _neighbours(vertex_keys, table, threads):  # pragma: no cover - compiled
        """(d+1, M, 2) ids of every vertex's two neighbours along each lattice direction; M if absent.

        Along direction j, n1 is the vertex at -1 in every coordinate and +(d+1) in coordinate j, n2
        the reverse move: n2(u) = v exactly when n1(v) = u, so only n1 is looked up.
        """
        num_vertices, d1 = vertex_keys.shape
        out = np.full((d1, num_vertices, 2), num_vertices, np.int32)
        chunk = (num_vertices + threads - 1) // threads
        for t in prange(threads):
            key = np.empty(d1, np.int32)
            for v in range(t * chunk, min(num_vertices, (t + 1) * chunk)):
                for j in range(d1):
                    key[0] = vertex_keys[v, 0]
                    for i in range(d1 - 1):
                        key[i + 1] = vertex_keys[v, i + 1] - 1 + (d1 if i == j else 0)
                    entry = table[_find_vertex(table, vertex_keys, key)[0]]
                    if entry >= 0:
                        out[j, v, 0] = entry & 0xFFFFFFFF
        for j in prange(d1):
            for v in range(num_vertices):
                if out[j, v, 0] < num_vertices:
                    out[j, out[j, v, 0], 1] = v
        return out

    @njit(cache=True, parallel=True)
    def _filter(offsets, weights, neighbours, values, splat_scale, slice_scale, out, buffers):  # pragma: no cover
        """out += slice(blur(splat(values * splat_scale))) * slice_scale: one filtering of (P, C) values.

        ``buffers`` (threads + 1, M + 1, >= C) float32: one private lattice per thread for the splat (no
        write conflicts), the last one for the blur's ping-pong. Row M stands for a missing vertex: 0.
        """
        num_points, num_classes = values.shape
        d1 = offsets.shape[1]
        num_vertices = neighbours.shape[1]
        threads = buffers.shape[0] - 1
        chunk = (num_points + threads - 1) // threads
        for t in prange(threads):
            partial = buffers[t]
            partial[:, :num_classes] = 0.0
            for p in range(t * chunk, min(num_points, (t + 1) * chunk)):
                s = splat_scale[p]
                for k in range(d1):
                    o = offsets[p, k]
                    w = weights[p, k] * s
                    for c in range(num_classes):
                        partial[o, c] += w * values[p, c]
        lattice = buffers[0]
        other = buffers[threads]
        for v in prange(num_vertices):
            for t in range(1, threads):
                for c in range(num_classes):
                    lattice[v, c] += buffers[t, v, c]
        other[num_vertices, :] = 0.0
        for j in range(d1):  # [1 2 1] / 2 along each direction, densecrf's order
            for v in prange(num_vertices):
                n1, n2 = neighbours[j, v, 0], neighbours[j, v, 1]
                for c in range(num_classes):
                    other[v, c] = lattice[v, c] + np.float32(0.5) * (lattice[n1, c] + lattice[n2, c])
            lattice, other = other, lattice
        for p in prange(num_points):
            s = slice_scale[p]
            for k in range(d1):
                o = offsets[p, k]
                w = weights[p, k] * s
                for c in range(num_classes):
                    out[p, c] += w * lattice[o, c]

    @njit(cache=True, parallel=True)
    def _normalize_rows(x):  # pragma: no cover - compiled
        """In place: every row of ``x`` (P, C) divided by its sum."""
        for p in prange(x.shape[0]):
            total = np.float32(0.0)
            for c in range(x.shape[1]):
                total += x[p, c]
            inverse = np.float32(1.0) / total
            for c in range(x.shape[1]):
                x[p, c] *= inverse

    @njit(cache=True, parallel=True)
    def _to_points(images, floor, points):  # pragma: no cover - compiled
        """``points`` (B*H*W, K) = ``images`` (B, K, H, W) pixel-major, clipped to [floor, 1]."""
        batch, num_classes, height, width = images.shape
        for r in prange(batch * height):
            b, y = r // height, r % height
            for x in range(width):
                row = points[r * width + x]
                for c in range(num_classes):
                    row[c] = min(max(images[b, c, y, x], floor), np.float32(1.0))

    @njit(cache=True, parallel=True)
    def _to_images(points, images):  # pragma: no cover - compiled
        """``images`` (B, K, H, W) = ``points`` (B*H*W, K) class-major."""
        batch, num_classes, height, width = images.shape
        for r in prange(batch * height):
            b, y = r // height, r % height
            for c in range(num_classes):
                for x in range(width):
                    images[b, c, y, x] = points[r * width + x, c]

    @njit(cache=True, parallel=True)
    def _separable_blur(grid, taps, across, out):  # pragma: no cover - compiled
        """``out`` = ``grid`` (B, H, W, C) convolved with ``taps`` (T,) along W, then along H, zeros beyond
        the edges; ``across`` (like ``grid``) is scratch.

        Every pass adds shifted rows, so the inner loops run over contiguous memory and vectorise
        (unsigned indices: numba then emits no negative-index wrap-around that would prevent it).
        """
        batch, height, width, channels = grid.shape
        radius = taps.size // 2
        row_len = width * channels
        rows = grid.reshape(batch * height, row_len)
        across = across.reshape(batch * height, row_len)
        out = out.reshape(batch * height, row_len)
        for r in prange(batch * height):  # along W: a 1-D convolution of the row with stride C
            across[r] = 0.0
            for t in range(taps.size):
                shift = (t - radius) * channels
                lo, hi = max(0, -shift), min(row_len, row_len - shift)
                _add_scaled(across[r, lo:hi], rows[r, lo + shift : hi + shift], taps[t])
        for r in prange(batch * height):  # along H: rows of the same image
            b, y = r // height, r % height
            out[r] = 0.0
            for t in range(max(0, radius - y), min(taps.size, height + radius - y)):
                _add_scaled(out[r], across[b * height + y + t - radius], taps[t])

    @njit(cache=True, inline="always")
    def _add_scaled(dst, src, scale):  # pragma: no cover - compiled
        """dst += scale * src, both 1-D of the same length."""
        for j in range(dst.size):
            dst[np.uintp(j)] += scale * src[np.uintp(j)]


class CompiledLattice:
    """`pixelwise.crf.PermutohedralLattice`'s interface and results, compiled with numba (CPU tensors only).

    Args:
        features: ``(P, d)`` float point features, already divided by their standard deviations.
        group: ``(P,)`` integer group index (image of the batch) of every point, or None for one group.

    Shape:
        ``filter``: values ``(P, C)`` -> ``(P, C)``.
    """

    def __init__(self, features: torch.Tensor, group: torch.Tensor | None = None) -> None:
        if numba is None:
            raise RuntimeError("CompiledLattice needs numba: pip install 'pixelwise[crf]'")
        f = np.ascontiguousarray(features.detach().float().cpu().numpy())
        num_points, d = f.shape
        self.d = d
        self.num_points = num_points
        # the vertices' coordinates are int32: |elevated| <= 2 d (d+1) max|f| must leave room for the keys
        if num_points and float(np.abs(f).max()) * 2 * d * (d + 1) >= 2**30:
            raise UserError(
                f"dense CRF: features up to {float(np.abs(f).max()):.3g} standard deviations put the permutohedral "
                "lattice beyond its int32 coordinates; increase the kernel's sxy / srgb"
            )
        g = np.zeros(num_points, np.int32) if group is None else group.cpu().numpy().astype(np.int32)
        rem0 = np.empty((num_points, d + 1), np.int32)
        rank = np.empty((num_points, d + 1), np.int32)
        self._weights = np.empty((num_points, d + 1), np.float32)
        self._offsets = np.empty((num_points, d + 1), np.int32)
        with _parallel() as threads:
            _simplices(f, np.empty((num_points, d + 1), np.float32), rem0, rank, self._weights)
            # the simplices first (most points share one with an earlier point), then their vertices
            simplex_of, firsts = np.empty(num_points, np.int32), np.empty(num_points, np.int32)
            corners = np.empty((_distinct_simplices(rem0, rank, g, simplex_of, firsts), d + 1), np.int32)
            vertex_keys, table = _insert_vertices(rem0, rank, g, firsts, corners)
            _point_vertices(simplex_of, corners, self._offsets)
            self._neighbours = _neighbours(vertex_keys, table, threads)
        self.num_vertices = vertex_keys.shape[0]
        self._buffers = None  # the filter's lattices, kept between calls (fresh memory costs page faults)
        self.set_point_scale(None, None)

    def set_point_scale(self, splat_scale: torch.Tensor | None, slice_scale: torch.Tensor | None) -> None:
        """Scale every point's value by ``splat_scale`` (P,) before splatting and by ``slice_scale`` after slicing."""
        alpha = 1.0 / (1.0 + 2.0**-self.d)  # densecrf's slice factor
        self._splat_scale = _as_numpy(torch.ones(self.num_points) if splat_scale is None else splat_scale)
        self._slice_scale = _as_numpy(alpha * (torch.ones(self.num_points) if slice_scale is None else slice_scale))

    def filter(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussian-filter ``values`` (P, C) over the point features; returns (P, C), or adds it to ``out``."""
        if out is None:
            out = torch.zeros(values.shape, dtype=torch.float32)
        target = out if out.is_contiguous() and out.dtype == torch.float32 else out.float().contiguous()
        num_classes = values.shape[1]
        with _parallel() as threads:
            buffers = self._buffers
            if buffers is None or buffers.shape[0] != threads + 1 or buffers.shape[2] < num_classes:
                self._buffers = buffers = np.empty((threads + 1, self.num_vertices + 1, num_classes), np.float32)
            _filter(
                self._offsets,
                self._weights,
                self._neighbours,
                _as_numpy(values),
                self._splat_scale,
                self._slice_scale,
                target.numpy(),
                buffers,
            )
        if target is not out:
            out.copy_(target)
        return out


def separable_blur(grid: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``grid`` (B, H, W, C) convolved with the 1-D ``taps`` along W and then along H, zero-padded (float32)."""
    out = torch.empty(grid.shape, dtype=torch.float32)
    with _parallel():
        _separable_blur(_as_numpy(grid), _as_numpy(taps), np.empty(out.shape, np.float32), out.numpy())
    return out


def normalize_rows_(x: torch.Tensor) -> torch.Tensor:
    """In place: rows of ``x`` (P, C) float32, each divided by its sum."""
    with _parallel():
        _normalize_rows(x.numpy())
    return x


def to_points(images: torch.Tensor, floor: float) -> torch.Tensor:
    """(B, K, H, W) -> (B*H*W, K) float32 pixel-major rows, clipped to [floor, 1]."""
    b, k, h, w = images.shape
    points = torch.empty(b * h * w, k)
    with _parallel():
        _to_points(_as_numpy(images), np.float32(floor), points.numpy())
    return points


def to_images(points: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """(B*H*W, K) pixel-major rows -> a contiguous float32 (B, K, H, W) tensor."""
    images = torch.empty(shape)
    with _parallel():
        _to_images(_as_numpy(points), images.numpy())
    return images


# numba's fallback threading layer (workqueue, where no OpenMP runtime is found) aborts when two
# Python threads run parallel loops at once; every call goes through this lock.
_LOCK = threading.Lock()


@contextlib.contextmanager
def _parallel() -> Iterator[int]:
    """Holds `_LOCK` with numba's thread count set to torch's (torch.set_num_threads governs the whole CRF)."""
    with _LOCK:
        torch_threads = torch.get_num_threads()
        threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(threads)
        try:
            yield threads
        finally:
            # numba's OpenMP layer, started by the first parallel loop, sets OpenMP's thread count to all
            # cores, and torch reads that count: give torch back the one it was given
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A contiguous float32 numpy view (or copy) of a CPU tensor."""
    return x.detach().to(torch.float32).contiguous().numpy()
