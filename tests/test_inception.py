"""The FID Inception-v3 matches the pt_inception-2015-12-05 checkpoint's layout, never downloads.

The expected table below is written from the published reference sources (pytorch-fid's
``src/pytorch_fid/inception.py`` with torchvision's Inception3 blocks it patches, and
torch-fidelity's ``feature_extractor_inceptionv3.py`` / ``util_convert_inception_weights.py``,
which converts the TensorFlow graph to the same keys): every ``BasicConv2d`` is a bias-free
conv ``NAME.conv.weight (out, in, kh, kw)`` and a batch norm ``NAME.bn.{weight, bias,
running_mean, running_var} (out,)``, plus ``fc.weight (1008, 2048)`` and ``fc.bias (1008,)``.
"""

from __future__ import annotations

import pytest
import torch

from sdelab.nets.inception import FID_WEIGHTS_URL, FIDInceptionV3, _avg_pool_tf, load_fid_inception


def _block_a(p: str, cin: int, pool: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{p}.branch1x1": (64, cin, 1, 1),
        f"{p}.branch5x5_1": (48, cin, 1, 1),
        f"{p}.branch5x5_2": (64, 48, 5, 5),
        f"{p}.branch3x3dbl_1": (64, cin, 1, 1),
        f"{p}.branch3x3dbl_2": (96, 64, 3, 3),
        f"{p}.branch3x3dbl_3": (96, 96, 3, 3),
        f"{p}.branch_pool": (pool, cin, 1, 1),
    }


def _block_c(p: str, c7: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{p}.branch1x1": (192, 768, 1, 1),
        f"{p}.branch7x7_1": (c7, 768, 1, 1),
        f"{p}.branch7x7_2": (c7, c7, 1, 7),
        f"{p}.branch7x7_3": (192, c7, 7, 1),
        f"{p}.branch7x7dbl_1": (c7, 768, 1, 1),
        f"{p}.branch7x7dbl_2": (c7, c7, 7, 1),
        f"{p}.branch7x7dbl_3": (c7, c7, 1, 7),
        f"{p}.branch7x7dbl_4": (c7, c7, 7, 1),
        f"{p}.branch7x7dbl_5": (192, c7, 1, 7),
        f"{p}.branch_pool": (192, 768, 1, 1),
    }


def _block_e(p: str, cin: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{p}.branch1x1": (320, cin, 1, 1),
        f"{p}.branch3x3_1": (384, cin, 1, 1),
        f"{p}.branch3x3_2a": (384, 384, 1, 3),
        f"{p}.branch3x3_2b": (384, 384, 3, 1),
        f"{p}.branch3x3dbl_1": (448, cin, 1, 1),
        f"{p}.branch3x3dbl_2": (384, 448, 3, 3),
        f"{p}.branch3x3dbl_3a": (384, 384, 1, 3),
        f"{p}.branch3x3dbl_3b": (384, 384, 3, 1),
        f"{p}.branch_pool": (192, cin, 1, 1),
    }


CONVS: dict[str, tuple[int, ...]] = {
    "Conv2d_1a_3x3": (32, 3, 3, 3),
    "Conv2d_2a_3x3": (32, 32, 3, 3),
    "Conv2d_2b_3x3": (64, 32, 3, 3),
    "Conv2d_3b_1x1": (80, 64, 1, 1),
    "Conv2d_4a_3x3": (192, 80, 3, 3),
    **_block_a("Mixed_5b", 192, 32),
    **_block_a("Mixed_5c", 256, 64),
    **_block_a("Mixed_5d", 288, 64),
    "Mixed_6a.branch3x3": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_1": (64, 288, 1, 1),
    "Mixed_6a.branch3x3dbl_2": (96, 64, 3, 3),
    "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    **_block_c("Mixed_6b", 128),
    **_block_c("Mixed_6c", 160),
    **_block_c("Mixed_6d", 160),
    **_block_c("Mixed_6e", 192),
    "Mixed_7a.branch3x3_1": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_1": (192, 768, 1, 1),
    "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    **_block_e("Mixed_7b", 1280),
    **_block_e("Mixed_7c", 2048),
}


def _expected_checkpoint() -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for name, shape in CONVS.items():
        keys[f"{name}.conv.weight"] = shape
        for buf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.bn.{buf}"] = (shape[0],)
    keys["fc.weight"] = (1008, 2048)
    keys["fc.bias"] = (1008,)
    return keys


def test_parameter_names_and_shapes_match_the_checkpoint():
    net = FIDInceptionV3()
    ours = {
        k: tuple(v.shape)
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert len(CONVS) == 94
    assert ours == _expected_checkpoint()
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with the
    # auxiliary head of 3,326,696); the FID graph has no auxiliary head and 1008 classes.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_tensorflow_average_pool_ignores_padding():
    """A constant map stays constant under TF's avg_pool (padding not counted); counting the
    zero padding would shrink the border to 4/9 in the corners."""
    x = torch.full((1, 2, 5, 5), 3.0)
    assert torch.equal(_avg_pool_tf(x), x)


def test_random_init_gives_2048_features_and_1008_logits():
    net = FIDInceptionV3().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        grey = net(torch.rand(2, 1, 8, 8, generator=g))  # digits-sized, grey
        pool, logits = net.features_and_logits(torch.rand(2, 3, 32, 32, generator=g))
        _, biased = net.features_and_logits(torch.rand(2, 3, 32, 32), bias=True)
    assert grey.shape == pool.shape == (2, 2048) and logits.shape == biased.shape == (2, 1008)
    assert torch.isfinite(pool).all() and (pool >= 0).all()  # average of ReLU outputs
    assert torch.allclose(logits, pool @ net.fc.weight.T)
    with pytest.raises(ValueError, match="Inception takes images"):
        net(torch.rand(2, 2, 8, 8))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip_through_a_file(tmp_path, suffix):
    torch.manual_seed(1)
    net = FIDInceptionV3().eval()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)  # no num_batches_tracked, like torch-fidelity's conversion
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_fid_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="download .*pt_inception-2015-12-05") as e:
        load_fid_inception(tmp_path / "nope.pth")
    assert FID_WEIGHTS_URL in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, bad)
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        load_fid_inception(bad)
