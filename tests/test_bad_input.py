"""The three scripts fed bad input as a user would (subprocesses): one ``ERROR`` line naming the
file or key and the problem, a non-zero exit, no traceback, nothing half-written and the
outputs of an earlier good run untouched. Input that can be handled (RGBA, grayscale, a
missing optional row, a slide smaller than a tile) is handled, with a warning."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import tifffile
import torch

from data.sample import SampleSpec, draw_slide, write_pyramid
from model.build import build_model
from model.checkpoint import save_checkpoint
from tests.conftest import run_script
from tests.dicom_slides import write_ct
from tests.slides import has_shared, shared
from utils.rle import rle_encode

SPEC = {"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}


def _tree(folder):
    """Every file under ``folder`` (bytes), the append-only log.txt aside."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name != "log.txt":
                path = os.path.join(root, name)
                out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _checkpoint(path, spec=SPEC, reduce=4, size=64):
    torch.manual_seed(0)
    save_checkpoint(str(path), build_model(spec), {
        "model": spec, "input": {"size": size, "reduce": reduce, "mean": [0.8, 0.7, 0.8], "std": [0.15, 0.2, 0.12]},
        "threshold": 0.5, "fold": 0, "metrics": {}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two small generated slides with labels, and the outputs of a good run of each script."""
    root = tmp_path_factory.mktemp("bad_input")
    wsi = root / "wsi"
    wsi.mkdir()
    rows = []
    for spec in (SampleSpec("s1", "x", 1024, 1280, 11), SampleSpec("s2", "x", 1152, 1024, 12)):
        image, mask = draw_slide(spec)
        write_pyramid(str(wsi / f"{spec.slide_id}.tiff"), image)
        rows.append(f"{spec.slide_id},{rle_encode(mask)}\n")
    (root / "train.csv").write_text("id,encoding\n" + "".join(rows))
    models = root / "models"
    models.mkdir()
    _checkpoint(models / "a.pth")
    for script, args in (("tiles_creator.py", _tiles_args(root)), ("train_net.py", _train_args(root)),
                         ("test_net.py", _test_args(root))):
        result = run_script(script, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def _tiles_args(root, *extra):
    return ["DATASETS.WSI_FOLDER", root / "wsi", "DATASETS.LABELS_CSV", root / "train.csv",
            "DATASETS.TRAIN_FOLDER", root / "tiles", "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 4, *extra]


def _train_args(root, *extra):
    return ["DATASETS.TRAIN_FOLDER", root / "tiles", "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 4,
            "MODEL.ARCHITECTURE", "Unet", "MODEL.ENCODER_NAME", "resnet18", "MODEL.ENCODER_WEIGHTS", "",
            "SOLVER.N_FOLDS", 2, "SOLVER.FOLDS", "[0]", "SOLVER.MAX_EPOCHS", 1, "SOLVER.IMS_PER_BATCH", 8,
            "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", root / "trained", *extra]


def _test_args(root, *extra):
    return ["TEST.WSI_FOLDER", root / "wsi", "TEST.MODEL_WEIGHTS_FOLDER", root / "models", "TEST.SIZE", 64,
            "TEST.LABELS_CSV", root / "train.csv", "OUTPUT_DIR", root / "predicted", *extra]


OUTPUTS = {"tiles_creator.py": "tiles", "train_net.py": "trained", "test_net.py": "predicted"}
ARGS = {"tiles_creator.py": _tiles_args, "train_net.py": _train_args, "test_net.py": _test_args}


def _write(path, data, **kwargs):
    tifffile.imwrite(str(path), data, **kwargs)


def _broken(kind, root, case):
    """Build the broken input in ``case``; return the extra KEY VALUE arguments."""
    if kind == "missing_folder":
        return {"tiles_creator.py": ["DATASETS.WSI_FOLDER", case / "nowhere"],
                "test_net.py": ["TEST.WSI_FOLDER", case / "nowhere"],
                "train_net.py": ["DATASETS.TRAIN_FOLDER", case / "nowhere"]}
    if kind == "no_slides":
        (case / "empty").mkdir()
        return {"tiles_creator.py": ["DATASETS.WSI_FOLDER", case / "empty"],
                "test_net.py": ["TEST.WSI_FOLDER", case / "empty"]}
    if kind in ("corrupt_svs", "truncated_svs"):
        wsi = case / "wsi"
        wsi.mkdir()
        for name in ("s1.tiff", "s2.tiff"):
            shutil.copy(root / "wsi" / name, wsi / name)
        if kind == "corrupt_svs":
            shutil.copy(shared("wsi", "histolab-broken.svs"), wsi / "broken.svs")
        else:
            data = open(shared("wsi", "CMU-1-Small-Region.svs"), "rb").read()
            (wsi / "broken.svs").write_bytes(data[:len(data) * 6 // 10])
        labels = (root / "train.csv").read_text() + "broken,\n"
        (case / "labels.csv").write_text(labels)
        return {"tiles_creator.py": ["DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", case / "labels.csv"],
                "test_net.py": ["TEST.WSI_FOLDER", wsi]}
    if kind.startswith("csv_"):
        text = (root / "train.csv").read_text().splitlines()
        if kind == "csv_no_id_column":
            text[0] = "image,encoding"
        elif kind == "csv_duplicate_ids":
            text.append(text[1])
        elif kind == "csv_missing_slide":
            text.append("absent,1 5")
        (case / "labels.csv").write_text("\n".join(text) + "\n")
        return {"tiles_creator.py": ["DATASETS.LABELS_CSV", case / "labels.csv"],
                "test_net.py": ["TEST.LABELS_CSV", case / "labels.csv"]}
    if kind.startswith("rle_"):
        bad = {"rle_odd": "1 5 9", "rle_text": "1 five", "rle_start_0": "0 5", "rle_zero_length": "5 0",
               "rle_negative": "5 -3", "rle_unsorted": "100 5 10 5", "rle_overlap": "10 20 15 5",
               "rle_past_end": "1310700 100", "rle_huge": "99999999999999999999 1"}[kind]
        lines = (root / "train.csv").read_text().splitlines()
        lines[2] = "s2," + bad
        (case / "labels.csv").write_text("\n".join(lines) + "\n")
        return {"tiles_creator.py": ["DATASETS.LABELS_CSV", case / "labels.csv"],
                "test_net.py": ["TEST.LABELS_CSV", case / "labels.csv"]}
    if kind in ("image_16bit", "image_multichannel"):
        wsi = case / "wsi"
        wsi.mkdir()
        shape = (300, 400, 3) if kind == "image_16bit" else (5, 300, 400)
        data = np.full(shape, 1000 if kind == "image_16bit" else 100, np.uint16 if kind == "image_16bit" else np.uint8)
        _write(wsi / "odd.tiff", data, **({"photometric": "rgb"} if kind == "image_16bit" else {}))
        (case / "labels.csv").write_text("id,encoding\nodd,\n")
        return {"tiles_creator.py": ["DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", case / "labels.csv"],
                "test_net.py": ["TEST.WSI_FOLDER", wsi]}
    if kind in ("dicom_not_wsi", "mrxs_no_data_folder", "fluorescence"):
        wsi = case / "wsi"
        wsi.mkdir()
        for name in ("s1.tiff", "s2.tiff"):
            shutil.copy(root / "wsi" / name, wsi / name)
        if kind == "dicom_not_wsi":
            write_ct(str(wsi / "odd.dcm"))
        elif kind == "mrxs_no_data_folder":
            (wsi / "odd.mrxs").write_bytes(b"an MRXS index without its data folder")
        else:  # three named greyscale channel pages (a Vectra QPTIFF's layout)
            with tifffile.TiffWriter(str(wsi / "odd.tif")) as tif:
                for name in ("DAPI", "FITC", "Cy5"):
                    tif.write(np.full((300, 400), 20, np.uint8), photometric="minisblack",
                              description="<PerkinElmer-QPI-ImageDescription><ImageType>FullResolution</ImageType>"
                                          f"<Name>{name}</Name></PerkinElmer-QPI-ImageDescription>")
        (case / "labels.csv").write_text((root / "train.csv").read_text() + "odd,\n")
        return {"tiles_creator.py": ["DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", case / "labels.csv"],
                "test_net.py": ["TEST.WSI_FOLDER", wsi]}
    if kind.startswith("ann_"):
        return _broken_annotations(kind, root, case)
    if kind == "ckpt_empty_folder":
        (case / "models").mkdir()
        return {"test_net.py": ["TEST.MODEL_WEIGHTS_FOLDER", case / "models"]}
    if kind == "ckpt_other_architecture":
        (case / "models").mkdir()
        other = case / "other.pth"
        _checkpoint(other, {**SPEC, "ARCHITECTURE": "FPN"})
        payload = torch.load(other, weights_only=True)
        payload["model"] = SPEC  # an FPN's weights under a Unet config
        torch.save(payload, case / "models" / "a.pth")
        return {"test_net.py": ["TEST.MODEL_WEIGHTS_FOLDER", case / "models"],
                "train_net.py": ["MODEL.WEIGHTS", case / "models" / "a.pth", "OVERWRITE", True]}
    if kind == "ckpt_truncated":
        (case / "models").mkdir()
        data = (root / "models" / "a.pth").read_bytes()
        (case / "models" / "a.pth").write_bytes(data[:len(data) // 2])
        return {"test_net.py": ["TEST.MODEL_WEIGHTS_FOLDER", case / "models"],
                "train_net.py": ["MODEL.WEIGHTS", case / "models" / "a.pth", "OVERWRITE", True]}
    if kind == "output_unwritable":
        (case / "a_file").write_text("not a folder")
        return {"tiles_creator.py": ["DATASETS.TRAIN_FOLDER", case / "a_file" / "tiles"],
                "train_net.py": ["OUTPUT_DIR", case / "a_file" / "out"],
                "test_net.py": ["OUTPUT_DIR", case / "a_file" / "out"]}
    raise AssertionError(kind)


CASES = [
    # (kind, script, what the error line must contain, needs ../shared)
    ("missing_folder", "tiles_creator.py", "folder not found (DATASETS.WSI_FOLDER)", False),
    ("missing_folder", "test_net.py", "folder not found (TEST.WSI_FOLDER)", False),
    ("missing_folder", "train_net.py", "no tiles", False),
    ("no_slides", "tiles_creator.py", "no slide file for 2 id(s)", False),
    ("no_slides", "test_net.py", "no slides (.tiff", False),
    ("corrupt_svs", "tiles_creator.py", "broken.svs", True),
    ("corrupt_svs", "test_net.py", "broken.svs", True),
    ("truncated_svs", "tiles_creator.py", "broken.svs", True),
    ("truncated_svs", "test_net.py", "broken.svs", True),
    ("csv_no_id_column", "tiles_creator.py", "labels.csv", False),
    ("csv_no_id_column", "test_net.py", "labels.csv", False),
    ("csv_duplicate_ids", "tiles_creator.py", "duplicate ids ['s1']", False),
    ("csv_duplicate_ids", "test_net.py", "duplicate ids ['s1']", False),
    ("csv_missing_slide", "tiles_creator.py", "no slide file for 1 id(s)", False),
    ("image_16bit", "tiles_creator.py", "odd.tiff: unsupported", False),
    ("image_16bit", "test_net.py", "odd.tiff: unsupported", False),
    ("image_multichannel", "tiles_creator.py", "odd.tiff", False),
    ("image_multichannel", "test_net.py", "odd.tiff", False),
    ("dicom_not_wsi", "tiles_creator.py", "odd.dcm: a DICOM file but not a whole-slide image (modality CT", False),
    ("dicom_not_wsi", "test_net.py", "odd.dcm: a DICOM file but not a whole-slide image (modality CT", False),
    ("mrxs_no_data_folder", "tiles_creator.py", "odd.mrxs: MRXS without its data folder", False),
    ("mrxs_no_data_folder", "test_net.py", "odd.mrxs: MRXS without its data folder", False),
    ("fluorescence", "tiles_creator.py", "odd.tif: 3 channels stored as separate greyscale images (DAPI, FITC, Cy5)",
     False),
    ("fluorescence", "test_net.py", "odd.tif: 3 channels stored as separate greyscale images (DAPI, FITC, Cy5)", False),
    ("ann_truncated_json", "tiles_creator.py", "s1.geojson: malformed or truncated JSON", False),
    ("ann_truncated_json", "test_net.py", "s1.geojson: malformed or truncated JSON", False),
    ("ann_truncated_xml", "tiles_creator.py", "s1.xml: malformed or truncated XML", False),
    ("ann_truncated_xml", "test_net.py", "s1.xml: malformed or truncated XML", False),
    ("ann_unknown", "tiles_creator.py", "s1.json: JSON but neither GeoJSON (QuPath) nor labelme", False),
    ("ann_unknown", "test_net.py", "s1.json: JSON but neither GeoJSON (QuPath) nor labelme", False),
    ("ann_unpaired", "tiles_creator.py", "1 slide(s) without an annotation file", False),
    ("ann_class", "tiles_creator.py", "s1.geojson: no shapes of the class(es) ['Glomeruli']", False),
    ("ann_class", "test_net.py", "s1.geojson: no shapes of the class(es) ['Glomeruli']", False),
    ("ckpt_empty_folder", "test_net.py", "no .pth checkpoints", False),
    ("ckpt_other_architecture", "test_net.py", "a.pth: weights do not fit", False),
    ("ckpt_other_architecture", "train_net.py", "a.pth: weights do not fit", False),
    ("ckpt_truncated", "test_net.py", "a.pth: not a readable checkpoint", False),
    ("ckpt_truncated", "train_net.py", "a.pth: not a readable checkpoint", False),
    ("output_unwritable", "tiles_creator.py", "a_file", False),
    ("output_unwritable", "train_net.py", "a_file", False),
    ("output_unwritable", "test_net.py", "a_file", False),
] + [(f"rle_{k}", script, "RLE of 's2'", False)
     for k in ("odd", "text", "start_0", "zero_length", "negative", "unsorted", "overlap", "past_end", "huge")
     for script in ("tiles_creator.py", "test_net.py")]


def _broken_annotations(kind, root, case):
    """Slides with annotation files (annotations format), one of them broken."""
    wsi = case / "wsi"
    wsi.mkdir()
    for name in ("s1.tiff", "s2.tiff"):
        shutil.copy(root / "wsi" / name, wsi / name)
    square = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [90, 10], [90, 90],
                                                                                 [10, 90], [10, 10]]]},
              "properties": {"classification": {"name": "Glomerulus"}}}
    good = json.dumps({"type": "FeatureCollection", "features": [square]})
    (wsi / "s2.geojson").write_text(good)
    if kind == "ann_truncated_json":
        (wsi / "s1.geojson").write_text(good[:len(good) // 2])
    elif kind == "ann_truncated_xml":
        (wsi / "s1.xml").write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="a" '
                                    'Type="Polygon" PartOfGroup="g"><Coordinates><Coordinate Order="0" X="1"')
    elif kind == "ann_unknown":
        (wsi / "s1.json").write_text('{"images": [], "categories": []}')
    elif kind == "ann_unpaired":
        (wsi / "other.geojson").write_text(good)  # and s1 has no annotation file
    elif kind == "ann_class":
        (wsi / "s1.geojson").write_text(good)
    args = ["DATASETS.FORMAT", "annotations", "DATASETS.WSI_FOLDER", wsi]
    classes = ["DATASETS.ANNOTATION_CLASSES", "[Glomeruli]"] if kind == "ann_class" else []
    return {"tiles_creator.py": args + classes, "test_net.py": ["TEST.LABELS_CSV", "", "TEST.ANNOTATIONS_FOLDER", wsi,
                                                                *classes]}


@pytest.mark.slow
@pytest.mark.parametrize("kind, script, needle, needs_shared", CASES, ids=[f"{c[1][:-3]}-{c[0]}" for c in CASES])
def test_bad_input_one_error_line_nothing_written(world, tmp_path, kind, script, needle, needs_shared):
    if needs_shared and not has_shared():
        pytest.skip("needs the real slides in ../shared/data")
    before = _tree(world / OUTPUTS[script])
    extra = _broken(kind, world, tmp_path)[script]
    result = run_script(script, *ARGS[script](world, *extra))
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _tree(world / OUTPUTS[script]) == before  # the earlier run's outputs, untouched (OVERWRITE included)
    written = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs
               if f != "log.txt" and not str(r).startswith(str(tmp_path / "wsi"))
               and not str(r).startswith(str(tmp_path / "models")) and f not in ("labels.csv", "a_file", "other.pth")]
    assert written == []  # nothing half-written beside the broken input


@pytest.mark.parametrize("key, value, needle", [
    ("INPUT.SIZE_TRAIN", "0", "INPUT.SIZE_TRAIN"),
    ("INPUT.SIZE_TRAIN", "big", "INPUT.SIZE_TRAIN"),
    ("TEST.OVERLAP", "1.0", "TEST.OVERLAP must be >= 0 and < 1"),
    ("TEST.TH", "1.5", "TEST.TH must be within 0..1"),
    ("TEST.UPSAMPLE", "cubic", "TEST.UPSAMPLE"),
    ("MODEL.NO_SUCH_KEY", "1", "MODEL.NO_SUCH_KEY"),
])
@pytest.mark.slow
def test_bad_config_values_exit_2_before_any_work(world, key, value, needle):
    for script in ("tiles_creator.py", "train_net.py", "test_net.py"):
        before = _tree(world / OUTPUTS[script])
        result = run_script(script, *ARGS[script](world), key, value)
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert result.returncode == 2 and len(errors) == 1 and needle in errors[0], result.stderr[-1500:]
        assert _tree(world / OUTPUTS[script]) == before


def test_more_folds_than_slides(world):
    before = _tree(world / "trained")
    result = run_script("train_net.py", *_train_args(world, "SOLVER.N_FOLDS", 5))
    assert result.returncode == 1 and "SOLVER.N_FOLDS 5 is more than the 2 slides" in result.stderr
    assert _tree(world / "trained") == before


def test_handled_input_gives_a_warning_and_a_result(world, tmp_path):
    """RGBA and grayscale slides are read as RGB, a slide smaller than one tile is padded to
    one, a slide without a CSV row is skipped: each with a warning, and the run succeeds."""
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    image, mask = draw_slide(SampleSpec("g", "x", 700, 900, 21))
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    _write(wsi / "rgba.tiff", rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(256, 256))
    _write(wsi / "gray.tiff", cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), tile=(256, 256))
    _write(wsi / "tiny.tiff", image[:40, :50], photometric="rgb")
    _write(wsi / "unlabelled.tiff", image, photometric="rgb", tile=(256, 256))
    rle = rle_encode(mask)
    (tmp_path / "labels.csv").write_text(f"id,encoding\nrgba,{rle}\ngray,{rle}\ntiny,\n")
    tiles = run_script("tiles_creator.py", *_tiles_args(world, "DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV",
                                                         tmp_path / "labels.csv", "DATASETS.TRAIN_FOLDER", tmp_path / "tiles"))
    assert tiles.returncode == 0, tiles.stderr[-2000:]
    assert "unlabelled" in tiles.stderr and "not tiled" in tiles.stderr
    assert "RGBA" in tiles.stderr or "alpha" in tiles.stderr.lower()
    assert "gray" in tiles.stderr.lower()
    names = os.listdir(tmp_path / "tiles" / "images_64_red4")
    assert any(n.startswith("rgba_") for n in names)
    stats = json.load(open(tmp_path / "tiles" / "stats_64_red4.json"))["slides"]
    assert stats["gray"]["tiles"] > 0 and stats["gray"]["kept"] == 0  # no saturation: all background
    assert stats["tiny"]["tiles"] == 1
    predicted = run_script("test_net.py", *_test_args(world, "TEST.WSI_FOLDER", wsi, "TEST.LABELS_CSV",
                                                       tmp_path / "labels.csv", "OUTPUT_DIR", tmp_path / "out"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert "no row for 1 slide(s), not scored: unlabelled" in predicted.stderr
    ids = [line.split(",")[0] for line in (tmp_path / "out" / "submission.csv").read_text().splitlines()[1:]]
    assert ids == ["gray", "rgba", "tiny", "unlabelled"]
