"""Parity with torch-fidelity, whose source is read from a checkout the user names.

Skipped unless ``SDELAB_TORCH_FIDELITY`` is the path of a torch-fidelity checkout (the folder
holding ``torch_fidelity/``). Only its network and metric modules are imported: the package's
``__init__`` and ``utils`` import torchvision, which cannot live beside the pinned torch, so a
bare package object and an empty ``torch_fidelity.utils`` stand in for them.

The same random weights (batch-norm statistics randomised too) give our FID Inception-v3 and
torch-fidelity's the same pool features and bias-free logits on 299×299 inputs; FD, KID (one
subset of all rows), the Inception score and precision/recall agree on the same features.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from sdelab import metrics as M
from sdelab.nets.inception import FIDInceptionV3

ROOT = os.environ.get("SDELAB_TORCH_FIDELITY")
pytestmark = pytest.mark.skipif(
    not ROOT or not (Path(ROOT) / "torch_fidelity").is_dir(),
    reason="set SDELAB_TORCH_FIDELITY to a torch-fidelity checkout to compare with it",
)

_UTILS_NAMES = (
    "cache_lookup_one_recompute_on_miss",
    "create_feature_extractor",
    "extract_featuresdict_from_input_id_cached",
    "get_cacheable_input_name",
    "resolve_feature_extractor",
    "resolve_feature_layer_for_metric",
)


@pytest.fixture(scope="module")
def tf():
    saved = {k: v for k, v in sys.modules.items() if k.startswith("torch_fidelity")}
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(Path(ROOT) / "torch_fidelity")]
    utils = types.ModuleType("torch_fidelity.utils")
    for name in _UTILS_NAMES:
        setattr(utils, name, None)
    sys.modules.update({"torch_fidelity": pkg, "torch_fidelity.utils": utils})
    try:
        from torch_fidelity import defaults, metric_fid, metric_isc, metric_kid, metric_prc
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        yield types.SimpleNamespace(
            Inception=FeatureExtractorInceptionV3,
            fid=metric_fid,
            kid=metric_kid,
            isc=metric_isc,
            prc=metric_prc,
            DEFAULTS=defaults.DEFAULTS,
        )
    finally:
        for k in [k for k in sys.modules if k.startswith("torch_fidelity")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_inception_features_equal_torch_fidelity(tf, tmp_path):
    torch.manual_seed(0)
    ours = FIDInceptionV3().eval()
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
    torch.save(ours.state_dict(), tmp_path / "w.pth")
    theirs = tf.Inception(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(tmp_path / "w.pth"),
    )
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 299, 299, generator=gen) * 255).to(torch.uint8)
    with torch.no_grad():
        pool_t, logits_t = theirs(x)
        pool_o = ours.pool_features((x.float() - 128) / 128)  # their input map at 299×299
    assert torch.allclose(pool_o, pool_t, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pool_o @ ours.fc.weight.T, logits_t, rtol=1e-5, atol=1e-6)


def test_metrics_equal_torch_fidelity(tf):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(600, 32, generator=g, dtype=torch.float64)
    b = 0.3 + 1.2 * torch.randn(500, 32, generator=g, dtype=torch.float64)
    sa, sb = tf.fid.fid_features_to_statistics(a), tf.fid.fid_features_to_statistics(b)
    fd_t = tf.fid.fid_statistics_to_metric(sa, sb, False)["frechet_inception_distance"]
    assert M.frechet_distance_features(a, b) == pytest.approx(fd_t, rel=1e-9)
    kw = {**tf.DEFAULTS, "kid_subsets": 1, "kid_subset_size": 500, "verbose": False}
    kid_t = tf.kid.kid_features_to_metric(a[:500], b, **kw)["kernel_inception_distance_mean"]
    assert M.mmd2_unbiased(a[:500], b) == pytest.approx(kid_t, rel=1e-9)
    logits = 3 * torch.randn(1000, 10, generator=g, dtype=torch.float64)
    is_t = tf.isc.isc_features_to_metric(logits, splits=10, shuffle=False)
    ours = M.inception_score(logits.softmax(1), splits=10)
    assert ours == pytest.approx(
        (is_t["inception_score_mean"], is_t["inception_score_std"]), rel=1e-9
    )
    pr_t = tf.prc.prc_features_to_metric(
        b.float(),
        a.float(),
        prc_neighborhood=3,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    assert M.precision_recall(a, b, k=3) == pytest.approx(
        (pr_t["precision"], pr_t["recall"]), abs=1e-6
    )
