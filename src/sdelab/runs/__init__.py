"""Run-level operations behind the CLI, one module per job: :mod:`~sdelab.runs.core` (open a run
once, its data splits and files), :mod:`~sdelab.runs.sampling` (samples, also class-guided),
:mod:`~sdelab.runs.likelihood` (NLL and bounds, resumable; the VDM bound; the denoising loss),
:mod:`~sdelab.runs.quality` (sample-quality metrics), :mod:`~sdelab.runs.plot` (plots of a 2-D
run) and :mod:`~sdelab.runs.foreign` (models trained elsewhere).

Each takes a run folder written by ``sdelab train`` and loads it with
:func:`sdelab.train.build.load_run` (no pickles; the config comes from the checkpoint).

:func:`sample_run` and :func:`run_likelihood` scale out: launched by ``torchrun`` /
``accelerate launch`` (:mod:`sdelab.distributed`), each process takes every N-th chunk of
samples or batch of test points, solves it alone — no collective inside a sampler or ODE
solver, so unequal adaptive step counts cannot hang — and the results are gathered in order
afterwards. Chunk i is seeded by (seed, i) and solved with the same batch as in one process,
so the numbers do not depend on the number of processes.
"""

from sdelab.runs.core import (
    METHODS,
    LoadedRun,
    check_finite_samples,
    open_run,
    save_samples,
    split_levels,
    write_json,
)
from sdelab.runs.foreign import (
    ForeignRun,
    foreign_run,
    foreign_sample,
)
from sdelab.runs.likelihood import (
    LikelihoodPlan,
    LikelihoodRow,
    LossEvaluation,
    VLBEvaluation,
    format_table,
    likelihood_table,
    plan_likelihood,
    run_likelihood,
    run_loss,
    run_vlb,
)
from sdelab.runs.plot import (
    plot_run,
)
from sdelab.runs.quality import (
    FEATURES,
    QualityEvaluation,
    data_split,
    dataset_stats,
    make_extractor,
    run_quality,
)
from sdelab.runs.sampling import (
    guided_sample_run,
    sample_chunks,
    sample_run,
)

__all__ = [
    "FEATURES",
    "METHODS",
    "ForeignRun",
    "LikelihoodPlan",
    "LikelihoodRow",
    "LoadedRun",
    "LossEvaluation",
    "QualityEvaluation",
    "VLBEvaluation",
    "check_finite_samples",
    "data_split",
    "dataset_stats",
    "foreign_run",
    "foreign_sample",
    "format_table",
    "guided_sample_run",
    "likelihood_table",
    "make_extractor",
    "open_run",
    "plan_likelihood",
    "plot_run",
    "run_likelihood",
    "run_loss",
    "run_quality",
    "run_vlb",
    "sample_chunks",
    "sample_run",
    "save_samples",
    "split_levels",
    "write_json",
]
