r"""The eight standard 2-D toy densities, with FFJORD's generator settings, and their entropies.

Every sampler draws fresh i.i.d. points from an explicit ``torch.Generator`` (float32, shape
``(n, 2)``). The settings are those of FFJORD's ``lib/toy_data.py`` (Grathwohl et al., 2019);
where FFJORD uses evenly spaced angles or a fixed split between mixture components (sklearn's
``make_circles``/``make_moons``), we draw the angle uniformly and the component i.i.d., which is
the density those batches approximate:

===============  ==========================================================================
checkerboard     uniform on the 8 "black" 2×2 squares of [−4, 4]²: density 1/32
circles          radii 3 and 1.5 (sklearn factor 0.5, ×3), Gaussian noise std 0.24 (0.08×3)
8gaussians       N(4·u_k / 1.414, (0.5 / 1.414)² I), u_k the 8 unit vectors at multiples of 45°
swissroll        t ~ U[1.5π, 4.5π], (t cos t, t sin t) + N(0, I), all / 5 (sklearn noise 1.0)
2spirals         n = 3π √u, ±((−n cos n, n sin n) + U[0, ½]²) / 3 + N(0, 0.1² I)
rings            radii 3, 2.25, 1.5, 0.75 (each ¼), Gaussian noise std 0.08
moons            sklearn moons (noise 0.1) × 2 + (−1, −0.2): noise std 0.2
pinwheel         5 arms, radial std 0.3, tangential std 0.1, rate 0.25, × 2
===============  ==========================================================================

Densities and entropies (:func:`toy_log_prob`, :func:`toy_entropy`). Every toy but pinwheel has
a density we can evaluate:

- checkerboard: closed form, 1/32 on its support, so H = ln 32.
- circles, rings: a ring of radius r blurred by N(0, s² I) has the radial density
  p(x) = exp(−(ρ² + r²)/2s²) I₀(ρr/s²) / (2π s²), ρ = ‖x‖ (closed form, Bessel I₀); the entropy
  H = −∫₀^∞ 2πρ p log p dρ is a 1-D integral done by Simpson's rule on 40 001 points.
- 8gaussians: a Gaussian mixture; moons, swissroll, 2spirals: a curve c(u) blurred by a known
  kernel, p(x) = ∫ q(u) k(x − c(u)) du, evaluated by Gauss–Legendre quadrature in u (node
  spacing along the curve ≤ ¼ of the kernel width). Their entropy H = −∫ p log p is then a 2-D
  midpoint rule on a grid of step 0.02 over the support plus 8 kernel widths.
- pinwheel: a mixture of warped Gaussians with no tractable density; ``toy_entropy`` returns
  ``None`` and ``toy_log_prob`` raises.

Labels (:data:`LABELED_TOYS`, ``ToyDataset.sample_labeled``): the natural class of each point,
drawn with it — checkerboard the black square (8), circles and rings the ring (2, 4),
8gaussians the component (8), 2spirals the arm (2), moons the moon (2), pinwheel the arm (5);
swissroll has none. ``sample`` and ``sample_labeled`` draw the same points from the same
generator state.

Accuracy: the quadratures resolve their integrands to far below 10⁻³ nats, which the tests
check against Monte-Carlo estimates −E log p(x) on fresh samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import Tensor

from sdelab import streams
from sdelab.data.base import VectorData
from sdelab.oracle import GaussianData
from sdelab.utils import derive_seed

__all__ = [
    "LABELED_TOYS",
    "TOYS",
    "OracleDataset",
    "ToyDataset",
    "eight_gaussians_mixture",
    "sample_toy",
    "toy_entropy",
    "toy_log_prob",
]

_F32 = torch.float32
_EIGHT_SCALE = 1.414  # FFJORD divides the 8 Gaussians by 1.414 (not √2)
_CIRCLES = ((3.0, 1.5), 0.24)  # radii, noise std
_RINGS = ((3.0, 2.25, 1.5, 0.75), 0.08)


def _rand(n: int, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=_F32)


def _randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=_F32)


def _randint(high: int, n: int, g: torch.Generator) -> Tensor:
    return torch.randint(high, (n,), generator=g)


# ---- samplers: (n, generator) -> ((n, 2) float32, (n,) int64 labels or None) -------------
# Labels are the natural class of each point, drawn along with it (the same random draws as
# the unlabeled points, so a run's data stream does not depend on whether it uses labels).
def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Label: which of the 8 black squares, 2·column + (lower/upper square of the column)."""
    x1 = _rand(n, g) * 4 - 2
    u = _rand(n, g)
    half = _randint(2, n, g)
    col = torch.floor(x1)
    x2 = u - half.to(_F32) * 2 + torch.remainder(col, 2)
    return torch.stack([x1, x2], dim=1) * 2, 2 * (col.long() + 2) + (1 - half)


