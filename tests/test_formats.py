"""Reading what labs scan: channels read honestly (fluorescence refused unless three channels
are picked; planar RGB still RGB); the OpenSlide backend (equal to tifffile on real slides; MRXS
and missing-package errors)."""
import numpy as np
import pytest
import tifffile

from config import load_cfg
from data.readers import OpenSlideSlide, SlideError, open_slide
from tests.conftest import requires_shared, run_script
from tests.slides import shared

_DATA = (np.random.default_rng(0).random((3, 64, 96)) * 255).astype(np.uint8)


def _qptiff_like(path):
    """Three greyscale channel pages, each with a PerkinElmer description naming its channel."""
    with tifffile.TiffWriter(str(path)) as tif:
        for i, name in enumerate(["DAPI", "FITC", "Cy5"]):
            tif.write(_DATA[i], photometric="minisblack",
                      description=f'<?xml version="1.0" encoding="utf-16"?><PerkinElmer-QPI-ImageDescription>'
                                  f"<ImageType>FullResolution</ImageType><Name>{name}</Name>"
                                  "</PerkinElmer-QPI-ImageDescription>")
    return str(path)


def test_fluorescence_channels_are_refused_naming_them(tmp_path):
    planes = np.concatenate([_DATA, _DATA[:2]])  # 5 unnamed greyscale planes
    tifffile.imwrite(str(tmp_path / "planes.tif"), planes, photometric="minisblack", metadata={"axes": "CYX"})
    with pytest.raises(SlideError, match=r"planes.tif: 5 channels, each greyscale \(0: channel 0, 1: channel 1, "
                                         r"2: channel 2, 3: channel 3, 4: channel 4\): a fluorescence .* set "
                                         r"INPUT.CHANNELS"):
        open_slide(str(tmp_path / "planes.tif"))
    tifffile.imwrite(str(tmp_path / "f.ome.tif"), _DATA, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "FITC", "Cy5"]}})
    with pytest.raises(SlideError, match=r"f.ome.tif: 3 channels, each greyscale \(0: DAPI, 1: FITC, 2: Cy5\)"):
        open_slide(str(tmp_path / "f.ome.tif"))
    with pytest.raises(SlideError, match=r"qp.tif: 3 channels stored as separate greyscale images \(DAPI, FITC, "
                                         r"Cy5\)"):
        open_slide(_qptiff_like(tmp_path / "qp.tif"))
    # 3 unnamed greyscale planes are the (1, 1, 3, H, W) layout of HuBMAP slides: RGB, with a warning
    tifffile.imwrite(str(tmp_path / "hubmap.tif"), _DATA[None, None], photometric="minisblack")
    with open_slide(str(tmp_path / "hubmap.tif")) as slide:
        assert (slide.read_level(0, 0, 0, 64, 96) == _DATA.transpose(1, 2, 0)).all()


def test_three_picked_channels_read_as_rgb_and_planar_rgb_stays_rgb(tmp_path):
    tifffile.imwrite(str(tmp_path / "f.ome.tif"), _DATA, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "FITC", "Cy5"]}})
    with open_slide(str(tmp_path / "f.ome.tif"), channels=(2, 0, 1)) as slide:
        assert (slide.read_level(0, 0, 0, 64, 96) == _DATA[[2, 0, 1]].transpose(1, 2, 0)).all()
    with pytest.raises(SlideError, match=r"INPUT.CHANNELS \[0, 1, 5\]: expected three indices among 0: DAPI"):
        open_slide(str(tmp_path / "f.ome.tif"), channels=(0, 1, 5))
    tifffile.imwrite(str(tmp_path / "planar.tif"), _DATA, photometric="rgb", planarconfig="separate")
    with open_slide(str(tmp_path / "planar.tif")) as slide:  # (3, H, W) RGB, as some HuBMAP slides
        assert (slide.read_level(0, 0, 0, 64, 96) == _DATA.transpose(1, 2, 0)).all()
    with pytest.raises(ValueError, match="INPUT.CHANNELS must be empty or three channel indices"):
        load_cfg(None, ["INPUT.CHANNELS", "[0, 1]"])


def test_tiles_creator_refuses_a_fluorescence_slide_with_one_line(tmp_path):
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    big = np.repeat(np.repeat(_DATA, 8, axis=1), 8, axis=2)  # (3, 512, 768)
    tifffile.imwrite(str(wsi / "vectra.tif"), big, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "FITC", "Cy5"]}}, ome=True)
    (tmp_path / "train.csv").write_text("id,encoding\nvectra,\n")
    out = tmp_path / "tiles"
    args = ["DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", tmp_path / "train.csv", "INPUT.SIZE_TRAIN", 64,
            "INPUT.SIZE_REDUCTION_TRAIN", 2, "DATASETS.TRAIN_FOLDER", out]
    result = run_script("tiles_creator.py", *args)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "vectra.tif: 3 channels, each greyscale (0: DAPI, 1: FITC, 2: Cy5)" in errors[0]
    assert not out.exists() or not list(out.rglob("*.png"))
    picked = run_script("tiles_creator.py", *args, "INPUT.CHANNELS", "[0, 1, 2]")
    assert picked.returncode == 0 and "DAPI, FITC, Cy5 read as R, G, B" in picked.stderr


