"""Every label source behind one interface: the tiler (and test_net's scoring) ask a mask for
windows, never for the whole full-resolution mask.

A mask has ``shape`` (level-0 ``(height, width)``) and ``window(rows, cols, step)``: level-0 rows
``rows[0]:rows[1]:step`` and columns likewise as a ``uint8`` 0/1 array, reading 0 outside the
mask (the tiler's zero padding). ``step = r`` is ``cv2.INTER_NEAREST`` by ``r``. :func:`mask_runs`
turns any mask into column-major RLE runs (``utils.rle``) band by band.

Sources:

* :class:`RLEMask`: parsed Kaggle RLE runs (``wsi_rle``);
* :class:`ArrayMask`: an in-memory mask image (``pairs``);
* :class:`ShapeMask`: polygons of an annotation file (``annotations``), rasterised on demand,
  only the rows and columns asked for;
* :class:`SegMask`: a DICOM Segmentation, read region by region (highdicom);
* :class:`ResampledMask`: any of these brought to another pixel size (``INPUT.MPP_TRAIN``).

**How polygons become pixels** (:class:`ShapeMask`): coordinates are level-0 ``(x, y)`` with the
origin at the top-left corner of the top-left pixel; a pixel belongs to a ring when its centre
``(col + 0.5, row + 0.5)`` lies inside it under the **even-odd rule** (as OpenCV's ``fillPoly``,
PIL and matplotlib fill: a self-intersecting ring such as a pentagram leaves its doubly wound
core empty). A centre exactly on an edge is decided as if it lay a hair (~3e-7 px) below and
to the right of where it is, so every pixel has one answer, whichever way the mask is read. A
shape is its exterior ring minus its hole rings; the foreground is the union of the foreground
shapes minus the union of the excluded ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data.annotations import AnnotationError, Annotations, Shape, describe_classes, read_annotations
from data.sources import load_pair_mask
from data.readers import SlideError
from utils.rle import RLEStripEncoder, check_shape, decode_window, intersect_runs, parse_rle, rle_area

__all__ = ["RLEMask", "ArrayMask", "ResampledMask", "ShapeMask", "SegMask", "mask_runs", "LabelSource",
           "LabelRules", "open_labels", "annotation_labels", "slide_labels", "ring_spans"]

logger = logging.getLogger(__name__)

# Pixel centres are tested at (col + 0.5 + _DX, row + 0.5 + _DY): no centre lies exactly on an
# edge through half-integer points, so row-wise and column-wise scans agree pixel for pixel.
_DX, _DY = 3.14159265e-7, 2.71828183e-7
_EMPTY_SPANS = (np.zeros(0, np.int64),) * 3
_KEY = np.int64(1) << np.int64(34)  # scanline k and column x packed as k * _KEY + x (x < 2**34)


class RLEMask:
    """A full-resolution mask given as parsed RLE runs (see ``utils.rle.parse_rle``)."""

    def __init__(self, runs: np.ndarray, shape: Tuple[int, int]):
        self.runs = runs
        self.shape = check_shape(shape)

    def window(self, rows: Tuple[int, int], cols: Tuple[int, int], step: int = 1) -> np.ndarray:
        """Rows ``rows[0]:rows[1]:step``, cols likewise (outside the mask reads 0)."""
        return decode_window(self.runs, self.shape, rows, cols, step)


class ArrayMask:
    """An in-memory ``(height, width)`` 0/1 mask with the same ``window`` interface."""

    def __init__(self, mask: np.ndarray):
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
        self.mask = (mask != 0).astype(np.uint8)
        self.shape = mask.shape

    def window(self, rows: Tuple[int, int], cols: Tuple[int, int], step: int = 1) -> np.ndarray:
        r = np.arange(rows[0], rows[1], step)
        c = np.arange(cols[0], cols[1], step)
        out = np.zeros((len(r), len(c)), dtype=np.uint8)
        rv = (r >= 0) & (r < self.shape[0])
        cv = (c >= 0) & (c < self.shape[1])
        if rv.any() and cv.any():
            out[np.ix_(rv, cv)] = self.mask[np.ix_(r[rv], c[cv])]
        return out


class ResampledMask:
    """A mask resampled by ``scale`` (base px per new px) to ``shape``: new pixel ``(r, c)`` is
    base pixel ``(floor((r + .5) g), floor((c + .5) g))`` (nearest), read through a window of the
    base at the nearest integer step (within half a step), so a band never decodes more than
    the output's pixels."""

    def __init__(self, base, scale: float, shape: Tuple[int, int]):
        self.base, self.scale, self.shape = base, float(scale), check_shape(shape)

    def window(self, rows: Tuple[int, int], cols: Tuple[int, int], step: int = 1) -> np.ndarray:
        g = self.scale
        sr = np.floor((np.arange(rows[0], rows[1], step) + 0.5) * g).astype(np.int64)
        sc = np.floor((np.arange(cols[0], cols[1], step) + 0.5) * g).astype(np.int64)
        if not len(sr) or not len(sc):
            return np.zeros((len(sr), len(sc)), dtype=np.uint8)
        q = max(1, int(step * g))
        dense = self.base.window((int(sr[0]), int(sr[-1]) + 1), (int(sc[0]), int(sc[-1]) + 1), q)
        ri = np.minimum(np.rint((sr - sr[0]) / q).astype(np.int64), dense.shape[0] - 1)
        ci = np.minimum(np.rint((sc - sc[0]) / q).astype(np.int64), dense.shape[1] - 1)
        return np.ascontiguousarray(dense[np.ix_(ri, ci)])


