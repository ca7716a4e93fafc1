"""Slide QC (data/qc.py): clean real tissue passes, and pen strokes, a blurred region and a dark
fold painted onto real pixels are found where they were painted; the command's outputs (label
map, overlay, qc.csv) and its bad input."""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from config import get_cfg_defaults
from data.qc import BACKGROUND, BLUR, CLASSES, FOLD, PEN, USABLE, qc_image, sharpness, verdict
from data.sample import SampleSpec, draw_slide, write_pyramid
from tests.conftest import REPO
from tests.slides import has_shared, shared

UM = 4.0  # the QC level of these tests (µm/px)


def _tissue(seed=7):
    """Real PAS tissue where ../shared is present (AIDPATH biopsies, 0.5 µm/px), else
    the generated sample (1 µm/px): the full-resolution image and its µm/px."""
    if has_shared():  # four biopsies side by side: 1 mm of real tissue a side
        tiles = [cv2.cvtColor(cv2.imread(shared("aidpath", "images", f"{n}.png")), cv2.COLOR_BGR2RGB)
                 for n in ("10064", "10149", "10169", "10210")]
        return np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0), 0.5
    return draw_slide(SampleSpec("q", "x", 2048, 2048, seed))[0], 1.0


def _at_qc(image, mpp):
    f = mpp / UM
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)


def _qc():
    return get_cfg_defaults().QC


def test_clean_tissue_is_usable_and_ok():
    image, mpp = _tissue()
    labels = qc_image(_at_qc(image, mpp), UM, _qc())
    tissue = labels != BACKGROUND
    assert tissue.mean() > 0.2
    assert (labels[tissue] == USABLE).mean() > 0.99, np.bincount(labels.ravel(), minlength=6)
    areas = {c: float((labels == k).sum()) for k, c in enumerate(CLASSES)}
    assert verdict(areas, _qc())[1] == "ok"


