"""DICOM WSI: real slides converted at test time with wsidicomizer read back equal to the
originals (exactly for the lossless copy, within JPEG tolerance for the JPEG ones); the tiler and
test_net on the DICOM copies give the originals' tiles and masks; the DICOM Segmentation output
reads back (highdicom) equal to the RLE; a DICOM file that is not a slide, a fluorescence DICOM
and a missing wsidicom each give one clear error (the scripts' one-line errors for a DICOM that
is not a slide: tests/test_bad_input.py)."""
import csv
import glob
import json
import os
import sys

import cv2
import numpy as np
import pytest
import tifffile

from config import load_cfg
from data.readers.dicom import DicomSlide, is_dicom_folder
from data.sources import slide_entries
from data.tiler import create_tiles
from data.readers import SlideError, open_slide
from model.prediction import predict_slides
from tests.blob_model import save_blob_checkpoint
from tests.conftest import requires_shared
from tests.dicom_slides import dicomize, write_ct, write_fluorescence
from tests.slides import shared
from utils.rle import parse_rle, rle_decode, rle_encode

AIDPATH = "10003"  # one real PAS biopsy crop (0.5 um/px) with its glomerulus mask


def _aidpath():
    image = cv2.cvtColor(cv2.imread(shared("aidpath", "images", f"{AIDPATH}.png")), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(shared("aidpath", "masks", f"{AIDPATH}.png"), cv2.IMREAD_GRAYSCALE) > 0
    return image, mask.astype(np.uint8)


def _jpeg_q90(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` after a JPEG round trip at wsidicomizer's settings (quality 90, 4:2:2), as int."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [
        cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(int)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """``tiff/``: a real PAS biopsy as TIFF (the original); ``dicom/``: wsidicomizer copies of it
    and of two real slides of ../shared: ``biopsy/`` (3 levels, JPEG), ``kidney/`` (3 levels,
    JPEG-LS lossless) and ``cmu.dcm`` (the CMU-1 SVS as one file, JPEG)."""
    if not os.path.isdir(shared("aidpath")):
        pytest.skip("needs the real slides in ../shared/data")
    root = tmp_path_factory.mktemp("dicom")
    tiff, dicom = root / "tiff", root / "dicom"
    tiff.mkdir()
    image, mask = _aidpath()
    tifffile.imwrite(str(tiff / "biopsy.tif"), image, photometric="rgb", tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    dicomize(str(tiff / "biopsy.tif"), str(dicom / "biopsy"), add_levels=True)
    dicomize(shared("wsi", "kidney-48-5.tif"), str(dicom / "kidney"), mpp=0.5, add_levels=True, lossless=True)
    (file,) = dicomize(shared("wsi", "CMU-1-Small-Region.svs"), str(root / "cmu"))
    os.replace(file, dicom / "cmu.dcm")
    (root / "labels.csv").write_text(f"id,encoding\nbiopsy,{rle_encode(mask)}\n")
    return root


@requires_shared
def test_dicom_copies_read_back_equal_to_the_originals(copies):
    dicom = copies / "dicom"
    assert slide_entries(str(dicom)) == [("biopsy", str(dicom / "biopsy")), ("cmu", str(dicom / "cmu.dcm")),
                                         ("kidney", str(dicom / "kidney"))]
    pairs = [("cmu.dcm", shared("wsi", "CMU-1-Small-Region.svs"), 0.499),
             ("kidney", shared("wsi", "kidney-48-5.tif"), 0.5), ("biopsy", str(copies / "tiff" / "biopsy.tif"), 0.5)]
    rng = np.random.default_rng(0)
    for name, original, mpp in pairs:
        with open_slide(str(dicom / name)) as ours, open_slide(original) as theirs:
            assert isinstance(ours, DicomSlide) and ours.shape == theirs.shape
            assert ours.pixel_size.mpp == pytest.approx(mpp) and ours.pixel_size.source == "DICOM PixelSpacing"
            h, w = ours.shape
            a, b = ours.read_level(0, 0, 0, h, w).astype(int), theirs.read_level(0, 0, 0, h, w).astype(int)
            if name == "kidney":  # JPEG-LS lossless: the very pixels
                assert (a == b).all()
            else:  # re-encoded as JPEG (quality 90, 4:2:2): within the error of such an encoding
                reference = np.abs(_jpeg_q90(b.astype(np.uint8)) - b).mean()
                assert np.abs(a - b).mean() <= 1.5 * reference + 0.2, (name, np.abs(a - b).mean(), reference)
            # pyramid levels (made by wsidicomizer: its own filter, JPEG again) are the level-0
            # image downscaled, aligned: closer to it than to its one-pixel shifts
            for level, info in enumerate(ours.levels[1:], start=1):
                assert info.downsample == pytest.approx(2**level, rel=0.01)
                lh, lw = info.shape
                got = ours.read_level(level, 0, 0, lh, lw).astype(int)[1:-1, 1:-1]
                want = cv2.resize(b.astype(np.uint8), (lw, lh), interpolation=cv2.INTER_AREA).astype(int)
                error = np.abs(got - want[1:-1, 1:-1]).mean()
                shifted = min(np.abs(got - want[1 + dy:lh - 1 + dy, 1 + dx:lw - 1 + dx]).mean()
                              for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)))
                assert error < 6 and error < shifted, (name, level, error, shifted)
            # regions (some past the edge) are crops of the whole level; outside reads black
            whole = ours.read_level(0, 0, 0, h, w)
            for _ in range(10):
                y, x = int(rng.integers(-30, h)), int(rng.integers(-30, w))
                rh, rw = int(rng.integers(1, 400)), int(rng.integers(1, 400))
                padded = np.zeros((h + 460, w + 460, 3), np.uint8)
                padded[30:30 + h, 30:30 + w] = whole
                assert (ours.read_level(0, y, x, rh, rw) == padded[y + 30:y + 30 + rh, x + 30:x + 30 + rw]).all()


@requires_shared
def test_tiler_on_the_dicom_copy_gives_the_tiffs_tiles(copies):
    """Same tile names and masks as the TIFF original; images within JPEG tolerance."""
    out = {}
    for kind in ("tiff", "dicom"):  # dicom/ also holds unlabelled slides: not tiled
        cfg = load_cfg(None, ["DATASETS.WSI_FOLDER", str(copies / kind), "DATASETS.LABELS_CSV", str(copies / "labels.csv"),
                              "DATASETS.TRAIN_FOLDER", str(copies / f"tiles_{kind}"), "INPUT.SIZE_TRAIN", "128",
                              "INPUT.SIZE_REDUCTION_TRAIN", "2"])
        stats = create_tiles(cfg)
        out[kind] = copies / f"tiles_{kind}"
        assert stats["n_slides"] == 1
    images = {k: sorted(os.listdir(v / "images_128_red2")) for k, v in out.items()}
    assert images["dicom"] == images["tiff"] and len(images["tiff"]) >= 10
    errors = []
    for name in images["tiff"]:
        a, b = (cv2.imread(str(out[k] / "masks_128_red2" / name)) for k in ("tiff", "dicom"))
        assert (a == b).all(), name
        # the DICOM copy is read from its level 1 (wsidicomizer's own downscale filter, JPEG
        # again), the TIFF from level 0 and reduced with INTER_AREA: 5-6 grey levels apart on tissue
        a, b = (cv2.imread(str(out[k] / "images_128_red2" / name)).astype(int) for k in ("tiff", "dicom"))
        errors.append(np.abs(a - b).mean())
    assert max(errors) < 8 and np.mean(errors) < 6, errors
    stats = json.load(open(out["dicom"] / "stats_128_red2.json"))
    assert stats["tile_mpp"] == pytest.approx(1.0)  # 0.5 um/px (DICOM PixelSpacing) x 2


@requires_shared
def test_test_net_on_the_dicom_copies_and_its_dicom_segmentation(copies):
    """test_net predicts the DICOM folder and file slides as it predicts the TIFF original (same
    objects, Dice against each other > 0.97); each DICOM Segmentation reads back with highdicom
    equal to the slide's RLE and references the slide's level-0 instance."""
    import highdicom as hd
    import pydicom

    save_blob_checkpoint(copies / "model.pth", size=64, reduce=4, mpp=2.0)
    common = ["TEST.MODEL_WEIGHTS_FOLDER", str(copies / "model.pth"), "TEST.SIZE", "64", "TEST.TH", "0.5",
              "MODEL.DEVICE", "cpu", "TEST.LABELS_CSV", str(copies / "labels.csv")]
    dicom_summary = predict_slides(load_cfg(None, ["TEST.WSI_FOLDER", str(copies / "dicom"), "OUTPUT_DIR",
                                                   str(copies / "pred_dicom"), "TEST.DICOM_SEG", "True", *common]))
    tiff_summary = predict_slides(load_cfg(None, ["TEST.WSI_FOLDER", str(copies / "tiff"), "OUTPUT_DIR",
                                                  str(copies / "pred_tiff"), *common]))
    predicted = {}
    for kind in ("dicom", "tiff"):
        with open(copies / f"pred_{kind}" / "submission.csv", newline="") as f:
            predicted[kind] = {row["id"]: row["predicted"] for row in csv.DictReader(f)}
    assert sorted(predicted["dicom"]) == ["biopsy", "cmu", "kidney"]
    shape = (1024, 1024)
    a, b = (rle_decode(predicted[k]["biopsy"], shape).astype(bool) for k in ("dicom", "tiff"))
    assert a.sum() > 1000 and 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97
    for kind, summary in (("dicom", dicom_summary), ("tiff", tiff_summary)):
        assert summary["per_slide"]["biopsy"]["mpp"] == pytest.approx(0.5)
    assert dicom_summary["per_slide"]["biopsy"]["objects"] == tiff_summary["per_slide"]["biopsy"]["objects"]
    assert dicom_summary["per_slide"]["cmu"]["mpp"] == pytest.approx(0.499)
    for slide_id in ("biopsy", "cmu", "kidney"):
        path = copies / "pred_dicom" / "predictions" / f"{slide_id}.seg.dcm"
        seg = hd.seg.segread(str(path))
        source = DicomSlide(str(copies / "dicom" / (slide_id + (".dcm" if slide_id == "cmu" else ""))))
        h, w = source.shape
        pixels = seg.get_total_pixel_matrix(combine_segments=True)
        truth = rle_decode(parse_rle(predicted["dicom"][slide_id], (h, w)), (h, w))
        assert pixels.shape == (h, w) and (pixels.astype(bool) == truth.astype(bool)).all(), slide_id
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        level0 = pydicom.dcmread(source.volume_file, stop_before_pixels=True)
        assert referenced == level0.SOPInstanceUID
        assert seg.StudyInstanceUID == level0.StudyInstanceUID and seg.SegmentSequence[0].SegmentLabel == "Glomerulus"
        source.close()
    assert not glob.glob(str(copies / "pred_tiff" / "predictions" / "*.dcm"))


@requires_shared
def test_an_empty_prediction_is_an_empty_dicom_segmentation(copies, tmp_path):
    import highdicom as hd

    from utils.dicom_seg import write_segmentation

    with DicomSlide(str(copies / "dicom" / "kidney")) as slide:
        frames = write_segmentation(slide.volume_file, parse_rle("", slide.shape), slide.shape, str(tmp_path / "e.dcm"))
        pixels = hd.seg.segread(str(tmp_path / "e.dcm")).get_total_pixel_matrix(combine_segments=True)
        assert frames == 0 and pixels.shape == slide.shape and not pixels.any()


# --- bad input --------------------------------------------------------------------------------
def test_a_dicom_file_that_is_not_a_slide_is_refused(tmp_path):
    write_ct(str(tmp_path / "ct.dcm"))
    with pytest.raises(SlideError, match=r"ct.dcm: a DICOM file but not a whole-slide image \(modality CT, "
                                         r"CT Image Storage\)"):
        open_slide(str(tmp_path / "ct.dcm"))
    series = tmp_path / "series"
    series.mkdir()
    write_ct(str(series / "IM0001"))  # no extension: found by the DICM preamble
    assert is_dicom_folder(str(series))
    with pytest.raises(SlideError, match=r"IM0001: a DICOM file but not a whole-slide image"):
        open_slide(str(series))
    (tmp_path / "notes").mkdir()  # a folder without DICOM files is no slide
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert slide_entries(str(tmp_path)) == [("ct", str(tmp_path / "ct.dcm")), ("series", str(series))]
    with pytest.raises(SlideError, match="a folder without DICOM files"):
        open_slide(str(tmp_path / "notes"), backend="wsidicom")


@requires_shared
def test_a_fluorescence_dicom_is_refused_naming_its_channel(tmp_path):
    (file,) = dicomize(shared("wsi", "CMU-1-Small-Region.svs"), str(tmp_path / "cmu"))
    write_fluorescence(file, str(tmp_path / "dapi.dcm"), "DAPI")
    with pytest.raises(SlideError, match=r"dapi.dcm: DICOM WSI with greyscale optical paths \(DAPI\): a "
                                         r"fluorescence slide"):
        open_slide(str(tmp_path / "dapi.dcm"))
    with pytest.raises(SlideError, match="INPUT.CHANNELS is for multi-channel TIFF slides, not DICOM's"):
        open_slide(file, channels=(0, 1, 2))


def test_a_missing_wsidicom_names_the_package(tmp_path, monkeypatch):
    write_ct(str(tmp_path / "x.dcm"))
    monkeypatch.setitem(sys.modules, "wsidicom", None)
    with pytest.raises(SlideError, match=r"x.dcm: reading DICOM WSI needs wsidicom: python -m pip install wsidicom"):
        open_slide(str(tmp_path / "x.dcm"))


def test_two_slides_with_one_id_are_an_error(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "a").mkdir()
    write_ct(str(tmp_path / "a" / "x.dcm"))
    with pytest.raises(ValueError, match=r"two slides for id 'a': a and a.tif"):
        slide_entries(str(tmp_path))

