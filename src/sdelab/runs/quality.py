"""Sample quality of a run: feature extractors by name, reference statistics of a data set,
and every metric of a run's samples (:func:`run_quality`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdelab import distributed
from sdelab.data import Dataset
from sdelab.nets.inception import load_fid_inception
from sdelab.progress import Progress
from sdelab.quality import (
    NEEDS_REFERENCE_FEATURES,
    ClassifierFeatures,
    FeatureExtractor,
    Features,
    FeatureStats,
    IdentityFeatures,
    InceptionFeatures,
    ProbabilisticExtractor,
    QualityResult,
    check_metrics,
    collect_features,
    evaluate_quality,
    feature_stats,
    load_stats,
)
from sdelab.runs.core import LoadedRun, open_run
from sdelab.runs.sampling import sample_run
from sdelab.samplers import SampleResult
from sdelab.sde import make_schedule
from sdelab.train.classifier import load_classifier
from sdelab.train.evalstore import EVAL_DIR, EvalStore

# ---- sample quality --------------------------------------------------------------------------
#: Feature extractors by CLI name (``--features``).
FEATURES = ("identity", "classifier", "inception")


def make_extractor(
    kind: str,
    dataset: Dataset,
    *,
    classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
) -> FeatureExtractor:
    """The feature extractor ``kind`` (:data:`FEATURES`) for samples of ``dataset``.

    ``identity``: the data themselves (2-D and tabular data). ``classifier``: the penultimate
    layer of a classifier folder from ``sdelab train-classifier`` (``--clean`` for a clean one),
    evaluated at its schedule's t_min. ``inception``: the FID-standard Inception-v3 from a
    weights file (images only; never downloaded).

    Raises:
        ValueError: an unknown kind, a missing ``classifier`` / ``inception_weights``, a
            classifier for another data dimension, Inception on vector data.
        FileNotFoundError: a weights file or classifier folder that does not exist.
    """
    if kind not in FEATURES:
        raise ValueError(f"unknown features {kind!r}: choose one of {', '.join(FEATURES)}")
    if kind == "identity":
        return IdentityFeatures()
    if kind == "classifier":
        if classifier is None:
            raise ValueError(
                "--features classifier needs --classifier DIR (from sdelab train-classifier "
                "--clean)"
            )
        net, meta = load_classifier(classifier)
        if meta["dim"] != dataset.dim:
            raise ValueError(
                f"classifier {classifier} is for data of dimension {meta['dim']}, the data have "
                f"{dataset.dim}: train one on this data set"
            )
        t_min = make_schedule(meta["sde"]["name"], **meta["sde"]["kwargs"]).t_min
        return ClassifierFeatures(net, t_min)
    if dataset.image_shape is None:
        raise ValueError(
            "--features inception needs image data; use --features identity or classifier"
        )
    if inception_weights is None:
        raise ValueError(
            "--features inception needs --inception-weights PATH (pt_inception-2015-12-05 "
            "weights, see docs/how-to/quality.md)"
        )
    return InceptionFeatures(
        load_fid_inception(inception_weights),
        scale=dataset.scale,
        shift=dataset.shift,
        image_shape=dataset.image_shape,
    )


def data_split(dataset: Dataset, split: str, n: int | None, seed: int = 0) -> torch.Tensor:
    """Model-space points of a data set's ``split`` (``train`` or ``test``), the first ``n``.

    Images: the split's levels at their bin centres. Vector data: the fixed test set, or ``n``
    training draws seeded by ``seed`` (default n: 10,000).
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: choose train or test")
    if dataset.num_levels is not None:
        levels = dataset.load(split).levels if split == "train" else dataset.test_set(10**9)
        levels = levels[:n] if n is not None else levels
        return dataset.to_model(levels.to(torch.int64))
    n = n or 10_000
    if split == "test":
        return dataset.test_set(n)
    return dataset.sample(n, torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, size: int = 500):
    return x.split(size)


def _shown(batches: Iterable[torch.Tensor], desc: str, enabled: bool) -> Iterator[torch.Tensor]:
    """The batches, with progress on stderr (a bar on a terminal, else plain lines)."""
    batches = list(batches)
    with Progress(len(batches), desc, "batches", enabled=enabled) as bar:
        for b in batches:
            yield b
            bar.update()


def dataset_stats(
    dataset: Dataset,
    extractor: FeatureExtractor,
    *,
    split: str = "train",
    n: int | None = None,
    progress: bool = True,
) -> FeatureStats:
    """Mean and covariance of the features of a data set split (``sdelab stats``)."""
    x = data_split(dataset, split, n)
    return feature_stats(extractor, _shown(_batches(x), f"features ({split})", progress))


@dataclass(frozen=True)
class QualityEvaluation:
    """What :func:`run_quality` returns: the metrics and how they were measured."""

    result: QualityResult
    nfe: int
    n_samples: int
    n_reference: int | None


