"""Build large test slides at test/benchmark time from the real pixels in ``../shared/data``.

Nothing here is copied into the repository: the pixels are read from ``SHARED_DATA`` and the
slides are written to a temporary folder by the caller.
"""
from __future__ import annotations

import glob
import os
from functools import lru_cache
from typing import Callable, Iterator, Sequence, Tuple

import cv2
import numpy as np
import tifffile

SHARED_DATA = os.environ.get(
    "GLOMERULI_SHARED_DATA",
    os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")),
)
SHARED_REASON = (
    f"real data not found at {SHARED_DATA} (clone beside ../shared or set GLOMERULI_SHARED_DATA)"
)
CELL = 1024  # side of one AIDPATH image, the mosaic's cell


def shared(*parts: str) -> str:
    return os.path.join(SHARED_DATA, *parts)


def has_shared() -> bool:
    return os.path.isdir(SHARED_DATA)


@lru_cache(maxsize=8)
def aidpath_cells(scale: int = 1) -> Tuple[np.ndarray, ...]:
    """The AIDPATH images (RGB), downscaled by ``scale`` with INTER_AREA."""
    cells = []
    for path in sorted(glob.glob(shared("aidpath", "images", "*.png"))):
        image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if scale > 1:
            image = cv2.resize(image, (CELL // scale, CELL // scale), interpolation=cv2.INTER_AREA)
        cells.append(image)
    if not cells:
        raise FileNotFoundError(SHARED_REASON)
    return tuple(cells)


def _cell(row: int, col: int, scale: int, background_every: int) -> np.ndarray:
    """The deterministic cell at mosaic ``(row, col)``: a real image, flipped, or background."""
    key = (row * 7919 + col * 104729) & 0xFFFFFFFF
    if background_every and key % background_every == 0:
        return None
    cells = aidpath_cells(scale)
    image = cells[key % len(cells)]
    flip = (key // len(cells)) % 4
    if flip & 1:
        image = image[::-1]
    if flip & 2:
        image = image[:, ::-1]
    return image


def mosaic_region(y0: int, y1: int, x0: int, x1: int, scale: int = 1,
                  background_every: int = 5, background: int = 242) -> np.ndarray:
    """Rows ``y0:y1``, cols ``x0:x1`` of an endless real-tissue mosaic at downscale ``scale``.

    The mosaic is made of AIDPATH images (1024 px cells) with flips; every
    ``background_every``-th cell (by a hash) is plain background. ``scale`` must divide 1024;
    the mosaic at ``scale`` equals INTER_AREA of the level-0 mosaic, so pyramid levels agree.
    """
    cell = CELL // scale
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    for row in range(y0 // cell, (y1 - 1) // cell + 1):
        for col in range(x0 // cell, (x1 - 1) // cell + 1):
            ya, yb = max(y0, row * cell), min(y1, (row + 1) * cell)
            xa, xb = max(x0, col * cell), min(x1, (col + 1) * cell)
            image = _cell(row, col, scale, background_every)
            target = out[ya - y0:yb - y0, xa - x0:xb - x0]
            if image is None:
                target[:] = background
            else:
                target[:] = image[ya - row * cell:yb - row * cell, xa - col * cell:xb - col * cell]
    return out


def _tiles(shape: Tuple[int, int], tile: int, region: Callable[[int, int, int, int], np.ndarray]) -> Iterator[np.ndarray]:
    h, w = shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.zeros((tile, tile, 3), dtype=np.uint8)
            part = region(y, min(y + tile, h), x, min(x + tile, w))
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def write_slide(
    path: str,
    shape: Tuple[int, int],
    region: Callable[..., np.ndarray],
    tile: int = 512,
    compression=("jpeg", 90),
    downsamples: Sequence[int] = (),
    mpp: float = 0.0,
) -> str:
    """Write a tiled (Big)TIFF of ``shape = (height, width)``.

    ``region(y0, y1, x0, x1, scale)`` returns the pixels of a region of the level at
    ``scale``. ``downsamples`` adds reduced-resolution SubIFD pyramid levels. ``mpp`` > 0
    writes level 0's pixel size (um/px) in the resolution tags.
    """
    codec, level = compression if isinstance(compression, tuple) else (compression, None)
    kwargs = dict(
        tile=(tile, tile), photometric="rgb", compression=codec, dtype=np.uint8,
        compressionargs={"level": level} if level is not None else None,
    )
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp > 0 else {}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            _tiles(shape, tile, lambda a, b, c, d: region(a, b, c, d, 1)),
            shape=(*shape, 3), subifds=len(downsamples), **kwargs, **resolution,
        )
        for d in downsamples:
            level_shape = (shape[0] // d, shape[1] // d)
            tif.write(
                _tiles(level_shape, tile, lambda a, b, c, e, d=d: region(a, b, c, e, d)),
                shape=(*level_shape, 3), subfiletype=1, **kwargs,
            )
    return path


def read_sizes() -> dict:
    """``{id: (height, width)}`` of the HuBMAP slides in ``sizes.csv``."""
    import pandas as pd

    frame = pd.read_csv(shared("hubmap2021", "sizes.csv"))
    return {r.id: (int(r.height), int(r.width)) for r in frame.itertuples()}


def read_train_csv() -> dict:
    import pandas as pd

    frame = pd.read_csv(shared("hubmap2021", "train.csv"))
    return dict(zip(frame["id"], frame["encoding"]))
