"""Time embeddings: shape, range and sensitivity to t."""

from __future__ import annotations

import pytest
import torch

from sdelab.nets.embeddings import TIME_EMBEDDINGS


@pytest.mark.parametrize("name", list(TIME_EMBEDDINGS))
def test_time_embedding_shape_and_sensitivity(name):
    emb = TIME_EMBEDDINGS[name](32)
    t = torch.tensor([0.0, 0.1, 0.5, 1.0])
    out = emb(t)
    assert out.shape == (4, 32)
    assert bool((out.abs() <= 1).all())
    # distinct times give distinct embeddings; the same time gives the same one
    dist = torch.cdist(out, out)
    assert float(dist[~torch.eye(4, dtype=bool)].min()) > 1e-2
    torch.testing.assert_close(emb(t), out)
    with pytest.raises(ValueError, match="even"):
        TIME_EMBEDDINGS[name](7)
