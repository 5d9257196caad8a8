"""The FID-standard Inception-v3, loaded from a file the user gives (nothing is downloaded).

FID, KID and the Inception score are only comparable across papers with one network: the
TensorFlow ``inception-2015-12-05`` graph, ported to PyTorch as
``pt_inception-2015-12-05-6726825d.pth`` by pytorch-fid (torch-fidelity ships the same
conversion). This module rebuilds that network with the checkpoint's parameter names and
shapes, including where it differs from the Inception-v3 of the paper and torchvision:

- the pooling branches of the A, C and first E blocks average over the 3×3 window without
  counting the zero padding (TensorFlow's ``avg_pool``);
- the last E block (``Mixed_7c``) max-pools in its pooling branch;
- the classifier has 1008 outputs, and the Inception score uses its logits without the bias
  (the original TensorFlow code multiplies the pool features by the softmax weights only).

Inputs are images in [0, 1] ``(B, 3, H, W)`` (one channel is repeated to three), resized
bilinearly to 299×299 (``align_corners=False``) and mapped to [−1, 1], as pytorch-fid does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FID_WEIGHTS_URL", "FIDInceptionV3", "load_fid_inception"]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299


class _ConvBN(nn.Module):
    """Conv (no bias) → batch norm (ε = 10⁻³) → ReLU: the checkpoint's ``*.conv``/``*.bn``."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """3×3, stride 1 average that ignores the zero padding (TensorFlow's ``avg_pool``)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _max_pool_reduce(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, stride=2)


class _BlockA(nn.Module):
    """35×35 block: 1×1 | 1×1 → 5×5 | 1×1 → 3×3 → 3×3 | pool → 1×1."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class _BlockB(nn.Module):
    """35 → 17 reduction: 3×3/2 | 1×1 → 3×3 → 3×3/2 | max-pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, _max_pool_reduce(x)], 1)


class _BlockC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (1×7 and 7×1) of ``c7`` channels."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBN(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = _ConvBN(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBN(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = _ConvBN(c7, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)


class _BlockD(nn.Module):
    """17 → 8 reduction: 1×1 → 3×3/2 | 1×1 → 1×7 → 7×1 → 3×3/2 | max-pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, _max_pool_reduce(x)], 1)


class _BlockE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs; ``pool`` is the FID graph's pooling branch
    (average without padding in ``Mixed_7b``, max in ``Mixed_7c``)."""

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)
        self.pool = {"avg": _avg_pool_tf, "max": _max_pool_same}[pool]

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID standard (``pt_inception-2015-12-05``): 2048-d pool features
    and 1008 class logits. Build it with random weights, or load the real ones with
    :func:`load_fid_inception`.

    ``forward(x)`` takes images in [0, 1] ``(B, C, H, W)`` with C = 3 or 1 and returns the pool
    features ``(B, 2048)``; :meth:`features_and_logits` also returns the logits.
    """

    feature_dim = 2048
    num_classes = 1008

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)  # 299 → 149
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)  # 147
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)  # 147, then max-pool → 73
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)  # 71, then max-pool → 35
        self.Mixed_5b = _BlockA(192, 32)  # 256 channels
        self.Mixed_5c = _BlockA(256, 64)  # 288
        self.Mixed_5d = _BlockA(288, 64)  # 288
        self.Mixed_6a = _BlockB(288)  # 768 at 17×17
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)  # 1280 at 8×8
        self.Mixed_7b = _BlockE(1280, "avg")  # 2048
        self.Mixed_7c = _BlockE(2048, "max")  # 2048
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """Images in [0, 1] ``(B, 1 or 3, H, W)`` → the network's input ``(B, 3, 299, 299)`` in
        [−1, 1] (bilinear resize, ``align_corners=False``)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception takes images (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool_features(self, x: Tensor) -> Tensor:
        """Preprocessed input ``(B, 3, 299, 299)`` → pool features ``(B, 2048)``."""
        h = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        h = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_reduce(h)))
        h = _max_pool_reduce(h)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            h = getattr(self, f"Mixed_{name}")(h)
        return h.mean(dim=(2, 3))  # (B, 2048)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool_features(self.preprocess(x))

    def features_and_logits(self, x: Tensor, *, bias: bool = False) -> tuple[Tensor, Tensor]:
        """Pool features ``(B, 2048)`` and logits ``(B, 1008)`` of images in [0, 1]. The
        Inception score's convention is ``bias=False`` (pool features times the weights)."""
        pool = self.forward(x)
        logits = pool @ self.fc.weight.T
        return pool, logits + self.fc.bias if bias else logits


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (ImportError, MemoryError):
        raise
    except Exception as e:  # not a weights file at all: pickle, zip and safetensors errors
        raise ValueError(
            f"{path} is not a readable weights file ({type(e).__name__}): pass the "
            f"pt_inception-2015-12-05 weights ({FID_WEIGHTS_URL})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors: save one with torch.save")
    return state


def load_fid_inception(path: str | Path, *, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception-v3 with weights from ``path``, in eval mode without gradients.

    Args:
        path: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth`` is the same conversion), read with
            ``torch.load(weights_only=True)``, or a ``.safetensors`` file of the same state dict.
            ``num_batches_tracked`` buffers may be absent.
        device: where to put the network.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says where to get it).
        ValueError: a file that is not a state dict (truncated, another format), or whose
            keys or shapes are not those of this network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: download {FID_WEIGHTS_URL} "
            "(the FID-standard pt_inception-2015-12-05 weights) and pass its path"
        )
    state = _read_state_dict(path)
    net = FIDInceptionV3()
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not an FID Inception-v3 state dict: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]} "
            f"({len(missing)}, {len(unexpected)}, {len(wrong)} in all); use {FID_WEIGHTS_URL}"
        )
    net.load_state_dict(state, strict=False)
    return net.to(device).eval().requires_grad_(False)
