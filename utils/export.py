"""Exports of predicted masks: QuPath-ready GeoJSON polygons in level-0 pixel coordinates."""
from __future__ import annotations

from typing import Dict, List

import cv2
import numpy as np

__all__ = ["mask_polygons", "polygons_geojson"]


def mask_polygons(mask: np.ndarray, scale: float = 1.0, offset=(0.0, 0.0),
                  clip=None, simplify: float = 0.0) -> List[List[List[List[float]]]]:
    """Polygons (outer ring, then holes) tracing the pixel *edges* of a 0/1 mask.

    Each pixel becomes a 3x3 block of a doubled grid whose even coordinates are the pixel
    edges, so the traced boundary lies on the edges, not on the boundary pixels' centres (which
    would shrink every object by half a pixel). A point ``(col, row)`` in mask pixels maps to
    ``(col * scale - offset[0], row * scale - offset[1])``: for a low-res mask of the tiler's
    padded grid, ``scale = reduce`` and ``offset = (pad_left, pad_top)`` give level-0 pixels.
    ``clip = (width, height)`` clamps the points into the image (e.g. the slide, when the
    low-res grid's padding lies outside it). ``simplify > 0`` drops the corners within that many
    output units of the ring (Douglas-Peucker). Rings are closed ``[x, y]`` lists, as GeoJSON wants.
    """
    h, w = mask.shape
    grid = np.zeros((2 * h + 1, 2 * w + 1), np.uint8)
    grid[1::2, 1::2] = mask > 0
    grid = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]

    def ring(contour) -> List[List[float]]:
        if simplify > 0:
            kept = cv2.approxPolyDP(contour, 2.0 * simplify / scale, True)
            contour = kept if len(kept) >= 3 else contour
        pts = contour[:, 0, :].astype(np.float64) * (scale / 2.0) - np.asarray(offset, np.float64)
        if clip is not None:
            pts = np.clip(pts, 0.0, np.asarray(clip, np.float64))
        pts = pts.tolist()
        return pts + [pts[0]]

    polygons = []
    for i, (nxt, prev, child, parent) in enumerate(hierarchy):
        if parent != -1 or len(contours[i]) < 3:
            continue
        rings = [ring(contours[i])]
        c = child
        while c != -1:
            if len(contours[c]) >= 3:
                rings.append(ring(contours[c]))
            c = hierarchy[c][0]
        polygons.append(rings)
    return polygons


def polygons_geojson(polygons, name: str = "Glomerulus", colour=(255, 0, 0)) -> Dict[str, object]:
    """A GeoJSON FeatureCollection that QuPath imports as annotations of class ``name``."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": list(colour)}},
        }
        for rings in polygons
    ]
    return {"type": "FeatureCollection", "features": features}
