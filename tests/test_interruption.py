"""Scripts killed with SIGKILL and started again end with the files of an uninterrupted run."""
import pytest
import os

from tests.conftest import kill_9_at_pause, requires_shared, run_script, start_script
from tests.slides import mosaic_region, write_slide
from utils.rle import rle_encode

pytestmark = requires_shared


def _tree(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == "log.txt" or name.endswith(".yaml"):
                continue
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_tiles(tmp_path):
    import numpy as np

    wsi = tmp_path / "wsi"
    wsi.mkdir()
    ids = ["s1", "s2", "s3"]
    lines = ["id,encoding"]
    for n, slide_id in enumerate(ids):
        h, w = 2600 + 300 * n, 3100
        write_slide(str(wsi / f"{slide_id}.tiff"), (h, w),
                    lambda a, b, c, d, s, n=n: mosaic_region(a + 1000 * n, b + 1000 * n, c, d, s),
                    tile=256, compression=("jpeg", 90))
        yy, xx = np.mgrid[:h, :w]
        lines.append(f"{slide_id},{rle_encode(((yy // 97 + xx // 131) % 5 == 0).astype(np.uint8))}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    args = ["DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", tmp_path / "train.csv",
            "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 1, "TILER.PNG_COMPRESSION", 9]

    reference = tmp_path / "reference"
    assert run_script("tiles_creator.py", *args, "DATASETS.TRAIN_FOLDER", reference).returncode == 0
    expected = _tree(reference)

    interrupted = tmp_path / "interrupted"
    images = interrupted / "images_64_red1"
    # killed in the middle of the second slide (s1 has 41 tile rows: the 51st row is s2's 10th),
    # at that point on any machine: one slide finished, one half-written
    pause = tmp_path / "paused"
    proc = start_script("tiles_creator.py", *args, "DATASETS.TRAIN_FOLDER", interrupted, pause_at="tiler.tile_row@51",
                        pause_file=pause)
    kill_9_at_pause(proc, pause)
    partial = _tree(interrupted)
    assert partial != expected  # it really was interrupted
    assert any(n.startswith("s2_") for n in os.listdir(images)) and not any(n.startswith("s3_") for n in
                                                                           os.listdir(images))

    result = run_script("tiles_creator.py", *args, "DATASETS.TRAIN_FOLDER", interrupted)
    assert result.returncode == 0, result.stderr
    assert "already tiled" in result.stderr  # s1 was not redone
    assert _tree(interrupted) == expected


@pytest.mark.slow
def test_test_net_kill_9_keeps_the_old_csv_then_rerun_is_byte_identical(tmp_path):
    """A killed test_net leaves the previous CSV whole; the rerun skips the finished slides and
    writes the same bytes as an uninterrupted run (deterministic model)."""
    from tests.test_inference import _checkpoint, _slides

    wsi = _slides(tmp_path / "wsi", 4)
    models = tmp_path / "models"
    models.mkdir()
    _checkpoint(models / "a.pth", reduce=4, size=64)
    args = ["TEST.WSI_FOLDER", wsi, "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.SIZE", 64, "TEST.TTA", True]
    reference = tmp_path / "reference"
    assert run_script("test_net.py", *args, "OUTPUT_DIR", reference).returncode == 0
    expected = (reference / "submission.csv").read_bytes()

    out = tmp_path / "out"
    old = run_script("test_net.py", *args, "OUTPUT_DIR", out, "TEST.TH", 0.9)  # an earlier CSV
    assert old.returncode == 0
    previous = (out / "submission.csv").read_bytes()
    assert previous != expected
    pause = tmp_path / "paused"  # killed once 2 of the 4 slides are done, on any machine
    proc = start_script("test_net.py", *args, "OUTPUT_DIR", out, pause_at="test_net.item_done@2", pause_file=pause)
    kill_9_at_pause(proc, pause)
    assert (out / "submission.csv").read_bytes() == previous  # the old CSV, whole
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    result = run_script("test_net.py", *args, "OUTPUT_DIR", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predicted earlier, skipped" in result.stderr
    assert (out / "submission.csv").read_bytes() == expected
