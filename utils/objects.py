"""Objects of a run-length-encoded mask: labelling, measurements and object-level matching.

Everything works on the runs of an RLE (``utils.rle``: 0-based half-open flat intervals in the
column-major order of Kaggle's format), never on a full-resolution mask: a 40k-px slide's mask
is a few hundred thousand vertical segments, and its objects are found by joining the segments
of neighbouring columns (8-connectivity), so they are exactly the connected components of the
mask that the RLE describes. Measurements that need a shape (perimeter, polygons) rasterise one
object at a time inside its bounding box.

Coordinates are level-0 pixels, ``x`` = column, ``y`` = row; a pixel's centre is at ``+0.5``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from utils.export import mask_polygons

__all__ = ["Segments", "column_segments", "label_segments", "Objects", "find_objects", "object_rows",
           "OBJECT_COLUMNS", "contour_perimeter", "match_objects", "object_scores", "count_objects"]

# Columns of objects.csv, in order.
OBJECT_COLUMNS = ["id", "object", "x", "y", "x_um", "y_um", "area_px", "area_um2", "diameter_um", "perimeter_um",
                  "circularity", "bbox", "mean_prob"]
# Objects larger than this (bounding box, pixels) are rasterised at a coarser step for their
# perimeter and polygon (areas, centroids and boxes always come from the runs, exactly).
MAX_RASTER_PIXELS = 1 << 22


@dataclass
class Segments:
    """Vertical runs of a mask, one column each, sorted by ``(x, y0)``: rows ``y0:y1`` of
    column ``x``; ``label`` is the object of each (after :func:`label_segments`)."""

    x: np.ndarray
    y0: np.ndarray
    y1: np.ndarray
    height: int
    label: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def length(self) -> np.ndarray:
        return self.y1 - self.y0


def column_segments(runs: np.ndarray, height: int) -> Segments:
    """Split flat runs (``(N, 2)`` ``[start, end)``, column-major, ``height`` rows) at column
    boundaries: a run that wraps from the bottom of a column to the top of the next is two (or
    more) segments."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    start, end = runs[:, 0], runs[:, 1]
    first, last = start // height, (end - 1) // height
    count = last - first + 1
    index = np.repeat(np.arange(len(runs)), count)
    offset = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    x = first[index] + offset
    y0 = np.where(offset == 0, start[index] - first[index] * height, 0)
    y1 = np.where(x == last[index], end[index] - last[index] * height, height)
    # coordinates fit 32 bits (a side < 2**31): half the memory of a large mask's segments
    return Segments(x.astype(np.int32), y0.astype(np.int32), y1.astype(np.int32), int(height))


