"""Counting and measuring: pixel sizes from slide metadata, objects of an RLE mask (against
OpenCV's connected components), object-level matching, physical-scale reading by test_net (real
tissue written at two resolutions), objects.csv / GeoJSON / metrics.json, and CSVs with awkward ids."""
import csv
import json
import math
import os

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from config import load_cfg
from data.readers import SlideError, image_pixel_size, open_slide, resolve_mpp
from model.checkpoint import save_checkpoint
from model.prediction import integer_reduction, predict_slides, slide_summary
from tests.blob_model import save_blob_checkpoint
from tests.conftest import requires_shared, run_script
from tests.slides import shared
from utils.objects import OBJECT_COLUMNS, contour_perimeter, find_objects, match_objects, object_rows, object_scores
from utils.rle import parse_rle, rle_encode


# --- pixel sizes ---------------------------------------------------------------------------------
def _tiff(path, mpp=None, unit="CENTIMETER", **kwargs):
    image = np.full((64, 96, 3), 200, np.uint8)
    if mpp is not None:
        per_unit = (1e4 if unit == "CENTIMETER" else 25400.0) / mpp
        kwargs.update(resolution=(per_unit, per_unit), resolutionunit=unit)
    tifffile.imwrite(str(path), image, photometric="rgb", **kwargs)
    return str(path)


@requires_shared
def test_pixel_size_of_a_real_svs():
    with open_slide(shared("wsi", "CMU-1-Small-Region.svs")) as slide:
        assert slide.pixel_size.mpp == pytest.approx(0.499) and "SVS MPP" in slide.pixel_size.source
    with open_slide(shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")) as slide:  # an SVS without MPP
        assert slide.pixel_size is None and resolve_mpp(slide, 0.0, "TEST.MPP") is None
        assert resolve_mpp(slide, 0.25, "TEST.MPP").mpp == 0.25  # the key supplies it


def test_pixel_size_from_tiff_ome_and_image_headers(tmp_path):
    with open_slide(_tiff(tmp_path / "cm.tif", 0.2265)) as slide:
        assert slide.pixel_size.mpp == pytest.approx(0.2265, rel=1e-6) and "cm" in slide.pixel_size.source
    with open_slide(_tiff(tmp_path / "inch.tif", 0.5, unit="INCH")) as slide:
        assert slide.pixel_size.mpp == pytest.approx(0.5, rel=1e-6)
    with open_slide(_tiff(tmp_path / "dpi.tif", 25400 / 72, unit="INCH")) as slide:  # 72 dpi: not a microscope
        assert slide.pixel_size is None and "display resolution" in slide.mpp_note
    with open_slide(_tiff(tmp_path / "none.tif")) as slide:
        assert slide.pixel_size is None
    ome = tmp_path / "x.ome.tif"
    tifffile.imwrite(str(ome), np.full((64, 96, 3), 200, np.uint8), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 460.0, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 460.0, "PhysicalSizeYUnit": "nm"})
    with open_slide(str(ome)) as slide:
        assert slide.pixel_size.mpp == pytest.approx(0.46) and "OME" in slide.pixel_size.source
    png = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, dpi=(50800, 50800))  # 0.5 um/px in pHYs
    assert image_pixel_size(str(png))[0].mpp == pytest.approx(0.5, rel=1e-3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "q.png")
    assert image_pixel_size(str(tmp_path / "q.png"))[0] is None


def test_pixel_size_of_a_philips_tiff(tmp_path):
    """Philips TIFF: DICOM_PIXEL_SPACING (mm, row then column) in the XML ImageDescription."""
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
           '<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">'
           '&quot;0.000227273&quot; &quot;0.000227273&quot;</Attribute></DataObject>')
    path = tmp_path / "philips.tif"
    tifffile.imwrite(str(path), np.full((64, 96, 3), 200, np.uint8), photometric="rgb",
                     description=xml.replace("&quot;", '"'))
    with open_slide(str(path)) as slide:
        assert slide.pixel_size.mpp == pytest.approx(0.227273, rel=1e-5) and "Philips" in slide.pixel_size.source


