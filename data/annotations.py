"""Annotation files of other tools, read into shapes with classes.

:func:`read_annotations` recognises the format from the file's content (never its extension):

======================  ==================================================================
format                  what is read
======================  ==================================================================
GeoJSON (QuPath, ours)  a FeatureCollection, a bare list of Features or one Feature; Polygon
                        (holes) and MultiPolygon; class ``properties.classification.name``;
                        any ``objectType``; LineString / Point features are skipped (counted)
ASAP XML                ``ASAP_Annotations``: Polygon, Rectangle, Spline (its control points);
                        class ``PartOfGroup``; Dot / PointSet skipped (counted)
ImageScope XML          Aperio ``Annotations``: regions of each layer (freehand, rectangle,
                        ellipse); ``NegativeROA="1"`` regions are holes of the layer's regions
                        they overlap; class = the layer's ``Name`` (``layer <Id>`` when empty);
                        ``MicronsPerPixel`` noted
labelme JSON            polygon, rectangle and circle shapes; class ``label``; the image from
                        ``imagePath`` or the embedded ``imageData``
DICOM Segmentation      (highdicom) a raster label: segments by ``SegmentLabel``; read by
                        :class:`data.masks.SegMask`
DICOM bulk annotations  (highdicom, 2-D image coordinates) POLYGON, RECTANGLE, ELLIPSE;
                        class ``AnnotationGroupLabel``; POINT / POLYLINE skipped (counted)
======================  ==================================================================

Coordinates are level-0 pixels ``(x, y)`` with the origin at the top-left *corner* of the
top-left pixel (pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``), as QuPath,
ASAP, labelme and DICOM (2-D) write them. Rings may be open or closed. How shapes become
pixels (the fill rule) is :mod:`data.masks`'s business.

Every problem is an :class:`AnnotationError` whose message starts with the file's path.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data.readers import SlideError

__all__ = ["AnnotationError", "Shape", "Annotations", "read_annotations", "ANNOTATION_EXTENSIONS",
           "UNCLASSIFIED", "describe_classes", "polygon_from_ellipse"]

logger = logging.getLogger(__name__)

# File name endings of annotation files (``<id><ending>``), longest first where they overlap.
ANNOTATION_EXTENSIONS = (".seg.dcm", ".ann.dcm", ".geojson", ".json", ".xml", ".dcm")
UNCLASSIFIED = ""  # the class of a shape its file gives none
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
ANN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"


class AnnotationError(SlideError):
    """An annotation file that cannot be read; the message starts with its path."""


@dataclass(frozen=True)
class Shape:
    """One filled region: an exterior ring and hole rings, ``(N, 2)`` float64 ``(x, y)`` arrays
    in level-0 pixels (open: the last vertex joins the first)."""

    label: str
    exterior: np.ndarray
    holes: Tuple[np.ndarray, ...] = ()

    def bounds(self) -> Tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the exterior."""
        x, y = self.exterior[:, 0], self.exterior[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())


@dataclass
class Annotations:
    """What one annotation file holds."""

    path: str
    format: str
    shapes: List[Shape] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)  # geometry kind -> count (points, lines, ...)
    notes: List[str] = field(default_factory=list)
    mpp: Optional[float] = None  # ImageScope MicronsPerPixel
    image_size: Optional[Tuple[int, int]] = None  # (height, width) the file states (labelme)
    image_path: Optional[str] = None  # labelme imagePath, resolved beside the file
    image_data: Optional[bytes] = None  # labelme's embedded image (PNG/JPEG bytes)
    segments: Dict[str, List[int]] = field(default_factory=dict)  # DICOM SEG: label -> segment numbers
    seg_size: Optional[Tuple[int, int]] = None  # DICOM SEG: (rows, columns) of its total pixel matrix

    @property
    def is_raster(self) -> bool:
        return self.format == "DICOM Segmentation"

    def class_counts(self) -> Dict[str, int]:
        """Shapes (segments, for a DICOM Segmentation) per class, most frequent first."""
        if self.is_raster:
            counts = Counter({label: len(numbers) for label, numbers in self.segments.items()})
        else:
            counts = Counter(s.label for s in self.shapes)
        return dict(counts.most_common())


