
import cv2
import numpy as np
import pytest
import tifffile

from data.readers import ArraySlide, SlideError, open_slide, read_image
from tests.conftest import requires_shared
from tests.slides import mosaic_region, shared, write_slide

# name: (height, width, number of levels)
REAL_SLIDES = {
    "CMU-1-Small-Region.svs": (2967, 2220, 1),
    "tcga-cr-7395-01a-01-ts1.svs": (3567, 4443, 2),
    "kidney-48-5.tif": (901, 1493, 1),
    "openslide-python-small.svs": (16, 16, 1),
}


@requires_shared
@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_real_slides_sizes_levels_and_regions(name):
    height, width, n_levels = REAL_SLIDES[name]
    with open_slide(shared("wsi", name)) as slide:
        assert slide.shape == (height, width)
        assert len(slide.levels) == n_levels
        full = slide.read_level(0, 0, 0, height, width)
        assert full.shape == (height, width, 3) and full.dtype == np.uint8
        assert full.std() > 5  # real pixels, not a blank
        rng = np.random.default_rng(1)
        for _ in range(5):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            h, w = int(rng.integers(1, 300)), int(rng.integers(1, 300))
            region = slide.read_level(0, y, x, h, w)
            expected = np.zeros((h, w, 3), np.uint8)
            crop = full[y:y + h, x:x + w]
            expected[:crop.shape[0], :crop.shape[1]] = crop  # outside the slide reads 0
            assert (region == expected).all()
        # negative origins read as zero padding
        region = slide.read_level(0, -3, -4, 10, 10)
        assert (region[:3] == 0).all() and (region[:, :4] == 0).all()
        assert (region[3:, 4:] == full[:7, :6]).all()
        # strips cover every row once and equal the full read
        rows = [strip for _, strip in slide.iter_strips(0)]
        assert (np.concatenate(rows) == full).all()
        rows = [strip.copy() for _, strip in slide.iter_strips(0, min_rows=100, reuse_buffer=True)]
        assert (np.concatenate(rows) == full).all()
        # column panels: any columns, inside or across tile borders, contiguous strips
        for x0, x1 in ((0, 1), (1, width // 3), (width // 3, width - 1), (width - 5, width)):
            rows = []
            for _, strip in slide.iter_strips(0, reuse_buffer=True, cols=(x0, x1)):
                assert strip.flags.c_contiguous and strip.shape[1] == x1 - x0
                rows.append(strip.copy())
            assert (np.concatenate(rows) == full[:, x0:x1]).all(), (x0, x1)


@requires_shared
def test_pyramid_level_is_used_for_a_downscale():
    with open_slide(shared("wsi", "tcga-cr-7395-01a-01-ts1.svs")) as slide:
        assert slide.levels[1].downsample == pytest.approx(2.0, rel=1e-3)
        assert slide.best_level(1.5) == 0 and slide.best_level(2) == 1 and slide.best_level(8) == 1
        h1, w1 = slide.levels[1].shape
        level1 = slide.read_level(1, 0, 0, h1, w1)
        region = slide.read(0, 0, 2000, 2400, downscale=4)
        assert region.shape == (500, 600, 3)
        expected = cv2.resize(level1[:1000, :1200], (600, 500), interpolation=cv2.INTER_AREA)
        assert np.abs(region.astype(int) - expected).max() <= 1


@requires_shared
def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    broken = shared("wsi", "histolab-broken.svs")
    with pytest.raises(SlideError) as info:
        open_slide(broken)
    assert broken in str(info.value) and "not a TIFF" in str(info.value)
    data = open(shared("wsi", "CMU-1-Small-Region.svs"), "rb").read()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideError) as info:
        open_slide(str(truncated))
    assert str(truncated) in str(info.value) and "truncated" in str(info.value)
    with pytest.raises(SlideError, match="file not found"):
        open_slide(str(tmp_path / "absent.tiff"))


RGB = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "name, data, kwargs",
    [
        ("hubmap5d.tif", RGB.transpose(2, 0, 1)[None, None], dict(photometric="minisblack")),
        ("planar.tif", RGB.transpose(2, 0, 1), dict(photometric="rgb", planarconfig="separate")),
        ("contig.tif", RGB, dict(photometric="rgb")),
        ("tiled.tif", RGB, dict(photometric="rgb", tile=(32, 32), compression="zlib")),
        ("ome.ome.tif", RGB.transpose(2, 0, 1)[None], dict(photometric="minisblack", metadata={"axes": "ZCYX"})),
        ("rgba.tif", np.dstack([RGB, np.full((70, 90), 9, np.uint8)]), dict(photometric="rgb", extrasamples=["unassalpha"])),
    ],
)
def test_layouts_read_as_rgb(tmp_path, name, data, kwargs):
    path = str(tmp_path / name)
    tifffile.imwrite(path, data, **kwargs)
    with open_slide(path) as slide:
        assert slide.shape == (70, 90)
        assert (slide.read_level(0, 0, 0, 70, 90) == RGB).all()
        assert (slide.read_level(0, 10, 20, 5, 7) == RGB[10:15, 20:27]).all()


