"""Annotation files of other tools as labels: parsing (real QuPath, ASAP, DICOM and labelme files,
and small hand-made ones), the polygon fill rule against independent rasterisations, streaming
equal to whole, and the mask interface (windows, runs)."""
import base64
import glob
import json
import math
import os

import cv2
import numpy as np
import pytest
from matplotlib.path import Path

from data.annotations import AnnotationError, Shape, read_annotations
from data.masks import _DX, _DY, ShapeMask, annotation_labels, mask_runs, slide_labels
from tests.slides import has_shared, shared
from utils.rle import rle_decode, rle_dice, runs_to_rle

needs_shared = pytest.mark.skipif(not has_shared(), reason="needs the real annotation files in ../shared/data")


def independent_mask(shapes, height, width, exclude=()):
    """Shapes rasterised by matplotlib's point-in-polygon test (even-odd) at every pixel centre of
    each shape's box, with the tie-breaking hair of data.masks: an independent implementation."""
    def region(group):
        out = np.zeros((height, width), bool)
        for shape in group:
            x0, y0, x1, y1 = shape.bounds()
            c0, c1 = max(0, int(math.floor(x0)) - 1), min(width, int(math.ceil(x1)) + 1)
            r0, r1 = max(0, int(math.floor(y0)) - 1), min(height, int(math.ceil(y1)) + 1)
            if c1 <= c0 or r1 <= r0:
                continue
            yy, xx = np.mgrid[r0:r1, c0:c1]
            points = np.stack((xx.ravel() + 0.5 + _DX, yy.ravel() + 0.5 + _DY), axis=1)

            def inside(ring):
                return Path(np.vstack((ring, ring[:1])), closed=True).contains_points(points).reshape(yy.shape)

            fill = inside(shape.exterior)
            for hole in shape.holes:
                fill &= ~inside(hole)
            out[r0:r1, c0:c1] |= fill
        return out

    return (region(shapes) & ~region(exclude)).astype(np.uint8)


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _mask(path, shape, **classes):
    return annotation_labels(read_annotations(path), shape, **classes).mask.window((0, shape[0]), (0, shape[1]))


# --- real files -------------------------------------------------------------------------------------