def _rings_of(
    radii: tuple[float, ...], std: float
) -> Callable[[int, torch.Generator], tuple[Tensor, Tensor]]:
    """Label: the ring (index into ``radii``, largest first)."""

    def sample(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ring = _randint(len(radii), n, g)
        r = torch.tensor(radii, dtype=_F32)[ring]
        angle = 2 * math.pi * _rand(n, g)
        x = torch.stack([r * angle.cos(), r * angle.sin()], dim=1)
        return x + std * _randn(n, 2, g=g), ring

    return sample


def _eight_centers() -> np.ndarray:
    angles = np.arange(8) * np.pi / 4
    return 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1) / _EIGHT_SCALE  # (8, 2)


def eight_gaussians_mixture() -> tuple[Tensor, float]:
    """The 8gaussians toy as a mixture: means ``(8, 2)`` and the common std (equal weights);
    with :func:`sdelab.oracle.mixture_score_fn` / ``mixture_classifier`` its exact score and
    classifier at every noise level."""
    return torch.tensor(_eight_centers(), dtype=_F32), 0.5 / _EIGHT_SCALE


def _eightgaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Label: the component k (centre at angle k·45°)."""
    centers = torch.tensor(_eight_centers(), dtype=_F32)
    k = _randint(8, n, g)
    return centers[k] + (0.5 / _EIGHT_SCALE) * _randn(n, 2, g=g), k


def _swissroll_curve(t):
    return np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5


def _swissroll(n: int, g: torch.Generator) -> tuple[Tensor, None]:
    """No natural classes (one arm)."""
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    return (x + _randn(n, 2, g=g)) / 5, None


def _twospirals(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Label: the spiral (0: the arm through (+x), 1: its mirror image)."""
    m = 3 * math.pi * _rand(n, g).sqrt()  # 540° of arc, density ∝ m
    d = torch.stack([-m.cos() * m, m.sin() * m], dim=1) + 0.5 * torch.rand(n, 2, generator=g)
    arm = _randint(2, n, g)
    sign = 1 - 2 * arm.to(_F32)
    return sign[:, None] * d / 3 + 0.1 * _randn(n, 2, g=g), arm


def _moons_curves(theta):
    outer = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    inner = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], axis=-1)
    shift = np.array([-1.0, -0.2])
    return 2 * outer + shift, 2 * inner + shift


def _moons(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Label: the moon (0: upper/outer, 1: lower/inner)."""
    theta = math.pi * _rand(n, g)
    outer = torch.stack([theta.cos(), theta.sin()], dim=1)
    inner = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    which = _randint(2, n, g)
    x = torch.where(which.to(torch.bool)[:, None], inner, outer) + 0.1 * _randn(n, 2, g=g)
    return x * 2 + torch.tensor([-1.0, -0.2]), which


def _pinwheel(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Label: the arm (0…4)."""
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = torch.arange(num_classes, dtype=_F32) * (2 * math.pi / num_classes)
    feats = _randn(n, 2, g=g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    arm = _randint(num_classes, n, g)
    angle = rads[arm] + rate * feats[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    # FFJORD: einsum("ti,tij->tj", features, [[cos, -sin], [sin, cos]])
    x = torch.stack([feats[:, 0] * c + feats[:, 1] * s, -feats[:, 0] * s + feats[:, 1] * c], 1)
    return 2 * x, arm


#: The toys with their labels: ``sampler(n, generator) -> (points, labels or None)`` and the
#: number of classes (0: no natural labels).
LABELED_TOYS: dict[str, tuple[Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]], int]]
LABELED_TOYS = {
    "checkerboard": (_checkerboard, 8),
    "circles": (_rings_of(*_CIRCLES), 2),
    "8gaussians": (_eightgaussians, 8),
    "swissroll": (_swissroll, 0),
    "2spirals": (_twospirals, 2),
    "rings": (_rings_of(*_RINGS), 4),
    "moons": (_moons, 2),
    "pinwheel": (_pinwheel, 5),
}


def _points(fn: Callable[[int, torch.Generator], tuple[Tensor, Tensor | None]]):
    return lambda n, g: fn(n, g)[0]


#: The eight 2-D toys by name: ``sampler(n, generator) -> (n, 2)`` float32 tensor.
TOYS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    name: _points(fn) for name, (fn, _) in LABELED_TOYS.items()
}


