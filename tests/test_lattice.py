"""Permutohedral-lattice filtering (wildseg/lattice.py) and the torch dense CRF (refine.mean_field_crf), checked
against exact Gaussian filtering, pydensecrf's own lattice and pydensecrf's CRF on real images."""

import numpy as np
import pytest
import torch
from coarse_maps import coarse_probabilities
from conftest import shared_dataset
from PIL import Image
from pydensecrf import densecrf

from wildseg.refinement.crf import dense_crf, mean_field_crf
from wildseg.refinement.lattice import PermutohedralLattice
from wildseg.refinement.settings import CrfSettings


def random_points(dims: int, points: int, box: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features uniform in [0, box)^dims (float64) and values uniform in [0, 1) (points x 4)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.rand(points, dims, generator=generator, dtype=torch.float64) * box
    return features, torch.rand(points, 4, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(
    ("dims", "box", "max_error", "l2_error"),
    [
        # Measured: normalised max 0.0109 (mean 0.0020), relative L2 after the global scale 0.0205 (scale 0.872).
        (2, 4.0, 0.015, 0.03),
        # Measured: normalised max 0.0251 (mean 0.0047), relative L2 after the global scale 0.0696 (scale 0.601).
        (5, 3.0, 0.035, 0.09),
    ],
)
def test_lattice_approximates_the_exact_gaussian_filter(dims, box, max_error, l2_error):
    """300 random points: the lattice against sum_j exp(-|f_i - f_j|^2 / 2) v_j computed exactly, both normalised
    by their filtered ones, and without normalisation up to the best global scale (least squares)."""
    features, values = random_points(dims, 300, box, seed=dims)
    lattice = PermutohedralLattice(features.float())
    filtered = lattice.filter(values.float()).double()
    ones = lattice.filter(torch.ones(300, 1)).double()
    kernel = torch.exp(-torch.cdist(features, features).square() / 2)
    exact, exact_ones = kernel @ values, kernel.sum(dim=1, keepdim=True)
    assert (filtered / ones - exact / exact_ones).abs().max() < max_error
    scale = (filtered * exact).sum() / exact.square().sum()
    assert (filtered - scale * exact).norm() / (scale * exact).norm() < l2_error


def pydensecrf_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """K v by pydensecrf's own permutohedral lattice: a 2-label CRF with unary -log Q0, Q0 = (1 + 0.8 v, 1 - 0.8 v)
    / 2, one kernel on `features` with Potts weight -1 and NO_NORMALIZATION. One mean-field step gives
    log(Q1_0 / Q1_1) = log(Q0_0 / Q0_1) - K (Q0_0 - Q0_1), and Q0_0 - Q0_1 = 0.8 v."""
    marginals = np.stack([0.5 + 0.4 * values, 0.5 - 0.4 * values]).astype(np.float32)
    crf = densecrf.DenseCRF(len(values), 2)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(marginals)))
    crf.addPairwiseEnergy(
        np.ascontiguousarray(features.T, dtype=np.float32), compat=-1.0, normalization=densecrf.NO_NORMALIZATION
    )
    updated = np.array(crf.inference(1))
    return (np.log(marginals[0] / marginals[1]) - np.log(updated[0] / updated[1])) / 0.8


@pytest.mark.parametrize(("dims", "spread"), [(2, 3.0), (5, 2.0)])
def test_lattice_equals_pydensecrf_lattice(dims, spread):
    """Same elevation, rounding, ranks, barycentric weights, blur and constant as Kraehenbuehl's code: measured
    max difference 1.8e-6 (2-D) and 5.3e-7 (5-D) of the largest |K v|, float32 round-off."""
    generator = torch.Generator().manual_seed(10 + dims)
    features = torch.randn(400, dims, generator=generator) * spread
    values = torch.rand(400, generator=generator) * 2 - 1
    ours = PermutohedralLattice(features).filter(values[:, None])[:, 0].numpy()
    theirs = pydensecrf_filter(features.numpy(), values.numpy())
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(theirs).max()


