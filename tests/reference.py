"""The original toolkit's tiler, written the straightforward way (whole slide in memory).

Used as the independent reference by the tiler tests and by ``tests/bench/bench_tiles.py``:
read everything, pad, resize, cut, filter, as the original did.
"""
from __future__ import annotations

import cv2
import numpy as np


def reference_tiles(image: np.ndarray, mask: np.ndarray, size: int, reduce: int,
                    sat_th: int = 40, p_th: int = 200):
    """Return ``{index: (image_tile, mask_tile)}`` for the kept tiles, and the tile count."""
    shape = image.shape
    span = reduce * size
    pad0 = (span - shape[0] % span) % span
    pad1 = (span - shape[1] % span) % span
    image = np.pad(image, [[pad0 // 2, pad0 - pad0 // 2], [pad1 // 2, pad1 - pad1 // 2], [0, 0]],
                   constant_values=0)
    mask = np.pad(mask, [[pad0 // 2, pad0 - pad0 // 2], [pad1 // 2, pad1 - pad1 // 2]],
                  constant_values=0)
    image = cv2.resize(image, (image.shape[1] // reduce, image.shape[0] // reduce),
                       interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (mask.shape[1] // reduce, mask.shape[0] // reduce),
                      interpolation=cv2.INTER_NEAREST)
    image = image.reshape(image.shape[0] // size, size, image.shape[1] // size, size, 3)
    image = image.transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
    mask = mask.reshape(mask.shape[0] // size, size, mask.shape[1] // size, size)
    mask = mask.transpose(0, 2, 1, 3).reshape(-1, size, size)
    limit = p_th * size // 256
    kept = {}
    for i, (im, m) in enumerate(zip(image, mask)):
        hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
        _, s, _ = cv2.split(hsv)
        if (s > sat_th).sum() <= limit or im.sum() <= limit:
            continue
        kept[i] = (im, m)
    return kept, len(image)
