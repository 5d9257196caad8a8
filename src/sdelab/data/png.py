"""PNG files: reading an observation or a mask for a run, writing image grids.

Every grid (sample grids of levels, rows of model-space images for inpainting and colorization)
is drawn by one tiling loop, :func:`tile_rows`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdelab.data.image_formats import read_image_file
from sdelab.data.images import levels_to_model
from sdelab.utils import atomic_write

__all__ = ["load_mask_png", "load_png", "save_level_grid", "save_png_grid", "upscale_factor"]


#: Grids upscale each tile to at least this many pixels on its longer side (8×8 digits: ×8).
MIN_TILE_PX = 64


def upscale_factor(h: int, w: int, min_px: int = MIN_TILE_PX) -> int:
    """The integer nearest-neighbour factor that makes an ``h × w`` tile at least ``min_px``
    pixels on its longer side (1 for tiles that are already that large)."""
    return max(1, math.ceil(min_px / max(h, w, 1)))


#: The grey of the lines between grid tiles: visible on black (digits) and white backgrounds.
GAP_GREY = 128


def tile_rows(rows: Sequence[np.ndarray], *, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile rows of images into one ``(H', W', C)`` uint8 array with ``pad`` grey
    (:data:`GAP_GREY`) pixels between and around the tiles; row i holds ``rows[i]``
    ``(n_i, H, W, C)``, shorter rows end in grey. ``scale``: each pixel becomes a
    ``scale × scale`` block (nearest neighbour, so levels stay exact)."""
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale > 1:
        rows = [np.repeat(np.repeat(np.asarray(r), scale, axis=1), scale, axis=2) for r in rows]
    h, w, c = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    shape = (len(rows) * (h + pad) + pad, cols * (w + pad) + pad, c)
    grid = np.full(shape, GAP_GREY, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = tile
    return grid


def write_png(grid: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, C)`` uint8 array (C = 1 or 3) as a PNG, atomically; returns the path."""
    from PIL import Image

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def _hwc(images: Tensor) -> np.ndarray:
    """``(N, C, H, W)`` uint8 tensor -> ``(N, H, W, C)`` numpy array."""
    return images.permute(0, 2, 3, 1).cpu().numpy()


def save_png_grid(
    rows: list[Tensor], path: str | Path, *, pad: int = 1, scale: int | None = None
) -> Path:
    """Write images in model space [−1, 1] as one PNG: a row of tiles per list entry, each
    entry ``(N, C, H, W)``; shorter rows are padded with grey. ``scale``: nearest-neighbour
    upscaling (default :func:`upscale_factor`, tiles of at least 64 px)."""
    tiles = [
        _hwc(((r.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte()) for r in rows
    ]
    scale = scale or upscale_factor(*tiles[0].shape[1:3])
    return write_png(tile_rows(tiles, pad=pad, scale=scale), path)


def save_level_grid(
    levels: Tensor,
    num_levels: int,
    path: str | Path,
    *,
    ncol: int | None = None,
    pad: int = 1,
    scale: int | None = None,
) -> Path:
    """Write integer levels ``(N, C, H, W)`` as one PNG grid (``ncol`` tiles a row, default
    ⌈√N⌉), scaling level k to round(255·k/(L − 1)) and each pixel to a ``scale × scale``
    block (nearest neighbour; default :func:`upscale_factor`, tiles of at least 64 px);
    overwrites ``path``."""
    n = levels.shape[0]
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    pix = (levels.to(torch.float64) * 255.0 / (num_levels - 1)).round().clamp(0, 255)
    tiles = _hwc(pix.to(torch.uint8))
    rows = [tiles[i : i + ncol] for i in range(0, n, ncol)]
    scale = scale or upscale_factor(*levels.shape[2:4])
    return write_png(tile_rows(rows, pad=pad, scale=scale), path)


def load_png(path: str | Path, dim: int, *, channels: int | None = None) -> Tensor:
    """A PNG as a model-space image ``(C, H, W)`` in [−1, 1] for a run of data dimension ``dim``
    (flattened images: C·H·W must equal ``dim``; C = ``channels`` or inferred as 1 or 3)."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
    if channels is None:
        channels = dim // (h * w) if dim in (h * w, 3 * h * w) else 0
    if channels not in (1, 3) or channels * h * w != dim:
        raise ValueError(
            f"{path}: a {h}×{w} image does not fit a run of data dimension {dim} "
            f"(need C·H·W = {dim} with C = {channels or '1 or 3'})"
        )
    levels = torch.from_numpy(read_image_file(path, channels=channels).astype(np.int64))
    return levels_to_model(levels, 256, u=0.0)


def load_mask_png(path: str | Path, image_shape: tuple[int, ...]) -> Tensor:
    """A mask PNG (nonzero = known) as a 0/1 tensor broadcast to ``image_shape`` ``(C, H, W)``."""
    arr = read_image_file(path, channels=1)  # (1, H', W')
    if arr.shape[1:] != tuple(image_shape[1:]):
        raise ValueError(
            f"mask has shape {arr.shape[1]}×{arr.shape[2]}, the image "
            f"{image_shape[1]}×{image_shape[2]}"
        )
    return torch.from_numpy((arr > 0).astype(np.float32)).expand(*image_shape).contiguous()
