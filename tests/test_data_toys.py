"""2-D toys, the oracle and array datasets: samplers, exact densities, entropies, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sdelab.data import DATASETS, TOYS, load_array, make_dataset, toy_entropy, toy_log_prob
from sdelab.data.toys import LABELED_TOYS, ToyDataset, eight_gaussians_mixture, sample_toy


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(TOYS))
def test_shapes_determinism_and_test_set(name):
    a = sample_toy(name, 500, gen(3))
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, sample_toy(name, 500, gen(3)))
    assert not torch.equal(a, sample_toy(name, 500, gen(4)))
    ds = make_dataset(name, seed=7)
    assert torch.equal(ds.test_set(300), make_dataset(name, seed=7).test_set(300))
    assert not torch.equal(ds.test_set(300), make_dataset(name, seed=8).test_set(300))
    # the test set is not the first training batch of the same seed
    assert not torch.equal(ds.test_set(300), ds.sample(300, gen(7)))


def test_checkerboard_support_and_uniformity():
    x = sample_toy("checkerboard", 40_000, gen())
    assert float(x.abs().max()) <= 4.0
    cells = torch.floor(x / 2).long()  # 2×2 squares, indices −2..1
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all()), "a point left the black squares"
    counts = torch.bincount((cells[:, 0] + 2) * 4 + (cells[:, 1] + 2), minlength=16)
    black = counts[counts > 0]
    assert len(black) == 8
    assert stats.chisquare(black.numpy()).pvalue > 1e-3
    # uniform within squares: the fractional position is U[0, 2)²
    frac = (x - 2 * torch.floor(x / 2)).flatten() / 2
    assert stats.kstest(frac.numpy(), "uniform").pvalue > 1e-3


def test_8gaussians_components():
    x = sample_toy("8gaussians", 16_000, gen(1)).double()
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centers = 4 / 1.414 * torch.stack([angles.cos(), angles.sin()], 1)  # radius ≈ 2.83
    label = torch.cdist(x, centers).argmin(1)
    for k in range(8):
        pts = x[label == k]
        assert abs(len(pts) / len(x) - 1 / 8) < 0.02
        assert torch.allclose(pts.mean(0), centers[k], atol=0.03)
        assert torch.allclose(pts.std(0), torch.full((2,), 0.5 / 1.414, dtype=x.dtype), rtol=0.05)


@pytest.mark.parametrize(
    ("name", "radii", "std"),
    [("rings", (3.0, 2.25, 1.5, 0.75), 0.08), ("circles", (3.0, 1.5), 0.24)],
)
def test_ring_radii(name, radii, std):
    x = sample_toy(name, 8000, gen(2))
    rho = x.norm(dim=1)
    r = torch.tensor(radii)
    nearest = (rho[:, None] - r).abs().argmin(1)
    assert torch.allclose(
        torch.bincount(nearest).float() / len(x), 1 / len(r) * torch.ones(len(r)), atol=0.03
    )
    for k, rk in enumerate(radii):  # radial spread of a blurred ring ≈ std (ρ ≫ std)
        d = rho[nearest == k] - rk
        assert abs(float(d.std()) - std) < 0.15 * std + 0.01


def test_other_toys_statistics():
    g = gen(5)
    moons = sample_toy("moons", 8000, g)
    # outer moon's mean (−1, 4/π − 0.2), inner's (1, 1 − 4/π − 0.2): overall (0, 0.3)
    se = moons.std(0) / math.sqrt(len(moons))
    assert bool(((moons.mean(0) - torch.tensor([0.0, 0.3])).abs() < 4.5 * se).all())
    sw = sample_toy("swissroll", 8000, g)
    assert 1.5 * math.pi / 5 - 1 < float(sw.norm(dim=1).median()) < 4.5 * math.pi / 5
    spirals = sample_toy("2spirals", 8000, g)
    assert abs(float(spirals.mean(0).norm())) < 0.1  # the two arms are mirror images
    pin = sample_toy("pinwheel", 8000, g)
    assert 1.5 < float(pin.norm(dim=1).mean()) < 2.5  # radius ≈ 2·|feature| ≈ 2


@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("checkerboard", 2000),
        ("circles", 6000),
        ("rings", 6000),
        ("8gaussians", 6000),
        ("moons", 3000),
        ("swissroll", 4000),
        ("2spirals", 2000),
    ],
)
def test_entropy_matches_monte_carlo(name, n):
    """H = −E log p(x) on fresh samples: checks the density's normalisation and the quadrature."""
    h = toy_entropy(name)
    logp = toy_log_prob(name, sample_toy(name, n, gen(11)).double())
    assert torch.isfinite(logp).all()
    mc, se = float(-logp.mean()), float(logp.std()) / math.sqrt(n)
    assert abs(mc - h) < 4 * se + 2e-3, (name, h, mc, se)


def test_entropy_values_known_in_closed_form():
    assert toy_entropy("checkerboard") == pytest.approx(math.log(32))
    # well-separated 8 Gaussians: ln 8 + entropy of one N(0, s² I) minus a small overlap term
    s2 = (0.5 / 1.414) ** 2
    assert toy_entropy("8gaussians") == pytest.approx(
        math.log(8) + math.log(2 * math.pi * math.e * s2), abs=0.01
    )
    # separated thin rings: H ≈ ln 4 + Σ_k ¼ [log(2π r_k) + ½ log(2πe s²)]
    rings = math.log(4) + sum(math.log(2 * math.pi * r) / 4 for r in (3, 2.25, 1.5, 0.75))
    assert toy_entropy("rings") == pytest.approx(
        rings + 0.5 * math.log(2 * math.pi * math.e * 0.08**2), abs=0.005
    )
    assert toy_entropy("pinwheel") is None
    with pytest.raises(ValueError, match="no tractable density"):
        toy_log_prob("pinwheel", torch.zeros(3, 2))


