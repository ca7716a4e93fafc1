"""``TEST.BACKEND auto`` (the default): ONNX Runtime on a CPU from exports cached by the
checkpoint's SHA-256, torch where onnxruntime is missing or an export fails; the cache under
shards started together; the per-stage time breakdown in the records and metrics.json."""
import json
import os
import subprocess
import sys
import time

import pytest

from data.sample import SampleSpec, draw_slide, write_pyramid
from model import backend
from model.backend import EXPORT_TAG, cache_folder, cached_export, resolve_models
from model.ship import DEFAULT_NAME, SHIPPED_FOLDER
from tests.blob_model import save_blob_checkpoint
from tests.conftest import REPO
from utils.io import file_sha256
from utils.rle import parse_rle, rle_dice, rle_encode
from utils.timing import STAGES, StageTimes, sum_stages

SHIPPED = os.path.join(SHIPPED_FOLDER, DEFAULT_NAME)


def _slides(folder, specs=((1400, 1700, 41), (1100, 1300, 42))):
    """Generated PAS-like slides (0.5 um/px) with their masks as an RLE CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (h, w, seed) in enumerate(specs):
        image, mask = draw_slide(SampleSpec(f"s{k}", "x", h, w, seed))
        write_pyramid(str(folder / f"s{k}.tif"), image)
        rows.append(f"s{k},{rle_encode(mask)}\n")
    labels = folder.parent / f"{folder.name}.csv"
    labels.write_text("id,encoding\n" + "".join(rows))
    return folder, labels


def _test_net(*opts, cache, env=None, importtime=False):
    """test_net.py as a user runs it (no TEST.BACKEND: the default), with its cache in ``cache``."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), os.path.join(REPO, "test_net.py"),
           *map(str, opts), "TEST.ONNX_CACHE", str(cache)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def _rles(out):
    import csv

    with open(out / "submission.csv", newline="") as fh:
        return {row["id"]: row["predicted"] for row in csv.DictReader(fh)}