# --- polygon scanlines -----------------------------------------------------------------------------

def ring_spans(ring: np.ndarray, row0: int, n_rows: int, step: int = 1, dx: float = _DX, dy: float = _DY
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of one ring (even-odd rule) on the scanlines ``row0 + k * step``,
    ``k < n_rows``, as spans ``(k, col_lo, col_hi)`` (half-open pixel columns, unclipped).

    ``ring`` is ``(N, 2)`` ``(x, y)``, open or closed. A pixel is inside when its centre
    (offset by the tie-breaking hair ``dx``, ``dy``) is: each edge crosses the scanlines whose
    centre ``y`` satisfies ``min(y0, y1) <= y < max(y0, y1)``; crossings sorted along a
    scanline pair up into spans."""
    x, y = ring[:, 0], ring[:, 1]
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    keep = y != y2  # horizontal edges cross no scanline
    x, y, x2, y2 = x[keep], y[keep], x2[keep], y2[keep]
    base = row0 + 0.5 + dy
    lo = np.clip(np.ceil((np.minimum(y, y2) - base) / step), 0, n_rows).astype(np.int64)
    hi = np.clip(np.ceil((np.maximum(y, y2) - base) / step), 0, n_rows).astype(np.int64)
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return _EMPTY_SPANS
    edge = np.repeat(np.arange(len(counts)), counts)
    k = lo[edge] + (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts))
    yk = base + k * step
    xk = x[edge] + (yk - y[edge]) * ((x2[edge] - x[edge]) / (y2[edge] - y[edge]))
    order = np.lexsort((xk, k))
    k, xk = k[order], xk[order]
    k = k[0::2]
    c_lo = np.ceil(xk[0::2] - 0.5 - dx).astype(np.int64)
    c_hi = np.ceil(xk[1::2] - 0.5 - dx).astype(np.int64)
    keep = c_hi > c_lo
    return k[keep], c_lo[keep], c_hi[keep]


def _pack(k: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return k * _KEY + lo, k * _KEY + hi


def _unpack(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = a // _KEY
    return k, a - k * _KEY, b - k * _KEY


def _union(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Packed spans ``[a, b)`` merged into disjoint, sorted spans (touching ones joined)."""
    if a.size == 0:
        return a, b
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    starts = np.concatenate(([True], a[1:] > reach[:-1]))
    first = np.flatnonzero(starts)
    last = np.concatenate((first[1:] - 1, [len(a) - 1]))
    return a[first], reach[last]


def _subtract(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Disjoint packed spans ``[a, b)`` minus disjoint packed spans ``[c, d)``."""
    if a.size == 0 or c.size == 0:
        return a, b
    pos = np.concatenate((a, b, c, d))
    in_a = np.concatenate((np.ones_like(a), -np.ones_like(b), np.zeros_like(c), np.zeros_like(d)))
    in_c = np.concatenate((np.zeros_like(a), np.zeros_like(b), np.ones_like(c), -np.ones_like(d)))
    order = np.argsort(pos, kind="stable")
    pos, state_a, state_c = pos[order], np.cumsum(in_a[order]), np.cumsum(in_c[order])
    last = np.concatenate((pos[1:] != pos[:-1], [True]))  # the state after every event at a position
    pos, state_a, state_c = pos[last], state_a[last], state_c[last]
    keep = (state_a[:-1] > 0) & (state_c[:-1] == 0) & (pos[1:] > pos[:-1])
    return _union(pos[:-1][keep], pos[1:][keep])


@dataclass
class _Rings:
    """Shapes ready for band queries: each one's exterior and holes, and every exterior's
    bounding box (to pick the shapes a band meets without looking at their vertices)."""

    exteriors: List[np.ndarray]
    holes: List[Tuple[np.ndarray, ...]]
    boxes: np.ndarray  # (n, 4) x_min, y_min, x_max, y_max

    @classmethod
    def of(cls, shapes: Sequence[Shape], transpose: bool = False) -> "_Rings":
        flip = (lambda r: r[:, ::-1].copy()) if transpose else (lambda r: r)
        exteriors = [flip(s.exterior) for s in shapes]
        holes = [tuple(flip(h) for h in s.holes) for s in shapes]
        boxes = np.array([(r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max()) for r in exteriors],
                         dtype=np.float64).reshape(-1, 4)
        return cls(exteriors, holes, boxes)

    def spans(self, row0: int, n_rows: int, step: int, col_range: Tuple[int, int], dx: float, dy: float
              ) -> Tuple[np.ndarray, np.ndarray]:
        """Packed spans of the union of (exterior - holes) of the shapes on these scanlines,
        clipped to ``col_range``."""
        if not len(self.exteriors) or n_rows <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        c0, c1 = col_range
        y_top, y_bottom = row0 + 0.5 + dy, row0 + 0.5 + dy + (n_rows - 1) * step
        x_b = self.boxes
        hit = np.flatnonzero((x_b[:, 3] > y_top) & (x_b[:, 1] <= y_bottom) & (x_b[:, 2] > c0) & (x_b[:, 0] < c1))
        parts_a, parts_b = [], []
        for i in hit.tolist():
            k, lo, hi = ring_spans(self.exteriors[i], row0, n_rows, step, dx, dy)
            lo, hi = np.maximum(lo, c0), np.minimum(hi, c1)
            keep = hi > lo
            a, b = _pack(k[keep], lo[keep], hi[keep])
            if self.holes[i] and a.size:
                ha, hb = [], []
                for hole in self.holes[i]:
                    k, lo, hi = ring_spans(hole, row0, n_rows, step, dx, dy)
                    pa, pb = _pack(k, np.clip(lo, c0, c1), np.clip(hi, c0, c1))
                    ha.append(pa)
                    hb.append(pb)
                a, b = _subtract(a, b, *_union(np.concatenate(ha), np.concatenate(hb)))
            parts_a.append(a)
            parts_b.append(b)
        if not parts_a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return _union(np.concatenate(parts_a), np.concatenate(parts_b))


class ShapeMask:
    """Polygons as a mask: the union of ``shapes`` minus the union of ``exclude``, rasterised
    only where asked (see the module's fill rule). Never builds the full-resolution mask."""

    def __init__(self, shapes: Sequence[Shape], shape: Tuple[int, int], exclude: Sequence[Shape] = ()):
        self.shape = check_shape(shape)
        self.shapes, self.exclude = list(shapes), list(exclude)
        self._rows = (_Rings.of(self.shapes), _Rings.of(self.exclude))
        self._cols = None  # transposed rings, for column-major runs (built on first use)

    def __len__(self) -> int:
        return len(self.shapes)

    @staticmethod
    def _spans(rings, row0, n_rows, step, col_range, dx, dy):
        a, b = rings[0].spans(row0, n_rows, step, col_range, dx, dy)
        if a.size and len(rings[1].exteriors):
            a, b = _subtract(a, b, *rings[1].spans(row0, n_rows, step, col_range, dx, dy))
        return _unpack(a, b)

    def window(self, rows: Tuple[int, int], cols: Tuple[int, int], step: int = 1) -> np.ndarray:
        """Rows ``rows[0]:rows[1]:step``, cols likewise, 0/1 uint8 (outside the mask reads 0)."""
        height, width = self.shape
        (r0, r1), (c0, c1), step = (int(v) for v in rows), (int(v) for v in cols), int(step)
        n_rows, n_cols = max(0, -(-(r1 - r0) // step)), max(0, -(-(c1 - c0) // step))
        out = np.zeros((n_rows, n_cols), dtype=np.uint8)
        # scanlines inside the mask only
        k0 = max(0, -(-(0 - r0) // step))
        k1 = min(n_rows, -(-(height - r0) // step))
        if k1 <= k0 or n_cols == 0:
            return out
        k, lo, hi = self._spans(self._rows, r0 + k0 * step, k1 - k0, step, (max(0, c0), min(width, c1)), _DX, _DY)
        j_lo = np.clip(-(-(lo - c0) // step), 0, n_cols)
        j_hi = np.clip(-(-(hi - c0) // step), 0, n_cols)
        keep = j_hi > j_lo
        # spans are disjoint and few (one per scanline and shape): painted as slices, no temporaries
        for row, a, b in zip((k[keep] + k0).tolist(), j_lo[keep].tolist(), j_hi[keep].tolist()):
            out[row, a:b] = 1
        return out

    def runs(self, band_cols: int = 4096) -> np.ndarray:
        """Column-major runs (``utils.rle``) of the whole mask, from column scanlines: no mask
        array at all, a band of ``band_cols`` columns at a time."""
        height, width = self.shape
        if self._cols is None:
            self._cols = (_Rings.of(self.shapes, transpose=True), _Rings.of(self.exclude, transpose=True))
        starts, ends = [], []
        for c0 in range(0, width, band_cols):
            n = min(band_cols, width - c0)
            k, lo, hi = self._spans(self._cols, c0, n, 1, (0, height), _DY, _DX)
            starts.append((k + c0) * height + lo)
            ends.append((k + c0) * height + hi)
        if not starts:
            return np.zeros((0, 2), np.int64)
        a, b = _union(np.concatenate(starts), np.concatenate(ends))  # joins runs across columns
        return np.stack((a, b), axis=1)


class SegMask:
    """A DICOM Segmentation (highdicom) as a mask: the union of ``segments`` minus the union of
    ``exclude`` (segment numbers), read region by region; fractional segments count where >= 0.5."""

    def __init__(self, path: str, segments: Sequence[int], exclude: Sequence[int] = ()):
        import highdicom as hd

        self.path = path
        self.seg = hd.seg.segread(path)
        self.shape = check_shape((int(self.seg.TotalPixelMatrixRows), int(self.seg.TotalPixelMatrixColumns)), path)
        self.segments, self.exclude = [int(s) for s in segments], [int(s) for s in exclude]

    def _read(self, numbers: List[int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        pixels = self.seg.get_total_pixel_matrix(row_start=r0 + 1, row_end=r1 + 1, column_start=c0 + 1,
                                                 column_end=c1 + 1, segment_numbers=numbers)
        return (pixels >= 0.5).any(axis=2) if pixels.ndim == 3 else pixels >= 0.5

    def window(self, rows: Tuple[int, int], cols: Tuple[int, int], step: int = 1) -> np.ndarray:
        height, width = self.shape
        (r0, r1), (c0, c1), step = (int(v) for v in rows), (int(v) for v in cols), int(step)
        n_rows, n_cols = max(0, -(-(r1 - r0) // step)), max(0, -(-(c1 - c0) // step))
        out = np.zeros((n_rows, n_cols), dtype=np.uint8)
        k0, k1 = max(0, -(-(0 - r0) // step)), min(n_rows, -(-(height - r0) // step))
        j0, j1 = max(0, -(-(0 - c0) // step)), min(n_cols, -(-(width - c0) // step))
        if k1 <= k0 or j1 <= j0 or not self.segments:
            return out
        ya, yb = r0 + k0 * step, r0 + (k1 - 1) * step + 1
        xa, xb = c0 + j0 * step, c0 + (j1 - 1) * step + 1
        fg = self._read(self.segments, ya, yb, xa, xb)
        if self.exclude:
            fg &= ~self._read(self.exclude, ya, yb, xa, xb)
        out[k0:k1, j0:j1] = fg[::step, ::step]
        return out


def mask_runs(mask, band_pixels: int = 1 << 24) -> np.ndarray:
    """Column-major RLE runs of any mask, a band of whole columns (~``band_pixels``) at a time
    (:class:`ShapeMask` and :class:`RLEMask` answer directly)."""
    if isinstance(mask, RLEMask):
        return mask.runs
    if isinstance(mask, ShapeMask):
        return mask.runs()
    height, width = mask.shape
    encoder = RLEStripEncoder(height)
    band = max(1, band_pixels // height)
    for c0 in range(0, width, band):
        encoder.add(mask.window((0, height), (c0, min(width, c0 + band))))
    return encoder.runs()


# --- annotation files as labels ------------------------------------------------------------------------

@dataclass
class LabelSource:
    """An annotation file turned into the masks of one slide: the foreground, the region of
    interest (None when the slide has no ROI shapes) and what went in, for the log."""

    mask: object
    roi: Optional[object]
    counts: Dict[str, int]  # shapes (segments) per class in the file
    used: int  # shapes (segments) that are foreground
    outside: int  # shapes reaching past the slide (clipped)
    roi_shapes: Tuple[Shape, ...] = ()  # the ROI's shapes, level-0 px of the slide (before resampling)
    area: Optional[int] = None  # level-0 pixels of foreground of the slide (before resampling), once counted

    def foreground_px(self) -> int:
        """Level-0 pixels of foreground (exact, from the runs: no mask is built)."""
        return rle_area(mask_runs(self.mask))

    def resampled(self, scale: float, shape: Tuple[int, int]) -> "LabelSource":
        """These masks brought to another pixel size (see :class:`ResampledMask`)."""
        roi = ResampledMask(self.roi, scale, shape) if self.roi is not None else None
        return LabelSource(ResampledMask(self.mask, scale, shape), roi, self.counts, self.used, self.outside,
                           self.roi_shapes, self.area)


def _pick(names: Sequence[str], counts: Dict[str, int]) -> List[str]:
    return [n for n in counts if n in set(names)]


def annotation_labels(annotations: Annotations, shape: Tuple[int, int], classes: Sequence[str] = (),
                      exclude: Sequence[str] = (), roi: Sequence[str] = ()) -> LabelSource:
    """The masks of a slide of ``shape`` from its annotation file.

    ``classes``: the foreground classes (empty: every class but ``exclude`` and ``roi``);
    ``exclude``: classes subtracted from the foreground; ``roi``: classes that mark where the
    slide was annotated. A filter naming classes none of which the file holds, while the file
    has other candidate shapes, is an :class:`AnnotationError` listing the classes found."""
    path, counts = annotations.path, annotations.class_counts()
    special = set(exclude) | set(roi)
    candidates = {n: c for n, c in counts.items() if n not in special}
    if classes:
        chosen = _pick(classes, candidates)
        if not chosen and candidates:
            raise AnnotationError(f"{path}: no shapes of the class(es) {list(classes)} (DATASETS.ANNOTATION_CLASSES); "
                                  f"the file holds: {describe_classes(counts)}")
    else:
        chosen = list(candidates)
    chosen, excluded, roi_names = set(chosen), set(_pick(exclude, counts)), set(_pick(roi, counts))
    if annotations.is_raster:
        rows, cols = annotations.seg_size
        if (rows, cols) != tuple(shape):
            raise AnnotationError(f"{path}: the Segmentation is {cols} x {rows} but its slide is {shape[1]} x "
                                  f"{shape[0]} (W x H)")
        if roi_names:
            raise AnnotationError(f"{path}: ROI classes {sorted(roi_names)} in a DICOM Segmentation: regions of "
                                  "interest are read from shapes only (GeoJSON, XML, labelme)")
        numbers = lambda names: [n for name in names for n in annotations.segments[name]]  # noqa: E731
        mask = SegMask(path, numbers(sorted(chosen)), numbers(sorted(excluded)))
        return LabelSource(mask, None, counts, sum(len(annotations.segments[n]) for n in chosen), 0)
    height, width = shape
    fg = [s for s in annotations.shapes if s.label in chosen]
    out = [s for s in annotations.shapes if s.label in chosen | excluded | roi_names]
    boxes = np.array([s.bounds() for s in out], dtype=np.float64).reshape(-1, 4)
    outside = int(((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)).sum())
    roi_shapes = [s for s in annotations.shapes if s.label in roi_names]
    mask = ShapeMask(fg, shape, [s for s in annotations.shapes if s.label in excluded])
    return LabelSource(mask, ShapeMask(roi_shapes, shape) if roi_shapes else None, counts, len(fg), outside,
                       tuple(roi_shapes))



@dataclass(frozen=True)
class LabelRules:
    """How a job's label file becomes masks: the pairs mask encoding and the annotation classes
    (``DATASETS.MASK_*``, ``DATASETS.ANNOTATION_*``)."""

    mask_channel: int = -1
    mask_threshold: int = 0
    mask_invert: bool = False
    classes: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    roi: Tuple[str, ...] = ()


def open_labels(job, shape: Tuple[int, int], rules: LabelRules = LabelRules(),
                annotations: Optional[Annotations] = None) -> LabelSource:
    """The masks of a tiling job (``data.sources.TileJob``) whose slide is ``shape``: its RLE, its
    mask image, or its annotation file (``annotations``: the file already read, if it was)."""
    if job.rle is not None:
        return LabelSource(RLEMask(parse_rle(job.rle, shape, name=job.id), shape), None, {}, 0, 0)
    if job.mask_path is not None:
        mask = load_pair_mask(job.mask_path, rules.mask_channel, rules.mask_threshold, rules.mask_invert)
        if mask.shape != tuple(shape):
            raise SlideError(f"{job.mask_path}: mask is {mask.shape[1]} x {mask.shape[0]} but image "
                             f"{job.image_path} is {shape[1]} x {shape[0]} (W x H)")
        return LabelSource(ArrayMask(mask), None, {}, 0, 0)
    if annotations is None:
        annotations = read_annotations(job.annotation_path)
    return annotation_labels(annotations, shape, rules.classes, rules.exclude, rules.roi)


def slide_labels(path: str, shape: Tuple[int, int], classes: Sequence[str] = (), exclude: Sequence[str] = (),
                 roi: Sequence[str] = ()) -> Tuple[np.ndarray, Optional[ShapeMask]]:
    """test_net's labels of a slide of ``shape`` from its annotation file: the true runs (inside
    the region of interest when the slide has ROI shapes of the classes ``roi``) and the ROI's
    mask (None without one)."""
    source = annotation_labels(read_annotations(path), shape, classes, exclude, roi)
    runs = mask_runs(source.mask)
    if source.roi is not None:
        runs = intersect_runs(runs, source.roi.runs())
    return runs, source.roi
