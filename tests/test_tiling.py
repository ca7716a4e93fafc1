import glob
import os

import cv2
import numpy as np
import pytest

from data.masks import ArrayMask, RLEMask
from data.tiling import (TileGrid, centered_padding, is_tissue, iter_tile_rows,
                         mask_band, pixel_limit, tissue_columns, tissue_windows)
from data.readers import ArraySlide, open_slide
from tests.conftest import requires_shared
from tests.reference import reference_tiles
from tests.slides import mosaic_region, read_sizes, read_train_csv, shared, write_slide
from utils.rle import parse_rle


def test_padding_and_grid_literals():
    assert centered_padding(31278, 4096) == (745, 745)
    assert centered_padding(25794, 4096) == (1439, 1439)
    assert centered_padding(4096, 4096) == (0, 0)
    assert centered_padding(5, 4) == (1, 2)
    grid = TileGrid(31278, 25794, 256, 16)
    assert (grid.n_rows, grid.n_cols, grid.n_tiles) == (8, 7, 56)
    assert (grid.pad_top, grid.pad_left) == (745, 1439)
    assert grid.tile_origin(0) == (-745, -1439)
    assert grid.tile_origin(9) == (4096 - 745, 2 * 4096 - 1439)
    with pytest.raises(ValueError):
        TileGrid(10, 10, 0, 4)
    with pytest.raises(ValueError):
        TileGrid(10, 10, 8, 0)


def test_background_test_literals():
    assert pixel_limit(200, 256) == 200 and pixel_limit(200, 512) == 400
    white = np.full((16, 16, 3), 255, np.uint8)
    black = np.zeros((16, 16, 3), np.uint8)
    tissue = np.zeros((16, 16, 3), np.uint8)
    tissue[...] = (200, 100, 180)  # saturation 127
    assert not is_tissue(white, 40, 10)
    assert not is_tissue(black, 40, 10)
    assert is_tissue(tissue, 40, 10)
    assert not is_tissue(tissue, 127, 10)  # S must exceed the threshold
    few = white.copy()
    few[:3, :3] = (200, 100, 180)  # 9 tissue pixels
    assert not is_tissue(few, 40, 9) and is_tissue(few, 40, 8)
    assert is_tissue(white, 40, -1)  # a negative threshold keeps everything


def _window_images():
    """Images with tissue, white background, black padding and borderline windows: real tissue
    when ../shared is there, else random blotches."""
    rng = np.random.default_rng(3)
    image = np.full((389, 517, 3), 242, np.uint8)
    if os.path.exists(shared("aidpath")):
        image[40:300, 60:450] = mosaic_region(0, 260, 0, 390, 4, background_every=3)
    else:
        for _ in range(40):
            y, x, r = rng.integers(0, 389), rng.integers(0, 250), rng.integers(2, 30)  # right part: background
            cv2.circle(image, (int(x), int(y)), int(r), tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
    image[:, :25] = 0  # black padding
    yield image
    yield rng.integers(0, 256, (130, 300, 3), dtype=np.uint8)


@pytest.mark.parametrize("size, stride", [(64, 32), (64, 64), (50, 17), (128, 128)])
def test_tissue_windows_equal_the_per_window_test(size, stride):
    """The window selection of test_net (once per row of windows, cumulative sums) keeps
    exactly the windows the tiler's per-tile test keeps, for overlapping windows too."""
    mixed = False
    for image in _window_images():
        h, w = image.shape[:2]
        ys = sorted(set(list(range(0, h - size + 1, stride)) + [h - size]))
        xs = sorted(set(list(range(0, w - size + 1, stride)) + [w - size]))
        for sat, p in ((40, 200), (40, 3000), (0, 10), (127, -1)):
            limit = pixel_limit(p, size)
            expected = [(y, x) for y in ys for x in xs if is_tissue(image[y:y + size, x:x + size], sat, limit)]
            assert tissue_windows(image, ys, xs, size, sat, limit) == expected
            if 0 < len(expected) < len(ys) * len(xs) and (sat, p) == (40, 200):
                mixed = True
        assert mixed  # some windows kept, some skipped: the comparison means something


def _streamed(slide, mask, grid, sat=40, p=200):
    kept = {}
    limit = pixel_limit(p, grid.size)
    for row, band in iter_tile_rows(slide, grid):
        masks = mask_band(mask, grid, row)
        for col in range(grid.n_cols):
            tile = band[:, col * grid.size:(col + 1) * grid.size]
            if is_tissue(tile, sat, limit):
                kept[row * grid.n_cols + col] = (tile, masks[:, col * grid.size:(col + 1) * grid.size])
    return kept


def _assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for index, (image, mask) in expected.items():
        assert (got[index][0] == image).all(), f"image tile {index} differs"
        assert (got[index][1] == mask).all(), f"mask tile {index} differs"


@requires_shared
@pytest.mark.parametrize("size, reduce", [(64, 4), (100, 3), (128, 1), (32, 16), (48, 5)])
def test_streamed_tiles_equal_whole_image_computation(tmp_path, size, reduce):
    height, width = 2300, 1900
    image = mosaic_region(0, height, 0, width, background_every=3)
    mask = (cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) < 150).astype(np.uint8)
    expected, n_tiles = reference_tiles(image, mask, size, reduce)
    grid = TileGrid(height, width, size, reduce)
    assert grid.n_tiles == n_tiles and 0 < len(expected) < n_tiles
    # in memory, and through a lossless tiled TIFF read in strips
    _assert_same(_streamed(ArraySlide(image), ArrayMask(mask), grid), expected)
    path = write_slide(str(tmp_path / "s.tiff"), (height, width),
                       lambda a, b, c, d, s: image[a:b, c:d], tile=256, compression=("zlib", 1))
    runs = parse_rle(__import__("utils.rle", fromlist=["rle_encode"]).rle_encode(mask), (height, width))
    with open_slide(path) as slide:
        _assert_same(_streamed(slide, RLEMask(runs, (height, width)), grid), expected)