def _backend_line(text):
    lines = [line for line in text.splitlines() if "Backend " in line]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def _entries(cache):
    return sorted(p.name for p in cache.glob("*.onnx"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return _slides(tmp_path_factory.mktemp("slides") / "wsi")


@pytest.mark.slow
def test_auto_runs_onnx_runtime_on_a_cpu_from_a_cached_export(slides, tmp_path):
    """The default command on a CPU: the shipped model exported once into the cache (its SHA-256
    names the entry), its masks those of the torch backend (RLE Dice >= 0.999, same objects); a
    rerun loads the cached file without exporting again and without importing torch; the log says
    which backend ran and why; metrics.json has the seconds of every stage."""
    wsi, labels = slides
    cache = tmp_path / "cache"
    common = ["TEST.WSI_FOLDER", wsi, "TEST.LABELS_CSV", labels]
    first = _test_net(*common, "OUTPUT_DIR", tmp_path / "auto", cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    line = _backend_line(first.stderr)
    assert "Backend onnx: TEST.BACKEND auto: a CPU" in line and "1 exported in" in line and str(cache) in line
    digest = file_sha256(SHIPPED)
    assert _entries(cache) == [f"{digest}-{EXPORT_TAG}.onnx"]
    assert json.loads((cache / f"{digest}-{EXPORT_TAG}.json").read_text())["checkpoint"]["sha256"] == digest
    stamp = os.stat(cache / f"{digest}-{EXPORT_TAG}.onnx").st_mtime_ns

    torch_run = _test_net(*common, "TEST.BACKEND", "torch", "OUTPUT_DIR", tmp_path / "torch", cache=cache)
    assert torch_run.returncode == 0, torch_run.stderr[-3000:]
    assert "Backend torch: TEST.BACKEND torch" in _backend_line(torch_run.stderr)
    a, b = _rles(tmp_path / "auto"), _rles(tmp_path / "torch")
    metrics_auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    metrics_torch = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    for slide_id, shape in (("s0", (1400, 1700)), ("s1", (1100, 1300))):
        ra, rb = parse_rle(a[slide_id], shape), parse_rle(b[slide_id], shape)
        assert int((ra[:, 1] - ra[:, 0]).sum()) > 1000, "the model finds glomeruli on the sample"
        assert rle_dice(ra, rb) >= 0.999, slide_id
        assert metrics_auto["per_slide"][slide_id]["objects"] == metrics_torch["per_slide"][slide_id]["objects"]
    # the breakdown: every stage of every slide, and their sums
    for metrics in (metrics_auto, metrics_torch):
        assert set(metrics["seconds_by_stage"]) == set(STAGES)
        for slide_id in ("s0", "s1"):
            stages = metrics["per_slide"][slide_id]["seconds"]["stages"]
            assert set(stages) == set(STAGES) and all(v >= 0 for v in stages.values())
            assert stages["forward"] > 0 and stages["read"] > 0
        assert metrics["seconds_by_stage"]["forward"] == pytest.approx(
            sum(metrics["per_slide"][s]["seconds"]["stages"]["forward"] for s in ("s0", "s1")), abs=2e-3)

    rerun = _test_net(*common, "OUTPUT_DIR", tmp_path / "again", cache=cache, importtime=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "(1 cached;" in _backend_line(rerun.stderr) and "exporting" not in rerun.stderr
    assert os.stat(cache / f"{digest}-{EXPORT_TAG}.onnx").st_mtime_ns == stamp and len(_entries(cache)) == 1
    imported = {line.rsplit("|", 1)[1].strip() for line in rerun.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and not {m for m in imported if m.split(".")[0] in ("torch", "timm")}
    assert _rles(tmp_path / "again") == a


def test_a_replaced_checkpoint_gets_a_new_export(tmp_path):
    """The cache knows a checkpoint by its content: retrained into the same file, it is exported
    again (a second entry), never served the old model's export."""
    folder, cache = tmp_path / "models", tmp_path / "cache"
    folder.mkdir()
    save_blob_checkpoint(folder / "m.pth", size=64, reduce=4)
    first = resolve_models(str(folder), "auto", "cpu", str(cache))
    assert first.backend == "onnx" and "1 exported" in first.reason
    again = resolve_models(str(folder), "auto", "cpu", str(cache))
    assert again.run_paths == first.run_paths and "1 cached" in again.reason
    save_blob_checkpoint(folder / "m.pth", size=64, reduce=8)  # retrained: same path, other content
    replaced = resolve_models(str(folder), "auto", "cpu", str(cache))
    assert "1 exported" in replaced.reason and replaced.run_paths != first.run_paths
    assert replaced.infos[0]["input"]["reduce"] == 8 and len(_entries(cache)) == 2
    assert os.path.basename(replaced.run_paths[0]).startswith(file_sha256(str(folder / "m.pth")))


@pytest.mark.slow
def test_two_shards_started_together_share_one_export(slides, tmp_path):
    """Two shards of an array job start at once on an empty cache: one exports while the other
    waits for it, both predict, one entry lands (whole: ONNX Runtime loads it), and the merge
    assembles both shards' slides."""
    wsi, labels = slides
    folder, cache, out = tmp_path / "models", tmp_path / "cache", tmp_path / "out"
    folder.mkdir()
    save_blob_checkpoint(folder / "m.pth", size=64, reduce=4)
    common = ["TEST.WSI_FOLDER", wsi, "TEST.LABELS_CSV", labels, "TEST.MODEL_WEIGHTS_FOLDER", folder,
              "OUTPUT_DIR", out, "TEST.SHARDS", 2]
    procs = [_start_blob(*common, "TEST.SHARD_INDEX", k, cache=cache) for k in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    lines = [_backend_line(log) for log in logs]
    assert sum("1 exported in" in line for line in lines) == 1, lines
    assert sum("1 exported by another process" in line or "1 cached" in line for line in lines) == 1, lines
    assert len(_entries(cache)) == 1 and not list(cache.glob(".tmp-*"))
    from model.onnx_backend import onnx_session

    onnx_session(str(next(cache.glob("*.onnx"))))
    merged = _blob_test_net(*common, "TEST.MERGE", True, cache=cache)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert sorted(_rles(out)) == ["s0", "s1"]


def _blob_cmd(*opts, cache):
    """test_net.py with the stand-in model's architecture registered (tests.blob_model)."""
    return [sys.executable, "-m", "tests.blob_model", "test_net.py", *map(str, opts), "TEST.ONNX_CACHE", str(cache)]


def _start_blob(*opts, cache):
    return subprocess.Popen(_blob_cmd(*opts, cache=cache), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _blob_test_net(*opts, cache):
    return subprocess.run(_blob_cmd(*opts, cache=cache), cwd=REPO, capture_output=True, text=True, timeout=900)


def test_without_onnxruntime_auto_falls_back_to_torch(slides, tmp_path):
    """Where onnxruntime cannot be imported, the default command runs torch and says so in one
    line (with the install command); nothing is exported."""
    wsi, labels = slides
    blocker = tmp_path / "site"
    (blocker / "onnxruntime").mkdir(parents=True)
    (blocker / "onnxruntime" / "__init__.py").write_text("raise ImportError('onnxruntime blocked by the test')\n")
    folder, cache = tmp_path / "models", tmp_path / "cache"
    folder.mkdir()
    save_blob_checkpoint(folder / "m.pth", size=64, reduce=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO])}
    result = subprocess.run(_blob_cmd("TEST.WSI_FOLDER", wsi, "TEST.MODEL_WEIGHTS_FOLDER", folder,
                                      "OUTPUT_DIR", tmp_path / "out", cache=cache),
                            cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = _backend_line(result.stderr)
    assert "Backend torch: TEST.BACKEND auto: onnxruntime is not installed" in line
    assert "pip install onnxruntime" in line
    assert not cache.exists() and sorted(_rles(tmp_path / "out")) == ["s0", "s1"]


def test_an_export_that_fails_runs_torch_and_is_not_tried_again(tmp_path, monkeypatch, caplog):
    """A checkpoint whose export fails its check: torch runs it, one warning names the file and
    the reason, and the failure is remembered in the cache (the next run does not export again)."""
    import model.export

    folder, cache = tmp_path / "models", tmp_path / "cache"
    folder.mkdir()
    save_blob_checkpoint(folder / "m.pth", size=64, reduce=4)
    calls = []

    def failing(ckpt, path, torchscript=True):
        calls.append(path)
        raise model.export.ExportError(f"{path}: the ONNX export differs from PyTorch by 0.5")

    monkeypatch.setattr(model.export, "export_checkpoint", failing)
    with caplog.at_level("WARNING"):
        first = resolve_models(str(folder), "auto", "cpu", str(cache))
    assert first.backend == "torch" and "m.pth does not export" in first.reason
    assert "differs from PyTorch by 0.5" in caplog.text and "TEST.BACKEND auto runs torch" in caplog.text
    second = resolve_models(str(folder), "auto", "cpu", str(cache))
    assert second.backend == "torch" and len(calls) == 1
    assert list(cache.glob("*.failed")) and not _entries(cache)


def test_explicit_backends_keep_their_meaning_and_the_cache_folder_default(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    save_blob_checkpoint(folder / "m.pth", size=64, reduce=4)
    chosen = resolve_models(str(folder), "torch", "cpu", str(tmp_path / "cache"))
    assert chosen.backend == "torch" and chosen.reason == "TEST.BACKEND torch" and not (tmp_path / "cache").exists()
    assert backend.choose_backend("onnx", "cpu") == ("onnx", "TEST.BACKEND onnx")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder("") == str(tmp_path / "xdg" / "glomeruli_segmentation" / "onnx")
    assert cache_folder(str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_stage_times_add_up_across_threads():
    from concurrent.futures import ThreadPoolExecutor

    times = StageTimes()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: times.add("forward", 0.25), range(8)))
    with times("read"):
        time.sleep(0.01)
    times.wrap("blend", lambda: None)()
    got = times.as_dict()
    assert list(got) == ["read", "forward", "blend"] and got["forward"] == 2.0 and got["read"] >= 0.01
    assert sum_stages([{"forward": 1.0, "extra": 1}, {"forward": 0.5, "read": 2}]) == {
        "read": 2.0, "forward": 1.5, "extra": 1.0}


def test_a_cached_export_reports_the_current_files_name(tmp_path):
    """One cache entry serves every copy of a checkpoint (same content): the provenance (DICOM
    Segmentation, logs) names the file the run was given, not the one first exported."""
    from model.card import model_identity

    first, second, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    first.mkdir()
    second.mkdir()
    save_blob_checkpoint(first / "model.pth", size=64, reduce=4)
    (second / "blobs.pth").write_bytes((first / "model.pth").read_bytes())
    resolve_models(str(first), "auto", "cpu", str(cache))
    again = resolve_models(str(second), "auto", "cpu", str(cache))
    assert "1 cached" in again.reason
    assert model_identity(again.infos, again.paths)[0] == "blobs"