def test_pen_strokes_are_found_where_they_were_drawn():
    image, mpp = _tissue()
    painted = image.copy()
    h, w = painted.shape[:2]
    width = max(4, int(40 / mpp))  # a 40 µm marker line
    strokes = np.zeros((h, w), np.uint8)
    for colour, (p, q) in (((35, 70, 190), ((0.1, 0.2), (0.9, 0.3))),   # blue
                           ((40, 150, 60), ((0.2, 0.8), (0.8, 0.6))),   # green
                           ((25, 25, 25), ((0.5, 0.05), (0.55, 0.95)))):  # black
        a, b = (int(p[0] * w), int(p[1] * h)), (int(q[0] * w), int(q[1] * h))
        cv2.line(painted, a, b, colour, width)
        cv2.line(strokes, a, b, 1, width)
    labels = qc_image(_at_qc(painted, mpp), UM, _qc())
    drawn = _at_qc(strokes * 255, mpp) > 127
    assert (labels[drawn] == PEN).mean() > 0.9
    near = cv2.dilate(drawn.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # the strokes' antialiased edges
    assert (labels[~near] == PEN).mean() < 0.005


def test_a_blurred_region_is_flagged_and_the_rest_is_not():
    image, mpp = _tissue()
    blurred = image.copy()
    h, w = image.shape[:2]
    sigma = 4.0 / mpp  # a 4 µm Gaussian at full resolution: out of focus
    blurred[:, : w // 2] = cv2.GaussianBlur(image, (0, 0), sigma)[:, : w // 2]
    labels = qc_image(_at_qc(blurred, mpp), UM, _qc())
    half = labels.shape[1] // 2
    left, right = labels[:, : half - 8], labels[:, half + 8:]  # the 120 µm smoothing straddles the edge
    assert (left[left != BACKGROUND] == BLUR).mean() > 0.7
    assert (right[right != BACKGROUND] == BLUR).mean() < 0.05
    areas = {c: float((labels == k).sum()) for k, c in enumerate(CLASSES)}
    share, outcome, rule = verdict(areas, _qc())
    assert outcome == "fail" and "blur" in rule and share > 0.25


def test_sharpness_falls_with_blur_on_real_tissue():
    image, mpp = _tissue()
    gray = cv2.cvtColor(_at_qc(image, mpp), cv2.COLOR_RGB2GRAY)
    values = []
    for sigma_um in (0, 2, 4):
        source = cv2.GaussianBlur(image, (0, 0), sigma_um / mpp) if sigma_um else image
        g = cv2.cvtColor(_at_qc(source, mpp), cv2.COLOR_RGB2GRAY)
        values.append(float(np.median(sharpness(g, 15, 31)[gray < 200])))
    assert values[0] > values[1] > values[2] and values[2] < 3.0 < values[0]


def test_a_fold_is_flagged_when_the_fold_rule_is_on():
    """Off by default (it flags dense HuBMAP cortex too); at the ratio measured on AIDPATH it finds a
    simulated fold (two layers: twice the optical density at full resolution)."""
    image, mpp = _tissue()
    folded = image.copy()
    h, w = image.shape[:2]
    side = min(int(400 / mpp), h // 2, w // 2)  # a square of up to 400 µm
    box = (slice(h // 8, h // 8 + side), slice(w // 8, w // 8 + side))
    glass = np.percentile(image, 95)
    folded[box] = (glass * (folded[box] / glass) ** 2).clip(0, 255).astype(np.uint8)  # two layers: twice the density
    assert not (qc_image(_at_qc(folded, mpp), UM, _qc()) == FOLD).any()  # off by default
    qc = _qc()
    qc.defrost()
    qc.FOLD_OD_RATIO = 1.5
    labels = qc_image(_at_qc(folded, mpp), UM, qc)
    mask = np.zeros((h, w), np.uint8)
    mask[box] = 255
    inside = _at_qc(mask, mpp) > 200
    tissue_inside = inside & (labels != BACKGROUND)
    assert (labels[tissue_inside] == FOLD).mean() > 0.7
    assert (labels[~inside] == FOLD).mean() < 0.02


def _run_qc(*args):
    return subprocess.run([sys.executable, "-m", "data.qc", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_the_qc_command_writes_the_label_map_overlay_and_csv(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    image, _ = draw_slide(SampleSpec("a", "x", 1800, 1500, 3))
    write_pyramid(str(slides / "a.tif"), image, mpp=1.0)
    pen = image.copy()
    cv2.line(pen, (100, 200), (1400, 1600), (35, 70, 190), 60)
    write_pyramid(str(slides / "b.tif"), pen, mpp=1.0)
    out = tmp_path / "out"
    result = _run_qc("DATASETS.WSI_FOLDER", slides, "OUTPUT_DIR", out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["id"]: r for r in csv.DictReader(open(out / "qc.csv", newline=""))}
    assert sorted(rows) == ["a", "b"]
    for slide_id in ("a", "b"):
        labels = cv2.imread(str(out / "qc" / f"{slide_id}_qc.png"), cv2.IMREAD_UNCHANGED)
        assert labels.ndim == 2 and set(np.unique(labels)) <= set(range(6))
        row = rows[slide_id]
        qc_mpp = float(row["qc_mpp"])
        assert row["unit"] == "mm2" and qc_mpp == pytest.approx(1800 / 1024, rel=0.01)
        assert float(row["downsample"]) == pytest.approx(1800 / 1024, rel=0.01)  # a small image: >= 1024 px kept
        # the CSV's areas are the label map's pixel counts at the QC level's pixel size
        for k, name in enumerate(CLASSES):
            assert float(row[name]) == pytest.approx((labels == k).sum() * qc_mpp * qc_mpp / 1e6, rel=1e-5, abs=1e-9)
        overlay = cv2.imread(str(out / "qc" / f"{slide_id}_qc_overlay.jpg"))
        assert overlay.shape[0] > labels.shape[0] and overlay.shape[1] >= labels.shape[1]  # with its legend
    assert rows["a"]["verdict"] == "ok" and float(rows["a"]["pen"]) == 0
    assert float(rows["b"]["pen"]) > 0.05 and rows["b"]["verdict"] in ("warn", "fail") and "pen" in rows["b"]["rule"]


def test_a_corrupt_slide_is_one_error_line_and_nothing_written(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid(str(slides / "a.tif"), draw_slide(SampleSpec("a", "x", 600, 600, 3))[0], mpp=1.0)
    (slides / "broken.svs").write_bytes(b"not a tiff at all" * 10)
    out = tmp_path / "out"
    result = _run_qc("DATASETS.WSI_FOLDER", slides, "OUTPUT_DIR", out)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode != 0 and len(errors) == 1 and "broken.svs" in errors[0], result.stderr[-2000:]
    assert not (out / "qc.csv").exists() and not (out / "qc").exists()


def test_qc_keys_are_checked():
    result = _run_qc("DATASETS.WSI_FOLDER", REPO, "QC.WARN_FRACTION", 0.5, "QC.FAIL_FRACTION", 0.2)
    assert result.returncode == 2 and "QC.WARN_FRACTION" in result.stderr


@pytest.mark.slow
def test_test_net_with_qc_predicts_nothing_on_pen_and_counts_what_it_dropped(tmp_path):
    """INPUT.QC True in test_net: a black marker stroke (which the dark-blob stand-in model takes for
    an object) gives no prediction and one object dropped for "pen"; the density uses the usable
    tissue QC found; qc.csv and the pictures are written; without QC the stroke is an object."""
    import json

    from tests.blob_model import save_blob_checkpoint
    from utils.rle import parse_rle

    slides, models = tmp_path / "slides", tmp_path / "models"
    slides.mkdir()
    models.mkdir()
    image, _ = draw_slide(SampleSpec("p", "x", 2400, 2400, 5))
    image[1100:1160, 200:2200] = (20, 20, 20)  # a 60 µm black marker line across the slide
    write_pyramid(str(slides / "p.tif"), image, mpp=1.0)
    save_blob_checkpoint(models / "blobs.pth", size=64, reduce=4, mpp=4.0)

    def run(out, *extra):
        result = subprocess.run([sys.executable, "-m", "tests.blob_model", "test_net.py", "TEST.WSI_FOLDER", str(slides),
                                 "TEST.MODEL_WEIGHTS_FOLDER", str(models), "TEST.BACKEND", "torch", "OUTPUT_DIR", str(out),
                                 *map(str, extra)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.load(open(out / "metrics.json"))
        rle = next(csv.DictReader(open(out / "submission.csv", newline="")))["predicted"]
        return metrics, parse_rle(rle, (2400, 2400))

    plain, runs_plain = run(tmp_path / "plain")
    checked, runs_qc = run(tmp_path / "qc", "INPUT.QC", True)

    def on_line(runs):  # foreground pixels on the stroke (column-major runs of the full-resolution mask)
        mask = np.zeros(2400 * 2400, bool)
        for start, end in runs:
            mask[start:end] = True
        return int(mask.reshape(2400, 2400, order="F")[1100:1160, 200:2200].sum())

    assert on_line(runs_plain) > 10000, "without QC the stroke is predicted"
    assert on_line(runs_qc) == 0
    assert checked["objects_dropped_by_qc"]["pen"] >= 1 and "objects_dropped_by_qc" not in plain
    qc = checked["per_slide"]["p"]["qc"]
    assert qc["areas"]["pen"] > 0.05 and qc["objects_dropped"]["pen"] >= 1
    usable_mm2 = qc["areas"]["usable"]
    assert checked["per_slide"]["p"]["tissue_mm2"] == pytest.approx(usable_mm2, rel=0.05)
    assert (tmp_path / "qc" / "qc.csv").exists() and (tmp_path / "qc" / "qc" / "p_qc_overlay.jpg").exists()
    rerun = subprocess.run([sys.executable, "-m", "tests.blob_model", "test_net.py", "TEST.WSI_FOLDER", str(slides),
                            "TEST.MODEL_WEIGHTS_FOLDER", str(models), "TEST.BACKEND", "torch", "OUTPUT_DIR",
                            str(tmp_path / "qc"), "INPUT.QC", "True", "QC.PEN_BLACK_VALUE", "0"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "predicted earlier, skipped" not in rerun.stderr  # a QC key is a setting


def test_the_tiler_with_qc_leaves_flagged_tiles_out_and_says_why(tmp_path):
    """INPUT.QC True in tiles_creator: the tiles under a blue marker line are not written (the rest
    are those of a run without QC, byte for byte), stats_*.json counts them under "pen", and the QC
    outputs land in the tile folder."""
    import json

    slides = tmp_path / "slides"
    slides.mkdir()
    image, mask = draw_slide(SampleSpec("t", "x", 2048, 2048, 9))
    image[800:1300, :] = (35, 70, 190)  # a 500 µm blue marker band across the slide
    write_pyramid(str(slides / "t.tif"), image, mpp=1.0)
    from utils.rle import rle_encode

    labels = tmp_path / "labels.csv"
    labels.write_text(f"id,encoding\nt,{rle_encode(mask)}\n")

    def tile(folder, *extra):
        result = subprocess.run([sys.executable, "tiles_creator.py", "DATASETS.WSI_FOLDER", str(slides),
                                 "DATASETS.LABELS_CSV", str(labels), "DATASETS.TRAIN_FOLDER", str(folder),
                                 "INPUT.SIZE_TRAIN", "128", "INPUT.SIZE_REDUCTION_TRAIN", "2", *map(str, extra)],
                                cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.load(open(folder / "stats_128_red2.json")), sorted((folder / "images_128_red2").iterdir())

    plain, plain_tiles = tile(tmp_path / "plain")
    checked, qc_tiles = tile(tmp_path / "qc", "INPUT.QC", True)
    dropped = checked["slides"]["t"]["qc"]["tiles_dropped"]
    assert dropped.get("pen", 0) >= 8 and checked["qc_tiles_dropped"] == dropped
    names = {p.name for p in qc_tiles}
    assert names < {p.name for p in plain_tiles}
    assert len(plain_tiles) - len(qc_tiles) == sum(dropped.values())
    for p in qc_tiles:  # the tiles kept are the same pixels
        assert p.read_bytes() == (tmp_path / "plain" / "images_128_red2" / p.name).read_bytes()
    for p in plain_tiles:  # the tiles left out are the ones on the band (tile rows 3 and 4 hold rows 768-1279)
        if p.name not in names:
            index = int(p.name.split("_")[1].split("red")[0])
            assert index // 8 in (3, 4), p.name
    assert "qc" not in plain["slides"]["t"] and "qc_tiles_dropped" not in plain
    rows = list(csv.DictReader(open(tmp_path / "qc" / "qc.csv", newline="")))
    assert [r["id"] for r in rows] == ["t"] and float(rows[0]["pen"]) > 0.05
    assert (tmp_path / "qc" / "qc" / "t_qc.png").exists()


def test_a_slide_without_tissue_is_a_warning_a_fail_row_and_no_tiles(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    from utils.rle import rle_encode

    image, mask = draw_slide(SampleSpec("a", "x", 1024, 1024, 8))
    write_pyramid(str(slides / "a.tif"), image, mpp=1.0)
    write_pyramid(str(slides / "empty.tif"), np.full((1024, 1024, 3), 240, np.uint8), mpp=1.0)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"id,encoding\na,{rle_encode(mask)}\nempty,\n")
    result = subprocess.run([sys.executable, "tiles_creator.py", "DATASETS.WSI_FOLDER", str(slides),
                             "DATASETS.LABELS_CSV", str(labels), "DATASETS.TRAIN_FOLDER", str(tmp_path / "tiles"),
                             "INPUT.SIZE_TRAIN", "64", "INPUT.SIZE_REDUCTION_TRAIN", "4", "INPUT.QC", "True",
                             "INPUT.PIXEL_THRESHOLD", "-1"],  # keep every tile: only QC may leave the empty slide out
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "empty: QC found no tissue: no tiles written" in result.stderr
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "tiles" / "qc.csv", newline=""))}
    assert rows["empty"]["verdict"] == "fail" and rows["empty"]["rule"] == "no tissue found"
    names = [p.name for p in (tmp_path / "tiles" / "images_64_red4").iterdir()]
    assert names and all(n.startswith("a_") for n in names)
