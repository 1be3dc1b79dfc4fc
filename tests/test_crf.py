"""Dense CRF (pixelwise.crf): the permutohedral lattice, mean-field inference, pydensecrf agreement, inputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelwise import crf as crf_module
from pixelwise import crf_compiled
from pixelwise.crf import (
    CRF_PRESETS,
    DenseCRF,
    PermutohedralLattice,
    _MixedRadix,
    crf_kwargs,
    dense_crf,
    exact_gaussian_filter,
)
from pixelwise.errors import ArgumentError, UserError

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
SMALL = {
    "iterations": 5,
    "gaussian_sxy": 1.5,
    "gaussian_weight": 3.0,
    "bilateral_sxy": 6.0,
    "bilateral_srgb": 20.0,
    "bilateral_weight": 5.0,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

needs_numba = pytest.mark.skipif(not crf_compiled.available(), reason="numba is not installed (the crf extra)")
# the CPU's two implementations: numba's compiled loops (the default where numba is installed) and the
# tensor one (without numba, and on CUDA); the tests of behaviour run on both
BACKENDS = [pytest.param("compiled", marks=needs_numba), "tensor"]
LATTICES = [pytest.param("compiled", marks=needs_numba), "tensor"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test with pixelwise.crf's compiled CPU loops, then with its tensor operations alone."""
    monkeypatch.setenv("PIXELWISE_CRF_COMPILED", "1" if request.param == "compiled" else "0")
    return request.param


def lattice_class(name: str) -> type:
    return crf_compiled.CompiledLattice if name == "compiled" else PermutohedralLattice


def smooth_image(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A uint8 (B, 3, H, W) image: a bilinearly upsampled 4x5 colour field plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.rand(b, 3, 4, 5, generator=g) * 255, size=(h, w), mode="bilinear")
    return (field + 6 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)


def random_probs(b: int, k: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(b, k, h, w, generator=g), 1)


def pixel_features(image: torch.Tensor, sxy: float, srgb: float | None) -> torch.Tensor:
    """(P, 2) positions / sxy, or (P, 5) positions / sxy and colours / srgb, of one (3, H, W) image."""
    h, w = image.shape[1:]
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    feats = [xx / sxy, yy / sxy] + ([] if srgb is None else [c.float() / srgb for c in image])
    return torch.stack(feats, -1).reshape(h * w, -1)


def normalised(filter_fn, values: torch.Tensor) -> torch.Tensor:
    """D^-1/2 K D^-1/2 values with D = diag(K 1): pydensecrf's NORMALIZE_SYMMETRIC."""
    norm = torch.rsqrt(filter_fn(torch.ones(values.shape[0], 1, dtype=values.dtype)) + 1e-20)
    return norm * filter_fn(norm * values)


# ------------------------------------------------------------------------------- the lattice
@pytest.mark.parametrize(("kind", "bound"), [("position", 0.04), ("bilateral", 0.20)])
def test_lattice_approximates_the_exact_gaussian_filter(kind, bound):
    # The permutohedral lattice is an approximation (Adams et al. 2010): on these tiny images the
    # normalised filter (what the CRF uses) is measured at ~2% relative error in 2-D and 7-16% in
    # 5-D; the bounds leave some room.
    for seed in range(2):
        image = smooth_image(1, 16, 20, seed)[0]
        feats = pixel_features(image, 2.0, None) if kind == "position" else pixel_features(image, 6.0, 15.0)
        values = random_probs(1, 4, 16, 20, seed).permute(0, 2, 3, 1).reshape(-1, 4)
        lattice = PermutohedralLattice(feats)
        approx = normalised(lattice.filter, values)
        exact = normalised(lambda v, f=feats: exact_gaussian_filter(f.double(), v.double()).float(), values)
        rel = float((approx - exact).norm() / exact.norm())
        assert rel < bound, f"{kind} seed {seed}: relative error {rel:.3f}"