# --- OpenSlide ----------------------------------------------------------------------------------
@requires_shared
@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "openslide-python-small.svs"])
def test_openslide_reads_equal_tifffile_reads_region_by_region(name):
    """Every level, the whole level and 20 random regions (some past the edge): the same pixels,
    levels and pixel size from both readers (Aperio JPEG and JPEG 2000)."""
    path = shared("wsi", name)
    rng = np.random.default_rng(0)
    with open_slide(path, backend="tifffile") as ours, open_slide(path, backend="openslide") as theirs:
        assert isinstance(theirs, OpenSlideSlide) and ours.levels == theirs.levels
        assert (ours.pixel_size is None) == (theirs.pixel_size is None)
        if ours.pixel_size:
            assert ours.pixel_size.mpp == theirs.pixel_size.mpp
        for level, info in enumerate(ours.levels):
            h, w = info.shape
            assert (ours.read_level(level, 0, 0, h, w) == theirs.read_level(level, 0, 0, h, w)).all()
            if not float(info.downsample).is_integer():
                # OpenSlide addresses regions in level-0 pixels: on a 2.0005x level most origins fall
                # between two pixels and it draws the region shifted by the fraction (interpolated)
                continue
            for _ in range(30):
                y, x = int(rng.integers(-20, h)), int(rng.integers(-20, w))
                rh, rw = int(rng.integers(1, 300)), int(rng.integers(1, 300))
                assert (ours.read_level(level, y, x, rh, rw) == theirs.read_level(level, y, x, rh, rw)).all()
        a, b = ours.read(100, 50, 400, 600, 3.5), theirs.read(100, 50, 400, 600, 3.5)  # as the tiler reads
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.1


@requires_shared
def test_openslide_cannot_read_the_stripped_tiff_and_says_so():
    """OpenSlide's generic TIFF needs tiles: the stripped kidney TIFF stays with tifffile."""
    path = shared("wsi", "kidney-48-5.tif")
    with pytest.raises(SlideError, match="kidney-48-5.tif: not a slide format OpenSlide knows"):
        open_slide(path, backend="openslide")
    with open_slide(path) as slide:  # auto: tifffile
        assert not isinstance(slide, OpenSlideSlide)


@requires_shared
def test_the_corrupt_svs_is_refused_by_both_readers():
    """The last file of ../shared/data/wsi: corrupt, for tifffile and for OpenSlide alike."""
    path = shared("wsi", "histolab-broken.svs")
    for backend in ("tifffile", "openslide", "auto"):
        with pytest.raises(SlideError, match=r"histolab-broken.svs: "):
            open_slide(path, backend=backend)


def test_mrxs_without_its_data_folder_is_one_error_line(tmp_path):
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    (wsi / "biopsy.mrxs").write_bytes(b"MRXS without its data folder")
    with pytest.raises(SlideError, match=r"biopsy.mrxs: MRXS without its data folder \(.*biopsy/Slidedat.ini not "
                                         r"found"):
        open_slide(str(wsi / "biopsy.mrxs"))
    (tmp_path / "broken").mkdir()  # a data folder whose Slidedat.ini is not one: OpenSlide's own error
    (tmp_path / "broken.mrxs").write_bytes(b"x")
    (tmp_path / "broken" / "Slidedat.ini").write_text("not an index")
    with pytest.raises(SlideError, match=r"broken.mrxs: (not a slide format OpenSlide knows|OpenSlide cannot read)"):
        open_slide(str(tmp_path / "broken.mrxs"))
    (tmp_path / "train.csv").write_text("id,encoding\nbiopsy,\n")
    out = tmp_path / "tiles"
    result = run_script("tiles_creator.py", "DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", tmp_path / "train.csv",
                        "DATASETS.TRAIN_FOLDER", out)
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode != 0 and len(errors) == 1 and "biopsy.mrxs: MRXS without" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists() or [p.name for p in out.rglob("*") if p.is_file()] == ["log.txt"]


def test_a_missing_openslide_names_the_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(SlideError, match=r"x.mrxs: reading this format needs OpenSlide: python -m pip install "
                                         r"openslide-python openslide-bin"):
        open_slide(str(tmp_path / "x.mrxs"))
    with pytest.raises(ValueError, match="INPUT.SLIDE_READER must be one of"):
        load_cfg(None, ["INPUT.SLIDE_READER", "bioformats"])