@needs_shared
def test_every_hubmap_labelme_file_equals_an_independent_rasterisation():
    files = sorted(glob.glob(shared("hubmap_ftu", "*.json")))
    assert len(files) == 88
    total, embedded = 0, []
    for path in files:
        annotations = read_annotations(path)
        assert annotations.format == "labelme JSON"
        height, width = annotations.image_size
        assert (height, width) == (1200, 1600)
        assert set(annotations.class_counts()) == {"Glomeruli"}
        total += len(annotations.shapes)
        if annotations.image_data:
            embedded.append(os.path.basename(path))
            image = cv2.imdecode(np.frombuffer(annotations.image_data, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (1200, 1600, 3)
        assert annotations.image_path == os.path.abspath(path[:-5] + ".jpg")
        mask = ShapeMask(annotations.shapes, (height, width))
        got = mask.window((0, height), (0, width))
        assert np.array_equal(got, independent_mask(annotations.shapes, height, width)), path
        assert got.sum() > 0
        # runs (column scanlines) equal the row scanlines' pixels exactly
        assert np.array_equal(rle_decode(runs_to_rle(mask.runs()), (height, width)), got), path
    assert total == 378
    assert embedded == ["16.json", "17.json"]


@needs_shared
@pytest.mark.parametrize("name, fmt, classes, skipped", [
    ("qupath-polygon-cell-classified.json", "GeoJSON", {"Cell": 2, "Nucleus": 2}, {}),
    ("qupath-brush.json", "GeoJSON", {"": 1}, {}),
    ("qupath-ellipse.json", "GeoJSON", {"": 1}, {}),
    ("asap-patient_004_node_4.xml", "ASAP XML", {"Tumor": 3}, {}),
    ("dicom-ann-sm_annotations.dcm", "DICOM bulk annotations", {}, {"POINT": 2}),
])
def test_real_annotation_files_are_read_with_their_shapes_and_classes(name, fmt, classes, skipped):
    annotations = read_annotations(shared("annotations", name))
    assert annotations.format == fmt
    assert annotations.class_counts() == classes
    assert annotations.skipped == skipped
    if not annotations.shapes:
        return
    # masks on a canvas of the file's extent equal the independent rasterisation, and their area
    # is the polygons' (shoelace) area within half a pixel per unit of perimeter
    x0 = min(s.bounds()[0] for s in annotations.shapes)
    y0 = min(s.bounds()[1] for s in annotations.shapes)
    shifted = [Shape(s.label, s.exterior - (x0 - 5, y0 - 5)) for s in annotations.shapes]
    width = int(max(s.bounds()[2] for s in shifted)) + 6
    height = int(max(s.bounds()[3] for s in shifted)) + 6
    got = ShapeMask(shifted, (height, width)).window((0, height), (0, width))
    assert np.array_equal(got, independent_mask(shifted, height, width))
    for shape in shifted:
        x, y = shape.exterior[:, 0], shape.exterior[:, 1]
        area = abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
        perimeter = np.hypot(np.diff(x, append=x[0]), np.diff(y, append=y[0])).sum()
        one = ShapeMask([shape], (height, width)).window((0, height), (0, width)).sum()
        assert abs(one - area) <= 0.5 * perimeter + 4, (name, one, area)


@needs_shared
def test_real_dicom_segmentation_is_a_label_equal_to_highdicom_and_the_slide_is_refused():
    import highdicom as hd

    path = shared("annotations", "dicom-seg-sm_dots_tiled_full.dcm")
    annotations = read_annotations(path)
    assert annotations.format == "DICOM Segmentation" and annotations.seg_size == (50, 50)
    assert sum(len(v) for v in annotations.segments.values()) == 50
    expected = hd.seg.segread(path).get_total_pixel_matrix(combine_segments=False).any(axis=2)
    got = _mask(path, (50, 50))
    assert np.array_equal(got, expected) and got.sum() == 200
    # a window past the edges and strided reads as the padded mask subsampled
    padded = np.zeros((70, 70), np.uint8)
    padded[7:57, 3:53] = got
    source = annotation_labels(annotations, (50, 50))
    assert np.array_equal(source.mask.window((-7, 63), (-3, 67), 3), padded[::3, ::3])
    assert np.array_equal(rle_decode(runs_to_rle(mask_runs(source.mask)), (50, 50)), got)
    # one class: the segments of that label only
    label = next(iter(annotations.segments))
    one = _mask(path, (50, 50), classes=[label])
    numbers = annotations.segments[label]
    assert np.array_equal(one, hd.seg.segread(path).get_total_pixel_matrix(segment_numbers=numbers).any(axis=2))
    with pytest.raises(AnnotationError, match="Segmentation is 50 x 50 but its slide is 60 x 50"):
        annotation_labels(annotations, (50, 60))
    with pytest.raises(AnnotationError, match="dicom-sm_image.dcm: a DICOM file but not a Segmentation"):
        read_annotations(shared("annotations", "dicom-sm_image.dcm"))


# --- hand-made files against hand-computed masks ---------------------------------------------------

def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_geojson_polygon_with_a_hole_and_bare_feature(tmp_path):
    path = _write(tmp_path / "a.geojson", {"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [_square(2, 3, 12, 13), _square(5, 6, 9, 10)]},
        "properties": {"objectType": "annotation", "classification": {"name": "Glomerulus", "color": [1, 2, 3]}}})
    expected = np.zeros((16, 16), np.uint8)
    expected[3:13, 2:12] = 1
    expected[6:10, 5:9] = 0
    annotations = read_annotations(path)
    assert annotations.class_counts() == {"Glomerulus": 1} and len(annotations.shapes[0].holes) == 1
    assert np.array_equal(_mask(path, (16, 16)), expected)


def test_multipolygon_with_sliver_rings_lines_points_and_a_detection(tmp_path):
    features = [
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [_square(1, 1, 4, 4)],
            [[[10, 10], [14, 10.0001], [10, 10.0002], [10, 10]]],  # a sliver: no pixel centre inside
            [_square(6, 1, 8, 3)]]},
         "properties": {"objectType": "detection", "classification": {"name": "Glomerulus"}}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [4, 3]}, "properties": {}},
    ]
    path = _write(tmp_path / "b.json", {"type": "FeatureCollection", "features": features})
    annotations = read_annotations(path)
    assert annotations.skipped == {"LineString": 1, "Point": 2}
    assert any("1 LineString, 2 Point" in note for note in annotations.notes)
    expected = np.zeros((16, 16), np.uint8)
    expected[1:4, 1:4] = 1
    expected[1:3, 6:8] = 1
    assert np.array_equal(_mask(path, (16, 16)), expected)


