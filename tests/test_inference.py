"""Sliding-window inference: blending, the exact round trip, evaluation, test_net.py."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch

from data.tiling import TileGrid, is_tissue, pixel_limit
from data.readers import open_slide
from model.build import build_model
from model.checkpoint import save_checkpoint
from model.prediction import ensemble_threshold
from model.inference import (blend_weights, fill_outside, lowres_image, mask_to_rle, predict_canvas, prob_to_rle,
                             remove_small_objects, slide_box, window_starts)
from tests.conftest import free_port, requires_shared, run_script
from tests.slides import mosaic_region, shared, write_slide
from utils.export import mask_polygons, polygons_geojson
from utils.rle import parse_rle, rle_decode, rle_dice, rle_encode


def test_window_starts_and_weights():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(10, 4, 0.0) == [0, 4, 6]
    assert window_starts(3, 4, 0.5) == [0]
    for length in range(1, 60):
        for size in (1, 4, 7):
            starts = window_starts(length, size, 0.5)
            covered = np.zeros(max(length, size), bool)
            for s in starts:
                covered[s:s + size] = True
            assert covered[:length].all() and starts == sorted(set(starts))
    with pytest.raises(ValueError, match="overlap must be >= 0 and < 1"):
        window_starts(10, 4, 1.0)
    g = blend_weights(64)
    assert g.max() == 1.0 and g.min() >= 1e-3 and np.allclose(g, g.T) and np.allclose(g, g[::-1])
    assert (blend_weights(8, "constant") == 1).all()


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_constant_model_gives_the_constant_everywhere(blend):
    image = np.full((300, 517, 3), (200, 100, 180), np.uint8)  # tissue-coloured everywhere
    for value, exact in ((0.5, True), (0.3, False)):
        prob, n = predict_canvas(image, lambda b: np.full(b.shape[:3], value, np.float32), 64, 0.5, blend,
                                 batch_size=7)
        assert n == len(window_starts(300, 64, 0.5)) * len(window_starts(517, 64, 0.5))
        if exact:  # a power of two: blending is exact to the bit
            assert (prob == value).all()
        else:
            assert np.abs(prob - value).max() < 1e-6


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_canvas_equals_a_sequential_reference(batch_size):
    """The model runs on its own thread while batches are cut and blended: the map and the
    windows must be those of a plain loop over the windows, to the bit."""
    rng = np.random.default_rng(5)
    image = np.full((300, 420, 3), 242, np.uint8)
    image[30:250, 40:300] = rng.integers(0, 256, (220, 260, 3))
    size = 64
    weights = blend_weights(size)

    def model(batch):  # depends on each window's content
        red = batch[..., 0].astype(np.float32) / 255
        return red * (batch[..., 1].astype(np.float32).mean(axis=(1, 2), keepdims=True) / 255)

    acc, norm, n = np.zeros((300, 420), np.float32), np.zeros((300, 420), np.float32), 0
    for y in window_starts(300, size, 0.5):
        for x in window_starts(420, size, 0.5):
            tile = image[y:y + size, x:x + size]
            if is_tissue(tile, 40, pixel_limit(200, size)):
                acc[y:y + size, x:x + size] += model(tile[None])[0] * weights
                norm[y:y + size, x:x + size] += weights
                n += 1
    expected = np.divide(acc, norm, out=acc, where=norm > 0)
    got, n_got = predict_canvas(image, model, size, 0.5, "gaussian", batch_size)
    assert 0 < n_got == n < 13 * 12 and np.array_equal(got, expected)

    calls = []

    def failing(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return model(batch)

    with pytest.raises(RuntimeError, match="simulated"):
        predict_canvas(image, failing, size, 0.5, "gaussian", batch_size)


def test_padding_is_mirrored_for_the_model_and_zero_in_the_output():
    """Windows at the slide's edges reach into the grid's black padding; the model must see
    mirrored slide pixels there (it never met black in training) and the map is 0 outside."""
    grid = TileGrid(300, 420, 32, 4)  # pads 300 -> 384 and 420 -> 512 level-0 px
    box = slide_box(grid)
    assert box == (11, 85, 12, 116)  # pads 42 / 46 level-0 px: wholly-inside low-res pixels
    assert slide_box(grid, whole=False) == (10, 86, 11, 117)  # and those touching the slide
    image = np.zeros((grid.n_rows * 32, grid.n_cols * 32, 3), np.uint8)
    image[box[0]:box[1], box[2]:box[3]] = (200, 90, 170)  # tissue on the whole slide

    def black(batch):  # a model thrown off by black anywhere in its field of view
        seen = (batch.max(axis=-1) == 0).any(axis=(1, 2))
        return np.broadcast_to(seen[:, None, None], batch.shape[:3]).astype(np.float32)

    plain, n_plain = predict_canvas(image, black, 32, 0.5, pixel_threshold=-1)
    assert plain[box[0]:box[1], box[2]:box[3]].max() > 0.5  # false positives on the slide's edges
    filled, n_filled = predict_canvas(image, black, 32, 0.5, pixel_threshold=-1, box=box)
    assert n_filled == n_plain and filled.max() == 0
    mirrored = fill_outside(image, box)
    assert (mirrored[:box[0]] == (200, 90, 170)).all() and (mirrored[:, box[3]:] == (200, 90, 170)).all()


@requires_shared
def test_exact_round_trip_through_tiling_blending_threshold_and_rle(tmp_path):
    """A fake model that finds pure green must give back the known mask exactly."""
    height, width, size, reduce = 2300, 1900, 64, 4
    grid = TileGrid(height, width, size, reduce)
    lr_h, lr_w = grid.n_rows * size, grid.n_cols * size
    yy, xx = np.mgrid[:lr_h, :lr_w]
    mask_lr = np.zeros((lr_h, lr_w), np.uint8)
    for cy, cx, r in ((100, 120, 30), (300, 380, 45), (520, 200, 25), (40, 440, 20)):
        mask_lr |= ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
    # full-resolution truth: each low-res pixel is a reduce x reduce block of the padded slide
    rows = (np.arange(height) + grid.pad_top) // reduce
    cols = (np.arange(width) + grid.pad_left) // reduce
    truth = mask_lr[rows][:, cols]
    image = mosaic_region(0, height, 0, width, background_every=4)
    image[truth > 0] = (0, 255, 0)
    path = write_slide(str(tmp_path / "s.tiff"), (height, width), lambda a, b, c, d, s: image[a:b, c:d],
                       tile=256, compression=("zlib", 1))
    with open_slide(path) as slide:
        low = lowres_image(slide, grid)

    def green(batch):
        return ((batch[..., 1] == 255) & (batch[..., 0] == 0) & (batch[..., 2] == 0)).astype(np.float32)

    prob, n_windows = predict_canvas(low, green, size, 0.5, "gaussian", batch_size=5, pixel_threshold=200)
    assert 0 < n_windows < len(window_starts(lr_h, size, 0.5)) * len(window_starts(lr_w, size, 0.5))
    predicted = (prob > 0.45).astype(np.uint8)
    assert (predicted == mask_lr).all()
    rle, area = mask_to_rle(predicted, grid, strip_cols=333)
    assert rle == rle_encode(truth) and area == int(truth.sum())
    # GeoJSON polygons: rasterised back (pixel centres inside), they give the mask
    polygons = mask_polygons(predicted)
    assert len(polygons) == 4
    back = _rasterise(polygons, predicted.shape)
    assert (back & predicted).sum() / (back | predicted).sum() >= 0.99
    level0 = mask_polygons(predicted, scale=reduce, offset=(grid.pad_left, grid.pad_top))
    xs = [x for rings in level0 for x, _ in rings[0]]
    ys = [y for rings in level0 for _, y in rings[0]]
    ty, tx = np.nonzero(truth)
    assert (min(xs), max(xs), min(ys), max(ys)) == (tx.min(), tx.max() + 1, ty.min(), ty.max() + 1)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
def test_streamed_upsampling_equals_whole_map_upsampling(upsample):
    """The strip-by-strip RLE equals thresholding the whole upsampled probability map
    (cv2.resize / np.repeat of the padded map, then the padding cropped), bit for bit."""
    import cv2

    rng = np.random.default_rng(1)
    for trial in range(40):
        reduce, size = int(rng.choice([1, 2, 3, 4, 5, 8])), int(rng.choice([8, 16]))
        height, width = int(rng.integers(3, 260)), int(rng.integers(3, 260))
        grid = TileGrid(height, width, size, reduce)
        shape = (grid.n_rows * size, grid.n_cols * size)
        prob = rng.random(shape).astype(np.float32)
        if trial % 2:
            prob = cv2.GaussianBlur(prob, (0, 0), 2)
        prob[:shape[0] // 3] = 0  # background rows and strips: the skipped path
        prob[:, -shape[1] // 4:] = 0.99  # and the all-foreground path
        threshold = float(np.quantile(prob, 0.6))
        if upsample == "bilinear":
            full = cv2.resize(prob, None, fx=reduce, fy=reduce, interpolation=cv2.INTER_LINEAR)
        else:
            full = np.repeat(np.repeat(prob, reduce, 0), reduce, 1)
        expected = full[grid.pad_top:grid.pad_top + height, grid.pad_left:grid.pad_left + width] > threshold
        strip_pixels = int(rng.integers(1, 6)) * height * reduce
        rle, area = prob_to_rle(prob, grid, threshold, upsample, strip_pixels=strip_pixels)
        assert rle == rle_encode(expected) and area == int(expected.sum()), (trial, reduce, height, width)


def test_bilinear_upsampling_rounds_block_corners():
    """Bilinear contours are smooth: a single low-res pixel above the threshold becomes a
    rounded blob inside its block, not the whole block (as nearest gives)."""
    grid = TileGrid(64, 64, 16, 8)
    prob = np.zeros((16, 16), np.float32)
    prob[4, 4] = 1.0
    for upsample, expected in (("nearest", 64), ("bilinear", None)):
        rle, area = prob_to_rle(prob, grid, 0.45, upsample)
        if expected:
            assert area == expected
        else:
            mask = rle_decode(rle, (64, 64))
            ys, xs = np.nonzero(mask)
            assert 0 < area < 64 and mask[ys.min(), xs.min()] == 0  # the block's corner is cut


def _rasterise(polygons, shape):
    from matplotlib.path import Path

    yy, xx = np.mgrid[:shape[0], :shape[1]]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    out = np.zeros(len(centres), bool)
    for rings in polygons:
        inside = Path(rings[0]).contains_points(centres)
        for hole in rings[1:]:
            inside &= ~Path(hole).contains_points(centres)
        out |= inside
    return out.reshape(shape).astype(np.uint8)


def test_polygons_keep_holes_and_single_pixels():
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 10:30] = 1
    mask[8:11, 15:20] = 0  # a hole
    mask[20, 2] = 1  # one pixel
    polygons = mask_polygons(mask)
    assert sorted(len(p) for p in polygons) == [1, 2]
    assert (_rasterise(polygons, mask.shape) == mask).all()
    collection = polygons_geojson(polygons)
    feature = collection["features"][0]
    assert collection["type"] == "FeatureCollection" and feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["classification"]["name"] == "Glomerulus"
    assert feature["properties"]["objectType"] == "annotation"
    assert all(r[0] == r[-1] for p in polygons for r in p)


def test_small_objects_and_rle_dice():
    mask = np.zeros((50, 60), np.uint8)
    mask[5:8, 5:8] = 1  # 9 px
    mask[20:40, 20:40] = 1
    kept = remove_small_objects(mask, 10)
    assert kept[5:8, 5:8].sum() == 0 and kept[20:40, 20:40].all()
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = (rng.random((40, 30)) < 0.3).astype(np.uint8)
        b = (rng.random((40, 30)) < rng.random()).astype(np.uint8)
        expected = 2 * (a & b).sum() / (a.sum() + b.sum())
        got = rle_dice(parse_rle(rle_encode(a), (40, 30)), parse_rle(rle_encode(b), (40, 30)))
        assert abs(got - expected) < 1e-12
    empty = parse_rle("", (4, 4))
    assert rle_dice(empty, empty) == 1.0


def _checkpoint(path, reduce=4, size=64, seed=0, threshold=0.5):
    torch.manual_seed(seed)
    model = build_model({"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1})
    save_checkpoint(str(path), model, {
        "model": {"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1},
        "input": {"size": size, "reduce": reduce, "mean": [0.8, 0.7, 0.8], "std": [0.15, 0.2, 0.12]},
        "threshold": threshold, "fold": 0, "metrics": {}})


def test_ensemble_threshold_comes_from_the_key_or_the_checkpoints():
    ckpts = [{"threshold": 0.3}, {"threshold": 0.5}]
    assert ensemble_threshold(0.7, ckpts) == (0.7, "TEST.TH")
    th, source = ensemble_threshold(-1.0, ckpts)
    assert th == pytest.approx(0.4) and "mean of the thresholds learned in training" in source and "0.30, 0.50" in source
    assert ensemble_threshold(-1.0, ckpts[:1]) == (0.3, "learned in training by the checkpoint")
    th, source = ensemble_threshold(-1.0, [{"fold": 0}])
    assert th == 0.45 and "carry no threshold" in source


@pytest.mark.slow
@requires_shared
def test_test_net_uses_the_learned_thresholds_unless_test_th_is_set(tmp_path):
    pairs = tmp_path / "pairs"
    for sub in ("images", "masks"):
        (pairs / sub).mkdir(parents=True)
    os.symlink(shared("aidpath", "images", "10003.png"), pairs / "images" / "10003.png")
    os.symlink(shared("aidpath", "masks", "10003.png"), pairs / "masks" / "10003.png")
    models = tmp_path / "models"
    models.mkdir()
    _checkpoint(models / "a.pth", reduce=8, size=64, seed=0, threshold=0.46)
    _checkpoint(models / "b.pth", reduce=8, size=64, seed=1, threshold=0.52)
    common = ["TEST.PAIRS_FOLDER", pairs, "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.SIZE", 64, "DATASETS.MASK_CHANNEL",
              0, "DATASETS.MASK_THRESHOLD", 127, "TEST.P_TH", -1]
    learned = run_script("test_net.py", *common, "OUTPUT_DIR", tmp_path / "learned")
    assert learned.returncode == 0, learned.stderr[-3000:]
    assert "Threshold 0.490: mean of the thresholds learned in training by the checkpoints (0.46, 0.52)" in learned.stderr
    metrics = json.load(open(tmp_path / "learned" / "metrics.json"))
    assert metrics["threshold"] == pytest.approx(0.49) and metrics["threshold_source"].startswith("mean of")
    explicit = run_script("test_net.py", *common, "TEST.TH", 0.49, "OUTPUT_DIR", tmp_path / "explicit")
    assert explicit.returncode == 0 and "Threshold 0.490: TEST.TH" in explicit.stderr
    assert ((tmp_path / "learned" / "submission.csv").read_text() ==
            (tmp_path / "explicit" / "submission.csv").read_text())


@pytest.mark.slow
@requires_shared
def test_test_net_end_to_end_resume_and_mismatch(tmp_path):
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    os.symlink(shared("wsi", "CMU-1-Small-Region.svs"), wsi / "cmu.svs")
    os.symlink(shared("wsi", "kidney-48-5.tif"), wsi / "kidney.tif")
    models = tmp_path / "models"
    models.mkdir()
    _checkpoint(models / "a.pth", seed=0)
    _checkpoint(models / "b.pth", seed=1)
    truth = np.zeros((2967, 2220), np.uint8)
    truth[1000:1400, 800:1300] = 1
    (tmp_path / "labels.csv").write_text(f"id,encoding\ncmu,{rle_encode(truth)}\n")
    args = ["TEST.WSI_FOLDER", wsi, "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.SIZE", 64, "OUTPUT_DIR",
            tmp_path / "out", "TEST.LABELS_CSV", tmp_path / "labels.csv", "TEST.TH", 0.5, "TEST.TTA", True]
    result = run_script("test_net.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    lines = (out / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,predicted" and [l.split(",")[0] for l in lines[1:]] == ["cmu", "kidney"]
    rles = dict(l.split(",", 1) for l in lines[1:])
    cmu = rle_decode(rles["cmu"], (2967, 2220))
    metrics = json.load(open(out / "metrics.json"))
    expected = 2 * (cmu & truth).sum() / (cmu.sum() + truth.sum())
    assert abs(metrics["overall_dice"] - expected) < 1e-9
    assert (out / "dice.csv").read_text().startswith("id,dice,true_objects,predicted_objects,matched_objects,")
    geo = json.load(open(out / "predictions" / "cmu.geojson"))
    assert geo["type"] == "FeatureCollection"
    # objects.csv: the objects are the RLE's 8-connected components; their areas sum to its area
    import cv2

    table = list(csv.DictReader(open(out / "objects.csv", newline="")))
    cmu_rows = [r for r in table if r["id"] == "cmu"]
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(cmu.astype(np.uint8), connectivity=8)
    assert len(cmu_rows) == n - 1 == metrics["per_slide"]["cmu"]["objects"]
    assert sum(int(r["area_px"]) for r in cmu_rows) == int(cmu.sum())
    assert sorted(int(r["area_px"]) for r in cmu_rows) == sorted(stats[1:, cv2.CC_STAT_AREA].tolist())
    assert all(abs(float(r["area_um2"]) - int(r["area_px"]) * 0.499**2) < 0.01 for r in cmu_rows)  # SVS MPP
    assert all(r["area_um2"] == "" for r in table if r["id"] == "kidney")  # no pixel size in that TIFF
    assert len(geo["features"]) == len(cmu_rows)
    first = geo["features"][0]["properties"]["measurements"]
    assert first["Area px"] == int(cmu_rows[0]["area_px"]) and first["Area um^2"] == float(cmu_rows[0]["area_um2"])
    for name in ("cmu_mask.png", "cmu_overlay.png", "kidney_mask.png", "kidney_overlay.png"):
        assert (out / "predictions" / name).stat().st_size > 0
    before = (out / "submission.csv").read_bytes()
    again = run_script("test_net.py", *args)
    assert again.returncode == 0 and again.stderr.count("predicted earlier, skipped") == 2
    assert (out / "submission.csv").read_bytes() == before
    # other labels: the predictions are reused, the Dice is computed against the new labels
    truth2 = np.zeros_like(truth)
    truth2[200:900, 300:1500] = 1
    (tmp_path / "labels.csv").write_text(f"id,encoding\ncmu,{rle_encode(truth2)}\n")
    rescored = run_script("test_net.py", *args)
    assert rescored.returncode == 0 and rescored.stderr.count("predicted earlier, skipped") == 2
    expected2 = 2 * (cmu & truth2).sum() / (cmu.sum() + truth2.sum())
    assert abs(json.load(open(out / "metrics.json"))["overall_dice"] - expected2) < 1e-9
    # checkpoints that disagree on the scale
    _checkpoint(models / "c.pth", reduce=8)
    bad = run_script("test_net.py", *args)
    assert bad.returncode == 1 and "must share scale and tile size" in bad.stderr
    assert (out / "submission.csv").read_bytes() == before  # earlier output untouched


@requires_shared
def test_pairs_mode_scores_against_the_masks(tmp_path):
    import cv2

    pairs = tmp_path / "pairs"
    for sub in ("images", "masks"):
        (pairs / sub).mkdir(parents=True)
    ids = ["10003", "10179"]
    for i in ids:
        os.symlink(shared("aidpath", "images", f"{i}.png"), pairs / "images" / f"{i}.png")
        os.symlink(shared("aidpath", "masks", f"{i}.png"), pairs / "masks" / f"{i}.png")
    models = tmp_path / "models"
    models.mkdir()
    _checkpoint(models / "a.pth", reduce=4, size=64)
    result = run_script("test_net.py", "TEST.PAIRS_FOLDER", pairs, "TEST.MODEL_WEIGHTS_FOLDER", models,
                        "TEST.SIZE", 64, "DATASETS.MASK_CHANNEL", 0, "DATASETS.MASK_THRESHOLD", 127,
                        "TEST.TH", 0.5, "TEST.P_TH", -1, "OUTPUT_DIR", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    rles = dict(line.split(",", 1) for line in (out / "submission.csv").read_text().splitlines()[1:])
    dices, inter, total = {}, 0, 0
    for i in ids:
        truth = (cv2.imread(shared("aidpath", "masks", f"{i}.png"))[..., 2] > 127).astype(np.uint8)
        pred = rle_decode(rles[i], truth.shape)
        inter += int((pred & truth).sum())
        total += int(pred.sum() + truth.sum())
        dices[i] = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    rows = {r["id"]: r["dice"] for r in csv.DictReader(open(out / "dice.csv", newline=""))}
    assert all(abs(float(rows[i]) - dices[i]) < 1e-6 for i in ids)
    metrics = json.load(open(out / "metrics.json"))
    assert abs(metrics["overall_dice"] - 2 * inter / total) < 1e-9
    assert abs(metrics["mean_dice"] - np.mean(list(dices.values()))) < 1e-6


def _slides(folder, n, height=1500, width=1300):
    """``n`` small tiled-JPEG slides of real tissue (different mosaic offsets)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        write_slide(str(folder / f"s{k}.tiff"), (height + 100 * k, width),
                    lambda a, b, c, d, s, k=k: mosaic_region(a + 700 * k, b + 700 * k, c, d, s, background_every=3),
                    tile=256, compression=("jpeg", 90))
    return folder