def describe_classes(counts: Dict[str, int]) -> str:
    """``Glomerulus 12, (unclassified) 3``; ``no shapes`` when empty."""
    if not counts:
        return "no shapes"
    return ", ".join(f"{name if name != UNCLASSIFIED else '(unclassified)'} {n}" for name, n in counts.items())


def polygon_from_ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """An ellipse as a polygon whose chords stray at most ~0.1 px from it."""
    r = max(abs(rx), abs(ry), 1e-6)
    n = int(min(4096, max(16, math.ceil(math.pi / math.acos(max(-1.0, 1.0 - 0.1 / r))))))
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack((cx + rx * np.cos(t), cy + ry * np.sin(t)), axis=1)


# --- helpers -----------------------------------------------------------------------------------

def _three_distinct(points: np.ndarray) -> bool:
    """Whether ``(N, 2)`` points hold at least three distinct vertices."""
    other = np.flatnonzero(np.any(points != points[0], axis=1))
    if not other.size:
        return False
    second = points[other[0]]
    return bool(np.any(np.any(points != points[0], axis=1) & np.any(points != second, axis=1)))


class _Reader:
    """Collects one file's shapes, skipped geometries and notes while a parser walks it."""

    def __init__(self, path: str, fmt: str):
        self.out = Annotations(path, fmt)
        self.degenerate = 0

    def fail(self, problem: str) -> AnnotationError:
        return AnnotationError(f"{self.out.path}: {self.out.format}: {problem}")

    def ring(self, points, where: str) -> Optional[np.ndarray]:
        """``points`` as an open ``(N, 2)`` ring; None (counted) when it has under 3 distinct vertices."""
        try:
            array = np.asarray(points, dtype=np.float64)  # C-speed for a list of [x, y(, z)] numbers
        except (TypeError, ValueError):
            array = None
        if array is None or (array.size and (array.ndim != 2 or array.shape[1] < 2)):
            raise self.fail(f"{where}: coordinates must be [x, y] numbers")
        array = array[:, :2] if array.size else array.reshape(0, 2)
        if not np.isfinite(array).all():
            raise self.fail(f"{where}: coordinates must be finite numbers")
        if len(array) > 1 and np.array_equal(array[0], array[-1]):
            array = array[:-1]  # closed ring: drop the repeated vertex
        if len(array) < 3 or not _three_distinct(array):
            self.degenerate += 1
            return None
        return np.ascontiguousarray(array)

    def add(self, label: str, exterior, holes=(), where: str = "") -> None:
        ring = self.ring(exterior, where)
        if ring is None:
            return
        kept = tuple(h for h in (self.ring(hole, f"{where} hole") for hole in holes) if h is not None)
        self.out.shapes.append(Shape(str(label), ring, kept))

    def skip(self, kind: str, n: int = 1) -> None:
        self.out.skipped[kind] = self.out.skipped.get(kind, 0) + n

    def done(self) -> Annotations:
        if self.degenerate:
            self.out.notes.append(f"{self.degenerate} ring(s) with fewer than 3 distinct vertices skipped")
        if self.out.skipped:
            self.out.notes.append("skipped (no area): " + ", ".join(f"{n} {k}" for k, n in self.out.skipped.items()))
        return self.out


# --- GeoJSON -------------------------------------------------------------------------------------

def _geojson_class(properties) -> str:
    if not isinstance(properties, dict):
        return UNCLASSIFIED
    classification = properties.get("classification")
    if isinstance(classification, str):
        return classification
    if isinstance(classification, dict):
        if isinstance(classification.get("name"), str):
            return classification["name"]
        names = classification.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return UNCLASSIFIED


def _geojson_geometry(reader: _Reader, geometry, label: str, where: str) -> None:
    if geometry is None:
        reader.skip("feature without geometry")
        return
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise reader.fail(f"{where}: geometry must be an object with a type")
    kind, coords = geometry["type"], geometry.get("coordinates")
    if kind == "Polygon":
        if not isinstance(coords, list) or not coords:
            raise reader.fail(f"{where}: a Polygon needs a list of rings")
        reader.add(label, coords[0], coords[1:], where)
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise reader.fail(f"{where}: a MultiPolygon needs a list of polygons")
        for k, polygon in enumerate(coords):
            if not isinstance(polygon, list) or not polygon:
                raise reader.fail(f"{where} polygon {k}: a polygon needs a list of rings")
            reader.add(label, polygon[0], polygon[1:], f"{where} polygon {k}")
    elif kind == "GeometryCollection":
        for k, part in enumerate(geometry.get("geometries") or []):
            _geojson_geometry(reader, part, label, f"{where} part {k}")
    elif kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        reader.skip(kind)
    else:
        raise reader.fail(f"{where}: unknown geometry type {kind!r}")


