"""Every random stream of sdelab in one place: the ``stream`` argument of
:func:`sdelab.utils.derive_seed` / :func:`sdelab.utils.chunk_generator`.

A stream id separates independent uses of one seed (a run's ``train.seed``, a command's
``--seed``): two uses with the same id would draw the same numbers. Each id below is used by
exactly one purpose (``tests/test_streams.py`` checks that they are distinct); the values are
those each purpose has always used, so every seeded result stays the same.
"""

from __future__ import annotations

__all__ = ["STREAMS"]

# ---- data sets (the data set's own seed) ------------------------------------------------------
#: The held-out test set of a toy distribution (``data.toys``).
TOY_TEST_SET = 1
#: The shuffle of array rows into train / test (``data.arrays``).
ARRAY_SPLIT = 2

# ---- training (``train.seed``) ---------------------------------------------------------------
#: The network's initial weights.
TRAIN_INIT = 10
#: Minibatch draws.
TRAIN_DATA = 11
#: The loss's times and noise.
TRAIN_LOSS = 12
#: Evaluations during training (``train.eval_every``), further keyed by the step.
TRAIN_EVAL = 13
#: The sample grids written during training (``train.sample_every``).
TRAIN_SAMPLES = 14

# ---- commands on a trained run (``--seed``; chunk/batch i > 0 keyed by i) -------------------
#: ``sample`` / ``evaluate`` sample chunks.
RUN_SAMPLES = 20
#: ``likelihood`` test batches (``sdelab.likelihood.bpd.LIKELIHOOD_STREAM`` holds the same id).
RUN_LIKELIHOOD = 21
#: ``likelihood --method vlb`` batches.
RUN_VLB = 22
#: ``likelihood --method loss`` batches.
RUN_LOSS = 23

# ---- ``train-dequantizer`` (its ``--seed``) ----------------------------------------------------
#: The dequantizer's minibatch draws.
DEQUANTIZER_DATA = 30
#: The dequantizer's noise draws.
DEQUANTIZER_LOSS = 31

#: Every stream by name (what the uniqueness test reads).
STREAMS: dict[str, int] = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, int) and not name.startswith("_")
}
