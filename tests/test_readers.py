"""The reader contract, for every backend on slides generated here (no ../shared needed):
pixels without data read as NO_DATA (past the edge, missing tiles of a sparse TIFF, OpenSlide's
transparent pixels), every reader reads column strips (so wide slides are tiled in column
panels, with the very tiles of full-width tiling), and a DICOM WSI built from generated pixels
reads back exactly."""
import numpy as np
import pytest
import tifffile

import data.tiling
from data.readers import NO_DATA, ArraySlide, DicomSlide, OpenSlideSlide, ResampledSlide, TiffSlide, open_slide
from data.tiling import TileGrid, iter_tile_rows, tile_panels
from tests.dicom_slides import dicomize
from tests.slides import write_slide

TILE = 128
H, W = 3 * TILE, 5 * TILE
MISSING = (1, 2)  # (tile row, tile column) stored without data


def _pixels():
    rng = np.random.default_rng(7)
    image = rng.integers(1, 255, (H, W, 3), dtype=np.uint8)  # never 0: a 0 read is "no data"
    image[:, : W // 2] = np.maximum(image[:, : W // 2] // 2, 1)
    return image


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    image = _pixels()

    def tiles():
        for r in range(H // TILE):
            for c in range(W // TILE):
                yield None if (r, c) == MISSING else image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]

    sparse = str(root / "sparse.tif")
    with tifffile.TiffWriter(sparse) as tif:
        tif.write(tiles(), shape=(H, W, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", compression="zlib",
                  resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    dense = write_slide(str(root / "dense.tif"), (H, W), lambda a, b, c, d, s: image[a:b, c:d], tile=TILE,
                        compression="zlib", mpp=0.5)
    dicomize(dense, str(root / "dicom"), mpp=0.5, lossless=True)
    expected = image.copy()
    r, c = MISSING
    expected[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = NO_DATA
    return {"sparse": sparse, "dense": dense, "dicom": str(root / "dicom"), "image": image, "expected": expected}


def _readers(slides):
    """``(name, open slide, its expected level-0 pixels)`` for every backend."""
    yield "tifffile", open_slide(slides["sparse"], backend="tifffile"), slides["expected"]
    yield "openslide", open_slide(slides["sparse"], backend="openslide"), slides["expected"]
    yield "memory", ArraySlide(slides["expected"]), slides["expected"]
    yield "resampled", ResampledSlide(open_slide(slides["sparse"], backend="tifffile"), 1.0), slides["expected"]
    yield "wsidicom", open_slide(slides["dicom"]), slides["image"]


def test_the_backends_are_the_ones_asked_for(slides):
    kinds = {name: type(slide).__name__ for name, slide, _ in _readers(slides)}
    assert kinds == {"tifffile": TiffSlide.__name__, "openslide": OpenSlideSlide.__name__, "memory": "ArraySlide",
                     "resampled": "ResampledSlide", "wsidicom": DicomSlide.__name__}


def test_pixels_without_data_read_as_no_data_in_every_reader(slides):
    assert NO_DATA == 0
    for name, slide, expected in _readers(slides):
        with slide:
            whole = slide.read_level(0, 0, 0, H, W)
            assert np.array_equal(whole, expected), name  # missing tiles: NO_DATA (DICOM has none)
            around = slide.read_level(0, -5, -7, H + 10, W + 14)  # past every edge
            assert (around[:5] == NO_DATA).all() and (around[:, :7] == NO_DATA).all(), name
            assert (around[-5:] == NO_DATA).all() and (around[:, -7:] == NO_DATA).all(), name
            assert np.array_equal(around[5:-5, 7:-7], expected), name


def test_a_resampled_sparse_slide_keeps_no_data_where_the_tile_is_missing(slides):
    with ResampledSlide(open_slide(slides["sparse"]), 2.0) as half:
        r, c = MISSING
        inner = half.read_level(0, r * TILE // 2 + 4, c * TILE // 2 + 4, TILE // 2 - 8, TILE // 2 - 8)
        assert (inner == NO_DATA).all()
        assert half.chunk_cols(0) == TILE // 2  # the base's tiles, at its scale


@pytest.mark.parametrize("x0, x1", [(0, 100), (130, 390), (W - 77, W)])
def test_every_reader_reads_column_strips(slides, x0, x1):
    for name, slide, expected in _readers(slides):
        with slide:
            assert 1 <= slide.chunk_cols(0) < W, name  # so a wide slide is tiled in column panels
            rows = [strip for _, strip in slide.iter_strips(0, min_rows=64, cols=(x0, x1))]
            assert np.array_equal(np.concatenate(rows), expected[:, x0:x1]), name


def test_every_reader_is_tiled_in_column_panels_with_the_tiles_of_full_width_tiling(slides, monkeypatch):
    monkeypatch.setattr(data.tiling, "PANEL_PIXELS", 150)  # panels of 2 tiles of 64 px at reduction 1
    for name, slide, _ in _readers(slides):
        with slide:
            grid = TileGrid(H, W, 64, 1)
            panels = tile_panels(slide, grid)
            assert len(panels) > 2, name
            full = np.concatenate([band for _, band in iter_tile_rows(slide, grid)])
            for c0, c1 in panels:
                part = np.concatenate([band for _, band in iter_tile_rows(slide, grid, (c0, c1))])
                assert np.array_equal(part, full[:, c0 * 64:c1 * 64]), (name, c0, c1)


def test_a_dicom_wsi_of_generated_pixels_reads_back_exactly(slides):
    with open_slide(slides["dicom"]) as dicom, open_slide(slides["dense"]) as tiff:
        assert isinstance(dicom, DicomSlide) and dicom.shape == tiff.shape == (H, W)
        assert dicom.pixel_size.mpp == pytest.approx(0.5) and dicom.pixel_size.source == "DICOM PixelSpacing"
        assert np.array_equal(dicom.read_level(0, 0, 0, H, W), slides["image"])
        assert np.array_equal(dicom.read(10, 20, 200, 300, 2.0), tiff.read(10, 20, 200, 300, 2.0))