def _read_geojson(path: str, data) -> Annotations:
    reader = _Reader(path, "GeoJSON")
    if isinstance(data, list):
        features = data
    elif data.get("type") == "FeatureCollection" or "features" in data:
        features = data.get("features")
        if not isinstance(features, list):
            raise reader.fail("a FeatureCollection needs a list of features")
    elif data.get("type") == "Feature":
        features = [data]
    else:  # a bare geometry
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    for n, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise reader.fail(f"item {n} is not a GeoJSON Feature")
        _geojson_geometry(reader, feature.get("geometry"), _geojson_class(feature.get("properties")), f"feature {n}")
    return reader.done()


# --- labelme ---------------------------------------------------------------------------------------

def _read_labelme(path: str, data: dict) -> Annotations:
    reader = _Reader(path, "labelme JSON")
    out = reader.out
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise reader.fail("'shapes' must be a list")
    for n, shape in enumerate(shapes):
        where = f"shape {n}"
        if not isinstance(shape, dict):
            raise reader.fail(f"{where} is not an object")
        kind = shape.get("shape_type") or "polygon"  # labelme 3 wrote no shape_type: polygons
        points = shape.get("points") or []
        label = shape.get("label", UNCLASSIFIED)
        if kind == "polygon":
            reader.add(label, points, (), where)
        elif kind == "rectangle":  # two opposite corners (labelme 5 may write all four)
            pairs = _points(reader, points, where)
            if len(pairs) < 2:
                reader.degenerate += 1
                continue
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            reader.add(label, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], (), where)
        elif kind == "circle":
            if len(points) != 2:
                raise reader.fail(f"{where}: a circle needs its centre and one point on it, got {len(points)} points")
            (cx, cy), (px, py) = _points(reader, points, where)
            r = math.hypot(px - cx, py - cy)
            if r > 0:
                out.shapes.append(Shape(str(label), polygon_from_ellipse(cx, cy, r, r)))
            else:
                reader.degenerate += 1
        else:
            reader.skip(kind)
    height, width = data.get("imageHeight"), data.get("imageWidth")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        out.image_size = (height, width)
    image_path = data.get("imagePath")
    if isinstance(image_path, str) and image_path:
        out.image_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                       image_path.replace("\\", "/")))
    encoded = data.get("imageData")
    if isinstance(encoded, str) and encoded:
        try:
            out.image_data = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError):
            raise reader.fail("imageData is not base64") from None
    return reader.done()


def _points(reader: _Reader, points, where: str) -> List[Tuple[float, float]]:
    """Two or more ``[x, y]`` points as float pairs (labelme rectangles and circles)."""
    try:
        pairs = [(float(p[0]), float(p[1])) for p in points]
    except (TypeError, ValueError, IndexError, KeyError):
        raise reader.fail(f"{where}: coordinates must be [x, y] numbers") from None
    if not all(math.isfinite(v) for p in pairs for v in p):
        raise reader.fail(f"{where}: coordinates must be finite numbers")
    return pairs


# --- XML: ASAP and ImageScope ------------------------------------------------------------------------

def _float_attr(reader: _Reader, element, name: str, where: str) -> float:
    try:
        value = float(element.attrib[name])
    except (KeyError, ValueError):
        raise reader.fail(f"{where}: attribute {name} must be a number") from None
    if not math.isfinite(value):
        raise reader.fail(f"{where}: attribute {name} must be finite")
    return value