def test_imagescope_negative_roa_is_a_hole_and_mpp_is_noted(tmp_path):
    def region(vertices, negative=False, kind=0):
        points = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
        return (f'<Region Id="1" Type="{kind}" NegativeROA="{int(negative)}"><Vertices>{points}</Vertices>'
                '</Region>')
    xml = ('<?xml version="1.0"?><Annotations MicronsPerPixel="0.499000">'
           '<Annotation Id="1" Name="Glomerulus"><Regions>'
           + region([(2, 2), (14, 2), (14, 14), (2, 14)])
           + region([(5, 5), (9, 5), (9, 9), (5, 9)], negative=True)
           + region([(20, 2), (24, 6)], kind=1)  # a rectangle from two vertices
           + region([(30, 30), (31, 31)])  # 2 vertices: no area, skipped
           + '</Regions></Annotation><Annotation Id="2" Name=""><Regions>'
           + region([(2, 20), (6, 20), (6, 24), (2, 24)]) + '</Regions></Annotation></Annotations>')
    path = _write(tmp_path / "c.xml", xml)
    annotations = read_annotations(path)
    assert annotations.format == "ImageScope XML" and annotations.mpp == pytest.approx(0.499)
    assert annotations.class_counts() == {"Glomerulus": 2, "layer 2": 1}
    assert any("MicronsPerPixel 0.499" in n for n in annotations.notes)
    assert any("fewer than 3 distinct vertices" in n for n in annotations.notes)
    expected = np.zeros((32, 32), np.uint8)
    expected[2:14, 2:14] = 1
    expected[5:9, 5:9] = 0
    expected[2:6, 20:24] = 1
    assert np.array_equal(_mask(path, (32, 32), classes=["Glomerulus"]), expected)


def test_asap_spline_rectangle_dots_and_an_excluded_group(tmp_path):
    def annotation(name, kind, group, points):
        coords = "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(points))
        return f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}"><Coordinates>{coords}</Coordinates></Annotation>'
    # coordinates out of order: Order decides
    body = (annotation("a", "Spline", "glom", [(2, 2), (12, 2), (12, 12), (2, 12)])
            + annotation("b", "Rectangle", "glom", [(20, 2), (26, 2), (26, 8), (20, 8)])
            + annotation("c", "Dot", "glom", [(5, 5)])
            + annotation("d", "PointSet", "glom", [(5, 5), (6, 6)])
            + annotation("e", "Polygon", "negative", [(4, 4), (8, 4), (8, 8), (4, 8)]))
    path = _write(tmp_path / "d.xml", f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{body}</Annotations>'
                  '<AnnotationGroups/></ASAP_Annotations>')
    annotations = read_annotations(path)
    assert annotations.class_counts() == {"glom": 2, "negative": 1}
    assert annotations.skipped == {"Dot": 1, "PointSet": 1}
    assert any("1 Spline annotation(s) read through their control points" in n for n in annotations.notes)
    expected = np.zeros((16, 32), np.uint8)
    expected[2:12, 2:12] = 1
    expected[2:8, 20:26] = 1
    expected[4:8, 4:8] = 0
    assert np.array_equal(_mask(path, (16, 32), exclude=["negative"]), expected)
    # without the exclusion, "negative" is a class like any other
    assert _mask(path, (16, 32)).sum() == expected.sum() + 16


