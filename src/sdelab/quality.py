"""Sample quality: feature extractors, reference statistics and one evaluation call.

The composition layer between :mod:`sdelab.metrics` (numbers from feature sets) and the run
layer (which draws samples and reads data sets). Nothing here touches a run folder:

- a *feature extractor* is a callable ``x (B, ...) -> features (B, F)``; extractors that
  classify also have ``features_and_probs(x) -> (features (B, F), probs (B, C))``, which the
  Inception score needs. Three come with sdelab: :class:`IdentityFeatures` (2-D and tabular
  data), :class:`ClassifierFeatures` (the penultimate layer of a clean classifier trained with
  ``sdelab train-classifier --clean``: a Fréchet distance that runs on a CPU) and
  :class:`InceptionFeatures` (the FID-standard Inception-v3, from a weights file);
- :func:`feature_stats` streams batches into the mean and covariance of their features, saved
  by :func:`save_stats` as an ``.npz`` with keys ``mu`` and ``sigma`` (the layout of
  ScoreFlow's and pytorch-fid's reference files, which :func:`load_stats` reads);
- :func:`collect_features` gathers the features (and probabilities) of samples, and
  :func:`evaluate_quality` turns them, with reference features or statistics, into every
  requested metric.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from sdelab import metrics as M
from sdelab.nets.inception import FIDInceptionV3
from sdelab.utils import atomic_write

__all__ = [
    "METRICS",
    "NEEDS_REFERENCE_FEATURES",
    "ClassifierFeatures",
    "FeatureExtractor",
    "FeatureStats",
    "Features",
    "IdentityFeatures",
    "InceptionFeatures",
    "ProbabilisticExtractor",
    "QualityResult",
    "check_metrics",
    "collect_features",
    "evaluate_quality",
    "feature_stats",
    "load_stats",
    "save_stats",
]

METRICS: dict[str, str] = {
    "fd": "Fréchet distance of the features (FID with Inception features)",
    "kid": "kernel Inception distance: unbiased cubic-kernel MMD² over subsets, mean ± sd",
    "is": "Inception score of the class probabilities over splits, mean ± sd",
    "pr": "precision and recall of k-NN feature manifolds",
    "energy": "energy distance of the features",
    "mmd": "unbiased Gaussian-kernel MMD² (median-heuristic bandwidth unless given)",
    "sw2": "sliced 2-Wasserstein distance over random directions",
}
NEEDS_REFERENCE_FEATURES = ("kid", "pr", "energy", "mmd", "sw2")


# ---- extractors ----------------------------------------------------------------------------
@runtime_checkable
class FeatureExtractor(Protocol):
    """``x (B, ...) -> features (B, F)``, any callable; no gradients are needed."""

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class ProbabilisticExtractor(FeatureExtractor, Protocol):
    """An extractor that also classifies: ``features_and_probs(x) -> ((B, F), (B, C))``."""

    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


def _device_of(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class IdentityFeatures:
    """The data themselves, flattened, as features ``(B, D)`` (2-D toys, tabular data)."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.detach().reshape(x.shape[0], -1)


class ClassifierFeatures:
    """Penultimate features of a (clean) classifier, and its class probabilities.

    Args:
        net: a :class:`~sdelab.nets.classifier.ConvClassifier` or
            :class:`~sdelab.nets.classifier.TimeClassifier` (anything with ``features(x, t)``
            and ``classify(features)``), e.g. the one ``sdelab train-classifier --clean``
            trains; it is put in eval mode.
        t: the time it is evaluated at: the schedule's ``t_min`` for a clean classifier (the
            samples are fed as they are, without the σ_min noise of its training, so the
            features are deterministic).
    """

    def __init__(self, net: nn.Module, t: float) -> None:
        if not (hasattr(net, "features") and hasattr(net, "classify")):
            raise ValueError(
                f"{type(net).__name__} has no features(x, t)/classify(h): use a "
                "ConvClassifier or TimeClassifier"
            )
        self.net, self.t = net.eval(), float(t)

    def _features(self, x: Tensor) -> Tensor:
        device = _device_of(self.net)
        x = x.to(device)
        return self.net.features(x, torch.full((x.shape[0],), self.t, device=device))

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self._features(x).cpu()

    @torch.no_grad()
    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self._features(x)
        return h.cpu(), self.net.classify(h).softmax(dim=1).cpu()


