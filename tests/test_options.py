"""Options that change outputs, each against what it must do: TEST.MIN_AREA / MIN_AREA_UM2 drop
exactly the objects under the size, TEST.MEASURE False counts the same objects without measuring
them, DATASETS.MASK_INVERT swaps foreground and background."""
import csv
import os

import cv2
import numpy as np
import pytest
import tifffile

from config import load_cfg
from data.sources import load_pair_mask
from data.tiler import create_tiles
from model.prediction import predict_slides
from tests.blob_model import save_blob_checkpoint
from utils.rle import parse_rle

H, W = 1024, 1280
SMALL, LARGE = (300, 300, 45), (600, 900, 130)  # (y, x, radius) of two dark discs, level-0 px


@pytest.fixture(scope="module")
def two_discs(tmp_path_factory):
    root = tmp_path_factory.mktemp("discs")
    image = np.full((H, W, 3), 235, np.uint8)
    for y, x, r in (SMALL, LARGE):
        cv2.circle(image, (x, y), r, (60, 30, 90), -1)
    (root / "wsi").mkdir()
    tifffile.imwrite(str(root / "wsi" / "discs.tif"), image, photometric="rgb", tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    save_blob_checkpoint(str(root / "model.pth"), size=64, reduce=4, mpp=2.0)
    return root


def _predict(root, out, *opts):
    cfg = load_cfg(None, ["TEST.WSI_FOLDER", str(root / "wsi"), "TEST.MODEL_WEIGHTS_FOLDER", str(root / "model.pth"),
                          "TEST.SIZE", "64", "TEST.TH", "0.5", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out), *opts])
    summary = predict_slides(cfg)
    if not cfg.TEST.MEASURE:
        return summary
    with open(out / "submission.csv", newline="") as fh:
        runs = parse_rle(next(csv.DictReader(fh))["predicted"], (H, W))
    with open(out / "objects.csv", newline="") as fh:
        objects = list(csv.DictReader(fh))
    return runs, objects


def _mask(runs):
    flat = np.zeros(H * W, np.uint8)
    for start, length in runs:
        flat[start:start + length] = 1
    return flat.reshape(W, H).T  # Kaggle RLE: column-major


def test_min_area_drops_exactly_the_objects_under_it(two_discs, tmp_path):
    runs, objects = _predict(two_discs, tmp_path / "all")
    areas = sorted(int(o["area_px"]) for o in objects)
    assert len(areas) == 2 and areas[0] < areas[1]  # both discs found
    cut = (areas[0] + areas[1]) // 2
    everything = _mask(runs)
    n, labels = cv2.connectedComponents(everything, connectivity=8)
    large = (labels == labels[LARGE[0], LARGE[1]]).astype(np.uint8)
    for name, opts in (("px", ["TEST.MIN_AREA", cut]), ("um2", ["TEST.MIN_AREA_UM2", cut * 0.25])):  # 0.5 um/px
        kept_runs, kept = _predict(two_discs, tmp_path / name, *map(str, opts))
        assert [int(o["area_px"]) for o in kept] == [areas[1]], name
        assert np.array_equal(_mask(kept_runs), large), name  # the large disc exactly as before, nothing else
    # a size below both keeps both
    same_runs, same = _predict(two_discs, tmp_path / "low", "TEST.MIN_AREA", str(areas[0] - 1))
    assert len(same) == 2 and np.array_equal(_mask(same_runs), everything)


def test_measure_false_counts_the_same_objects_without_measuring_them(two_discs, tmp_path):
    """One definition of objects: the 8-connected components of the full-resolution mask, with
    or without TEST.MEASURE (before, MEASURE False counted the low-resolution mask's)."""
    measured_runs, measured = _predict(two_discs, tmp_path / "measured")
    summary = _predict(two_discs, tmp_path / "counted", "TEST.MEASURE", "False")
    assert summary["per_slide"]["discs"]["objects"] == len(measured) == summary["objects"] == 2
    assert summary["per_slide"]["discs"]["median_area_um2"] is None  # not measured
    assert not (tmp_path / "counted" / "objects.csv").exists()
    assert not (tmp_path / "counted" / "predictions" / "discs.geojson").exists()
    assert (tmp_path / "counted" / "predictions" / "discs_overlay.png").exists()
    with open(tmp_path / "counted" / "submission.csv", newline="") as fh:
        assert np.array_equal(parse_rle(next(csv.DictReader(fh))["predicted"], (H, W)), measured_runs)


def test_mask_invert_swaps_foreground_and_background(tmp_path):
    rng = np.random.default_rng(3)
    truth = np.zeros((256, 320), np.uint8)
    for _ in range(5):
        cv2.circle(truth, (int(rng.integers(30, 290)), int(rng.integers(30, 226))), int(rng.integers(8, 30)), 1, -1)
    for name, mask in (("plain", truth * 255), ("inverted", (1 - truth) * 255)):
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        cv2.imwrite(str(folder / "images" / "a.png"), rng.integers(0, 255, (256, 320, 3), dtype=np.uint8))
        cv2.imwrite(str(folder / "masks" / "a.png"), mask)
    assert np.array_equal(load_pair_mask(str(tmp_path / "inverted" / "masks" / "a.png"), 0, 127, invert=True), truth)
    assert np.array_equal(load_pair_mask(str(tmp_path / "plain" / "masks" / "a.png"), 0, 127), truth)
    tiles = {}
    for name, invert in (("plain", "False"), ("inverted", "True")):
        cfg = load_cfg(None, ["DATASETS.FORMAT", "pairs", "DATASETS.PAIRS_FOLDER", str(tmp_path / name),
                              "DATASETS.LABELS_CSV", "", "DATASETS.MASK_THRESHOLD", "127", "DATASETS.MASK_INVERT",
                              invert, "INPUT.SIZE_TRAIN", "64", "INPUT.SIZE_REDUCTION_TRAIN", "2",
                              "INPUT.PIXEL_THRESHOLD", "0", "DATASETS.TRAIN_FOLDER", str(tmp_path / f"tiles_{name}")])
        create_tiles(cfg)
        folder = tmp_path / f"tiles_{name}" / "masks_64_red2"
        tiles[name] = {n: cv2.imread(str(folder / n), cv2.IMREAD_UNCHANGED) for n in sorted(os.listdir(folder))}
    assert tiles["plain"].keys() == tiles["inverted"].keys() and len(tiles["plain"]) >= 4
    assert all(np.array_equal(tiles["plain"][n], tiles["inverted"][n]) for n in tiles["plain"])
    assert sum(int(t.sum()) for t in tiles["plain"].values()) > 0