@requires_shared
def test_pyramid_level_at_the_reduction_is_used(tmp_path):
    height, width = 4096, 3072  # pads are multiples of 4: the level grid aligns exactly
    path = write_slide(str(tmp_path / "p.tiff"), (height, width), mosaic_region, tile=256,
                       compression=("zlib", 1), downsamples=(4,))
    image = mosaic_region(0, height, 0, width)
    mask = np.zeros((height, width), np.uint8)
    expected, _ = reference_tiles(image, mask, 128, 4)
    grid = TileGrid(height, width, 128, 4)
    with open_slide(path) as slide:
        assert slide.best_level(4) == 1
        calls = []
        read_raw, iter_strips = slide._read_raw, slide.iter_strips
        slide._read_raw = lambda level, *a: calls.append(level) or read_raw(level, *a)
        slide.iter_strips = lambda level, *a, **k: calls.append(level) or iter_strips(level, *a, **k)
        got = _streamed(slide, ArrayMask(mask), grid)
        assert set(calls) == {1}  # level 0 was never decoded
    _assert_same(got, expected)  # the mosaic's level 1 is INTER_AREA of level 0


@requires_shared
def test_non_integer_rest_of_downscale_is_resized(tmp_path):
    height, width = 3000, 2600
    path = write_slide(str(tmp_path / "p.tiff"), (height, width), mosaic_region, tile=256,
                       compression=("zlib", 1), downsamples=(4,))
    image = mosaic_region(0, height, 0, width)
    expected, _ = reference_tiles(image, np.zeros((height, width), np.uint8), 64, 6)
    grid = TileGrid(height, width, 64, 6)
    with open_slide(path) as slide:
        assert slide.best_level(6) == 1
        got = _streamed(slide, ArrayMask(np.zeros((height, width), np.uint8)), grid)
    common = set(got) & set(expected)
    assert len(common) >= 0.9 * len(expected)
    # Level 4 then x1.5 INTER_AREA is not the x6 block mean of level 0 (a level-1 pixel that
    # straddles a block edge brings in its neighbours): close, not equal.
    errors = [np.abs(got[i][0].astype(int) - expected[i][0]).mean() for i in common]
    assert max(errors) < 6 and np.mean(errors) < 3


@requires_shared
@pytest.mark.slow
def test_real_rle_reproduces_the_original_tiles_at_true_size(tmp_path):
    """Slide 2f6ecfcdf at its true size: the six reference tiles, pixel for pixel."""
    slide_id = "2f6ecfcdf"
    height, width = read_sizes()[slide_id]
    grid = TileGrid(height, width, 256, 16)
    reference = {}
    for path in glob.glob(shared("hubmap2021", "images_256_red16", "*.png")):
        index = int(os.path.basename(path).split("_")[1].split("red")[0])
        mask_path = path.replace("images_256_red16", "masks_256_red16")
        reference[index] = (cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB),
                            cv2.imread(mask_path, cv2.IMREAD_UNCHANGED))
    assert sorted(reference) == [3, 9, 10, 11, 12, 16]

    def region(y0, y1, x0, x1, scale=1):
        # The reference image tiles upscaled 16x (nearest) at their place; black elsewhere,
        # which the background test drops.
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        for index, (tile, _) in reference.items():
            ty, tx = grid.tile_origin(index)
            a, b, c, d = max(y0, ty), min(y1, ty + grid.span), max(x0, tx), min(x1, tx + grid.span)
            if a < b and c < d:
                rows = (np.arange(a, b) - ty) // 16
                cols = (np.arange(c, d) - tx) // 16
                out[a - y0:b - y0, c - x0:d - x0] = tile[rows[:, None], cols[None, :]]
        return out

    path = write_slide(str(tmp_path / f"{slide_id}.tiff"), (height, width), region,
                       compression=("zlib", 1))
    runs = parse_rle(read_train_csv()[slide_id], (height, width), slide_id)
    with open_slide(path) as slide:
        assert slide.shape == (height, width)
        got = _streamed(slide, RLEMask(runs, (height, width)), grid)
    _assert_same(got, reference)
    assert sum(int(m.sum()) for _, m in got.values()) > 0