@pytest.mark.slow
@requires_shared
def test_torchrun_shards_slides_and_rank_0_assembles_the_csv(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): each rank predicts its share of the slides, and
    the CSV rank 0 writes is byte-identical to a single-process run."""
    import subprocess
    import sys

    from tests.conftest import REPO

    wsi = _slides(tmp_path / "wsi", 3)
    models = tmp_path / "models"
    models.mkdir()
    _checkpoint(models / "a.pth", reduce=4, size=64)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["TEST.WSI_FOLDER", wsi, "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.SIZE", 64, "TEST.TH", 0.5]
    single = subprocess.run([sys.executable, os.path.join(REPO, "test_net.py"), *map(str, args),
                             "OUTPUT_DIR", str(tmp_path / "single")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    # test_net ends with os._exit (no module teardown): the console and the log are complete
    assert single.stderr.count("Done in") == 1 and "Done in" in (tmp_path / "single" / "log.txt").read_text()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "test_net.py"), *map(str, args), "OUTPUT_DIR", str(tmp_path / "ddp")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2" in result.stderr and "rank 1/2" in result.stderr
    assert result.stderr.count("Done in") == 1  # rank 0 alone assembles and reports
    predicted = re.findall(r"(s\d): \d+ objects, ", result.stderr)
    assert sorted(predicted) == ["s0", "s1", "s2"]  # each slide predicted once, by one rank
    assert (tmp_path / "ddp" / "submission.csv").read_bytes() == (tmp_path / "single" / "submission.csv").read_bytes()
    assert (tmp_path / "ddp" / "objects.csv").read_bytes() == (tmp_path / "single" / "objects.csv").read_bytes()