def _read_asap(path: str, root) -> Annotations:
    reader = _Reader(path, "ASAP XML")
    spline = 0
    for n, annotation in enumerate(root.iter("Annotation")):
        where = f"Annotation {n} ({annotation.get('Name', '')})"
        kind = annotation.get("Type", "Polygon")
        group = annotation.get("PartOfGroup", "None")
        label = UNCLASSIFIED if group in ("None", "") else group
        coordinates = sorted(annotation.iter("Coordinate"),
                             key=lambda c: _float_attr(reader, c, "Order", where) if "Order" in c.attrib else 0)
        points = [(_float_attr(reader, c, "X", where), _float_attr(reader, c, "Y", where)) for c in coordinates]
        if kind in ("Polygon", "Rectangle", "Spline"):
            if kind == "Rectangle" and len(points) >= 2:
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                points = [(min(xs), min(ys)), (max(xs), min(ys)), (max(xs), max(ys)), (min(xs), max(ys))]
            spline += kind == "Spline"
            reader.add(label, points, (), where)
        else:  # Dot, PointSet, Measurement: no area
            reader.skip(kind)
    if spline:
        reader.out.notes.append(f"{spline} Spline annotation(s) read through their control points (as polygons)")
    return reader.done()


def _read_imagescope(path: str, root) -> Annotations:
    reader = _Reader(path, "ImageScope XML")
    out = reader.out
    if root.get("MicronsPerPixel"):
        try:
            out.mpp = float(root.get("MicronsPerPixel"))
            out.notes.append(f"MicronsPerPixel {out.mpp:g}")
        except ValueError:
            out.notes.append(f"MicronsPerPixel {root.get('MicronsPerPixel')!r} is not a number: ignored")
    orphans = 0
    for n, layer in enumerate(root.iter("Annotation")):
        label = layer.get("Name") or f"layer {layer.get('Id', n + 1)}"
        positive, negative = [], []
        for k, region in enumerate(layer.iter("Region")):
            where = f"layer {label!r} region {k}"
            vertices = [(_float_attr(reader, v, "X", where), _float_attr(reader, v, "Y", where))
                        for v in region.iter("Vertex")]
            kind = region.get("Type", "0")
            if kind in ("1", "2"):  # rectangle, ellipse: the box of their vertices
                if len(vertices) < 2:
                    reader.degenerate += 1
                    continue
                xs, ys = [p[0] for p in vertices], [p[1] for p in vertices]
                x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
                if kind == "1":
                    vertices = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
                else:
                    vertices = polygon_from_ellipse((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2).tolist()
            elif kind != "0":  # arrows, rulers, pins: no area
                reader.skip(f"region of type {kind}")
                continue
            ring = reader.ring(vertices, where)
            if ring is not None:
                (negative if region.get("NegativeROA") == "1" else positive).append(ring)
        boxes = [(r[:, 0].min(), r[:, 1].min(), r[:, 0].max(), r[:, 1].max()) for r in positive]
        holes: List[List[np.ndarray]] = [[] for _ in positive]
        for ring in negative:  # a hole of every region of its layer it overlaps
            x0, y0, x1, y1 = ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()
            hits = [i for i, (a, b, c, d) in enumerate(boxes) if x0 < c and a < x1 and y0 < d and b < y1]
            orphans += not hits
            for i in hits:
                holes[i].append(ring)
        out.shapes.extend(Shape(label, ring, tuple(h)) for ring, h in zip(positive, holes))
    if orphans:
        out.notes.append(f"{orphans} NegativeROA region(s) overlap no region of their layer: ignored")
    return reader.done()


# --- DICOM ----------------------------------------------------------------------------------------------

def _read_dicom(path: str) -> Annotations:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        raise AnnotationError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from None
    sop = str(header.get("SOPClassUID", ""))
    if sop == SEG_SOP_CLASS:
        return _read_dicom_seg(path, header)
    if sop == ANN_SOP_CLASS:
        return _read_dicom_ann(path)
    kind = getattr(getattr(header.get("SOPClassUID"), "name", None), "strip", lambda: sop)() or sop
    raise AnnotationError(f"{path}: a DICOM file but not a Segmentation or bulk annotations ({kind}, modality "
                          f"{header.get('Modality', '?')}): not a label file")


def _read_dicom_seg(path: str, header) -> Annotations:
    out = Annotations(path, "DICOM Segmentation")
    rows, cols = header.get("TotalPixelMatrixRows"), header.get("TotalPixelMatrixColumns")
    if rows is None or cols is None:
        raise AnnotationError(f"{path}: a DICOM Segmentation without a total pixel matrix (not of a slide): "
                              "only Segmentations of whole-slide images are labels")
    out.seg_size = (int(rows), int(cols))
    for item in header.get("SegmentSequence", []):
        label = str(item.get("SegmentLabel", "") or f"segment {int(item.SegmentNumber)}")
        out.segments.setdefault(label, []).append(int(item.SegmentNumber))
    if not out.segments:
        raise AnnotationError(f"{path}: a DICOM Segmentation without segments")
    return out


def _read_dicom_ann(path: str) -> Annotations:
    import highdicom as hd

    reader = _Reader(path, "DICOM bulk annotations")
    try:
        ann = hd.ann.annread(path)
    except Exception as exc:  # highdicom / pydicom errors of a damaged object
        raise reader.fail(f"unreadable ({type(exc).__name__}: {exc})") from None
    if str(ann.AnnotationCoordinateType) != "2D":
        raise reader.fail("3-D slide coordinates are not supported: export the annotations in 2-D image "
                          "(pixel) coordinates")
    for group in ann.get_annotation_groups():
        kind = group.graphic_type.value if hasattr(group.graphic_type, "value") else str(group.graphic_type)
        label = str(group.label)
        if kind in ("POINT", "POLYLINE"):
            reader.skip(kind, group.number_of_annotations)
            continue
        for k, coords in enumerate(group.get_graphic_data(coordinate_type="2D")):
            coords = np.asarray(coords, dtype=np.float64)
            where = f"group {label!r} annotation {k}"
            if kind == "ELLIPSE":  # four points: the ends of the major then the minor axis
                centre = coords.mean(axis=0)
                major, minor = coords[1] - coords[0], coords[3] - coords[2]
                t = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)[:, None]
                ring = centre + np.cos(t) * major / 2 + np.sin(t) * minor / 2
                reader.add(label, ring, (), where)
            else:  # POLYGON, RECTANGLE
                reader.add(label, coords, (), where)
    return reader.done()