def test_exact_gaussian_filter_is_the_definition():
    g = torch.Generator().manual_seed(0)
    f, v = torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g)
    out = exact_gaussian_filter(f, v)
    for i in (0, 4):
        expected = sum(math.exp(-0.5 * float((f[i] - f[j]).square().sum())) * v[j] for j in range(7))
        assert torch.allclose(out[i], expected, atol=1e-6)


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("d", [2, 5])
def test_lattice_filter_equals_pydensecrfs(d, lattice):
    # One mean-field step of pydensecrf's generic DenseCRF from unary U with one pairwise term of
    # weight 1 gives log Q1 = -U + N(Q0) + const per point, N the normalised lattice filter: our
    # lattice follows densecrf's permutohedral.cpp step by step, so N must match to float rounding.
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    g = torch.Generator().manual_seed(d)
    points, classes = 400, 4
    feats = 3 * torch.randn(points, d, generator=g)
    unary = 3 * torch.rand(points, classes, generator=g)
    crf = dcrf.DenseCRF(points, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.T.numpy()))
    crf.addPairwiseEnergy(np.ascontiguousarray(feats.T.numpy()), compat=1.0)
    reference = torch.log(torch.from_numpy(np.array(crf.inference(1))).T) + unary
    ours = normalised(lattice_class(lattice)(feats).filter, torch.softmax(-unary, 1))
    centred = lambda x: x - x.mean(1, keepdim=True)  # noqa: E731
    assert torch.allclose(centred(ours), centred(reference), atol=2e-5)


@pytest.mark.parametrize("lattice", LATTICES)
def test_lattice_keeps_groups_apart(lattice):
    # two copies of the same points in different groups filter exactly like one copy alone
    g = torch.Generator().manual_seed(1)
    feats, values = torch.randn(50, 5, generator=g), torch.rand(50, 3, generator=g)
    alone = lattice_class(lattice)(feats).filter(values)
    both = lattice_class(lattice)(torch.cat([feats, feats]), torch.arange(2).repeat_interleave(50))
    out = both.filter(torch.cat([values, 2 * values]))
    assert torch.allclose(out[:50], alone, atol=1e-6)
    assert torch.allclose(out[50:], 2 * alone, atol=1e-6)


def test_key_overflow_is_a_user_error():
    with pytest.raises(UserError, match="sxy / srgb"):
        _MixedRadix([6, 1] + [(0, 2**20)] * 5)
    if crf_compiled.available():  # the compiled lattice's coordinates are int32
        with pytest.raises(UserError, match="sxy / srgb"):
            crf_compiled.CompiledLattice(torch.tensor([[0.0, 1e8, 0.0, 0.0, 0.0]]))


@needs_numba
@pytest.mark.parametrize(("d", "spread"), [(2, 0.7), (5, 3.0)])
def test_compiled_lattice_equals_the_tensor_lattice(d, spread):
    # the same simplices, vertices and blur: equal to float rounding, also through hash-table growth
    # (the 5-D case has ~10^5 vertices), groups, point scales and accumulation into `out`
    g = torch.Generator().manual_seed(d)
    points = 20000
    feats = spread * torch.randn(points, d, generator=g)
    group = (torch.arange(points) >= points // 3).long()
    values = torch.rand(points, 4, generator=g)
    tensor, compiled = PermutohedralLattice(feats, group), crf_compiled.CompiledLattice(feats, group)
    assert compiled.num_vertices == tensor.num_vertices
    assert torch.allclose(compiled.filter(values), tensor.filter(values), rtol=1e-5, atol=1e-5)
    splat, slice_ = torch.rand(points, generator=g), torch.rand(points, generator=g)
    tensor.set_point_scale(splat, slice_)
    compiled.set_point_scale(splat, slice_)
    start = torch.randn(points, 4, generator=g)
    expected = tensor.filter(values, out=start.clone())
    assert torch.allclose(compiled.filter(values, out=start.clone()), expected, rtol=1e-5, atol=1e-5)


@needs_numba
@pytest.mark.parametrize("sxy", [1.0, 3.0])
def test_compiled_separable_blur_is_the_convolution(sxy):
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(2, 23, 31, 5, generator=g)  # (B, H, W, C)
    radius = math.ceil(4 * sxy)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sxy) ** 2)
    x = grid.permute(0, 3, 1, 2)
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(5, 1, 1, -1), padding=(0, radius), groups=5)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(5, 1, -1, 1), padding=(radius, 0), groups=5)
    assert torch.allclose(crf_compiled.separable_blur(grid, taps), x.permute(0, 2, 3, 1), atol=1e-5)