def test_images_in_one_lattice_do_not_mix():
    """Two point sets drawn from the same distribution, filtered together with an image index, give each set's
    result alone (measured: identical on the CPU; GPU atomics could reorder sums, hence the tolerance); without
    the index they would mix (measured max difference 22.7)."""
    features, values = random_points(3, 350, 3.0, seed=7)
    features, values = features.float(), values.float()
    image_index = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(150, dtype=torch.long)])
    together = PermutohedralLattice(features, image_index).filter(values)
    first = PermutohedralLattice(features[:200]).filter(values[:200])
    second = PermutohedralLattice(features[200:]).filter(values[200:])
    assert torch.allclose(together[:200], first, rtol=0, atol=1e-5)
    assert torch.allclose(together[200:], second, rtol=0, atol=1e-5)
    mixed = PermutohedralLattice(features).filter(values)
    assert (mixed[:200] - first).abs().max() > 0.1


def test_lattice_refuses_keys_that_overflow():
    features = torch.tensor([[0.0] * 5, [1e6] * 5])
    with pytest.raises(ValueError, match="overflow int64"):
        PermutohedralLattice(features)


def scaled_sample(name: str, index: int, size: tuple[int, int], ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of a shared data set resized to `size` (bilinear; its mask nearest) and coarse.py's
    CLIP-like probabilities of its ground truth (noise seed = index)."""
    root = shared_dataset(name)
    classes = len((root / "classes.txt").read_text().splitlines())
    path = sorted((root / "images").iterdir())[index]
    image = Image.open(path).convert("RGB").resize(size, Image.BILINEAR)
    truth = np.array(Image.open(root / "masks" / f"{path.stem}.png").resize(size, Image.NEAREST))
    return np.array(image), coarse_probabilities(truth, classes, seed=index, ignore_index=ignore_index)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize(
    ("name", "index", "size", "ignore_index"),
    [("camvid", 0, (240, 180), 11), ("camvid", 1, (240, 180), 11), ("nyuv2", 0, (320, 240), 0)],
)
def test_torch_crf_reproduces_pydensecrf(name, index, size, ignore_index, device):
    """The default CRF on coarse maps of real images, where it changes the argmax of 18-24 % of the pixels, on the
    CPU and on a GPU (its tolerances are the CPU's: both are float32 on the same lattice).

    Measured on the CPU (these and 4 more CamVid / NYUv2 images, one at full 480 x 360): every pixel's argmax
    agrees, mean |Q - Q_pydensecrf| 3e-9 to 9e-9, max 5e-6 (float32 round-off: both filter on the same lattice).
    """
    image, probabilities = scaled_sample(name, index, size, ignore_index)
    expected = dense_crf(image, probabilities, CrfSettings())
    (refined,) = mean_field_crf([torch.from_numpy(image).to(device)], [torch.from_numpy(probabilities).to(device)],
                                CrfSettings())
    assert refined.dtype == torch.float32 and refined.shape == probabilities.shape
    assert refined.device.type == device
    refined = refined.cpu().numpy()
    assert (expected.argmax(0) != probabilities.argmax(0)).mean() > 0.15
    assert (refined.argmax(0) == expected.argmax(0)).mean() >= 0.9999
    assert np.abs(refined - expected).mean() < 5e-8
    assert np.abs(refined - expected).max() < 5e-5


def test_torch_crf_batch_of_different_sizes_equals_each_alone():
    """Measured: the batched marginals equal the single-image ones exactly on the CPU."""
    samples = [scaled_sample("camvid", 2, (240, 180), 11), scaled_sample("camvid", 3, (200, 150), 11)]
    images = [torch.from_numpy(image) for image, _ in samples]
    probabilities = [torch.from_numpy(probability) for _, probability in samples]
    together = mean_field_crf(images, probabilities)
    for image, probability, batched in zip(images, probabilities, together):
        (alone,) = mean_field_crf([image], [probability])
        assert batched.shape == probability.shape
        assert torch.allclose(batched, alone, rtol=0, atol=1e-6)
        assert torch.allclose(batched.sum(dim=0), torch.ones(()), atol=1e-5)


def test_torch_crf_inside_an_autocast_region_stays_float32():
    """The pipeline runs the model under fp16 autocast on CUDA; the sparse products have no half kernels, so the
    lattice filters in float32 regardless (measured: identical marginals, here with CPU bfloat16 autocast)."""
    image, probabilities = scaled_sample("camvid", 4, (120, 90), 11)
    image, probabilities = torch.from_numpy(image), torch.from_numpy(probabilities)
    (expected,) = mean_field_crf([image], [probabilities])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (refined,) = mean_field_crf([image], [probabilities])
    assert refined.dtype == torch.float32
    assert torch.allclose(refined, expected, rtol=0, atol=1e-6)