def label_segments(seg: Segments) -> int:
    """Label the 8-connected objects of ``seg`` (sets ``seg.label``, numbered in the order of
    each object's first pixel, column-major); returns the number of objects.

    Segment ``b`` of column ``x + 1`` touches segment ``a`` of column ``x`` when their rows,
    ``a``'s widened by one on each side, overlap. Segments of one column are disjoint and sorted,
    so the partners of ``a`` are one contiguous range, found by binary search."""
    n = len(seg)
    if n == 0:
        seg.label = np.zeros(0, dtype=np.int64)
        return 0
    k = seg.height + 1  # flat key x * k + y keeps columns apart (y <= height < k)
    x = seg.x.astype(np.int64) * k
    key_end = x + seg.y1
    lo = np.searchsorted(key_end, x + k + seg.y0, side="left")   # b.y1 >= a.y0
    del key_end
    key_start = x + seg.y0
    hi = np.searchsorted(key_start, x + k + seg.y1, side="right")  # b.y0 <= a.y1
    del key_start, x
    count = np.maximum(hi - lo, 0).astype(np.int32)
    del hi
    first = (np.cumsum(count) - count).astype(np.int32)
    src = np.repeat(np.arange(n, dtype=np.int32), count)
    dst = (np.repeat(lo.astype(np.int32), count) + np.arange(len(src), dtype=np.int32)
           - np.repeat(first, count))
    del lo, first, count
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n)).tocsr()
    del src, dst
    n_objects, labels = connected_components(graph, directed=False)
    del graph
    # number the objects by their first segment (scipy's order is already that; made explicit)
    first = np.full(n_objects, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))  # labels of scipy are in that order already: cheap
    rank = np.empty(n_objects, dtype=np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(n_objects)
    seg.label = rank[labels]
    return int(n_objects)


def contour_perimeter(mask: np.ndarray) -> float:
    """Perimeter (px) of the outer boundary of a 0/1 mask holding one 8-connected object.

    The boundary pixels' chain is measured with Vossepoel & Smeulders' corner-count estimator
    (``0.980 n_even + 1.406 n_odd - 0.091 n_corners``, unbiased for straight and curved edges
    within a few percent, where counting pixel edges overestimates circles by 4/pi), then moved
    out by half a pixel (``+ pi``, Steiner's formula) from the pixel centres to the pixel edges,
    so a digital disc of radius R measures ``2 pi R``."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    return _chain_perimeter(max(contours, key=len)[:, 0, :])


@dataclass
class Objects:
    """The objects of one mask: per object its area (px), centroid, bounding box
    ``(x0, y0, x1, y1)`` (half-open), perimeter (px), mean probability and polygon."""

    area: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    bbox: np.ndarray
    perimeter: np.ndarray
    mean_prob: np.ndarray
    polygons: List[list]

    def __len__(self) -> int:
        return len(self.area)


def _raster(seg: Segments, idx: np.ndarray, box, step: int) -> np.ndarray:
    """The 0/1 mask of segments ``idx`` inside ``box = (x0, y0, x1, y1)``, one pixel per
    ``step x step`` block (a block is set when any of its pixels is)."""
    x0, y0, x1, y1 = box
    h, w = -(-(y1 - y0) // step), -(-(x1 - x0) // step)
    top = (seg.y0[idx] - y0) // step
    bottom = -(-(seg.y1[idx] - y0) // step)
    col = (seg.x[idx] - x0) // step
    diff = np.zeros((h + 1, w), dtype=np.int16)
    if step == 1:  # a column's segments are disjoint and apart: every start and end is distinct
        diff[top, col] = 1
        diff[bottom, col] -= 1
    else:  # coarser, blocks may be entered twice: count them
        size = (h + 1) * w
        diff += (np.bincount(top * w + col, minlength=size) - np.bincount(bottom * w + col, minlength=size)
                 ).reshape(h + 1, w).astype(np.int16)
    return (np.cumsum(diff[:-1], axis=0, dtype=np.int16) > 0).view(np.uint8)


def _prob_mean(prob, origin, scale, ys: np.ndarray, xs: np.ndarray, inside: np.ndarray, labels: np.ndarray,
               n: int) -> np.ndarray:
    """Per label, the mean of ``prob`` over the level-0 pixels ``(ys, xs)`` where ``inside``."""
    rows = np.clip((ys[inside] + origin[0]) // scale, 0, prob.shape[0] - 1).astype(np.int64)
    cols = np.clip((xs[inside] + origin[1]) // scale, 0, prob.shape[1] - 1).astype(np.int64)
    total = np.bincount(labels[inside], weights=prob[rows, cols], minlength=n)
    count = np.bincount(labels[inside], minlength=n)
    return total / np.maximum(count, 1)


# Small objects are measured together, packed side by side on canvases of CELL x CELL px cells
# (one findContours for up to PACKED_PIXELS / cell**2 specks instead of one call each): objects whose
# box fits in cell - 2 px, for each cell size.
CELLS = (16, 32, 64, 128)
PACKED_PIXELS = 1 << 22


def _measure_packed(seg: Segments, order, bounds, bbox, which: np.ndarray, prob, origin, scale,
                    polygons: bool, simplify: float, CELL: int):
    """Perimeter, mean probability and polygons of the small objects ``which``, from one canvas
    of ``CELL`` px cells (object ``which[i]`` in cell ``i``, one pixel from the cell's edge)."""
    m = len(which)
    per_row = max(1, min(m, 4096 // CELL))
    n_rows = -(-m // per_row)
    canvas = np.zeros((n_rows * CELL + 1, per_row * CELL), dtype=np.int16)
    cell_y = (np.arange(m) // per_row) * CELL + 1
    cell_x = (np.arange(m) % per_row) * CELL + 1
    counts = bounds[which + 1] - bounds[which]
    idx = np.concatenate([order[bounds[k]:bounds[k + 1]] for k in which])
    cell = np.repeat(np.arange(m), counts)
    oy = cell_y[cell] - bbox[which[cell], 1]  # level-0 -> canvas offsets of each segment
    ox = cell_x[cell] - bbox[which[cell], 0]
    col = seg.x[idx] + ox
    canvas[seg.y0[idx] + oy, col] = 1
    canvas[seg.y1[idx] + oy, col] -= 1
    mask = (np.cumsum(canvas[:-1], axis=0, dtype=np.int16) > 0).view(np.uint8)
    del canvas
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = np.zeros(m)
    for contour in contours:
        y, x = int(contour[0, 0, 1]), int(contour[0, 0, 0])
        i = (y // CELL) * per_row + x // CELL
        perimeter[i] = _chain_perimeter(contour[:, 0, :])
    mean = None
    if prob is not None:
        yy, xx = np.nonzero(mask)
        i = (yy // CELL) * per_row + xx // CELL
        ys = yy - cell_y[i] + bbox[which[i], 1]
        xs = xx - cell_x[i] + bbox[which[i], 0]
        mean = _prob_mean(prob, origin, scale, ys, xs, np.ones(len(i), bool), i, m)
    shapes = [None] * m
    if polygons:
        for rings in mask_polygons(mask, simplify=simplify):
            x, y = rings[0][0]
            i = (int(y) // CELL) * per_row + int(x) // CELL
            dx, dy = float(bbox[which[i], 0] - cell_x[i]), float(bbox[which[i], 1] - cell_y[i])
            shapes[i] = [[[px + dx, py + dy] for px, py in ring] for ring in rings]
    return perimeter, mean, shapes


def _chain_perimeter(contour: np.ndarray) -> float:
    """Vossepoel-Smeulders length of a closed chain of boundary pixel centres, + pi (see
    :func:`contour_perimeter`)."""
    if len(contour) < 2:
        return math.pi
    contour = contour.astype(np.int64)
    steps = np.diff(np.vstack([contour, contour[:1]]), axis=0)
    odd = (steps[:, 0] != 0) & (steps[:, 1] != 0)
    n_odd = int(odd.sum())
    n_even = len(steps) - n_odd
    code = steps[:, 0] * 3 + steps[:, 1]
    n_corners = int((code != np.roll(code, 1)).sum())
    return 0.980 * n_even + 1.406 * n_odd - 0.091 * n_corners + math.pi


def find_objects(runs: np.ndarray, shape: Tuple[int, int], prob: Optional[np.ndarray] = None,
                 prob_origin: Tuple[int, int] = (0, 0), prob_scale: float = 1.0,
                 polygons: bool = True, simplify: float = 0.5) -> Objects:
    """Label and measure the objects of an RLE mask of ``shape = (height, width)``.

    ``prob`` (optional, e.g. the low-resolution probability map of test_net) gives each
    object's ``mean_prob``: level-0 pixel ``(y, x)`` reads ``prob[(y + oy) // s, (x + ox) // s]``
    with ``(oy, ox) = prob_origin`` and ``s = prob_scale``. ``polygons`` traces each object's
    outline (with holes) in level-0 pixel-edge coordinates, simplified by ``simplify`` px
    (Douglas-Peucker; 0 keeps every corner)."""
    height, _ = shape
    seg = column_segments(runs, height)
    n = label_segments(seg)
    if n == 0:
        empty = np.zeros(0)
        return Objects(empty, empty, empty, np.zeros((0, 4), np.int64), empty, empty, [])
    length = seg.length.astype(np.float64)
    area = np.bincount(seg.label, weights=length, minlength=n)
    cx = np.bincount(seg.label, weights=length * (seg.x + 0.5), minlength=n) / area
    cy = np.bincount(seg.label, weights=length * (seg.y0 + seg.y1) / 2.0, minlength=n) / area
    del length
    order = np.argsort(seg.label, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(seg.label, minlength=n))])
    starts = bounds[:-1]
    bbox = np.stack([np.minimum.reduceat(seg.x[order], starts), np.minimum.reduceat(seg.y0[order], starts),
                     np.maximum.reduceat(seg.x[order], starts) + 1, np.maximum.reduceat(seg.y1[order], starts)], 1)
    perimeter = np.zeros(n)
    mean_prob = np.full(n, np.nan)
    shapes: List[Optional[list]] = [None] * n
    side = np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])
    done = np.zeros(n, bool)
    for cell in CELLS:
        fits = np.flatnonzero(~done & (side <= cell - 2))
        done[fits] = True
        chunk = max(1, PACKED_PIXELS // (cell * cell))
        for start in range(0, len(fits), chunk):
            which = fits[start:start + chunk]
            p, mean, packed = _measure_packed(seg, order, bounds, bbox, which, prob, prob_origin, prob_scale,
                                              polygons, simplify, cell)
            perimeter[which] = p
            if mean is not None:
                mean_prob[which] = mean
            for i, k in enumerate(which):
                shapes[k] = packed[i]
    for k in np.flatnonzero(~done):
        idx = order[bounds[k]:bounds[k + 1]]
        x0, y0, x1, y1 = (int(v) for v in bbox[k])
        step = max(1, math.ceil(math.sqrt((x1 - x0) * (y1 - y0) / MAX_RASTER_PIXELS)))
        mask = _raster(seg, idx, (x0, y0, x1, y1), step)
        perimeter[k] = contour_perimeter(np.pad(mask, 1)) * step
        if prob is not None:
            ys = (y0 + np.arange(mask.shape[0]) * step + prob_origin[0]) // prob_scale
            xs = (x0 + np.arange(mask.shape[1]) * step + prob_origin[1]) // prob_scale
            ys = np.clip(ys.astype(np.int64), 0, prob.shape[0] - 1)
            xs = np.clip(xs.astype(np.int64), 0, prob.shape[1] - 1)
            mean_prob[k] = float(prob[np.ix_(ys, xs)][mask > 0].mean())
        if polygons:
            rings = mask_polygons(mask, scale=step, offset=(-x0, -y0), simplify=simplify)
            shapes[k] = rings[0] if rings else None
    return Objects(area, cx, cy, bbox, perimeter, mean_prob, shapes if polygons else [])


def object_rows(item_id: str, objects: Objects, mpp: Optional[float]) -> List[Dict[str, object]]:
    """One row of :data:`OBJECT_COLUMNS` per object (µm columns empty without ``mpp``)."""
    rows = []
    for k in range(len(objects)):
        area, perimeter = float(objects.area[k]), float(objects.perimeter[k])
        circularity = min(1.0, 4 * math.pi * area / perimeter**2) if perimeter > 0 else 1.0
        x0, y0, x1, y1 = (int(v) for v in objects.bbox[k])
        row = {"id": item_id, "object": k + 1, "x": round(float(objects.cx[k]), 2), "y": round(float(objects.cy[k]), 2),
               "x_um": "", "y_um": "", "area_px": int(area), "area_um2": "", "diameter_um": "", "perimeter_um": "",
               "circularity": round(circularity, 4), "bbox": f"{x0} {y0} {x1} {y1}",
               "mean_prob": "" if np.isnan(objects.mean_prob[k]) else round(float(objects.mean_prob[k]), 4)}
        if mpp:
            row.update(x_um=round(float(objects.cx[k]) * mpp, 2), y_um=round(float(objects.cy[k]) * mpp, 2),
                       area_um2=round(area * mpp * mpp, 2),
                       diameter_um=round(2 * math.sqrt(area / math.pi) * mpp, 2),
                       perimeter_um=round(perimeter * mpp, 2))
        rows.append(row)
    return rows


def count_objects(runs: np.ndarray, height: int) -> int:
    """How many objects (8-connected components) the runs of a mask of ``height`` rows hold: the
    objects :func:`find_objects` measures, counted without measuring them."""
    return label_segments(column_segments(runs, height))


def _labelled(runs: np.ndarray, height: int) -> Tuple[Segments, int, np.ndarray]:
    seg = column_segments(runs, height)
    n = label_segments(seg)
    area = np.bincount(seg.label, weights=seg.length, minlength=n).astype(np.int64)
    return seg, n, area


def match_objects(pred_runs: np.ndarray, true_runs: np.ndarray, height: int,
                  iou: float = 0.5) -> Dict[str, int]:
    """Match predicted to true objects (8-connected) at intersection-over-union >= ``iou``,
    one to one (greedy by IoU; above 0.5 a match is unique anyway). Returns the counts
    ``{"predicted", "true", "matched"}``."""
    pred, n_pred, pred_area = _labelled(pred_runs, height)
    true, n_true, true_area = _labelled(true_runs, height)
    counts = {"predicted": n_pred, "true": n_true, "matched": 0}
    if not n_pred or not n_true:
        return counts
    # flat intervals of the segments, both sorted; partners of a predicted one by binary search
    ps, pe = pred.x * height + pred.y0, pred.x * height + pred.y1
    ts, te = true.x * height + true.y0, true.x * height + true.y1
    lo = np.searchsorted(te, ps, side="right")
    hi = np.searchsorted(ts, pe, side="left")
    count = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(ps)), count)
    b = np.repeat(lo, count) + (np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count))
    overlap = np.minimum(pe[a], te[b]) - np.maximum(ps[a], ts[b])
    pair = pred.label[a] * n_true + true.label[b]
    keys, inverse = np.unique(pair, return_inverse=True)
    inter = np.bincount(inverse, weights=overlap).astype(np.int64)
    p, t = keys // n_true, keys % n_true
    scores = inter / (pred_area[p] + true_area[t] - inter)
    used_p, used_t = set(), set()
    for k in np.argsort(-scores, kind="stable"):
        if scores[k] < iou:
            break
        if p[k] not in used_p and t[k] not in used_t:
            used_p.add(p[k])
            used_t.add(t[k])
    counts["matched"] = len(used_p)
    return counts


def object_scores(counts: Sequence[Dict[str, int]]) -> Dict[str, float]:
    """Precision, recall and F1 of object matches summed over ``counts``; a ratio with nothing
    to count (no prediction, or no true object) is 1 when the other side is empty too, else 0
    for recall (objects all missed) and 1 for precision (nothing predicted wrongly)."""
    pred = sum(c["predicted"] for c in counts)
    true = sum(c["true"] for c in counts)
    matched = sum(c["matched"] for c in counts)
    precision = matched / pred if pred else 1.0
    recall = matched / true if true else 1.0
    f1 = 2 * matched / (pred + true) if pred + true else 1.0
    return {"object_precision": precision, "object_recall": recall, "object_f1": f1}