def test_labelme_rectangle_circle_and_embedded_image(tmp_path):
    image = np.full((20, 30, 3), 200, np.uint8)
    ok, png = cv2.imencode(".png", image)
    data = {"version": "5.2.1", "shapes": [
        {"label": "glom", "points": [[10, 12], [2, 3]], "shape_type": "rectangle"},
        {"label": "glom", "points": [[20.5, 10.5], [25.5, 10.5]], "shape_type": "circle"},
        {"label": "glom", "points": [[1, 1], [3, 3]], "shape_type": "line"}],
        "imagePath": None, "imageData": base64.b64encode(png.tobytes()).decode(), "imageHeight": 20, "imageWidth": 30}
    path = _write(tmp_path / "e.json", data)
    annotations = read_annotations(path)
    assert annotations.format == "labelme JSON" and annotations.skipped == {"line": 1}
    assert cv2.imdecode(np.frombuffer(annotations.image_data, np.uint8), cv2.IMREAD_COLOR).shape == (20, 30, 3)
    got = _mask(path, (20, 30))
    expected = np.zeros((20, 30), np.uint8)
    expected[3:12, 2:10] = 1
    yy, xx = np.mgrid[:20, :30]
    expected[(xx + 0.5 - 20.5) ** 2 + (yy + 0.5 - 10.5) ** 2 < 5 ** 2 - 0.5] = 1  # clear of the chords
    ring = ((xx + 0.5 - 20.5) ** 2 + (yy + 0.5 - 10.5) ** 2 - 25) ** 2 < 1.5 ** 2  # pixels near the circle
    assert np.array_equal(got[~ring], expected[~ring])
    # the circle's pixels lie between the lattice points strictly inside it (69) and those on it too (81)
    assert 72 + 69 <= int(got.sum()) <= 72 + 81


def test_self_intersecting_ring_follows_the_even_odd_rule():
    star = np.array([(50 + 40 * math.cos(math.pi / 2 + k * 4 * math.pi / 5),
                      50 - 40 * math.sin(math.pi / 2 + k * 4 * math.pi / 5)) for k in range(5)])
    got = ShapeMask([Shape("s", star)], (100, 100)).window((0, 100), (0, 100))
    assert got[50, 50] == 0 and got[20, 50] == 1  # the doubly wound core is empty, a point is filled
    assert np.array_equal(got, independent_mask([Shape("s", star)], 100, 100))  # matplotlib: even-odd too


def test_streamed_windows_equal_the_whole_mask_and_an_independent_whole_rasterisation():
    rng = np.random.default_rng(3)
    shapes = []
    for _ in range(40):
        cx, cy, r = rng.uniform(0, 2000), rng.uniform(0, 1500), rng.uniform(20, 120)
        t = np.sort(rng.uniform(0, 2 * math.pi, rng.integers(6, 30)))
        radius = r * rng.uniform(0.6, 1.0, len(t))
        shapes.append(Shape("g", np.stack((cx + radius * np.cos(t), cy + radius * np.sin(t)), 1)))
    mask = ShapeMask(shapes, (1500, 2000))
    whole = mask.window((0, 1500), (0, 2000))
    bands = np.concatenate([mask.window((y, y + 256), (0, 2000)) for y in range(0, 1500, 256)])[:1500]
    assert np.array_equal(bands, whole)
    cv_whole = np.zeros((1500, 2000), np.uint8)
    cv2.fillPoly(cv_whole, [np.round((s.exterior - 0.5) * 256).astype(np.int32) for s in shapes], 1, shift=8)
    cv_whole = np.zeros_like(cv_whole)
    for s in shapes:  # one at a time: the union (fillPoly of several rings is even-odd across them)
        one = np.zeros_like(cv_whole)
        cv2.fillPoly(one, [np.round((s.exterior - 0.5) * 256).astype(np.int32)], 1, shift=8)
        cv_whole |= one
    dice = 2 * int((whole & cv_whole).sum()) / int(whole.sum() + cv_whole.sum())
    assert dice >= 0.99, dice
    runs = mask.runs()
    assert np.array_equal(rle_decode(runs_to_rle(runs), (1500, 2000)), whole)
    assert rle_dice(runs, mask_runs(mask)) == 1.0