@needs_numba
def test_compiled_loops_leave_torchs_thread_count_alone():
    # numba's OpenMP layer, started by its first parallel loop, sets OpenMP's thread count to every core,
    # and torch reads that count; in a fresh process the layer starts inside the CRF
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from pixelwise.crf import crf_kwargs, dense_crf\n"
        "dense_crf(torch.rand(1, 3, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), **crf_kwargs('pydensecrf'))\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "PIXELWISE_CRF_COMPILED": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]


# ------------------------------------------------------------------------------- mean field
def direct_mean_field(
    probs,
    image,
    *,
    iterations,
    gaussian_sxy,
    gaussian_weight,
    bilateral_sxy,
    bilateral_srgb,
    bilateral_weight,
    compat=None,
):
    """The update equations written out pixel pair by pixel pair, in float64, for one tiny image."""
    k, h, w = probs.shape
    n = h * w
    p = probs.double().permute(1, 2, 0).reshape(n, k)
    pos = [(i % w, i // w) for i in range(n)]
    rgb = image.double().permute(1, 2, 0).reshape(n, 3)
    smooth, appear = torch.empty(n, n, dtype=torch.float64), torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            d2 = (pos[i][0] - pos[j][0]) ** 2 + (pos[i][1] - pos[j][1]) ** 2
            c2 = float((rgb[i] - rgb[j]).square().sum())
            smooth[i, j] = math.exp(-d2 / (2 * gaussian_sxy**2))
            appear[i, j] = math.exp(-d2 / (2 * bilateral_sxy**2) - c2 / (2 * bilateral_srgb**2))
    kernels = []
    for kern, weight in ((smooth, gaussian_weight), (appear, bilateral_weight)):
        degree = kern.sum(1)
        kernels.append(weight * kern / torch.sqrt(degree[:, None] * degree[None, :]))
    mu = 1 - torch.eye(k, dtype=torch.float64) if compat is None else compat.double()
    mu = (mu + mu.T) / 2
    unary = -torch.log(p.clamp(1e-5, 1.0))
    q = torch.softmax(-unary, 1)
    for _ in range(iterations):
        message = sum(kern @ q for kern in kernels)  # (N, K)
        energy = unary + message @ mu  # mu(l, l') summed over l'
        q = torch.softmax(-energy, 1)
    return q.reshape(h, w, k).permute(2, 0, 1)


@pytest.mark.parametrize("compat", [None, "matrix"])
def test_exact_mean_field_matches_the_update_equations(compat):
    probs, image = random_probs(1, 3, 5, 6, 0), smooth_image(1, 5, 6, 0)
    mu = None
    if compat == "matrix":
        mu = torch.tensor([[0.0, 1.0, 3.0], [0.5, 0.0, 1.0], [2.0, 1.0, 0.2]])
    params = {**SMALL, "bilateral_sxy": 3.0}
    ours = dense_crf(probs, image, **params, compat=mu, filtering="exact")[0]
    direct = direct_mean_field(probs[0], image[0], **params, compat=mu)
    assert torch.allclose(ours.double(), direct, atol=2e-5)  # float32 against float64
    assert not torch.allclose(ours, probs[0], atol=1e-2)  # the CRF did change something


def test_lattice_mean_field_is_close_to_exact_mean_field():
    # random, ambiguous unaries amplify the lattice's approximation; measured: labels agree on
    # 94-96% of the pixels and the probabilities differ by ~1/6 of what the CRF changes
    probs, image = random_probs(1, 4, 20, 24, 3), smooth_image(1, 20, 24, 3)
    lattice = dense_crf(probs, image, **SMALL)
    exact = dense_crf(probs, image, **SMALL, filtering="exact")
    assert float((lattice.argmax(1) == exact.argmax(1)).float().mean()) > 0.9
    assert float((lattice - exact).abs().mean()) < 0.25 * float((probs - exact).abs().mean())


def test_shape_dtype_device_and_normalisation(backend):
    image = smooth_image(2, 12, 14, 1)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        probs = random_probs(2, 5, 12, 14, 1).to(dtype)
        out = dense_crf(probs, image, **SMALL)
        assert out.shape == probs.shape and out.dtype == dtype and out.device == probs.device
        assert out.is_contiguous()
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
        assert torch.allclose(out.float().sum(1), torch.ones(2, 12, 14), atol=tol)
        assert bool((out >= 0).all())


def test_unnormalised_scores_and_zero_iterations(backend):
    probs = random_probs(1, 3, 6, 7, 2)
    image = smooth_image(1, 6, 7, 2)
    out = dense_crf(probs * 0.5, image, **{**SMALL, "iterations": 0})
    assert torch.allclose(out, probs, atol=1e-6)  # rows are normalised, nothing else
    single_class = dense_crf(torch.ones(1, 1, 6, 7), image, **SMALL)
    assert torch.equal(single_class, torch.ones(1, 1, 6, 7))


def test_batch_equals_images_one_by_one(backend):
    probs, image = random_probs(3, 4, 18, 22, 5), smooth_image(3, 18, 22, 5)
    batched = dense_crf(probs, image, **SMALL)
    for i in range(3):
        assert torch.allclose(batched[i : i + 1], dense_crf(probs[i : i + 1], image[i : i + 1], **SMALL), atol=1e-5)


@pytest.mark.parametrize("sxy", [1.5, 3.0])  # the separable convolution; the compiled path's 2-D lattice
def test_smoothness_kernel_is_built_once_per_grid(backend, sxy, monkeypatch):
    # it depends on the pixel grid alone: images of one size share it, and the results are unchanged
    built = []
    real = crf_module._GridGaussianKernel, crf_module._LatticeKernel
    monkeypatch.setattr(crf_module, "_GridGaussianKernel", lambda *a: built.append("grid") or real[0](*a))
    monkeypatch.setattr(crf_module, "_LatticeKernel", lambda *a: built.append("lattice") or real[1](*a))
    params = {**SMALL, "gaussian_sxy": sxy}
    crf_module.clear_cache()
    probs, image = random_probs(2, 4, 18, 22, 11), smooth_image(2, 18, 22, 11)
    first = dense_crf(probs[:1], image[:1], **params)
    second = dense_crf(probs[1:], image[1:], **params)  # another image of the same size
    assert len(built) == 3  # smoothness once, appearance per image
    crf_module.clear_cache()
    assert torch.equal(second, dense_crf(probs[1:], image[1:], **params))  # as if built for it
    assert torch.equal(first, dense_crf(probs[:1], image[:1], **params))
    built.clear()
    dense_crf(probs[:1], image[:1], **{**params, "gaussian_weight": 1.0})  # other parameters: built anew
    dense_crf(probs[:1, :, :17], image[:1, :, :17], **params)  # another grid
    ignore = torch.zeros(1, 18, 22, dtype=torch.bool)
    ignore[:, 3:5, 4:9] = True
    dense_crf(probs[:1], image[:1], **params, ignore_mask=ignore)  # pixels left out: not the whole grid
    dense_crf(probs[:1], image[:1], **params, ignore_mask=ignore)
    assert len(built) == 8
    dense_crf(probs[:1], image[:1], **params)  # the first grid's kernel is still kept
    assert len(built) == 9
    monkeypatch.setattr(crf_module, "_SMOOTHNESS_MAX_POINTS", 18 * 22)  # room for one image's grid
    dense_crf(probs, image, **params)  # a batch of two: beyond the pixels kept, built and not kept
    dense_crf(probs, image, **params)
    assert len(built) == 9 + 2 + 2
    assert all(key[0][0] == 1 for key in crf_module._SMOOTHNESS_CACHE)  # only single-image grids kept
    monkeypatch.setattr(crf_module, "_SMOOTHNESS_MAX_POINTS", 2 * 18 * 22)
    for rows in (18, 16, 14):  # three grids, room for two: the least recently used goes
        dense_crf(probs[:1, :, :rows], image[:1, :, :rows], **params)
    assert [key[0] for key in crf_module._SMOOTHNESS_CACHE] == [(1, 16, 22), (1, 14, 22)]


def test_ignore_mask_padding_equals_the_cropped_image(backend):
    # the padding use: bottom/right padding marked ignored gives exactly the crop's result
    probs, image = random_probs(1, 4, 24, 30, 6), smooth_image(1, 24, 30, 6)
    cropped = dense_crf(probs[..., :17, :23], image[..., :17, :23], **SMALL)
    ignore = torch.ones(1, 24, 30, dtype=torch.bool)
    ignore[:, :17, :23] = False
    padded = dense_crf(probs, image, **SMALL, ignore_mask=ignore)
    assert torch.allclose(padded[..., :17, :23], cropped, atol=1e-5)
    assert torch.equal(padded[..., 17:, :], probs[..., 17:, :])  # ignored pixels come back unchanged
    assert torch.equal(padded[..., :, 23:], probs[..., :, 23:])


def test_ignored_pixels_send_no_messages(backend):
    probs, image = random_probs(1, 3, 14, 16, 7), smooth_image(1, 14, 16, 7)
    ignore = torch.zeros(1, 14, 16, dtype=torch.bool)
    ignore[:, 4:9, 5:11] = True
    out = dense_crf(probs, image, **SMALL, ignore_mask=ignore)
    other = probs.clone()
    other[:, :, 4:9, 5:11] = torch.softmax(10 * torch.randn(1, 3, 5, 6), 1)  # change the ignored scores only
    out_other = dense_crf(other, image, **SMALL, ignore_mask=ignore)
    assert torch.equal(out[:, :, 4:9, 5:11], probs[:, :, 4:9, 5:11])
    assert torch.allclose(out[~ignore[:, None].expand_as(out)], out_other[~ignore[:, None].expand_as(out)], atol=1e-6)
    assert not torch.allclose(out, dense_crf(probs, image, **SMALL), atol=1e-4)  # but they did before


def test_crf_cleans_noisy_labels_along_colour_edges(backend):
    # four flat colour quadrants, label = quadrant, unary = noisy softmax: the CRF must recover most
    h = w = 32
    label = torch.zeros(h, w, dtype=torch.long)
    label[:16, 16:], label[16:, :16], label[16:, 16:] = 1, 2, 3
    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]])
    image = colours[label].permute(2, 0, 1)[None].to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    logits = 2 * F.one_hot(label, 4).permute(2, 0, 1)[None] + 1.2 * torch.randn(1, 4, h, w, generator=g)
    probs = torch.softmax(logits, 1)
    out = dense_crf(probs, image, **crf_kwargs("deeplab_vgg"))
    before = float((probs.argmax(1) == label).float().mean())
    after = float((out.argmax(1) == label).float().mean())
    assert before < 0.8 and after > 0.99