def _check_toy(name: str) -> None:
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}: choose one of {', '.join(TOYS)}")


def sample_toy(name: str, n: int, generator: torch.Generator) -> Tensor:
    """``n`` fresh points of toy ``name`` drawn with ``generator``: a float32 ``(n, 2)`` tensor."""
    _check_toy(name)
    return TOYS[name](n, generator)


# ---- densities (float64) ---------------------------------------------------------------------
def _ring_logp(x: np.ndarray, radii: tuple[float, ...], std: float) -> np.ndarray:
    from scipy import special  # imported on use: keeps `import sdelab` light

    rho = np.linalg.norm(x, axis=-1)[..., None]  # (..., 1)
    r = np.asarray(radii)
    s2 = std**2
    # log[exp(−(ρ² + r²)/2s²) I₀(ρr/s²)] = −(ρ − r)²/2s² + log i0e(ρr/s²)
    comp = -((rho - r) ** 2) / (2 * s2) + np.log(special.i0e(rho * r / s2))
    return special.logsumexp(comp, axis=-1) - math.log(len(radii)) - math.log(2 * math.pi * s2)


def _log_gauss(std: float) -> Callable[[Tensor], Tensor]:
    def log_k(d: Tensor) -> Tensor:
        return -0.5 * (d / std) ** 2 - 0.5 * math.log(2 * math.pi * std**2)

    return log_k


def _box_gauss(width: float, std: float, log: bool = True) -> Callable[[Tensor], Tensor]:
    """1-D (log) density of U[0, width] + N(0, std²): (Φ(d/s) − Φ((d − w)/s)) / w."""

    def k(d: Tensor) -> Tensor:
        a, b = d / std, (d - width) / std
        upper = b > -a  # right of the box centre: use the mirrored tails Φ(−b) − Φ(−a)
        hi, lo = torch.where(upper, -b, a), torch.where(upper, -a, b)
        if not log:
            return (torch.special.ndtr(hi) - torch.special.ndtr(lo)) / width
        la, lb = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
        return la + torch.log1p(-torch.exp(lb - la)) - math.log(width)

    return k


class _KernelMixture:
    """p(x) = Σ_m w_m Π_d k(s_m (x_d − μ_md)): a mixture of a separable 1-D kernel ``k`` placed at
    ``centers`` (M, 2) with orientation ``signs`` (M,) = ±1 (mirrored arms) and weights w (M,);
    ``log_k`` and (optionally, when exp(log_k) loses precision) ``k`` evaluate the kernel.

    Curves blurred by a kernel become such mixtures through Gauss–Legendre quadrature nodes.
    """

    def __init__(self, centers, log_w, log_k, k=None, signs=None) -> None:
        self.centers = torch.as_tensor(centers, dtype=torch.float64)
        self.log_w = torch.as_tensor(log_w, dtype=torch.float64)
        self.signs = torch.ones(len(self.log_w), dtype=torch.float64) if signs is None else signs
        self.log_k = log_k
        self.k = k if k is not None else lambda d: torch.exp(log_k(d))

    def _log_terms(self, x: Tensor) -> Tensor:  # (n, 2) -> (n, M) log w_m k(x − μ_m)
        d = self.signs[:, None] * (x[:, None, :] - self.centers)
        return self.log_w + self.log_k(d).sum(-1)

    def log_prob(self, x: Tensor, chunk: int = 4096) -> Tensor:
        # Separable sum in linear space (fast); log-space only for points where it underflows.
        p = torch.cat(
            [
                self._kernel_matrix(xi[:, 0], 0) * self._kernel_matrix(xi[:, 1], 1)
                for xi in x.split(chunk)
            ]
        )
        logp = p.mul(self.log_w.exp()).sum(1).log()
        far = torch.isinf(logp).nonzero().flatten()
        if len(far):
            logp[far] = torch.logsumexp(self._log_terms(x[far]), dim=1)
        return logp

    def _kernel_matrix(self, u: Tensor, dim: int) -> Tensor:  # (G,) -> (G, M)
        return self.k(self.signs * (u[:, None] - self.centers[:, dim]))

    def grid_density(self, u: Tensor) -> Tensor:
        """p on the grid u × u, (G, G): separable, so one matrix product (G, M) @ (M, G)."""
        return (self._kernel_matrix(u, 0) * self.log_w.exp()) @ self._kernel_matrix(u, 1).T


