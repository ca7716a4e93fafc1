"""Random training crops read across the tile grid, and augmentation that keeps image and mask aligned."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from data.datasets import TileSet, tile_group, tile_index
from data.sampling import RandomCropDataset, crop_margin, slide_canvases
from data.tiling import TileGrid, slide_box
from data.transforms import build_histology_transform, build_train_transform
from tests.conftest import run_script


def _pairs(folder, shapes, seed=0):
    """Image/mask pairs of random blotches (the mask is where the green channel is high)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "images")
    os.makedirs(folder / "masks")
    arrays = {}
    for n, (h, w) in enumerate(shapes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(image, (0, 0), 3)
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX)
        mask = (image[..., 1] > 140).astype(np.uint8)
        cv2.imwrite(str(folder / "images" / f"p{n}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "masks" / f"p{n}.png"), mask * 255)
        arrays[f"p{n}"] = (image, mask)
    return arrays


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Pairs of awkward sizes tiled at reduction 1 (tiles are exact pixels, centred padding)."""
    root = tmp_path_factory.mktemp("canvas")
    arrays = _pairs(root / "pairs", [(150, 230), (97, 64)])
    result = run_script("tiles_creator.py", "DATASETS.FORMAT", "pairs", "DATASETS.PAIRS_FOLDER", root / "pairs",
                        "DATASETS.LABELS_CSV", "", "DATASETS.MASK_THRESHOLD", 127, "INPUT.SIZE_TRAIN", 32,
                        "INPUT.SIZE_REDUCTION_TRAIN", 1, "INPUT.PIXEL_THRESHOLD", -1,
                        "DATASETS.TRAIN_FOLDER", root / "tiles")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "tiles", arrays


def _canvases(tiles_dir, size=32, reduce=1, drop=()):
    tiles = TileSet(str(tiles_dir), size, reduce)
    stats = json.load(open(tiles.stats_file))
    grids = {k: TileGrid(*v["shape"], size, reduce) for k, v in stats["slides"].items()}
    names = [n for n in tiles.names if n not in drop]
    return slide_canvases(tiles.images, tiles.masks, names, grids, tile_group, tile_index), grids


def _padded(array, grid, mode="reflect"):
    """The slide on its padded grid: padding mirrored (what the canvas shows off the slide), or
    black (``constant``: what the tiler wrote in its tiles)."""
    top, left = grid.pad_top, grid.pad_left
    span_h, span_w = grid.n_rows * grid.size, grid.n_cols * grid.size
    pads = ((top, span_h - grid.height - top), (left, span_w - grid.width - left))
    return np.pad(array, pads + ((0, 0),) * (array.ndim - 2), mode=mode)


def test_canvas_reads_any_region_across_tile_borders(tiled):
    tiles_dir, arrays = tiled
    canvases, grids = _canvases(tiles_dir)
    rng = np.random.default_rng(1)
    for canvas in canvases:
        image, mask = arrays[canvas.id]
        grid = grids[canvas.id]
        assert canvas.box == slide_box(grid) and grid.pad_top + grid.pad_left > 0
        ref_image, ref_mask = _padded(image, grid), _padded(mask, grid)
        for _ in range(60):  # regions inside, across tiles, into the padding and beyond the grid
            h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
            y = int(rng.integers(-20, ref_mask.shape[0] - h + 20))
            x = int(rng.integers(-20, ref_mask.shape[1] - w + 20))
            got_image, got_mask = canvas.read(y, x, h, w)
            assert got_image.shape == (h, w, 3) and got_mask.shape == (h, w)
            inside = (0 <= y and y + h <= ref_mask.shape[0] and 0 <= x and x + w <= ref_mask.shape[1])
            if inside:
                assert np.array_equal(got_image, ref_image[y:y + h, x:x + w])
                assert np.array_equal(got_mask, ref_mask[y:y + h, x:x + w])
            # off the slide the canvas mirrors the slide (as test_net fills the grid's padding)
            by0, by1, bx0, bx1 = canvas.box
            if by0 <= y and y + h <= by1 and bx0 <= x and x + w <= bx1:
                assert np.array_equal(got_image, image[y - by0:y - by0 + h, x - bx0:x - bx0 + w])


def test_dropped_tiles_read_as_glass_with_no_mask(tiled):
    tiles_dir, arrays = tiled
    canvases, grids = _canvases(tiles_dir, drop={"p0_0red1.png"})
    canvas = [c for c in canvases if c.id == "p0"][0]
    image, mask = canvas._read_inside(0, 32, 0, 32)
    assert (image == 255).all() and not mask.any()
    image, mask = canvas._read_inside(0, 32, 32, 64)  # its neighbour is still there, as tiled
    ref = _padded(arrays["p0"][0], grids["p0"], "constant")
    assert np.array_equal(image, ref[0:32, 32:64])


@pytest.mark.parametrize("foreground", [0.0, 0.5, 1.0])
def test_random_crops_hold_foreground_as_asked_and_repeat_with_the_seed(tiled, foreground):
    tiles_dir, _ = tiled
    canvases, _ = _canvases(tiles_dir)
    ds = RandomCropDataset(canvases, 24, 400, foreground, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    crops = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 24, 24) and y.shape == (1, 24, 24) for x, y in crops)
    # a foreground-centred crop holds its foreground pixel, within the jitter (a quarter of the
    # crop) of its centre unless the crop had to be moved to stay on the slide
    holds = np.mean([float(y.max()) for _, y in crops])
    centre = np.mean([float(y[0, 6:19, 6:19].max()) for _, y in crops])
    assert centre >= foreground - 0.08
    if foreground == 1.0:
        assert holds == 1.0
    else:
        assert centre < 1.0
    torch.manual_seed(0)
    again = [ds[i] for i in range(20)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, crops[:20]))


def test_crops_with_a_margin_come_back_at_the_crop_size(tiled):
    tiles_dir, _ = tiled
    canvases, _ = _canvases(tiles_dir)
    margin = crop_margin(32, True)
    assert margin == 8 and crop_margin(32, False) == 0
    for transform in (None, build_histology_transform(1.0, 32, margin, seed=0)):
        ds = RandomCropDataset(canvases, 32, 10, 0.5, [0.5] * 3, [0.25] * 3, transform, margin)
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)


# --- augmentation keeps image and mask aligned --------------------------------------------------
def _probe(size=96, seed=0):
    """An image whose green channel *is* the mask (blobs with sharp edges), and the mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(6):
        cy, cx, r = rng.integers(10, size - 10, 2).tolist() + [int(rng.integers(5, 14))]
        cv2.circle(mask, (cx, cy), r, 1, -1)
    cv2.rectangle(mask, (5, size - 30), (40, size - 8), 1, -1)  # an asymmetric shape: flips show
    image = np.full((size, size, 3), 60, np.uint8)
    image[..., 1] = mask * 255
    return image, mask


def _alignment(out):
    """IoU between the transformed mask and the mask read back from the transformed image."""
    seen = out["image"][..., 1] > 127
    mask = out["mask"] > 0
    union = (seen | mask).sum()
    return 1.0 if union == 0 else (seen & mask).sum() / union


def _geometric(kind, crop, margin):
    if kind == "histology":
        return build_histology_transform(1.0, crop, margin, seed=5, colour=False)
    import albumentations as A

    full = build_train_transform(1.0, seed=5)  # the classic pipeline's geometric (dual) transforms
    return A.Compose([t for t in full.transforms if isinstance(t, A.DualTransform) or
                      (isinstance(t, A.OneOf) and all(isinstance(c, A.DualTransform) for c in t.transforms))], seed=5)


@pytest.mark.parametrize("kind", ["histology", "classic"])
def test_every_geometric_transform_moves_image_and_mask_together(kind):
    crop, margin = 64, 16
    image, mask = _probe(crop + 2 * margin if kind == "histology" else crop)
    transform = _geometric(kind, crop, margin)
    scores = []
    for _ in range(60):
        out = transform(image=image.copy(), mask=mask.copy())
        assert out["image"].shape[:2] == out["mask"].shape == (crop, crop)
        assert set(np.unique(out["mask"])) <= {0, 1}
        if out["mask"].sum() > 50:
            scores.append(_alignment(out))
    assert len(scores) > 20 and min(scores) > 0.9, (min(scores), len(scores))


def test_the_alignment_check_catches_a_misaligned_transform():
    """The check above fails when the mask is moved differently from the image."""
    import albumentations as A

    image, mask = _probe(96)
    shifted = A.Compose([A.HorizontalFlip(p=1.0)])
    out = shifted(image=image, mask=mask)
    out["mask"] = mask  # the mask left behind
    assert _alignment(out) < 0.8
    out = {"image": np.roll(image, 4, axis=1), "mask": mask}  # a few pixels off
    assert _alignment(out) < 0.9


def test_histology_colour_is_mild_and_leaves_the_mask(shared_path):
    image = cv2.cvtColor(cv2.imread(shared_path("aidpath/images/10003.png")), cv2.COLOR_BGR2RGB)[:256, :256]
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[50:100, 60:120] = 1
    import albumentations as A

    full = build_histology_transform(1.0, 256, 0, seed=2)
    colour = A.Compose([t for t in full.transforms if not isinstance(t, (A.DualTransform, A.NoOp))], seed=2)
    assert len(colour.transforms) == 5  # stain, HSV, brightness/contrast, gamma, blur or noise
    diffs = []
    for _ in range(40):  # every draw is checked
        out = colour(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask)  # colour never touches the mask
        diffs.append(np.abs(out["image"].astype(int) - image.astype(int)).mean())
        # mild: even the rare draw that stacks stain, brightness and gamma changes this bright
        # tile (mean 237) by less than a quarter of the range (worst of 300 draws: 55)
        assert diffs[-1] < 64
    assert float(np.median(diffs)) < 15  # a typical draw: a few grey levels (median of 300: 7.2)
    assert sum(d > 1 for d in diffs) >= 20  # and it does recolour
