"""Time-dependent (noise-conditional) classifiers p_t(y | x_t) for classifier guidance.

Both return logits ``(B, K)`` for x_t of shape ``(B, D)`` (MLP) or ``(B, C, H, W)`` (conv net)
and times ``(B,)``, as ``classify(features(x, t))``: the penultimate ``features`` of a clean
classifier are what :mod:`sdelab.quality` compares samples with. They are trained on noised
data with the score model's schedule (:func:`sdelab.controllable.train_classifier`).
"""

from __future__ import annotations

from torch import Tensor, nn

from sdelab.nets.embeddings import TIME_EMBEDDINGS
from sdelab.utils import append_dims

__all__ = ["ConvClassifier", "TimeClassifier"]


def _time_mlp(embedding: str, embedding_dim: int, out: int) -> nn.Sequential:
    if embedding not in TIME_EMBEDDINGS:
        raise ValueError(
            f"unknown time embedding {embedding!r}: choose one of {', '.join(TIME_EMBEDDINGS)}"
        )
    return nn.Sequential(
        TIME_EMBEDDINGS[embedding](embedding_dim),
        nn.Linear(embedding_dim, out),
        nn.SiLU(),
        nn.Linear(out, out),
    )


class TimeClassifier(nn.Module):
    """An MLP classifier of vectors ``(B, D)`` (any ``(B, ...)``, flattened) at time t.

    The time embedding is added to every hidden layer, as in :class:`~sdelab.nets.mlp.MLP`.

    Args:
        dim: data dimension D.
        num_classes: K.
        width, depth: hidden units and layers.
        embedding, embedding_dim: time embedding (``sinusoidal`` or ``fourier``).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        width: int = 128,
        depth: int = 3,
        embedding: str = "sinusoidal",
        embedding_dim: int = 64,
    ) -> None:
        super().__init__()
        if dim < 1 or num_classes < 2 or width < 1 or depth < 1:
            raise ValueError(
                f"need dim, width, depth >= 1 and num_classes >= 2, got "
                f"{dim}, {width}, {depth}, {num_classes}"
            )
        self.time_embed = _time_mlp(embedding, embedding_dim, width)
        self.inp = nn.Linear(dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, num_classes)
        self.act = nn.SiLU()
        self.num_classes = num_classes

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """Penultimate features ``(B, width)``: the activations the linear head reads."""
        code = self.time_embed(t)  # (B, width)
        h = self.inp(x.reshape(x.shape[0], -1))
        for layer in self.hidden:
            h = layer(self.act(h + code))
        return self.act(h)

    def classify(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from :meth:`features`."""
        return self.out(features)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.classify(self.features(x, t))  # (B, K)


class ConvClassifier(nn.Module):
    """A small conv net classifier of images ``(B, C, H, W)`` at time t.

    Three 3×3 conv stages (``channels``, 2×, 2×; stride 2 after the first two) with the time
    embedding added per channel, global average pooling and a linear head. With
    ``image_shape`` (C, H, W) it also takes flattened images ``(B, C·H·W)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 32,
        embedding: str = "sinusoidal",
        embedding_dim: int = 64,
        groups: int = 8,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or channels < 1:
            raise ValueError(
                f"need in_channels, channels >= 1 and num_classes >= 2, got "
                f"{in_channels}, {channels}, {num_classes}"
            )
        self.image_shape = image_shape
        widths = (channels, 2 * channels, 2 * channels)
        self.time_embed = _time_mlp(embedding, embedding_dim, sum(widths))
        convs, c_in = [], in_channels
        for i, c in enumerate(widths):
            convs.append(nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.GroupNorm(min(groups, c), c) for c in widths)
        self.head = nn.Linear(widths[-1], num_classes)
        self.act = nn.SiLU()
        self.widths = widths
        self.num_classes = num_classes

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        """Penultimate features ``(B, 2·channels)``: the globally pooled last stage the linear
        head reads (for a clean classifier, the features of a Fréchet distance on CPU)."""
        if x.ndim == 2 and self.image_shape is not None:
            x = x.reshape(x.shape[0], *self.image_shape)
        codes = self.time_embed(t).split(self.widths, dim=1)  # per stage (B, c)
        h = x
        for conv, norm, code in zip(self.convs, self.norms, codes):
            h = self.act(norm(conv(h)) + append_dims(code, h.ndim))  # (B, c, H', W')
        return h.mean(dim=(2, 3))  # (B, 2·channels)

    def classify(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from :meth:`features`."""
        return self.head(features)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.classify(self.features(x, t))  # (B, K)
