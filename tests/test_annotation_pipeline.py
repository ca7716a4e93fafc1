"""Annotations as labels through the scripts, as a user runs them: tiles_creator.py with
DATASETS.FORMAT annotations gives wsi_rle's and pairs' tiles; regions of interest; training crops
inside them; test_net scoring from annotation files (TEST.ANNOTATIONS_FOLDER, TEST.ROI); round
trips through test_net's own GeoJSON and DICOM Segmentation."""
import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from config import load_cfg
from data.annotations import read_annotations
from data.datasets import TileSet, tile_group, tile_index
from data.masks import annotation_labels, mask_runs
from data.sample import SampleSpec, draw_slide, write_pyramid
from data.sampling import RandomCropDataset, slide_canvases
from data.tiling import TileGrid
from model.prediction import predict_slides
from tests.blob_model import save_blob_checkpoint
from tests.conftest import run_script
from tests.slides import has_shared, shared
from utils.export import mask_polygons, polygons_geojson
from utils.rle import parse_rle, rle_decode, rle_dice, rle_encode

TILES = ["INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 4]


def _geojson(mask, extra=()):
    collection = polygons_geojson(mask_polygons(mask))
    collection["features"].extend(extra)
    return collection


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two generated kidney-like slides (pyramidal TIFF), their masks as an RLE CSV and as GeoJSON
    polygons traced from the same masks."""
    root = tmp_path_factory.mktemp("annotated")
    wsi, ann = root / "wsi", root / "ann"
    wsi.mkdir()
    ann.mkdir()
    rows, masks = [], {}
    for spec in (SampleSpec("s1", "x", 1100, 1300, 31), SampleSpec("s2", "x", 1000, 900, 32)):
        image, mask = draw_slide(spec)
        write_pyramid(str(wsi / f"{spec.slide_id}.tif"), image)
        rows.append(f"{spec.slide_id},{rle_encode(mask)}\n")
        (ann / f"{spec.slide_id}.geojson").write_text(json.dumps(_geojson(mask)))
        masks[spec.slide_id] = mask
    (root / "train.csv").write_text("id,encoding\n" + "".join(rows))
    return root, masks


def test_annotations_give_the_tiles_of_wsi_rle(slides, tmp_path):
    root, masks = slides
    rle = run_script("tiles_creator.py", "DATASETS.WSI_FOLDER", root / "wsi", "DATASETS.LABELS_CSV",
                     root / "train.csv", "DATASETS.TRAIN_FOLDER", tmp_path / "rle", *TILES)
    ann = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", root / "wsi",
                     "DATASETS.ANNOTATIONS_FOLDER", root / "ann", "DATASETS.TRAIN_FOLDER", tmp_path / "ann", *TILES)
    assert rle.returncode == 0 and ann.returncode == 0, ann.stderr[-2000:]
    images_rle, images_ann = _files(tmp_path / "rle" / "images_64_red4"), _files(tmp_path / "ann" / "images_64_red4")
    assert images_ann == images_rle and len(images_ann) > 20  # the same names, the same bytes
    masks_rle, masks_ann = _files(tmp_path / "rle" / "masks_64_red4"), _files(tmp_path / "ann" / "masks_64_red4")
    assert masks_ann.keys() == masks_rle.keys()
    same = sum(np.array_equal(cv2.imdecode(np.frombuffer(masks_ann[n], np.uint8), 0),
                              cv2.imdecode(np.frombuffer(masks_rle[n], np.uint8), 0)) for n in masks_ann)
    assert same == len(masks_ann)  # polygons traced on pixel edges rasterise back to the very mask
    stats = json.load(open(tmp_path / "ann" / "stats_64_red4.json"))
    assert stats["slides"]["s1"]["foreground_px"] == int(masks["s1"].sum())
    assert stats["slides"]["s1"]["labels"].startswith("Glomerulus ")
    assert "labels s1.geojson: Glomerulus" in ann.stderr and "foreground " in ann.stderr


def test_annotations_give_the_tiles_of_pairs_for_plain_images(tmp_path):
    image, mask = draw_slide(SampleSpec("p", "x", 700, 600, 41))
    pairs = tmp_path / "pairs"
    (pairs / "images").mkdir(parents=True)
    (pairs / "masks").mkdir()
    cv2.imwrite(str(pairs / "images" / "p.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(pairs / "masks" / "p.png"), mask * 255)
    labelme = tmp_path / "labelme"
    labelme.mkdir()
    shutil.copy(pairs / "images" / "p.png", labelme / "p.png")
    shapes = [{"label": "glom", "points": rings[0][:-1], "shape_type": "polygon"} for rings in mask_polygons(mask)]
    (labelme / "p.json").write_text(json.dumps({"version": "5.0.1", "shapes": shapes, "imagePath": "p.png",
                                                "imageData": None, "imageHeight": 700, "imageWidth": 600}))
    a = run_script("tiles_creator.py", "DATASETS.FORMAT", "pairs", "DATASETS.PAIRS_FOLDER", pairs,
                   "DATASETS.LABELS_CSV", "", "DATASETS.MASK_THRESHOLD", 127, "DATASETS.TRAIN_FOLDER", tmp_path / "a",
                   *TILES)
    b = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", labelme,
                   "DATASETS.TRAIN_FOLDER", tmp_path / "b", *TILES)
    assert a.returncode == 0 and b.returncode == 0, b.stderr[-2000:]
    assert _files(tmp_path / "a" / "images_64_red4") == _files(tmp_path / "b" / "images_64_red4")
    if not any(len(rings) > 1 for rings in mask_polygons(mask)):  # no holes: labelme's polygons are the mask
        assert _files(tmp_path / "a" / "masks_64_red4") == _files(tmp_path / "b" / "masks_64_red4")


@pytest.mark.slow
def test_labelme_images_found_through_image_path_and_image_data(tmp_path):
    if not has_shared():
        pytest.skip("needs ../shared/data/hubmap_ftu")
    ann = tmp_path / "ann"
    ann.mkdir()
    for name in ("16.json", "17.json", "107.json"):
        data = json.load(open(shared("hubmap_ftu", name)))
        if name == "107.json":  # the image elsewhere, named by imagePath
            data["imagePath"] = os.path.relpath(shared("hubmap_ftu", "107.jpg"), ann)
        (ann / name).write_text(json.dumps(data))
    empty = tmp_path / "wsi"
    empty.mkdir()
    result = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", empty,
                        "DATASETS.ANNOTATIONS_FOLDER", ann, "DATASETS.TRAIN_FOLDER", tmp_path / "t",
                        "INPUT.SIZE_TRAIN", 128, "INPUT.SIZE_REDUCTION_TRAIN", 8)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.load(open(tmp_path / "t" / "stats_128_red8.json"))
    assert sorted(stats["slides"]) == ["107", "16", "17"]
    reference = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER",
                           shared("hubmap_ftu"), "DATASETS.TRAIN_FOLDER", tmp_path / "r",
                           "INPUT.SIZE_TRAIN", 128, "INPUT.SIZE_REDUCTION_TRAIN", 8)
    assert reference.returncode == 0, reference.stderr[-2000:]
    got, expected = _files(tmp_path / "t" / "images_128_red8"), _files(tmp_path / "r" / "images_128_red8")
    assert got.keys() <= expected.keys() and any(n.startswith("16_") for n in got)
    for name in got:
        a, b = (cv2.imdecode(np.frombuffer(x[name], np.uint8), 1).astype(int) for x in (got, expected))
        if name.startswith("107_"):  # read from the file imagePath names: the folder's very image
            assert np.array_equal(a, b)
        else:  # labelme embeds a re-encoded JPEG of the image (2-3 grey levels apart on average)
            assert np.abs(a - b).mean() < 4, name


def _roi_geojson(mask, roi):
    x0, y0, x1, y1 = roi
    box = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                                                              [x0, y0]]]},
           "properties": {"classification": {"name": "ROI"}}}
    return _geojson(mask, [box])


def test_roi_tiles_outside_are_not_written_and_crops_stay_inside(slides, tmp_path):
    root, masks = slides
    ann = tmp_path / "ann"
    ann.mkdir()
    roi = (100, 150, 700, 800)  # x0, y0, x1, y1 of s1's region of interest
    (ann / "s1.geojson").write_text(json.dumps(_roi_geojson(masks["s1"], roi)))
    shutil.copy(root / "ann" / "s2.geojson", ann / "s2.geojson")  # s2 has no ROI: tiled whole
    out = tmp_path / "tiles"
    result = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", root / "wsi",
                        "DATASETS.ANNOTATIONS_FOLDER", ann, "DATASETS.ANNOTATION_ROI", "[ROI]",
                        "DATASETS.TRAIN_FOLDER", out, *TILES)
    assert result.returncode == 0, result.stderr[-2000:]
    reference = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", root / "wsi",
                           "DATASETS.ANNOTATIONS_FOLDER", root / "ann", "DATASETS.TRAIN_FOLDER", tmp_path / "all",
                           *TILES)
    assert reference.returncode == 0
    grid = TileGrid(1100, 1300, 64, 4)
    every = {n for n in os.listdir(tmp_path / "all" / "images_64_red4")}
    names = set(os.listdir(out / "images_64_red4"))
    expected = set()
    for name in every:
        if not name.startswith("s1_"):
            expected.add(name)
            continue
        y, x = grid.tile_origin(tile_index(name))  # the share of the tile's sampled pixels in the ROI
        ys, xs = np.arange(y, y + grid.span, 4), np.arange(x, x + grid.span, 4)
        inside = ((xs[None] + 0.5 > roi[0]) & (xs[None] + 0.5 < roi[2]) & (ys[:, None] + 0.5 > roi[1])
                  & (ys[:, None] + 0.5 < roi[3]))
        if inside.mean() >= 0.5:
            expected.add(name)
    assert names == expected
    assert len([n for n in every if n.startswith("s1_")]) > len([n for n in names if n.startswith("s1_")]) > 0
    stats = json.load(open(out / "stats_64_red4.json"))
    assert stats["slides"]["s1"]["roi_dropped"] > 0 and "roi" not in stats["slides"]["s2"]
    assert "ROI of 1 shape(s)" in result.stderr
    # training crops on s1 lie wholly inside its ROI (in grid px: the padded slide / 4)
    tiles = TileSet(str(out), 64, 4)
    s1 = [n for n in tiles.names if n.startswith("s1_")]
    grids = {"s1": grid}
    canvases = slide_canvases(tiles.images, tiles.masks, s1, grids, tile_group, tile_index,
                              {"s1": stats["slides"]["s1"]["roi"]})
    dataset = RandomCropDataset(canvases, 48, 100, 0.5, [0.5] * 3, [0.2] * 3)
    box = [(roi[0] + grid.pad_left) / 4, (roi[1] + grid.pad_top) / 4, (roi[2] + grid.pad_left) / 4,
           (roi[3] + grid.pad_top) / 4]
    for _ in range(100):
        _, y, x = dataset.draw()
        # every pixel centre of the crop inside the box (the rule that decides what is inside)
        assert box[0] <= x + 0.5 and x + 47.5 < box[2] and box[1] <= y + 0.5 and y + 47.5 < box[3], (x, y, box)


def _predict(root, out, *extra):
    return predict_slides(load_cfg(None, ["TEST.WSI_FOLDER", str(root / "wsi"), "TEST.MODEL_WEIGHTS_FOLDER",
                                          str(root / "model.pth"), "TEST.SIZE", "64", "MODEL.DEVICE", "cpu",
                                          "OUTPUT_DIR", str(out), *map(str, extra)]))


@pytest.mark.slow
def test_test_net_scores_from_annotations_as_from_the_csv_and_round_trips_its_geojson(slides, tmp_path):
    root, masks = slides
    save_blob_checkpoint(root / "model.pth", size=64, reduce=4, mpp=4.0)
    # objects of glomerulus size (specks of ~100 px lose ~2 % to the GeoJSON's simplification by 2 px)
    by_csv = _predict(root, tmp_path / "csv", "TEST.LABELS_CSV", root / "train.csv", "TEST.MIN_AREA", 1000)
    by_ann = _predict(root, tmp_path / "ann", "TEST.ANNOTATIONS_FOLDER", root / "ann", "TEST.MIN_AREA", 1000)
    assert by_ann["overall_dice"] == by_csv["overall_dice"] and by_ann["object_f1"] == by_csv["object_f1"]
    assert by_ann["true_objects"] == by_csv["true_objects"] > 0
    # the GeoJSON test_net wrote, read back as labels, is its prediction (Dice >= 0.99)
    with open(tmp_path / "ann" / "submission.csv", newline="") as fh:
        predicted = {row["id"]: row["predicted"] for row in csv.DictReader(fh)}
    for slide_id, shape in (("s1", (1100, 1300)), ("s2", (1000, 900))):
        labels = annotation_labels(read_annotations(str(tmp_path / "ann" / "predictions" / f"{slide_id}.geojson")),
                                   shape)
        assert rle_dice(mask_runs(labels.mask), parse_rle(predicted[slide_id], shape)) >= 0.99
    again = _predict(root, tmp_path / "again", "TEST.ANNOTATIONS_FOLDER", tmp_path / "ann" / "predictions",
                     "TEST.MIN_AREA", 1000)
    assert again["overall_dice"] >= 0.99 and again["scored"] == 2


def test_test_net_roi_predicts_and_scores_inside_it_only(slides, tmp_path):
    root, masks = slides
    save_blob_checkpoint(root / "model.pth", size=64, reduce=4, mpp=4.0)
    ann = tmp_path / "ann"
    ann.mkdir()
    roi = (200, 100, 900, 700)
    (ann / "s1.geojson").write_text(json.dumps(_roi_geojson(masks["s1"], roi)))
    summary = _predict(root, tmp_path / "roi", "TEST.ANNOTATIONS_FOLDER", ann, "TEST.ROI", "[ROI]")
    whole = _predict(root, tmp_path / "whole")
    with open(tmp_path / "roi" / "submission.csv", newline="") as fh:
        predicted = {row["id"]: row["predicted"] for row in csv.DictReader(fh)}
    with open(tmp_path / "whole" / "submission.csv", newline="") as fh:
        everywhere = {row["id"]: row["predicted"] for row in csv.DictReader(fh)}
    mask = rle_decode(predicted["s1"], (1100, 1300))
    inside = np.zeros_like(mask)
    inside[roi[1]:roi[3], roi[0]:roi[2]] = 1
    assert mask.sum() > 0 and not (mask & ~inside.astype(bool)).any()
    full = rle_decode(everywhere["s1"], (1100, 1300))
    assert (full & ~inside.astype(bool)).any()  # the whole-slide prediction reaches outside
    assert predicted["s2"] == everywhere["s2"]  # s2 (no annotation file): predicted whole, not scored
    assert summary["scored"] == 1
    truth = masks["s1"] & inside
    expected = 2 * int((mask & truth).sum()) / int(mask.sum() + truth.sum())
    assert summary["overall_dice"] == pytest.approx(expected)
    assert summary["per_slide"]["s1"]["tissue_mm2"] < whole["per_slide"]["s1"]["tissue_mm2"]


@pytest.mark.slow
def test_round_trip_through_test_nets_dicom_segmentation(tmp_path):
    """A DICOM slide (a generated slide converted with wsidicomizer: no ../shared needed) predicted
    with TEST.DICOM_SEG; its Segmentation read back as labels by test_net and the tiler equals the
    prediction exactly."""
    from tests.dicom_slides import dicomize

    image, _ = draw_slide(SampleSpec("d", "x", 900, 1000, 51))
    write_pyramid(str(tmp_path / "d.tif"), image, downsamples=(), mpp=1.0)
    wsi = tmp_path / "wsi"
    dicomize(str(tmp_path / "d.tif"), str(wsi / "d"), lossless=True)
    save_blob_checkpoint(tmp_path / "model.pth", size=64, reduce=4, mpp=4.0)
    root = tmp_path
    _predict(root, tmp_path / "p", "TEST.DICOM_SEG", "True")
    with open(tmp_path / "p" / "submission.csv", newline="") as fh:
        predicted = next(csv.DictReader(fh))["predicted"]
    seg_folder = tmp_path / "seg"
    seg_folder.mkdir()
    shutil.copy(tmp_path / "p" / "predictions" / "d.seg.dcm", seg_folder / "d.seg.dcm")
    again = _predict(root, tmp_path / "again", "TEST.ANNOTATIONS_FOLDER", seg_folder)
    assert again["overall_dice"] == 1.0 and again["scored"] == 1
    tiles = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", wsi,
                       "DATASETS.ANNOTATIONS_FOLDER", seg_folder, "DATASETS.TRAIN_FOLDER", tmp_path / "t", *TILES)
    assert tiles.returncode == 0, tiles.stderr[-2000:]
    stats = json.load(open(tmp_path / "t" / "stats_64_red4.json"))
    runs = parse_rle(predicted, (900, 1000))
    assert stats["slides"]["d"]["foreground_px"] == int((runs[:, 1] - runs[:, 0]).sum()) > 0


def test_unpaired_slides_and_files_are_listed_in_one_error(tmp_path):
    from data.sources import annotation_jobs

    for name in ("a.png", "b.png", "c.svs"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (tmp_path / "z.xml").write_text('<?xml version="1.0"?><ASAP_Annotations/>')
    with pytest.raises(FileNotFoundError) as info:
        annotation_jobs(str(tmp_path))
    message = str(info.value)
    assert "2 slide(s) without an annotation file" in message and "['b', 'c']" in message
    assert "1 annotation file(s) without a slide" in message and "['z.xml']" in message
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(ValueError, match="two annotation files for id 'a': a.geojson and a.json"):
        annotation_jobs(str(tmp_path))


def test_shapes_past_the_slide_and_empty_files_warn_and_tile(slides, tmp_path):
    root, masks = slides
    ann = tmp_path / "ann"
    ann.mkdir()
    past = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[-50, -50], [200, -50], [200, 200],
                                                                               [-50, 200], [-50, -50]]]},
            "properties": {"classification": {"name": "Glomerulus"}}}
    (ann / "s1.geojson").write_text(json.dumps(_geojson(masks["s1"], [past])))
    (ann / "s2.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    result = run_script("tiles_creator.py", "DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", root / "wsi",
                        "DATASETS.ANNOTATIONS_FOLDER", ann, "DATASETS.TRAIN_FOLDER", tmp_path / "t", *TILES)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "s1.geojson: 1 shape(s) reach past the 1300 x 1100 slide: clipped to it" in result.stderr
    assert "s2.geojson: no shapes: a slide without foreground (an empty mask)" in result.stderr
    stats = json.load(open(tmp_path / "t" / "stats_64_red4.json"))["slides"]
    assert stats["s2"]["foreground_px"] == 0 and stats["s2"]["kept"] > 0
    expected = masks["s1"].copy()
    expected[:200, :200] = 1
    assert stats["s1"]["foreground_px"] == int(expected.sum())