def test_streaming_edge_cases_match_the_reference():
    """Random small geometries: slides smaller than a tile, odd strips, every padding split."""
    rng = np.random.default_rng(0)

    class OddStrips(ArraySlide):
        def chunk_rows(self, level):
            return int(rng.integers(1, 7))

    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        size, reduce = int(rng.integers(1, 20)), int(rng.integers(1, 9))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = (rng.random((h, w)) < 0.3).astype(np.uint8)
        expected, n_tiles = reference_tiles(image, mask, size, reduce, p_th=-1)  # keep all
        grid = TileGrid(h, w, size, reduce)
        got = {}
        for row, band in iter_tile_rows(OddStrips(image), grid):
            masks = mask_band(ArrayMask(mask), grid, row)
            assert band.shape == (size, grid.n_cols * size, 3)
            for col in range(grid.n_cols):
                got[row * grid.n_cols + col] = (band[:, col * size:(col + 1) * size],
                                                masks[:, col * size:(col + 1) * size])
        assert len(got) == n_tiles
        _assert_same(got, expected)


@requires_shared
def test_band_tissue_test_equals_the_per_tile_test():
    image = mosaic_region(0, 512, 0, 2048, background_every=2)
    image[:, :300] = 0
    for size in (64, 128, 256):
        for row in range(512 // size):
            band = image[row * size:(row + 1) * size]
            columns = tissue_columns(band, size, 40, pixel_limit(200, size))
            single = [is_tissue(band[:, c * size:(c + 1) * size], 40, pixel_limit(200, size))
                      for c in range(2048 // size)]
            assert columns.tolist() == single
            assert 0 < sum(single) < len(single)


@requires_shared
@pytest.mark.parametrize("reduce, downsamples", [(1, ()), (3, ()), (4, (4,)), (3, (2,))])
def test_column_panels_give_the_same_tiles_as_full_width(tmp_path, monkeypatch, reduce, downsamples):
    """Tiling a wide slide in column panels (memory flat in width) writes the very tiles, masks
    and stats of full-width tiling: panels at odd offsets, from level 0, from a pyramid level,
    and through the non-integer resize path (reduction 3 from a 2x level)."""
    import json

    import data.tiling
    from config import load_cfg
    from data.tiler import create_tiles
    from utils.rle import rle_encode

    height, width = 1300, 3100
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    write_slide(str(wsi / "wide.tiff"), (height, width), lambda a, b, c, d, s: mosaic_region(a, b, c, d, s),
                tile=256, compression=("jpeg", 90), downsamples=downsamples)
    yy, xx = np.mgrid[:height, :width]
    mask = (((yy - 600) ** 2 + (xx - 1700) ** 2 < 400 ** 2) | ((xx // 211 + yy // 97) % 7 == 0)).astype(np.uint8)
    (tmp_path / "train.csv").write_text(f"id,encoding\nwide,{rle_encode(mask)}\n")
    common = ["DATASETS.WSI_FOLDER", str(wsi), "DATASETS.LABELS_CSV", str(tmp_path / "train.csv"),
              "INPUT.SIZE_TRAIN", "64", "INPUT.SIZE_REDUCTION_TRAIN", str(reduce), "INPUT.PIXEL_THRESHOLD", "50"]
    full = create_tiles(load_cfg(None, common + ["DATASETS.TRAIN_FOLDER", str(tmp_path / "full")]))
    monkeypatch.setattr(data.tiling, "PANEL_PIXELS", 300)
    with open_slide(str(wsi / "wide.tiff")) as slide:
        grid = TileGrid(height, width, 64, reduce)
        assert len(data.tiling.tile_panels(slide, grid)) > 2
    panels = create_tiles(load_cfg(None, common + ["DATASETS.TRAIN_FOLDER", str(tmp_path / "panels")]))
    assert json.dumps(full, sort_keys=True) == json.dumps(panels, sort_keys=True)
    for kind in ("images", "masks"):
        names = sorted(os.listdir(tmp_path / "full" / f"{kind}_64_red{reduce}"))
        assert names and names == sorted(os.listdir(tmp_path / "panels" / f"{kind}_64_red{reduce}"))
        for name in names:
            a = cv2.imread(str(tmp_path / "full" / f"{kind}_64_red{reduce}" / name), cv2.IMREAD_UNCHANGED)
            b = cv2.imread(str(tmp_path / "panels" / f"{kind}_64_red{reduce}" / name), cv2.IMREAD_UNCHANGED)
            assert (a == b).all(), name