# --------------------------------------------------------------------------------- pydensecrf
def pydensecrf_refine(image: np.ndarray, probs: np.ndarray, params: dict, compat=None) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    k, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(k, -1)))
    gw, bw = params["gaussian_weight"], params["bilateral_weight"]
    crf.addPairwiseGaussian(sxy=params["gaussian_sxy"], compat=gw if compat is None else gw * compat)
    crf.addPairwiseBilateral(
        sxy=params["bilateral_sxy"],
        srgb=params["bilateral_srgb"],
        rgbim=np.ascontiguousarray(image),
        compat=bw if compat is None else bw * compat,
    )
    return np.asarray(crf.inference(params["iterations"])).reshape(k, h, w)


def camvid_case(index: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, probs (11, H, W), label (H, W)) of a CamVid val image, noisy GT unary."""
    from PIL import Image

    names = sorted(p.name for p in (CAMVID / "val").glob("*.png"))
    if not names or not (CAMVID / "valannot").is_dir():
        pytest.skip("CamVid val not found under ../shared/data/camvid")
    name = names[index % len(names)]
    image = np.array(Image.open(CAMVID / "val" / name).convert("RGB"))
    label = np.array(Image.open(CAMVID / "valannot" / name))
    onehot = np.eye(12, dtype=np.float32)[label][..., :11].transpose(2, 0, 1)  # 11 = void: no bump
    rng = np.random.default_rng(seed)
    logits = 2.0 * onehot + rng.normal(0.0, 1.0, onehot.shape).astype(np.float32)
    e = np.exp(logits - logits.max(0))
    return image, (e / e.sum(0)).astype(np.float32), label


@pytest.mark.data
@pytest.mark.parametrize(("preset", "index"), [("deeplab_vgg", 0), ("pydensecrf", 50), ("deeplab_resnet", 90)])
def test_labels_agree_with_pydensecrf_on_camvid(preset, index, backend):
    pytest.importorskip("pydensecrf.densecrf")
    image, probs, label = camvid_case(index, seed=index)
    params = crf_kwargs(preset)
    reference = pydensecrf_refine(image, probs, params)
    ours = dense_crf(torch.from_numpy(probs)[None], torch.from_numpy(image).permute(2, 0, 1)[None], **params)
    ours = ours[0].numpy()
    assert ours.shape == (11, 360, 480)
    agreement = float((ours.argmax(0) == reference.argmax(0)).mean())
    assert agreement >= 0.999, f"{preset}: labels agree on {agreement:.4f} of the pixels"
    valid = label < 11
    gain = (ours.argmax(0) == label)[valid].mean() - (probs.argmax(0) == label)[valid].mean()
    assert gain > 0.1  # and the refinement is real: noisy unaries get much better


def test_compat_matrix_agrees_with_pydensecrf(backend):
    pytest.importorskip("pydensecrf.densecrf")
    probs, image = random_probs(1, 4, 40, 48, 8), smooth_image(1, 40, 48, 8)
    mu = torch.tensor([[0.0, 1.0, 2.0, 1.0], [1.0, 0.0, 0.5, 2.0], [2.0, 0.5, 0.0, 1.0], [1.0, 2.0, 1.0, 0.0]])
    params = {**SMALL, "iterations": 5}
    reference = pydensecrf_refine(image[0].permute(1, 2, 0).numpy(), probs[0].numpy(), params, compat=mu.numpy())
    ours = dense_crf(probs, image, **params, compat=mu)[0].numpy()
    assert float((ours.argmax(0) == reference.argmax(0)).mean()) >= 0.99
    assert float(np.abs(ours - reference).mean()) < 0.01


# ------------------------------------------------------------------------- presets and module
def test_presets_hold_the_papers_values():
    vgg, resnet, pyd = (CRF_PRESETS[n].kwargs() for n in ("deeplab_vgg", "deeplab_resnet", "pydensecrf"))
    assert (vgg["bilateral_weight"], vgg["bilateral_sxy"], vgg["bilateral_srgb"]) == (4, 121, 5)
    assert (vgg["gaussian_weight"], vgg["gaussian_sxy"], vgg["iterations"]) == (3, 3, 10)
    assert (resnet["bilateral_weight"], resnet["bilateral_sxy"], resnet["bilateral_srgb"]) == (4, 67, 3)
    assert (resnet["gaussian_weight"], resnet["gaussian_sxy"]) == (3, 1)
    assert (pyd["gaussian_sxy"], pyd["gaussian_weight"]) == (3, 3)
    assert (pyd["bilateral_sxy"], pyd["bilateral_srgb"], pyd["bilateral_weight"]) == (80, 13, 10)
    assert crf_kwargs("deeplab_vgg", iterations=3)["iterations"] == 3
    assert crf_kwargs("deeplab_vgg")["iterations"] == 10
    with pytest.raises(ArgumentError, match="deeplab_vgg, deeplab_resnet, pydensecrf"):
        crf_kwargs("deeplab")
    with pytest.raises(ArgumentError, match="sigma=3"):
        crf_kwargs("deeplab_vgg", sigma=3)


def test_module_equals_function(backend):
    probs, image = random_probs(2, 3, 10, 12, 9), smooth_image(2, 10, 12, 9)
    module = DenseCRF.from_preset("deeplab_resnet", iterations=4)
    assert "iterations=4" in repr(module) and list(module.parameters()) == []
    assert torch.equal(module(probs, image), dense_crf(probs, image, **crf_kwargs("deeplab_resnet", iterations=4)))
    mu = 1 - torch.eye(3)
    with_compat = DenseCRF(**SMALL, compat=mu)
    assert torch.equal(with_compat.compat, mu)
    assert torch.allclose(with_compat(probs, image), dense_crf(probs, image, **SMALL), atol=1e-5)  # Potts


@pytest.mark.cuda
def test_cuda_matches_cpu():
    probs, image = random_probs(2, 5, 40, 50, 10), smooth_image(2, 40, 50, 10)
    cpu = dense_crf(probs, image, **crf_kwargs("deeplab_vgg"))
    gpu = dense_crf(probs.cuda(), image.cuda(), **crf_kwargs("deeplab_vgg"))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# ---------------------------------------------------------------------------------- bad input
def _bad_cases():
    p, im = random_probs(1, 3, 6, 7, 0), smooth_image(1, 6, 7, 0)
    neg, nan = p.clone(), p.clone()
    neg[0, 0, 0, 0], nan[0, 1, 2, 3] = -0.1, float("nan")
    return [
        ("size", dict(probs=p, image=smooth_image(1, 6, 8, 0))),
        ("RGB", dict(probs=p, image=im[:, :1])),
        ("uint8", dict(probs=p, image=im.float())),
        ("-0.1", dict(probs=neg, image=im)),
        ("nan", dict(probs=nan, image=im)),
        ("float tensor", dict(probs=p.argmax(1), image=im)),
        ("gaussian_sxy=0", dict(probs=p, image=im, gaussian_sxy=0)),
        ("bilateral_srgb=-5", dict(probs=p, image=im, bilateral_srgb=-5)),
        ("bilateral_sxy=nan", dict(probs=p, image=im, bilateral_sxy=float("nan"))),
        ("bilateral_weight=-1", dict(probs=p, image=im, bilateral_weight=-1)),
        ("iterations=-1", dict(probs=p, image=im, iterations=-1)),
        ("compat", dict(probs=p, image=im, compat=torch.ones(2, 2))),
        ("ignore_mask", dict(probs=p, image=im, ignore_mask=torch.zeros(6, 7, dtype=torch.bool))),
        ("filtering='fast'", dict(probs=p, image=im, filtering="fast")),
    ]


@pytest.mark.parametrize(("needle", "kwargs"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_is_one_clear_value_error(needle, kwargs):
    kwargs = {**SMALL, **kwargs}
    with pytest.raises(ValueError) as info:
        dense_crf(kwargs.pop("probs"), kwargs.pop("image"), **kwargs)
    message = str(info.value)
    assert needle.lower() in message.lower() and "\n" not in message