# --- entry point -----------------------------------------------------------------------------------------

def _sniff(path: str) -> str:
    """``dicom``, ``json`` or ``xml`` from the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] in (b"{", b"["):
        return "json"
    if text[:1] == b"<":
        return "xml"
    raise AnnotationError(f"{path}: not an annotation file (neither JSON, XML nor DICOM)")


def read_annotations(path: str) -> Annotations:
    """Read one annotation file of any supported format (recognised from its content)."""
    path = str(path)
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: annotation file not found")
    kind = _sniff(path)
    if kind == "dicom":
        return _read_dicom(path)
    if kind == "json":
        try:
            with open(path, "r", encoding="utf-8-sig") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AnnotationError(f"{path}: malformed or truncated JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("shapes"), list) and (
                "imagePath" in data or "imageData" in data or "version" in data):
            return _read_labelme(path, data)
        if isinstance(data, list) or (isinstance(data, dict) and (
                data.get("type") in ("FeatureCollection", "Feature", "Polygon", "MultiPolygon", "GeometryCollection")
                or isinstance(data.get("features"), list))):
            return _read_geojson(path, data)
        raise AnnotationError(f"{path}: JSON but neither GeoJSON (QuPath) nor labelme (top-level keys: "
                              f"{sorted(data)[:8] if isinstance(data, dict) else type(data).__name__})")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: malformed or truncated XML ({exc})") from None
    tag = root.tag.split("}")[-1]
    if tag == "ASAP_Annotations":
        return _read_asap(path, root)
    if tag == "Annotations" and (root.find("Annotation") is not None or root.get("MicronsPerPixel")):
        return _read_imagescope(path, root)
    if tag == "Annotations" and not len(root):
        return Annotations(path, "ImageScope XML", notes=["no annotation layers"])
    raise AnnotationError(f"{path}: XML but neither ASAP (<ASAP_Annotations>) nor ImageScope (<Annotations>) "
                          f"annotations (root <{tag}>)")


def annotation_id_of(name: str, endings: Sequence[str] = ANNOTATION_EXTENSIONS) -> Optional[str]:
    """The id of an annotation file name (``<id><ending>``), or None."""
    lower = name.lower()
    for ending in endings:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None