def test_impossible_pixel_sizes_name_their_source(tmp_path):
    svs = tmp_path / "bad.svs"
    tifffile.imwrite(str(svs), np.full((64, 96, 3), 200, np.uint8), photometric="rgb",
                     description="Aperio Image Library v11.2.1 \n96x64 |AppMag = 20|MPP = 0")
    with open_slide(str(svs)) as slide:
        assert slide.pixel_size.mpp == 0.0
        with pytest.raises(SlideError, match=r"bad.svs \(SVS MPP in ImageDescription; set TEST.MPP to override\): "
                                             r"pixel size 0 um/px is impossible"):
            resolve_mpp(slide, 0.0, "TEST.MPP")
        assert resolve_mpp(slide, 0.5, "TEST.MPP").source == "TEST.MPP"


# --- objects of an RLE ---------------------------------------------------------------------------
def _random_mask(rng, h, w, smooth):
    noise = rng.random((h, w)).astype(np.float32)
    if smooth:
        noise = cv2.GaussianBlur(noise, (0, 0), smooth)
        return (noise > np.quantile(noise, 0.7)).astype(np.uint8)
    return (noise > 0.6).astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_objects_are_the_connected_components_of_the_rle(seed):
    """Objects found from the runs = OpenCV's 8-connected components of the decoded mask: the
    same count, areas and centroids; areas sum to the RLE's area; boxes are the components'."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 120, 2))
    mask = _random_mask(rng, h, w, smooth=seed % 3)
    runs = parse_rle(rle_encode(mask), (h, w))
    found = find_objects(runs, (h, w))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    assert len(found) == n - 1
    assert int(found.area.sum()) == int(mask.sum())
    expected = sorted((int(a), round(cx + 0.5, 6), round(cy + 0.5, 6), int(x), int(y), int(x + ww), int(y + hh))
                      for (x, y, ww, hh, a), (cx, cy) in zip(stats[1:], centroids[1:]))
    got = sorted((int(a), round(cx, 6), round(cy, 6), *(int(v) for v in box))
                 for a, cx, cy, box in zip(found.area, found.cx, found.cy, found.bbox))
    assert got == expected


def test_objects_of_a_large_mask_from_runs_alone():
    """A 12k x 10k mask: the objects of its runs are found without decoding it (the reference
    labels a decoded copy): what find_objects allocates is a small share of the mask's bytes.
    (Its speed on a 31k slide is measured by tests/bench/bench_scale.py.)"""
    import tracemalloc

    rng = np.random.default_rng(1)
    h, w = 12000, 10000
    mask = np.zeros((h, w), np.uint8)
    for _ in range(60):
        cv2.circle(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(40, 300)), 1, -1)
    runs = parse_rle(rle_encode(mask), (h, w))
    tracemalloc.start()
    found = find_objects(runs, (h, w))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    assert len(found) == n - 1 and sorted(found.area.astype(int)) == sorted(stats[1:, 4])
    assert peak < mask.nbytes / 10, peak  # a decoded mask alone would be 120 MB


@pytest.mark.parametrize("radius", [8, 30, 150])
def test_perimeter_and_circularity_of_digital_discs(radius):
    yy, xx = np.mgrid[: 2 * radius + 8, : 2 * radius + 8]
    disc = (((yy - radius - 4 + 0.5) ** 2 + (xx - radius - 4 + 0.5) ** 2) <= radius**2).astype(np.uint8)
    perimeter = contour_perimeter(disc)
    assert perimeter == pytest.approx(2 * math.pi * radius, rel=0.03)
    assert 4 * math.pi * disc.sum() / perimeter**2 == pytest.approx(1.0, abs=0.06)
    square = np.zeros((60, 60), np.uint8)
    square[10:50, 10:50] = 1
    assert contour_perimeter(square) == pytest.approx(160, rel=0.03)  # straight edges: no 4/pi excess


def test_object_rows_units_and_empty_um_columns():
    mask = np.zeros((50, 40), np.uint8)
    mask[10:20, 5:15] = 1
    objects = find_objects(parse_rle(rle_encode(mask), mask.shape), mask.shape, prob=np.full((50, 40), 0.8))
    row = object_rows("a", objects, 0.5)[0]
    assert list(row) == OBJECT_COLUMNS
    assert (row["area_px"], row["area_um2"], row["x"], row["y"], row["x_um"]) == (100, 25.0, 10.0, 15.0, 5.0)
    assert row["bbox"] == "5 10 15 20" and row["mean_prob"] == 0.8
    assert row["diameter_um"] == pytest.approx(2 * math.sqrt(100 / math.pi) * 0.5, abs=0.01)
    bare = object_rows("a", objects, None)[0]
    assert all(bare[k] == "" for k in ("x_um", "y_um", "area_um2", "diameter_um", "perimeter_um"))
    summary = slide_summary(1, objects.area, 4000, 0.5)
    assert summary["tissue_mm2"] == pytest.approx(4000 * 0.25 / 1e6) and summary["median_area_um2"] == 25.0
    assert summary["objects_per_mm2"] == pytest.approx(1 / (4000 * 0.25 / 1e6), rel=1e-3)


def _brute_force_matches(pred, true, iou=0.5):
    n_p, lp = cv2.connectedComponents(pred, connectivity=8)
    n_t, lt = cv2.connectedComponents(true, connectivity=8)
    matched = 0
    for t in range(1, n_t):
        for p in range(1, n_p):
            inter = ((lt == t) & (lp == p)).sum()
            union = ((lt == t) | (lp == p)).sum()
            if inter / union >= iou:
                matched += 1
                break
    return n_p - 1, n_t - 1, matched


@pytest.mark.parametrize("seed", range(8))
def test_object_matching_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    h, w = 90, 70
    true = np.zeros((h, w), np.uint8)
    pred = np.zeros((h, w), np.uint8)
    for _ in range(6):
        y, x, r = int(rng.integers(5, h - 5)), int(rng.integers(5, w - 5)), int(rng.integers(2, 9))
        cv2.circle(true, (x, y), r, 1, -1)
        cv2.circle(pred, (x + int(rng.integers(-4, 5)), y + int(rng.integers(-4, 5))), r + int(rng.integers(-2, 3)), 1, -1)
    counts = match_objects(parse_rle(rle_encode(pred), (h, w)), parse_rle(rle_encode(true), (h, w)), h)
    assert (counts["predicted"], counts["true"], counts["matched"]) == _brute_force_matches(pred, true)


def test_object_scores_pool_counts():
    scores = object_scores([{"predicted": 4, "true": 5, "matched": 3}, {"predicted": 1, "true": 0, "matched": 0}])
    assert scores == pytest.approx({"object_precision": 3 / 5, "object_recall": 3 / 5, "object_f1": 6 / 10})
    assert object_scores([{"predicted": 0, "true": 0, "matched": 0}])["object_f1"] == 1.0


def test_integer_reduction():
    assert integer_reduction(4.0) == 4 and integer_reduction(8.0004) == 8
    assert integer_reduction(6.667) == 6 and integer_reduction(0.6) == 1


# --- test_net at the checkpoints' physical scale ------------------------------------------------
def _blob_checkpoint(path, mpp):
    save_blob_checkpoint(path, size=64, reduce=4, mpp=mpp)


def _predict_objects(folder, model, out, *opts):
    cfg = load_cfg(None, ["TEST.WSI_FOLDER", str(folder), "TEST.MODEL_WEIGHTS_FOLDER", str(model), "TEST.SIZE", "64",
                          "OUTPUT_DIR", str(out), "TEST.TH", "0.5", "MODEL.DEVICE", "cpu", *opts])
    summary = predict_slides(cfg)
    rows = list(csv.DictReader(open(os.path.join(out, "objects.csv"), newline="")))
    return summary, rows


@requires_shared
def test_same_tissue_at_two_resolutions_gives_the_same_objects(tmp_path):
    """Real PAS tissue written at 0.5 and at 0.25 um/px (and at 0.3: a real factor, 6.67) and
    predicted by one model trained at 2 um/px: the objects (>= 100 um2) agree within 5 % in
    count and area. The control (a checkpoint without a pixel size: read at its reduction) does not."""
    image = cv2.cvtColor(cv2.imread(shared("aidpath", "images", "10003.png")), cv2.COLOR_BGR2RGB)
    folders = {}
    for mpp in (0.5, 0.25, 0.3):
        side = round(1024 * 0.5 / mpp)
        pixels = image if side == 1024 else cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
        folders[mpp] = tmp_path / f"wsi_{mpp}"
        folders[mpp].mkdir()
        tifffile.imwrite(str(folders[mpp] / "biopsy.tif"), pixels, photometric="rgb", tile=(256, 256),
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    _blob_checkpoint(tmp_path / "model.pth", 2.0)
    results = {}
    for mpp, folder in folders.items():
        summary, rows = _predict_objects(folder, tmp_path / "model.pth", tmp_path / f"out_{mpp}")
        assert summary["per_slide"]["biopsy"]["factor"] == pytest.approx(2.0 / mpp, rel=1e-4)
        areas = [float(r["area_um2"]) for r in rows if float(r["area_um2"]) >= 100]
        results[mpp] = (len(areas), sum(areas), summary["per_slide"]["biopsy"]["tissue_mm2"])
    count, area, tissue = results[0.5]
    assert count >= 5
    for mpp in (0.25, 0.3):
        assert abs(results[mpp][0] - count) <= 0.05 * count, results
        assert results[mpp][1] == pytest.approx(area, rel=0.05), results
        assert results[mpp][2] == pytest.approx(tissue, rel=0.05), results
    # TEST.MIN_AREA_UM2 drops the same physical specks at both resolutions
    kept = {}
    for mpp in (0.5, 0.25):
        _, rows = _predict_objects(folders[mpp], tmp_path / "model.pth", tmp_path / f"min_{mpp}", "TEST.MIN_AREA_UM2",
                                   "100")
        kept[mpp] = [float(r["area_um2"]) for r in rows]
    assert abs(len(kept[0.25]) - len(kept[0.5])) <= 0.05 * len(kept[0.5]) and min(kept[0.5] + kept[0.25]) > 50
    assert sum(kept[0.25]) == pytest.approx(sum(kept[0.5]), rel=0.05)
    # control: without the checkpoint's pixel size the 0.25 um/px slide is read at reduction 4,
    # i.e. at twice the model's resolution, and the objects change
    _blob_checkpoint(tmp_path / "old.pth", None)
    _, rows = _predict_objects(folders[0.25], tmp_path / "old.pth", tmp_path / "out_old")
    areas = [float(r["area_um2"]) for r in rows if float(r["area_um2"]) >= 100]
    assert abs(len(areas) - count) > 0.2 * count or abs(sum(areas) - area) > 0.2 * area


@pytest.mark.slow
@requires_shared
def test_bad_and_missing_pixel_sizes_through_test_net(tmp_path):
    """No pixel size and no key: a warning and the reduction fallback. An impossible pixel size
    (metadata or key): one error line naming the slide or the key, exit 1, nothing written."""
    _blob_checkpoint(tmp_path / "model.pth", 2.0)
    plain = tmp_path / "plain"
    plain.mkdir()
    os.symlink(shared("wsi", "kidney-48-5.tif"), plain / "kidney.tif")  # no pixel size
    from model.build import build_model  # test_net runs in a fresh process: a real architecture

    spec = {"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}
    save_checkpoint(str(tmp_path / "unet.pth"), build_model(spec), {
        "model": spec, "input": {"size": 64, "reduce": 4, "mean": [0.8] * 3, "std": [0.2] * 3, "mpp": 2.0},
        "threshold": 0.5, "fold": 0, "metrics": {}})
    common = ["TEST.MODEL_WEIGHTS_FOLDER", tmp_path / "unet.pth", "TEST.SIZE", 64, "TEST.TH", 0.5]
    ok = run_script("test_net.py", "TEST.WSI_FOLDER", plain, "OUTPUT_DIR", tmp_path / "out", *common)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "kidney.tif: pixel size unknown" in ok.stderr and "read at the checkpoints' reduction 4" in ok.stderr
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["per_slide"]["kidney"]["tissue_mm2"] is None and metrics["per_slide"]["kidney"]["factor"] == 4
    bad = tmp_path / "bad"
    bad.mkdir()
    tifffile.imwrite(str(bad / "s.svs"), np.full((300, 400, 3), 180, np.uint8), photometric="rgb",
                     description="Aperio Image Library v11.2.1 \n400x300 |AppMag = 20|MPP = 500")
    for opts, needle in (([], "s.svs (SVS MPP in ImageDescription; set TEST.MPP to override): pixel size 500 um/px "
                              "is impossible"),
                         (["TEST.MPP", -1], "command line: TEST.MPP must be 0 (from the metadata) or a pixel size")):
        out = tmp_path / f"out_bad{len(opts)}"
        result = run_script("test_net.py", "TEST.WSI_FOLDER", bad, "OUTPUT_DIR", out, *common, *opts)
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert result.returncode != 0 and len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
        written = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert set(written) <= {"log.txt"}, written
    fixed = run_script("test_net.py", "TEST.WSI_FOLDER", bad, "OUTPUT_DIR", tmp_path / "out_fixed", *common,
                       "TEST.MPP", 0.5)
    assert fixed.returncode == 0 and "0.5 um/px (TEST.MPP)" in fixed.stderr


# --- every CSV through the csv module -----------------------------------------------------------
@requires_shared
def test_awkward_ids_round_trip_through_every_csv(tmp_path):
    """Ids with a comma, quotes and spaces survive submission.csv, objects.csv and dice.csv."""
    ids = ['a,b', 'say "hi"', "plain"]
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    image = cv2.cvtColor(cv2.imread(shared("aidpath", "images", "10003.png")), cv2.COLOR_BGR2RGB)
    truth = (cv2.imread(shared("aidpath", "masks", "10003.png"))[..., 2] > 127).astype(np.uint8)
    for slide_id in ids:
        tifffile.imwrite(str(wsi / f"{slide_id}.tif"), image, photometric="rgb", tile=(256, 256),
                         resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "encoding"])
        writer.writerows([i, rle_encode(truth)] for i in ids)
    _blob_checkpoint(tmp_path / "model.pth", 2.0)
    summary, rows = _predict_objects(wsi, tmp_path / "model.pth", tmp_path / "out", "TEST.LABELS_CSV", str(labels))
    submission = list(csv.DictReader(open(tmp_path / "out" / "submission.csv", newline="")))
    assert sorted(r["id"] for r in submission) == sorted(ids)
    assert {r["id"] for r in rows} == set(ids) and all(len(r) == len(OBJECT_COLUMNS) for r in rows)
    dice = list(csv.DictReader(open(tmp_path / "out" / "dice.csv", newline="")))
    assert sorted(r["id"] for r in dice) == sorted(ids)
    # object-level scores: the same image three times, the same scores; pooled = per item
    assert len({(r["object_f1"], r["true_objects"], r["predicted_objects"]) for r in dice}) == 1
    assert summary["object_f1"] == pytest.approx(float(dice[0]["object_f1"]), abs=1e-4)
    n_true = max(0, cv2.connectedComponents(truth, connectivity=8)[0] - 1)
    assert int(dice[0]["true_objects"]) == n_true
    assert int(dice[0]["count_error"]) == int(dice[0]["predicted_objects"]) - n_true
    per = summary["per_slide"]["a,b"]
    assert per["objects"] == sum(1 for r in rows if r["id"] == "a,b") and per["true_objects"] == n_true
    for slide_id in ids:  # areas in px sum to the RLE's area, per slide
        area = sum(int(r["area_px"]) for r in rows if r["id"] == slide_id)
        rle = next(r["predicted"] for r in submission if r["id"] == slide_id)
        assert area == int(parse_rle(rle, image.shape[:2]).dot([-1, 1]).sum())


# --- tiles at one physical scale ------------------------------------------------------------------
@requires_shared
def test_tiler_brings_two_scanners_to_one_physical_scale(tmp_path):
    """The same real tissue scanned at 0.5 and at 0.25 um/px, tiled with INPUT.MPP_TRAIN 2.0: the
    tiles are the same within JPEG-free resampling noise, the masks within a pixel, and the
    stats record 2.0 um/px for the checkpoints. Without MPP_TRAIN the scales differ and no
    pixel size is recorded; a slide without one is refused before anything is written."""
    from data.tiler import create_tiles

    image = cv2.cvtColor(cv2.imread(shared("aidpath", "images", "10025.png")), cv2.COLOR_BGR2RGB)
    truth = (cv2.imread(shared("aidpath", "masks", "10025.png"))[..., 2] > 127).astype(np.uint8)
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    rows = []
    for slide_id, mpp in (("fine", 0.25), ("coarse", 0.5)):
        side = round(1024 * 0.5 / mpp)
        pixels = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC) if side != 1024 else image
        mask = cv2.resize(truth, (side, side), interpolation=cv2.INTER_NEAREST) if side != 1024 else truth
        tifffile.imwrite(str(wsi / f"{slide_id}.tif"), pixels, photometric="rgb", tile=(256, 256),
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        rows.append([slide_id, rle_encode(mask)])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "encoding"], *rows])
    common = ["DATASETS.WSI_FOLDER", str(wsi), "DATASETS.LABELS_CSV", str(labels), "INPUT.SIZE_TRAIN", "64",
              "INPUT.SIZE_REDUCTION_TRAIN", "4", "INPUT.PIXEL_THRESHOLD", "-1"]
    stats = create_tiles(load_cfg(None, common + ["DATASETS.TRAIN_FOLDER", str(tmp_path / "one"),
                                                  "INPUT.MPP_TRAIN", "2.0"]))
    assert stats["tile_mpp"] == 2.0
    assert stats["slides"]["fine"]["resample"] == 2.0 and stats["slides"]["coarse"]["resample"] == 1.0
    assert stats["slides"]["fine"]["shape"] == stats["slides"]["coarse"]["shape"] == [1024, 1024]
    folder = tmp_path / "one"
    for index in range(16):
        tiles = [cv2.imread(str(folder / "images_64_red4" / f"{s}_{index}red4.png")).astype(int)
                 for s in ("fine", "coarse")]
        masks = [cv2.imread(str(folder / "masks_64_red4" / f"{s}_{index}red4.png"), 0) for s in ("fine", "coarse")]
        assert np.abs(tiles[0] - tiles[1]).mean() < 3
        assert (masks[0] != masks[1]).sum() <= 0.05 * max(1, int(masks[1].sum())) + 8
    plain = create_tiles(load_cfg(None, common + ["DATASETS.TRAIN_FOLDER", str(tmp_path / "two")]))
    assert plain["tile_mpp"] is None and plain["slides"]["fine"]["tile_mpp"] == 1.0
    assert plain["slides"]["coarse"]["tile_mpp"] == 2.0
    os.symlink(shared("wsi", "kidney-48-5.tif"), wsi / "kidney.tif")  # no pixel size
    with open(labels, "a", newline="") as fh:
        csv.writer(fh).writerow(["kidney", ""])
    with pytest.raises(SlideError, match=r"kidney.tif: pixel size unknown .*INPUT.MPP_TRAIN needs it: set DATASETS.MPP"):
        create_tiles(load_cfg(None, common + ["DATASETS.TRAIN_FOLDER", str(tmp_path / "three"), "INPUT.MPP_TRAIN", "2"]))
    assert not (tmp_path / "three").exists() or not any((tmp_path / "three").rglob("*.png"))
