"""The random-stream registry: one id per purpose, none shared."""

from __future__ import annotations

from sdelab import streams
from sdelab.likelihood.bpd import LIKELIHOOD_STREAM
from sdelab.runs import core


def test_stream_ids_are_distinct():
    """Two purposes with one id would draw the same numbers from one seed."""
    ids = list(streams.STREAMS.values())
    assert len(streams.STREAMS) == 13 and len(set(ids)) == len(ids), streams.STREAMS


def test_ids_defined_outside_the_registry_agree_with_it():
    """The likelihood package keeps its own name for its stream; runs/likelihood.py imports
    two under older names: all must be the registry's ids."""
    assert LIKELIHOOD_STREAM == streams.RUN_LIKELIHOOD
    assert (core.VLB_STREAM, core.LOSS_STREAM) == (streams.RUN_VLB, streams.RUN_LOSS)