def _gauss_legendre(lo: float, hi: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import roots_legendre  # O(m) asymptotics, unlike numpy's O(m³) leggauss

    nodes, weights = roots_legendre(m)
    return lo + (hi - lo) * (nodes + 1) / 2, weights * (hi - lo) / 2


@cache
def _eight_mixture() -> _KernelMixture:
    return _KernelMixture(
        _eight_centers(), np.full(8, -math.log(8)), _log_gauss(0.5 / _EIGHT_SCALE)
    )


@cache
def _swissroll_mixture() -> _KernelMixture:
    t, w = _gauss_legendre(1.5 * math.pi, 4.5 * math.pi, 800)
    return _KernelMixture(_swissroll_curve(t), np.log(w / (3 * math.pi)), _log_gauss(0.2))


@cache
def _moons_mixture() -> _KernelMixture:
    theta, w = _gauss_legendre(0.0, math.pi, 240)
    outer, inner = _moons_curves(theta)
    log_w = np.log(np.concatenate([w, w]) / (2 * math.pi))
    return _KernelMixture(np.concatenate([outer, inner]), log_w, _log_gauss(0.2))


@cache
def _twospirals_mixture() -> _KernelMixture:
    m, w = _gauss_legendre(0.0, 3 * math.pi, 1000)
    log_q = np.log(w * 2 * m / (3 * math.pi) ** 2 / 2)  # density of m (∝ m), half per arm
    c = np.stack([-np.cos(m) * m, np.sin(m) * m], axis=-1) / 3  # (M, 2)
    signs = torch.cat([torch.ones(len(m)), -torch.ones(len(m))]).to(torch.float64)
    return _KernelMixture(
        np.concatenate([c, -c]),
        np.concatenate([log_q, log_q]),
        _box_gauss(0.5 / 3, 0.1),
        _box_gauss(0.5 / 3, 0.1, log=False),
        signs,
    )


def _checkerboard_logp(x: np.ndarray) -> np.ndarray:
    inside = (np.abs(x) < 4).all(-1)
    black = (np.floor(x[..., 0] / 2) + np.floor(x[..., 1] / 2)) % 2 == 0
    return np.where(inside & black, -math.log(32), -np.inf)


_MIXTURES: dict[str, Callable[[], _KernelMixture]] = {
    "8gaussians": _eight_mixture,
    "swissroll": _swissroll_mixture,
    "moons": _moons_mixture,
    "2spirals": _twospirals_mixture,
}
_RADIAL = {"circles": _CIRCLES, "rings": _RINGS}
# Half-width of the entropy grid: support radius + 8 kernel widths.
_GRID_HALF_WIDTH = {
    "8gaussians": 2.83 + 8 * 0.354,
    "swissroll": 2.83 + 1.6,
    "moons": 3.0 + 1.6,
    "2spirals": math.pi + 0.17 + 0.8,
}
_WITH_DENSITY = ("checkerboard", *_RADIAL, *_MIXTURES)


def toy_log_prob(name: str, x: Tensor) -> Tensor:
    """Exact log-density (nats) of toy ``name`` at points ``x`` ``(N, 2)``: a ``(N,)`` tensor.

    Raises ``ValueError`` for ``pinwheel``, whose density is intractable. See the module
    docstring for how each density is evaluated.
    """
    _check_toy(name)
    if name not in _WITH_DENSITY:
        raise ValueError(
            f"toy {name!r} has no tractable density: choose one of {', '.join(_WITH_DENSITY)}"
        )
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"toy densities take points of shape (N, 2), got {tuple(x.shape)}")
    x64 = x.detach().cpu().to(torch.float64)
    if name in _MIXTURES:
        out = _MIXTURES[name]().log_prob(x64)
    elif name in _RADIAL:
        out = torch.from_numpy(_ring_logp(x64.numpy(), *_RADIAL[name]))
    else:
        out = torch.from_numpy(_checkerboard_logp(x64.numpy()))
    return out.to(x.dtype)


