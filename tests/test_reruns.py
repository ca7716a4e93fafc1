"""A rerun never reuses work done with another model, slide or training setting (no ../shared
needed: generated slides and the dark-blob model)."""
import pytest
import json
import os
import shutil
import subprocess
import sys


from data.sample import SampleSpec, generate_sample
from tests.blob_model import DarkBlobs, SPEC
from tests.conftest import REPO
from model.checkpoint import save_checkpoint


def _blob_checkpoint(path, gain: float) -> None:
    model = DarkBlobs()
    model.gain.fill_(gain)
    save_checkpoint(str(path), model, {"model": SPEC, "input": {"size": 64, "reduce": 4, "mean": [0, 0, 0],
                                                                "std": [1, 1, 1]}, "threshold": 0.5, "fold": 0,
                                       "metrics": {}})


def _test_net(*args):
    result = subprocess.run([sys.executable, "-m", "tests.blob_model", "test_net.py", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_test_net_predicts_again_when_a_checkpoint_or_a_slide_is_replaced_under_its_name(tmp_path):
    specs = [SampleSpec("one", "test", 1024, 1280, 11), SampleSpec("two", "test", 1024, 1280, 12)]
    generate_sample(str(tmp_path / "sample"), specs)
    slides, models = tmp_path / "sample" / "test", tmp_path / "models"
    models.mkdir()
    _blob_checkpoint(models / "m.pth", 1.0)
    args = ["TEST.WSI_FOLDER", slides, "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.SIZE", 64, "TEST.TH", 0.5,
            "TEST.MPP", 1.0, "OUTPUT_DIR", tmp_path / "out"]
    _test_net(*args)
    first = (tmp_path / "out" / "submission.csv").read_text()
    assert "predicted earlier, skipped" in _test_net(*args)  # nothing changed: reused
    assert (tmp_path / "out" / "submission.csv").read_text() == first

    _blob_checkpoint(models / "m.pth", 0.2)  # retrained into the same path: another model
    log = _test_net(*args)
    assert "predicted earlier, skipped" not in log
    second = (tmp_path / "out" / "submission.csv").read_text()
    assert second != first
    fresh = tmp_path / "fresh"
    _test_net(*args[:-1], fresh)  # the same as a run that never saw the first model
    assert second == (fresh / "submission.csv").read_text()

    shutil.copyfile(slides / "two.tiff", slides / "one.tiff")  # a slide replaced under its name
    log = _test_net(*args)
    assert log.count("predicted earlier, skipped") == 1 and "two: predicted earlier, skipped" in log
    rows = dict(line.split(",", 1) for line in (tmp_path / "out" / "submission.csv").read_text().splitlines()[1:])
    assert rows["one"] == rows["two"]  # "one" now holds two's pixels, and was predicted from them
    record = json.load(open(tmp_path / "out" / ".predictions" / "one.json"))
    assert record["source_stamp"][0] == os.path.getsize(slides / "one.tiff")


def test_the_tiler_refuses_to_keep_tiles_made_with_another_pixel_size_or_channels(tmp_path):
    """A rerun with a corrected DATASETS.MPP (before: counted only with INPUT.MPP_TRAIN), other
    INPUT.CHANNELS or another INPUT.SLIDE_READER does not keep the earlier tiles: one line names the key."""
    from tests.conftest import run_script

    csvs = generate_sample(str(tmp_path / "sample"), [SampleSpec("one", "train", 1024, 1280, 11)])
    args = ["--config-file", os.path.join(REPO, "config", "sample.yaml"), "DATASETS.WSI_FOLDER",
            tmp_path / "sample" / "train", "DATASETS.LABELS_CSV", csvs["train"], "DATASETS.TRAIN_FOLDER",
            tmp_path / "tiles"]
    first = run_script("tiles_creator.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert run_script("tiles_creator.py", *args).returncode == 0  # the same settings: kept
    for key, value, shown in (("DATASETS.MPP", 0.9, "DATASETS.MPP None -> 0.9"),
                              ("INPUT.CHANNELS", "[0, 1, 2]", "INPUT.CHANNELS None -> [0, 1, 2]"),
                              ("INPUT.SLIDE_READER", "openslide", "INPUT.SLIDE_READER None -> 'openslide'")):
        again = run_script("tiles_creator.py", *args, key, value)
        errors = [line for line in again.stderr.splitlines() if "ERROR" in line]
        assert again.returncode != 0 and len(errors) == 1 and shown in errors[0], again.stderr[-2000:]
        assert "OVERWRITE True" in errors[0]
    assert run_script("tiles_creator.py", *args, "DATASETS.MPP", 0.9, "OVERWRITE", True).returncode == 0