def test_oracle_dataset():
    ds = make_dataset("oracle", seed=0)
    x = ds.sample(20_000, gen())
    assert torch.allclose(x.mean(0), torch.tensor([1.0, -0.5]), atol=0.03)
    assert torch.allclose(torch.cov(x.T), torch.tensor([[1.0, 0.7], [0.7, 0.8]]), atol=0.04)
    mc = float(-ds.log_prob(x).mean())
    assert mc == pytest.approx(ds.entropy(), abs=0.03)
    three = make_dataset("oracle", mean=[0.0, 0.0, 1.0], cov=[1.0, 2.0, 3.0])
    assert three.dim == 3 and three.sample(4, gen()).shape == (4, 3)


def test_registry_errors():
    assert {"checkerboard", "8gaussians", "oracle", "array"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'nope': choose one of checkerboard"):
        make_dataset("nope")
    with pytest.raises(ValueError, match="unknown option.*'moons': valid are none"):
        make_dataset("moons", noise=0.3)


def test_array_dataset(tmp_path):
    arr = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    (tmp_path / "a.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, r)) for r in arr))
    for f in ("a.npy", "a.csv"):
        ds = make_dataset("array", seed=1, path=str(tmp_path / f), test_fraction=0.25)
        assert ds.dim == 3 and ds.test_set(1000).shape == (50, 3)
        train_rows = {tuple(r) for r in ds.train.tolist()}
        assert not train_rows & {tuple(r) for r in ds.test.tolist()}  # held out
        batch = ds.sample(64, gen())
        assert all(tuple(r) in train_rows for r in batch.tolist())
    np.testing.assert_allclose(load_array(tmp_path / "a.csv"), arr, rtol=1e-6)


@pytest.mark.parametrize(
    ("content", "err", "match"),
    [
        (None, FileNotFoundError, "not found: pass an existing .npy or .csv path"),
        (np.zeros((3, 2, 2)), ValueError, r"shape \(3, 2, 2\): need a 2-D N×D array"),
        (
            np.array([[1.0, np.nan], [0.0, 1.0]]),
            ValueError,
            "1 NaN/inf values \\(first in row 0\\): drop",
        ),
        (np.zeros((1, 2)), ValueError, "need at least 2 rows"),
    ],
)
def test_array_errors(tmp_path, content, err, match):
    path = tmp_path / "bad.npy"
    if content is not None:
        np.save(path, content)
    with pytest.raises(err, match=match) as info:
        load_array(path)
    assert "\n" not in str(info.value)


def test_array_bad_extension_and_csv(tmp_path):
    (tmp_path / "a.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="use a .npy or .csv file"):
        load_array(tmp_path / "a.txt")
    (tmp_path / "b.csv").write_text("1,2\n3,oops\n")
    with pytest.raises(ValueError, match="cannot read .* as numbers"):
        load_array(tmp_path / "b.csv")


# ---- labels --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, (_, k) in LABELED_TOYS.items() if k])
def test_labeled_points_are_the_training_points(name):
    """sample_labeled draws the same points as sample (the data stream of a run does not
    depend on labels), with every class present and no other."""
    ds = ToyDataset(name)
    x, labels = ds.sample_labeled(3000, torch.Generator().manual_seed(4))
    assert torch.equal(x, ds.sample(3000, torch.Generator().manual_seed(4)))
    assert labels.dtype == torch.int64 and labels.shape == (3000,)
    assert set(labels.tolist()) == set(range(ds.num_classes))


def test_labels_follow_the_geometry():
    """Checkerboard: the label is the square (exact). 8gaussians: the nearest centre
    (neighbours are 6.1 stds apart, so the rule errs with probability ≈ 2Φ(−3.06) ≈ 0.2 %:
    ≥ 99 % agree). Circles/rings: the nearest radius (gaps ≥ 4.7 noise stds: ≥ 99 % agree).
    Moons: the outer moon lies above the inner one on average. 2spirals: the two arms are
    mirror images (label 1 = the point reflected through 0)."""
    g = torch.Generator().manual_seed(0)
    x, lab = ToyDataset("checkerboard").sample_labeled(5000, g)
    col = torch.floor(x[:, 0] / 2).long() + 2  # 2×2 squares: columns 0…3 left to right
    upper = (x[:, 1] >= 0).long()  # each column has one black square above 0, one below
    assert torch.equal(lab, 2 * col + upper)
    x, lab = ToyDataset("8gaussians").sample_labeled(5000, g)
    centers, _ = eight_gaussians_mixture()
    assert (torch.cdist(x, centers).argmin(1) == lab).float().mean() >= 0.99
    for name, radii in (("circles", (3.0, 1.5)), ("rings", (3.0, 2.25, 1.5, 0.75))):
        x, lab = ToyDataset(name).sample_labeled(5000, g)
        near = (x.norm(dim=1, keepdim=True) - torch.tensor(radii)).abs().argmin(1)
        assert (near == lab).float().mean() >= 0.99, name
    x, lab = ToyDataset("moons").sample_labeled(5000, g)
    assert x[lab == 0, 1].mean() > x[lab == 1, 1].mean() + 1
    x, lab = ToyDataset("2spirals").sample_labeled(20000, g)
    a, b = x[lab == 0], -x[lab == 1]  # arm 1 reflected onto arm 0: the same distribution
    torch.testing.assert_close(a.mean(0), b.mean(0), atol=0.06, rtol=0)


def test_unlabeled_toy_is_a_value_error():
    ds = ToyDataset("swissroll")
    assert ds.num_classes == 0
    with pytest.raises(ValueError, match="no class labels"):
        ds.sample_labeled(4, torch.Generator())