def test_shapes_past_the_slide_are_clipped_and_counted(tmp_path):
    path = _write(tmp_path / "f.geojson", {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(-5, -5, 4, 4)]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(30, 30, 40, 40)]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(6, 6, 8, 8)]}, "properties": {}}]})
    source = annotation_labels(read_annotations(path), (10, 10))
    assert source.outside == 2 and source.used == 3
    expected = np.zeros((10, 10), np.uint8)
    expected[:4, :4] = 1
    expected[6:8, 6:8] = 1
    assert np.array_equal(source.mask.window((0, 10), (0, 10)), expected)
    assert np.array_equal(rle_decode(runs_to_rle(source.mask.runs()), (10, 10)), expected)


def test_class_filters_and_roi(tmp_path):
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                 "properties": {"classification": {"name": name}}}
                for name, ring in (("Glomerulus", _square(2, 2, 6, 6)), ("Glomerulus", _square(10, 2, 14, 6)),
                                   ("Tubule", _square(2, 10, 6, 14)), ("ROI", _square(0, 0, 8, 16)))]
    path = _write(tmp_path / "g.geojson", {"type": "FeatureCollection", "features": features})
    annotations = read_annotations(path)
    with pytest.raises(AnnotationError, match=r"g.geojson: no shapes of the class\(es\) \['Glomeruli'\].*"
                                              r"Glomerulus 2, Tubule 1, ROI 1"):
        annotation_labels(annotations, (16, 16), classes=["Glomeruli"])
    source = annotation_labels(annotations, (16, 16), classes=["Glomerulus"], roi=["ROI"])
    assert source.used == 2 and source.roi is not None
    assert source.mask.window((0, 16), (0, 16)).sum() == 32
    runs, roi = slide_labels(path, (16, 16), classes=["Glomerulus"], roi=["ROI"])
    labels = rle_decode(runs_to_rle(runs), (16, 16))
    assert labels.sum() == 16 and labels[2:6, 2:6].all()  # inside the ROI only
    assert roi.window((0, 16), (0, 16)).sum() == 8 * 16
    # every class but the ROI's by default; an ROI-only file is an empty label, not an error
    assert annotation_labels(annotations, (16, 16), roi=["ROI"]).used == 3
    only = _write(tmp_path / "h.geojson", {"type": "FeatureCollection", "features": features[3:]})
    assert annotation_labels(read_annotations(only), (16, 16), classes=["Glomerulus"], roi=["ROI"]).used == 0


@pytest.mark.parametrize("content, needle", [
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geom', "malformed or truncated JSON"),
    ('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation', "malformed or truncated XML"),
    ('{"hello": 1}', "JSON but neither GeoJSON (QuPath) nor labelme"),
    ('<?xml version="1.0"?><svg/>', "XML but neither ASAP"),
    ("id,encoding\n", "not an annotation file"),
    ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], ["a", 1], [2, 2]]]}}',
     "coordinates must be [x, y] numbers"),
    ('{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [0, 0]}}', "unknown geometry type 'Circle'"),
])
def test_bad_files_raise_one_error_naming_the_file(tmp_path, content, needle):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(AnnotationError) as info:
        read_annotations(path)
    assert str(info.value).startswith(path) and needle in str(info.value)
