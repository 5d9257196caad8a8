"""A time-conditioned MLP for vector data (2-D toys, tabular)."""

from __future__ import annotations

from torch import Tensor, nn

from sdelab.nets.embeddings import TIME_EMBEDDINGS, ClassEmbedding, check_unconditional

__all__ = ["MLP"]


class MLP(nn.Module):
    """``net(x, t)`` for x of shape ``(B, D)`` (or ``(B, ...)``, flattened) and t of shape ``(B,)``.

    x is projected to ``width``; the time embedding (``sinusoidal`` or ``fourier`` from
    :data:`~sdelab.nets.embeddings.TIME_EMBEDDINGS`) goes through a two-layer SiLU MLP and is
    added before every hidden layer; the output has x's shape. What the output means (ε, score,
    x0, v or drift) is decided by the :class:`~sdelab.parametrization.ScoreModel` around it.

    Args:
        dim: data dimension D.
        width: hidden units per layer.
        depth: number of hidden layers (≥ 1).
        embedding: ``"sinusoidal"`` or ``"fourier"``.
        embedding_dim: size of the time embedding (even).
        embedding_scale: the embedding's input scale (``None``: its default — 1000 for
            sinusoidal, 16 for Fourier).
        num_classes: K > 0 makes the network class-conditional: ``net(x, t, y)`` adds a
            learned class embedding (K classes + a null class, see
            :class:`~sdelab.nets.embeddings.ClassEmbedding`) to the time codes; ``y = None``
            is the null class. 0: unconditional (no labels).
    """

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        embedding: str = "sinusoidal",
        embedding_dim: int = 64,
        embedding_scale: float | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"unknown time embedding {embedding!r}: choose one of {', '.join(TIME_EMBEDDINGS)}"
            )
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"need dim, width, depth >= 1, got {dim}, {width}, {depth}")
        kwargs = {} if embedding_scale is None else {"scale": embedding_scale}
        self.time_embed = nn.Sequential(
            TIME_EMBEDDINGS[embedding](embedding_dim, **kwargs),
            nn.Linear(embedding_dim, width),
            nn.SiLU(),
            nn.Linear(width, width * depth),  # one additive time code per hidden layer
        )
        self.inp = nn.Linear(dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, dim)
        self.act = nn.SiLU()
        self.depth = depth
        self.class_embed = ClassEmbedding(num_classes, width * depth) if num_classes else None

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)  # (B, D)
        if t.numel() > 1 and bool((t == t[0]).all()):
            t = t[:1]  # one time for the batch (samplers, ODEs): embed once, broadcast below
        code = self.time_embed(t)  # (B or 1, width·depth)
        if self.class_embed is not None:
            code = code + self.class_embed(y, x.shape[0])
        else:
            check_unconditional(y)
        codes = code.chunk(self.depth, dim=1)  # depth × (B or 1, width)
        h = self.inp(flat)
        for layer, code in zip(self.hidden, codes):
            h = layer(self.act(h + code))
        return self.out(self.act(h)).reshape(x.shape)