class InceptionFeatures:
    """Pool features ``(B, 2048)`` and 1008-class probabilities of the FID Inception-v3.

    Args:
        net: a :class:`~sdelab.nets.inception.FIDInceptionV3`, normally from
            :func:`~sdelab.nets.inception.load_fid_inception` (the real weights).
        scale, shift: the data's model space y = scale·x + shift with x ∈ [0, 1] images
            (sdelab's ``"[-1,1]"`` is (2, −1), the default); samples are mapped back to x and
            clamped to [0, 1].
        image_shape: ``(C, H, W)`` of flattened samples ``(B, C·H·W)``.
    """

    def __init__(
        self,
        net: FIDInceptionV3,
        *,
        scale: float = 2.0,
        shift: float = -1.0,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.net, self.scale, self.shift, self.image_shape = net.eval(), scale, shift, image_shape

    def _images(self, x: Tensor) -> Tensor:
        if x.ndim == 2 and self.image_shape is not None:
            x = x.reshape(x.shape[0], *self.image_shape)
        return ((x.to(_device_of(self.net), torch.float32) - self.shift) / self.scale).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        return self.net(self._images(x)).cpu()

    @torch.no_grad()
    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pool, logits = self.net.features_and_logits(self._images(x))  # logits without bias
        return pool.cpu(), logits.softmax(dim=1).cpu()


# ---- features and statistics ---------------------------------------------------------------
class Features(NamedTuple):
    """Features ``(n, F)`` of a sample set and, from a classifying extractor, probs ``(n, C)``."""

    features: Tensor
    probs: Tensor | None = None


class FeatureStats(NamedTuple):
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` (float64) of ``n`` feature rows
    (``n`` is ``None`` for a reference file that does not record it)."""

    mu: Tensor
    sigma: Tensor
    n: int | None


def _batch_tensor(batch: Tensor | tuple | list) -> Tensor:
    """A batch, or the first element of a ``(x, labels, ...)`` batch from a data loader."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor) or batch.ndim < 1:
        raise ValueError(f"batches must be tensors (B, ...) or (x, ...) tuples, got {type(batch)}")
    return batch


def collect_features(
    extractor: FeatureExtractor,
    batches: Iterable[Tensor],
    *,
    probs: bool = False,
    max_n: int | None = None,
) -> Features:
    """Features (and class probabilities) of every batch, concatenated in order.

    Args:
        extractor: a :class:`FeatureExtractor` (with ``probs=True``, a
            :class:`ProbabilisticExtractor`).
        batches: tensors ``(B, ...)`` or ``(x, labels, ...)`` tuples.
        probs: also collect ``features_and_probs``'s probabilities (for the Inception score).
        max_n: stop after this many rows (the last batch is cut).

    Returns:
        :class:`Features` with ``features`` ``(n, F)`` (float64) and ``probs`` ``(n, C)`` or
        ``None``.
    """
    if probs and not isinstance(extractor, ProbabilisticExtractor):
        raise ValueError(
            f"{type(extractor).__name__} gives no class probabilities: use ClassifierFeatures "
            "or InceptionFeatures for the Inception score"
        )
    feats, ps, n = [], [], 0
    for batch in batches:
        x = _batch_tensor(batch)
        if max_n is not None:
            x = x[: max_n - n]
        if x.shape[0] == 0:
            break
        if probs:
            f, p = extractor.features_and_probs(x)
            ps.append(p.detach().to(torch.float64).cpu())
        else:
            f = extractor(x)
        feats.append(f.detach().reshape(f.shape[0], -1).to(torch.float64).cpu())
        n += x.shape[0]
        if max_n is not None and n >= max_n:
            break
    if not feats:
        raise ValueError("no batches to extract features from")
    return Features(torch.cat(feats), torch.cat(ps) if probs else None)


def feature_stats(
    extractor: FeatureExtractor, batches: Iterable[Tensor], *, max_n: int | None = None
) -> FeatureStats:
    """Mean and covariance of the extractor's features over all batches, streamed in float64.

    The sums are taken around the first batch's mean, so large feature offsets do not cancel
    catastrophically; memory is O(F²) whatever the number of batches.

    Args:
        extractor: a :class:`FeatureExtractor`, e.g. ``IdentityFeatures()``.
        batches: tensors ``(B, ...)`` or ``(x, labels, ...)`` tuples (a data loader).
        max_n: stop after this many rows (the last batch is cut).

    Returns:
        ``FeatureStats(mu (F,), sigma (F, F), n)``; unpacks as ``mu, sigma, n``.

    Raises:
        ValueError: fewer than 2 rows in all, or batches whose feature sizes differ.
    """
    n, shift, total, outer = 0, None, None, None
    for batch in batches:
        x = _batch_tensor(batch)
        if max_n is not None:
            x = x[: max_n - n]
        if x.shape[0] == 0:
            break
        f = extractor(x)
        f = f.detach().reshape(f.shape[0], -1).to(torch.float64).cpu()
        if shift is None:
            shift = f.mean(0)
            total = torch.zeros_like(shift)
            outer = torch.zeros(shift.numel(), shift.numel(), dtype=torch.float64)
        elif f.shape[1] != shift.numel():
            raise ValueError(f"feature sizes differ between batches: {shift.numel()}, {f.shape[1]}")
        c = f - shift
        total += c.sum(0)
        outer += c.T @ c
        n += f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 rows for a covariance, got {n}")
    mean_c = total / n
    sigma = (outer - n * torch.outer(mean_c, mean_c)) / (n - 1)
    return FeatureStats(shift + mean_c, 0.5 * (sigma + sigma.T), n)


def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write ``stats`` to an ``.npz`` with keys ``mu``, ``sigma`` (float64) and ``n``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if stats.n is None else {"n": np.int64(stats.n)}
    buf = io.BytesIO()  # written whole, then renamed into place: never a half-written file
    np.savez(buf, mu=_np64(stats.mu), sigma=_np64(stats.sigma), **extra)
    atomic_write(path, buf.getvalue())
    return path


def _np64(v: Tensor | np.ndarray) -> np.ndarray:
    return torch.as_tensor(v).detach().cpu().to(torch.float64).numpy()


def load_stats(path: str | Path) -> FeatureStats:
    """Read reference statistics: an ``.npz`` with ``mu`` ``(F,)`` and ``sigma`` ``(F, F)``
    (sdelab's, ScoreFlow's ``cifar10_stats.npz``, pytorch-fid's ``--save-stats`` files).

    Raises:
        FileNotFoundError: no file; ValueError: keys or shapes that are not statistics.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no statistics file {path}: write one with `sdelab stats` or "
            "sdelab.quality.save_stats(path, feature_stats(...))"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(
                    f"{path} has keys {sorted(data)}; statistics need 'mu' and 'sigma'"
                )
            mu = torch.from_numpy(np.asarray(data["mu"], dtype=np.float64).copy())
            sigma = torch.from_numpy(np.asarray(data["sigma"], dtype=np.float64).copy())
            n = int(data["n"]) if "n" in data else None
    except ValueError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, zlib.error, KeyError, ...
        raise ValueError(
            f"{path} is not a readable .npz ({type(e).__name__}: truncated or damaged): write "
            "it again with `sdelab stats`"
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.numel(), mu.numel()):
        raise ValueError(
            f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not (F,), (F, F)"
        )
    check_stats(mu, sigma, path)
    return FeatureStats(mu, sigma, n)


def check_stats(mu: Tensor, sigma: Tensor, source: str | Path = "the statistics") -> None:
    """Refuse statistics that cannot be a mean and covariance: a ``ValueError`` naming the
    cause for a mean or covariance with NaN/inf, a covariance that is not symmetric, or one
    with a negative eigenvalue (not positive semi-definite; tolerance 1e-6 of the largest)."""
    fix = "write the file again with `sdelab stats`"
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"{source}: the mean mu contains NaN or inf: {fix}")
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError(f"{source}: the covariance sigma contains NaN or inf: {fix}")
    if sigma.numel():
        if float((sigma - sigma.T).abs().max()) > 1e-6 * float(sigma.abs().max()):
            raise ValueError(f"{source}: the covariance sigma is not symmetric: {fix}")
        eig = torch.linalg.eigvalsh(sigma)
        if float(eig[0]) < -1e-6 * max(float(eig[-1]), 0.0):
            raise ValueError(
                f"{source}: the covariance sigma is not positive semi-definite (eigenvalue "
                f"{float(eig[0]):.3g}): {fix}"
            )


# ---- evaluation ----------------------------------------------------------------------------
@dataclass
class QualityResult:
    """Every requested metric (``None`` when not requested). ``kid`` and ``inception_score``
    come with their sd over subsets / splits; ``n_reference`` is ``None`` when the reference
    statistics do not record it."""

    n_samples: int
    n_reference: int | None
    fd: float | None = None
    kid: float | None = None
    kid_sd: float | None = None
    inception_score: float | None = None
    inception_score_sd: float | None = None
    precision: float | None = None
    recall: float | None = None
    energy: float | None = None
    mmd2: float | None = None
    sliced_w2: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        """The computed fields, for JSON."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def check_metrics(metrics: Iterable[str] | str) -> tuple[str, ...]:
    """Metric names (a list or one comma-separated string such as ``"fd,kid"``) as a tuple;
    ``ValueError`` listing the valid names for an unknown or empty choice. Call it before
    drawing samples to fail early."""
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    names = tuple(metrics)
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"unknown metric(s) {unknown or '(none given)'}: choose from {', '.join(METRICS)}"
        )
    return names


def evaluate_quality(
    sample_features: Tensor | Features,
    reference: Tensor | Features | FeatureStats,
    metrics: Iterable[str] | str = ("fd", "kid", "is", "pr"),
    *,
    sample_probs: Tensor | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    mmd_bandwidth: float | None = None,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> QualityResult:
    """Sample-quality metrics of sample features against reference features or statistics.

    Args:
        sample_features: features ``(n, F)`` of the samples, or :class:`Features` from
            :func:`collect_features` (its ``probs`` serve the Inception score).
        reference: the reference set's features ``(m, F)`` (or :class:`Features`), or its
            :class:`FeatureStats` (from :func:`feature_stats` / :func:`load_stats`): enough
            for ``fd`` only.
        metrics: names from :data:`METRICS` (``fd``, ``kid``, ``is``, ``pr``, ``energy``,
            ``mmd``, ``sw2``), or one comma-separated string such as ``"fd,kid"``.
        sample_probs: class probabilities ``(n, C)`` for ``is`` (overrides ``Features.probs``).
        kid_subsets, kid_subset_size: KID's subsets (each of min(size, n, m) rows).
        is_splits: the Inception score's splits (at most n).
        pr_k: the k of the k-NN manifolds.
        mmd_bandwidth: the Gaussian kernel's bandwidth for ``mmd`` (median heuristic if None).
        num_projections: directions of the sliced W2.
        generator: randomness of KID's subsets and the sliced W2's directions.

    Returns:
        A :class:`QualityResult`.

    Raises:
        ValueError: an unknown metric (the message lists the valid ones); ``is`` without class
            probabilities; a metric needing reference features given only statistics; feature
            sizes that differ.
    """
    names = check_metrics(metrics)
    if isinstance(sample_features, Features):
        sample_features, probs = sample_features
        sample_probs = sample_probs if sample_probs is not None else probs
    x = torch.as_tensor(sample_features).detach().to(torch.float64).cpu()
    x = x.reshape(x.shape[0], -1)
    if isinstance(reference, Features):
        reference = reference.features
    if isinstance(reference, FeatureStats):
        ref_stats, y, n_ref = reference, None, reference.n
        ref_dim = torch.as_tensor(reference.mu).numel()
    else:
        y = torch.as_tensor(reference).detach().to(torch.float64).cpu()
        y = y.reshape(y.shape[0], -1)
        ref_stats, n_ref, ref_dim = None, y.shape[0], y.shape[1]
    if x.shape[1] != ref_dim:
        raise ValueError(
            f"samples have {x.shape[1]} features but the reference has {ref_dim}: "
            "use the same feature extractor for both"
        )
    if not torch.isfinite(x).all() or (y is not None and not torch.isfinite(y).all()):
        raise ValueError("features contain NaN or inf: check the samples and the extractor")
    need_features = [m for m in names if m in NEEDS_REFERENCE_FEATURES]
    if y is None and need_features:
        raise ValueError(
            f"metrics {need_features} need reference features, not only statistics: pass the "
            "reference features (collect_features) or keep to 'fd'"
        )
    if "is" in names and sample_probs is None:
        raise ValueError(
            "metric 'is' needs class probabilities: collect features with probs=True from "
            "ClassifierFeatures or InceptionFeatures (or pass sample_probs=), or drop 'is'"
        )
    if "is" in names and sample_probs.shape[0] != x.shape[0]:
        raise ValueError(
            f"{sample_probs.shape[0]} rows of class probabilities for {x.shape[0]} samples: "
            "pass the probabilities of the same samples"
        )

    result = QualityResult(n_samples=x.shape[0], n_reference=n_ref)
    if "fd" in names:
        mu, sigma = (ref_stats.mu, ref_stats.sigma) if y is None else M.feature_moments(y)
        result.fd = M.frechet_distance(*M.feature_moments(x), mu, sigma)
    if "kid" in names:
        result.kid, result.kid_sd = M.kid(
            x, y, num_subsets=kid_subsets, subset_size=kid_subset_size, generator=generator
        )
    if "is" in names:
        result.inception_score, result.inception_score_sd = M.inception_score(
            sample_probs, splits=min(is_splits, int(sample_probs.shape[0]))
        )
    if "pr" in names:
        result.precision, result.recall = M.precision_recall(y, x, k=pr_k)
    if "energy" in names:
        result.energy = M.energy_distance(x, y)
    if "mmd" in names:
        result.mmd2 = M.mmd2_gaussian(x, y, mmd_bandwidth)
    if "sw2" in names:
        result.sliced_w2 = M.sliced_w2(x, y, num_projections=num_projections, generator=generator)
    return result