def _radial_entropy(radii: tuple[float, ...], std: float) -> float:
    from scipy import integrate

    rho = np.linspace(0.0, max(radii) + 12 * std, 40_001)
    x = np.stack([rho, np.zeros_like(rho)], axis=1)
    logp = _ring_logp(x, radii, std)
    return float(integrate.simpson(-2 * np.pi * rho * np.exp(logp) * logp, x=rho))


def _grid_entropy(name: str, step: float = 0.02) -> float:
    half = _GRID_HALF_WIDTH[name]
    u = torch.arange(-half + step / 2, half, step, dtype=torch.float64)  # cell midpoints
    p = _MIXTURES[name]().grid_density(u)
    logp = torch.where(p > 0, p, 1.0).log()
    return float(-(p * logp).sum() * step**2)


@cache
def toy_entropy(name: str) -> float | None:
    """True differential entropy (nats) of toy ``name``, or ``None`` where unknown (pinwheel).

    checkerboard: ln 32 exactly; circles, rings: 1-D radial integral; 8gaussians, moons,
    swissroll, 2spirals: 2-D grid integral of −p log p (see the module docstring). Results are
    cached; the slowest (swissroll, 2spirals) take a few seconds on first use.
    """
    _check_toy(name)
    if name == "checkerboard":
        return math.log(32)
    if name in _RADIAL:
        return _radial_entropy(*_RADIAL[name])
    if name in _MIXTURES:
        return _grid_entropy(name)
    return None


# ---- datasets --------------------------------------------------------------------------------


class ToyDataset(VectorData):
    """A 2-D toy as a dataset: fresh training batches from a generator, a fixed test set per seed.

    Args:
        name: one of :data:`TOYS`.
        seed: the run seed; the test set is drawn from an independent stream of it.
    """

    dim = 2

    def __init__(self, name: str, seed: int = 0) -> None:
        _check_toy(name)
        self.name = name
        self.seed = int(seed)
        #: number of natural classes (0: the toy has no labels), see :data:`LABELED_TOYS`
        self.num_classes = LABELED_TOYS[name][1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` fresh training points, ``(n, 2)`` float32."""
        return sample_toy(self.name, n, generator)

    def sample_labeled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` fresh points and their class labels ``(n,)`` int64 — the same points
        :meth:`sample` draws from the same generator state.

        Raises:
            ValueError: the toy has no natural classes (swissroll).
        """
        x, labels = LABELED_TOYS[self.name][0](n, generator)
        if labels is None:
            raise no_labels_error(self.name)
        return x, labels

    def test_set(self, n: int) -> Tensor:
        """The held-out test set: the same ``n`` points for the same seed, ``(n, 2)``."""
        return self.sample(
            n, torch.Generator().manual_seed(derive_seed(self.seed, streams.TOY_TEST_SET))
        )

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density, see :func:`toy_log_prob`."""
        return toy_log_prob(self.name, x)

    def entropy(self) -> float | None:
        """True differential entropy in nats (``None`` if unknown)."""
        return toy_entropy(self.name)


def no_labels_error(name: str) -> ValueError:
    """The one-line error for a dataset without class labels, naming those that have them."""
    labeled = [k for k, (_, c) in LABELED_TOYS.items() if c]
    return ValueError(
        f"dataset {name!r} has no class labels: use a labeled one ({', '.join(labeled)}, or "
        "image data: digits, mnist, fashion_mnist, cifar10, a folder with class sub-folders)"
    )


class OracleDataset(ToyDataset):
    """The Gaussian oracle N(mean, cov) as a dataset (exact score, density and entropy).

    Defaults to the demo's correlated 2-D Gaussian. ``mean`` is a list of D numbers and ``cov``
    a D×D nested list (or D variances).
    """

    def __init__(
        self,
        seed: int = 0,
        mean: list[float] | None = None,
        cov: list[list[float]] | list[float] | None = None,
    ) -> None:
        mean = [1.0, -0.5] if mean is None else mean
        cov = [[1.0, 0.7], [0.7, 0.8]] if cov is None else cov
        self.gaussian = GaussianData(torch.tensor(mean, dtype=_F32), torch.tensor(cov, dtype=_F32))
        self.name = "oracle"
        self.seed = int(seed)
        self.dim = self.gaussian.dim
        self.num_classes = 0

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.gaussian.sample(n, generator=generator)

    def sample_labeled(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise no_labels_error(self.name)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.gaussian.log_prob(x)

    def entropy(self) -> float | None:
        return self.gaussian.entropy()