def run_quality(
    run: str | Path | LoadedRun,
    *,
    metrics: str | tuple[str, ...] = "fd",
    features: str = "classifier",
    classifier: str | Path | None = None,
    inception_weights: str | Path | None = None,
    n: int = 1000,
    sampler: str = "euler_maruyama",
    steps: int = 1000,
    seed: int = 0,
    which: str = "ema",
    options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    stats: str | Path | None = None,
    reference_split: str = "test",
    n_reference: int | None = None,
    kid_subset_size: int | None = None,
    resumable: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> QualityEvaluation:
    """Sample-quality metrics of a trained run (``sdelab evaluate``).

    Draws ``n`` samples with :func:`sample_run` (chunked and split over launched processes
    like ``sdelab sample``), extracts their features, and compares them with the reference:
    the features of the run's own data set split ``reference_split`` (all of it, or the first
    ``n_reference`` ≥ 2 points), or — for ``fd`` alone — a statistics file ``stats`` (keys
    ``mu``, ``sigma``, from ``sdelab stats`` or ScoreFlow's ``*_stats.npz``; checked finite,
    symmetric and positive semi-definite). KID uses 100 subsets of ``kid_subset_size`` rows
    (default: 1000 or the smaller set's size; a larger size is refused). ``resumable``: every
    finished sample chunk is kept in ``RUN/eval/quality/`` (locked while this runs, removed
    when done, and removed too if an evaluation started afresh fails with an error) so that an
    interrupted evaluation continues with ``resume=True`` and draws only the missing chunks,
    giving the same samples and metrics as an uninterrupted one; other options on resume are
    refused, and so is ``resume`` with nothing to resume.

    Everything that can be checked is checked before the first sample is drawn.

    Raises:
        ValueError: unknown metrics, metrics needing reference features with only ``stats``,
            statistics or reference features of another dimension than the samples' features,
            ``n_reference`` < 2, an impossible ``kid_subset_size``, a store to resume that
            is absent, damaged or made with other options, the extractor's errors
            (:func:`make_extractor`).
        RunLockedError: another process is evaluating the run (its store is locked).
    """
    names = check_metrics(metrics)
    if n_reference is not None and n_reference < 2:
        raise ValueError(
            f"--n-reference must be at least 2 points (a covariance), got {n_reference}"
        )
    loaded = open_run(run, which)
    dataset = loaded.dataset
    extractor = make_extractor(
        features, dataset, classifier=classifier, inception_weights=inception_weights
    )
    need_probs = "is" in names
    if need_probs and not isinstance(extractor, ProbabilisticExtractor):
        raise ValueError(
            f"metric 'is' needs class probabilities: --features {features} has none; use "
            "--features classifier or inception, or drop 'is'"
        )
    reference: Features | FeatureStats
    if stats is not None:
        needs = [m for m in names if m in NEEDS_REFERENCE_FEATURES]
        if needs:
            raise ValueError(
                f"metrics {', '.join(needs)} need reference features, which a statistics file "
                "does not hold: drop --stats (the run's data set is used) or keep to fd"
            )
        reference = load_stats(stats)
        ref_dim, n_ref = reference.mu.numel(), reference.n
        probe = data_split(dataset, "test", 2)
        if dataset.image_shape is not None:
            probe = probe.reshape(len(probe), *dataset.image_shape)
        feat_dim = collect_features(extractor, [probe]).features.shape[1]
        if feat_dim != ref_dim:
            raise ValueError(
                f"--stats {stats} holds statistics of {ref_dim} features, but --features "
                f"{features} gives {feat_dim} for this run's data: use statistics made with the "
                "same features and data (sdelab stats)"
            )
    else:
        ref = data_split(dataset, reference_split, n_reference)
        if len(ref) < 2:
            raise ValueError(
                f"the {reference_split} split of {dataset.name} has {len(ref)} point(s): a "
                "reference needs at least 2; choose the other --reference-split"
            )
        reference = collect_features(
            extractor, _shown(_batches(ref), "reference features", progress)
        )
        n_ref = len(reference.features)
    if "kid" in names:
        largest = n if n_ref is None else min(n, n_ref)
        if kid_subset_size is None:
            kid_subset_size = min(1000, largest)
        elif not 2 <= kid_subset_size <= largest:
            raise ValueError(
                f"--kid-subset-size {kid_subset_size} is impossible with {n} samples and "
                f"{n_ref} reference points: choose 2 to {largest}"
            )
    store = None
    if resumable or resume:  # finished sample chunks survive pre-emption
        record = dict(
            metrics=list(names), features=features, classifier=classifier and str(classifier),
            n=n, sampler=sampler, steps=steps, seed=seed, weights=which, checkpoint=loaded.step,
            options=options or {}, batch_size=batch_size,
        )  # fmt: skip
        folder = loaded.run_dir / EVAL_DIR / "quality"
        store = EvalStore(folder, record, resume=resume, command="sdelab evaluate")
        if resume and not store.finished():
            store.close()
            raise ValueError(
                f"nothing to resume: {folder} holds no finished sample chunk; run without "
                "--resume to start the evaluation"
            )
        if distributed.get_info().is_main:
            store.open()

    def cached(i: int) -> SampleResult | None:
        stored = store.get_tensors(i)
        if stored is None:
            return None
        t, meta = stored
        return SampleResult(samples=t["samples"], nfe=meta["nfe"], grid=meta["grid"])

    def on_chunk(i: int, res: SampleResult) -> None:
        store.put_tensors(i, {"samples": res.samples}, {"nfe": res.nfe, "grid": res.grid})

    with store.guard() if store is not None else contextlib.nullcontext():
        res = sample_run(
            loaded,
            n=n,
            sampler=sampler,
            steps=steps,
            seed=seed,
            options=options,
            batch_size=batch_size,
            cached=None if store is None else cached,
            on_chunk=None if store is None else on_chunk,
            progress=progress,
        )
        samples = res.samples
        if not bool(torch.isfinite(samples).all()):
            raise ValueError(
                "the samples contain NaN or inf (a diverged run or sampler): check the run with "
                "sdelab sample first"
            )
        if dataset.image_shape is not None:
            samples = samples.reshape(len(samples), *dataset.image_shape)
        feats = collect_features(extractor, _batches(samples), probs=need_probs)
        result = evaluate_quality(
            feats,
            reference,
            names,
            kid_subset_size=kid_subset_size or 1000,
            generator=torch.Generator().manual_seed(seed),
        )
        if store is not None:
            store.finish()  # complete
    return QualityEvaluation(result=result, nfe=res.nfe, n_samples=len(samples), n_reference=n_ref)
