"""Stain normalisation (data/stain.py, torch-staintools): one transform per slide (a tile equals
the same part of the whole), a re-stained slide brought back towards its reference, and the
reference carried from the tiler's stats into the checkpoint and applied by test_net."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data import stain
from data.sample import SampleSpec, draw_slide, write_pyramid
from tests.conftest import REPO, run_script
from tests.slides import has_shared, shared


def _image():
    """Real PAS tissue (an AIDPATH biopsy at 1 µm/px) where ../shared is present, else the sample."""
    if has_shared():
        image = cv2.cvtColor(cv2.imread(shared("aidpath", "images", "10064.png")), cv2.COLOR_BGR2RGB)
        return cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    return draw_slide(SampleSpec("s", "x", 768, 768, 4))[0]


def _restain(image, gains=(1.5, 0.7, 1.2)):
    """The same tissue as another lab's stain: each channel's optical density scaled."""
    od = -np.log((image.astype(np.float64) + 1) / 256)
    return np.clip(256 * np.exp(-od * np.asarray(gains)) - 1, 0, 255).astype(np.uint8)


def _lab_mean(image, tissue):
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[tissue].mean(axis=0)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_slide_has_one_transform_so_tiles_match_the_whole(method, tmp_path):
    image = _image()
    ref_path = tmp_path / "ref.png"
    cv2.imwrite(str(ref_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    target = stain.reference(method, "" if method == "macenko" else str(ref_path))
    slide = _restain(image)
    transform = stain.slide_transform(slide, stain.thumbnail_tissue(slide), target, "s")
    whole = stain.apply(slide, transform)
    h, w = slide.shape[:2]
    tile = stain.apply(slide[h // 4: h // 2, w // 3: w // 2], transform)
    assert np.array_equal(tile, whole[h // 4: h // 2, w // 3: w // 2])
    assert json.loads(json.dumps(transform)) == transform  # plain JSON: it goes into stats and checkpoints


def test_reinhard_brings_a_restained_slide_back_to_its_reference(tmp_path):
    image = _image()
    ref_path = tmp_path / "ref.png"
    cv2.imwrite(str(ref_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    target = stain.reference("reinhard", str(ref_path))
    slide = _restain(image)
    tissue = stain.thumbnail_tissue(image)
    normalised = stain.apply(slide, stain.slide_transform(slide, stain.thumbnail_tissue(slide), target, "s"))
    before = np.abs(_lab_mean(slide, tissue) - _lab_mean(image, tissue)).sum()
    after = np.abs(_lab_mean(normalised, tissue) - _lab_mean(image, tissue)).sum()
    assert after < 0.5 * before, (before, after)  # measured on AIDPATH 10064: 43 -> 15 (sum of |Lab mean differences|)


def test_a_reference_is_needed_except_for_macenko_and_bad_keys_are_refused():
    assert stain.reference("macenko")["stain_matrix"] == stain.MACENKO_REFERENCE["stain_matrix"]
    with pytest.raises(stain.StainError, match="needs INPUT.STAIN_REFERENCE"):
        stain.reference("reinhard")
    bad = run_script("tiles_creator.py", "INPUT.STAIN_NORM", "magic")
    assert bad.returncode == 2 and "INPUT.STAIN_NORM must be one of" in bad.stderr
    bad = run_script("tiles_creator.py", "INPUT.STAIN_NORM", "vahadane")
    assert bad.returncode == 2 and "needs INPUT.STAIN_REFERENCE" in bad.stderr


@pytest.mark.slow
def test_the_reference_goes_from_the_tiles_into_the_checkpoint_and_test_net_applies_it(tmp_path):
    """tiles_creator writes normalised tiles and the reference into stats_*.json; train_net copies
    it into the checkpoint (and its card); test_net applies it to the slide it predicts (the record
    holds the slide's own fitted stain) even though its config does not ask for it; a checkpoint
    without it beside one with it is refused in one line."""
    import torch

    from model.checkpoint import load_checkpoint, save_checkpoint

    slides = tmp_path / "slides"
    slides.mkdir()
    rows = []
    for k, seed in enumerate((11, 12, 13)):
        image, mask = draw_slide(SampleSpec(f"s{k}", "x", 1024, 1024, seed))
        write_pyramid(str(slides / f"s{k}.tif"), _restain(image, (1.0 + 0.2 * k, 1.0, 1.0 - 0.1 * k)), mpp=1.0)
        from utils.rle import rle_encode

        rows.append(f"s{k},{rle_encode(mask)}\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,encoding\n" + "".join(rows))
    reference = tmp_path / "ref.png"
    cv2.imwrite(str(reference), cv2.cvtColor(draw_slide(SampleSpec("r", "x", 768, 768, 4))[0], cv2.COLOR_RGB2BGR))
    tiles = tmp_path / "tiles"
    common = ["DATASETS.WSI_FOLDER", slides, "DATASETS.LABELS_CSV", labels, "DATASETS.TRAIN_FOLDER", tiles,
              "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 4, "INPUT.STAIN_NORM", "reinhard",
              "INPUT.STAIN_REFERENCE", reference]
    result = run_script("tiles_creator.py", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.load(open(tiles / "stats_64_red4.json"))
    assert stats["stain"]["method"] == "reinhard" and stats["stain"]["source"] == str(reference)
    assert all("stain_source" in info for info in stats["slides"].values())
    out = tmp_path / "out"
    result = run_script("train_net.py", *common[:6], "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 4,
                        "MODEL.ARCHITECTURE", "Unet", "MODEL.ENCODER_NAME", "resnet18", "MODEL.ENCODER_WEIGHTS", "",
                        "SOLVER.N_FOLDS", 3, "SOLVER.FOLDS", "[0]", "SOLVER.MAX_EPOCHS", 1, "SOLVER.IMS_PER_BATCH", 8,
                        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", out)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_path = next(out.glob("model_*_fold_0.pth"))
    ckpt = load_checkpoint(str(ckpt_path))
    assert ckpt["input"]["stain"] == stats["stain"]
    assert json.load(open(ckpt_path.with_suffix(".json")))["input"]["stain"] == stats["stain"]
    predicted = tmp_path / "predicted"
    result = run_script("test_net.py", "TEST.WSI_FOLDER", slides, "TEST.MODEL_WEIGHTS_FOLDER", ckpt_path,
                        "TEST.BACKEND", "torch", "OUTPUT_DIR", predicted)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stain normalisation of every slide: reinhard" in result.stderr
    record = json.load(open(predicted / ".predictions" / "s0.json"))
    assert record["stain"]["method"] == "reinhard" and len(record["stain"]["means"]) == 3
    # an ensemble that disagrees on it is refused, naming the file
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.pth").write_bytes(ckpt_path.read_bytes())
    plain = dict(ckpt)
    plain["input"] = {k: v for k, v in ckpt["input"].items() if k != "stain"}
    from model.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(str(ckpt_path))
    save_checkpoint(str(mixed / "b.pth"), model, {k: v for k, v in plain.items() if k not in ("state_dict", "format")})
    result = run_script("test_net.py", "TEST.WSI_FOLDER", slides, "TEST.MODEL_WEIGHTS_FOLDER", mixed,
                        "TEST.BACKEND", "torch", "OUTPUT_DIR", tmp_path / "mixed_out")
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode != 0 and len(errors) == 1 and "b.pth" in errors[0] and "stain" in errors[0]
    assert torch is not None


@pytest.mark.slow
def test_bad_stain_input_is_one_line_or_a_skipped_slide(tmp_path):
    """A reference image with no tissue stops tiles_creator with one line before anything is
    written; a near-white slide (nothing to fit) is skipped with a warning, the others tiled."""
    slides = tmp_path / "slides"
    slides.mkdir()
    from utils.rle import rle_encode

    image, mask = draw_slide(SampleSpec("a", "x", 768, 768, 21))
    write_pyramid(str(slides / "a.tif"), image, mpp=1.0)
    write_pyramid(str(slides / "blank.tif"), np.full((768, 768, 3), 244, np.uint8), mpp=1.0)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"id,encoding\na,{rle_encode(mask)}\nblank,\n")
    white = tmp_path / "white.png"
    cv2.imwrite(str(white), np.full((300, 300, 3), 250, np.uint8))
    common = ["DATASETS.WSI_FOLDER", slides, "DATASETS.LABELS_CSV", labels, "INPUT.SIZE_TRAIN", 64,
              "INPUT.SIZE_REDUCTION_TRAIN", 4, "INPUT.STAIN_NORM", "reinhard"]
    bad = run_script("tiles_creator.py", *common, "INPUT.STAIN_REFERENCE", white, "DATASETS.TRAIN_FOLDER",
                     tmp_path / "bad")
    errors = [line for line in bad.stderr.splitlines() if "ERROR" in line]
    assert bad.returncode != 0 and len(errors) == 1 and "white.png" in errors[0] and "too little tissue" in errors[0]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.png"))
    reference = tmp_path / "ref.png"
    cv2.imwrite(str(reference), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    good = run_script("tiles_creator.py", *common, "INPUT.STAIN_REFERENCE", reference, "DATASETS.TRAIN_FOLDER",
                      tmp_path / "tiles")
    assert good.returncode == 0, good.stderr[-3000:]
    assert "blank: too little tissue" in good.stderr and "no tiles written for it" in good.stderr
    names = [p.name for p in (tmp_path / "tiles" / "images_64_red4").iterdir()]
    assert names and all(n.startswith("a_") for n in names)