def test_grayscale_is_converted(tmp_path):
    path = str(tmp_path / "gray.tif")
    tifffile.imwrite(path, RGB[..., 1])
    with open_slide(path) as slide:
        region = slide.read_level(0, 0, 0, 70, 90)
    assert (region == RGB[..., 1:2]).all() and region.shape == (70, 90, 3)


@pytest.mark.parametrize(
    "data, kwargs, needle",
    [
        (RGB.astype(np.uint16) * 250, dict(photometric="rgb"), "unsupported bit depth uint16"),
        (RGB.astype(np.float32), dict(photometric="rgb"), "unsupported bit depth float32"),
        (np.zeros((5, 70, 90), np.uint8), dict(photometric="minisblack", metadata={"axes": "CYX"}), "5 channels"),
        (np.zeros((4, 70, 90), np.uint8), dict(photometric="minisblack", metadata={"axes": "CYX"}), "multi-channel"),
        (np.zeros((3, 70, 90, 3), np.uint8), dict(photometric="rgb"), "3 planes"),
    ],
)
def test_unsupported_images_are_refused(tmp_path, data, kwargs, needle):
    path = str(tmp_path / "bad.tif")
    tifffile.imwrite(path, data, **kwargs)
    with pytest.raises(SlideError) as info:
        open_slide(path)
    assert path in str(info.value) and needle in str(info.value)


@requires_shared
def test_generated_pyramid_jpeg_slide(tmp_path):
    path = str(tmp_path / "pyramid.tiff")
    write_slide(path, (3000, 2600), mosaic_region, tile=256, compression=("jpeg", 90), downsamples=(4, 16))
    with open_slide(path) as slide:
        assert [lv.shape for lv in slide.levels] == [(3000, 2600), (750, 650), (187, 162)]
        assert slide.best_level(4) == 1 and slide.best_level(16) == 2 and slide.best_level(15) == 1
        assert slide.chunk_rows(0) == 256
        region = slide.read(0, 0, 2048, 2048, downscale=16)
        truth = cv2.resize(mosaic_region(0, 2048, 0, 2048), (128, 128), interpolation=cv2.INTER_AREA)
        assert region.shape == (128, 128, 3)
        assert np.abs(region.astype(int) - truth).mean() < 4  # JPEG loss only


def test_array_slide_and_read_image(tmp_path):
    slide = ArraySlide(RGB)
    assert (slide.read(0, 0, 70, 90, 1) == RGB).all()
    assert slide.read(0, 0, 70, 90, 2).shape == (35, 45, 3)
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    assert (read_image(str(png)) == RGB).all()
    cv2.imwrite(str(png), (RGB.astype(np.uint16) * 200))
    with pytest.raises(SlideError, match="bit depth uint16"):
        read_image(str(png))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(SlideError, match="not a readable image"):
        read_image(str(tmp_path / "junk.png"))
