"""Deployment: ``python -m model.export`` (ONNX, TorchScript, model card), ``TEST.BACKEND onnx``,
shards without torchrun (``TEST.SHARDS`` / SLURM array variables) and ``TEST.MERGE``, model cards
from train_net, provenance in the DICOM Segmentation, and their bad input."""
import csv
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from config import load_cfg
from data.sample import SampleSpec, draw_slide, write_pyramid
from model.card import CARD_FORMAT, card_path, model_card, read_card
from model.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from model.build import build_model
from model.prediction import predict_slides
from model.ship import DEFAULT_NAME, SHIPPED_FOLDER
from tests.blob_model import save_blob_checkpoint
from tests.conftest import REPO, run_script
from tests.slides import has_shared, shared
from utils.rle import parse_rle, rle_dice, rle_encode
from utils.shards import ShardError, resolve_shard, shard_ids, split_balanced
from utils.version import TOOLKIT, VERSION

SHIPPED = os.path.join(SHIPPED_FOLDER, DEFAULT_NAME)
SPEC = {"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}


def _module(name, *args, env=None, timeout=600):
    """``python -m name ARGS`` from the repository, as a user runs it."""
    return subprocess.run([sys.executable, "-m", name, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _errors(result):
    return [line for line in result.stderr.splitlines() if "ERROR" in line]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped model exported by the command a user runs."""
    out = tmp_path_factory.mktemp("exported")
    result = _module("model.export", "TEST.MODEL_WEIGHTS_FOLDER", SHIPPED, "OUTPUT_DIR", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _real_tile(size: int) -> np.ndarray:
    """A real PAS tile at the shipped model's scale: an AIDPATH biopsy (0.5 um/px) read at 2 um/px
    where ../shared is present, else a generated sample slide's (0.5 um/px too)."""
    if has_shared():
        image = cv2.cvtColor(cv2.imread(shared("aidpath", "images", "10003.png")), cv2.COLOR_BGR2RGB)
    else:
        image = draw_slide(SampleSpec("t", "x", 2048, 2048, 5))[0]
    small = cv2.resize(image, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    y, x = (small.shape[0] - size) // 2, (small.shape[1] - size) // 2
    return small[y:y + size, x:x + size]


@pytest.mark.slow
def test_export_writes_onnx_torchscript_and_a_card_that_match_pytorch_on_a_real_tile(exported):
    import onnxruntime as ort

    card = json.load(open(exported / "glomeruli_kidney.json"))
    ckpt = load_checkpoint(SHIPPED)
    model, _ = model_from_checkpoint(SHIPPED)
    model = model.float().eval()
    mean, std = (np.asarray(card["input"][k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    tile = _real_tile(card["input"]["size"])
    x = (tile.transpose(2, 0, 1)[None].astype(np.float32) / 255 - mean) / std
    x = np.concatenate([x, x[:, :, ::-1, ::-1]]).astype(np.float32)  # batch of 2 (dynamic batch)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(exported / "glomeruli_kidney.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert session.get_inputs()[0].shape[0] == "batch" or not isinstance(session.get_inputs()[0].shape[0], int)
    onnx_out = session.run(None, {"input": x})[0]
    script = torch.jit.load(str(exported / "glomeruli_kidney.pt"))
    with torch.inference_mode():
        script_out = script(torch.from_numpy(x)).numpy()
    assert ref.shape == onnx_out.shape == script_out.shape == (2, 1, 256, 256)
    assert np.abs(script_out - ref).max() <= 1e-4  # TorchScript: the same kernels
    # ONNX Runtime sums in another order: within 1e-4 of the logits' range, and as close to the exact
    # (float64) result as PyTorch's own float32 is (which is up to ~6e-4 away from it on these
    # logits of -13..7: an absolute 1e-4 between two float32 runtimes is not a property of float32)
    assert np.abs(onnx_out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    with torch.inference_mode():
        exact = model.double()(torch.from_numpy(x).double()).numpy()
    model.float()
    assert np.abs(onnx_out - exact).max() <= max(1e-4, 1.5 * float(np.abs(ref - exact).max()))
    assert (ref > 0).mean() > 0.001 or (ref < 0).all()  # a real prediction, not a constant
    # another spatial size: the axes are dynamic
    x2 = np.ascontiguousarray(x[:1, :, :192, :224])
    with torch.inference_mode():
        ref2 = model(torch.from_numpy(x2)).numpy()
    assert np.abs(session.run(None, {"input": x2})[0] - ref2).max() <= 1e-4
    # the card: what a runtime needs, and where the model came from
    import onnx

    assert onnx.load(str(exported / "glomeruli_kidney.onnx")).opset_import[0].version >= 17
    assert card["format"] == CARD_FORMAT and card["name"] == "glomeruli_kidney"
    assert (card["architecture"], card["encoder"]) == (ckpt["model"]["ARCHITECTURE"], ckpt["model"]["ENCODER_NAME"])
    assert card["input"] == {k: ckpt["input"].get(k) for k in ("size", "reduce", "mean", "std", "mpp")}
    assert card["pixel_size_um"] == 2.0 and card["threshold"] == ckpt["threshold"] and card["classes"] == ["Glomerulus"]
    assert card["software"][TOOLKIT] == VERSION and "onnxruntime" in card["software"]
    assert card["held_out"]["heldout_dice_at_0.5"] == ckpt["card"]["heldout_dice_at_0.5"]
    assert card["shipped"]["training_data"][0]["licence"] == "CC BY 4.0"
    assert card["files"] == {"onnx": "glomeruli_kidney.onnx", "torchscript": "glomeruli_kidney.pt"}
    assert card["export"]["opset"] >= 17 and card["export"]["onnx_max_difference"] <= 1e-4
    import hashlib

    assert card["checkpoint"]["sha256"] == hashlib.sha256(open(SHIPPED, "rb").read()).hexdigest()
    shipped_card = json.load(open(card_path(SHIPPED)))  # the card beside the shipped weights is theirs
    assert shipped_card["checkpoint"] == card["checkpoint"] and shipped_card["input"] == card["input"]
    assert shipped_card == model_card(ckpt, SHIPPED) | {"software": shipped_card["software"]}


def _sample_slides(folder, specs=((1400, 1700, 41), (1100, 1300, 42), (1700, 1200, 43))):
    """Generated PAS-like slides (0.5 um/px) and their masks as an RLE CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (h, w, seed) in enumerate(specs):
        image, mask = draw_slide(SampleSpec(f"s{k}", "x", h, w, seed))
        write_pyramid(str(folder / f"s{k}.tif"), image)
        rows.append(f"s{k},{rle_encode(mask)}\n")
    labels = folder.parent / f"{folder.name}.csv"
    labels.write_text("id,encoding\n" + "".join(rows))
    return folder, labels


def _predict(*opts):
    return predict_slides(load_cfg(None, [*map(str, opts), "MODEL.DEVICE", "cpu"]))


def _rles(out):
    with open(out / "submission.csv", newline="") as fh:
        return {row["id"]: row["predicted"] for row in csv.DictReader(fh)}


@pytest.mark.slow
def test_onnx_backend_gives_the_torch_backends_masks(exported, tmp_path):
    """The shipped model through ONNX Runtime and through torch, with flips (TTA): RLE Dice >= 0.999
    on every slide, the same objects; the records say which backend made them."""
    wsi, labels = _sample_slides(tmp_path / "wsi", ((1400, 1700, 41), (1100, 1300, 42)))
    common = ["TEST.WSI_FOLDER", wsi, "TEST.LABELS_CSV", labels, "TEST.TTA", True]
    by_torch = _predict(*common, "TEST.BACKEND", "torch", "TEST.MODEL_WEIGHTS_FOLDER", SHIPPED, "OUTPUT_DIR",
                        tmp_path / "torch")
    by_onnx = _predict(*common, "TEST.BACKEND", "onnx", "TEST.ONNX_THREADS", 2, "TEST.MODEL_WEIGHTS_FOLDER", exported,
                       "OUTPUT_DIR", tmp_path / "onnx")
    a, b = _rles(tmp_path / "torch"), _rles(tmp_path / "onnx")
    assert sorted(a) == sorted(b) == ["s0", "s1"]
    for slide_id, shape in (("s0", (1400, 1700)), ("s1", (1100, 1300))):
        ra, rb = parse_rle(a[slide_id], shape), parse_rle(b[slide_id], shape)
        assert int((ra[:, 1] - ra[:, 0]).sum()) > 1000, "the model finds glomeruli on the sample"
        assert rle_dice(ra, rb) >= 0.999, slide_id
        assert by_torch["per_slide"][slide_id]["objects"] == by_onnx["per_slide"][slide_id]["objects"]
    assert by_onnx["threshold"] == by_torch["threshold"] == load_checkpoint(SHIPPED)["threshold"]
    assert abs(by_onnx["overall_dice"] - by_torch["overall_dice"]) < 1e-3
    record = json.load(open(tmp_path / "onnx" / ".predictions" / "s0.json"))
    assert record["settings"]["backend"] == "onnx" and record["settings"]["checkpoints"][0][0].endswith(".onnx")
    assert "backend" not in json.load(open(tmp_path / "torch" / ".predictions" / "s0.json"))["settings"]


def test_split_is_deterministic_balanced_and_complete():
    sizes = {f"s{k}": size for k, size in enumerate([90, 10, 40, 40, 30, 30, 20, 5, 5, 1])}
    shares = split_balanced(sizes, 3)
    assert split_balanced(dict(reversed(list(sizes.items()))), 3) == shares  # order of listing does not matter
    assert sorted(i for s in shares for i in s) == sorted(sizes) and all(s == sorted(s) for s in shares)
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes.values()) and loads == [91, 90, 90]  # largest first, to the least loaded
    assert split_balanced({"a": 5}, 3) == [["a"], [], []]  # more shards than slides: some are empty


@pytest.mark.parametrize("env, keys, expected", [
    ({}, (0, -1), (0, 1)),
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "2"}, (0, -1), (2, 4)),
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}, (0, -1), (2, 4)),
    ({"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_STEP": "2"}, (0, -1), (2, 3)),
    ({"JOB_COMPLETION_INDEX": "1"}, (3, -1), (1, 3)),
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "2"}, (2, 1), (1, 2)),  # the keys win
])
def test_shard_comes_from_the_keys_or_the_array_job(env, keys, expected):
    assert resolve_shard(*keys, environ=env) == expected


@pytest.mark.parametrize("env, keys, needle", [
    ({"JOB_COMPLETION_INDEX": "1"}, (0, -1), "set TEST.SHARDS"),
    ({}, (4, -1), "set TEST.SHARD_INDEX"),
    ({"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "2"}, (0, -1), "shard index 2 (SLURM_ARRAY_TASK_ID)"),
    ({"SLURM_ARRAY_TASK_COUNT": "two"}, (0, -1), "SLURM_ARRAY_TASK_COUNT='two' is not an integer"),
])
def test_shard_settings_that_cannot_work_are_named(env, keys, needle):
    with pytest.raises(ShardError, match=re.escape(needle)):
        resolve_shard(*keys, environ=env)


def _readme_block(marker):
    """The fenced code block after ``<!-- marker -->`` in the docs' deploy page."""
    text = open(os.path.join(REPO, "docs", "deploy.md"), encoding="utf-8").read()
    after = text[text.index(f"<!-- {marker} -->"):]
    return after.split("```bash\n", 1)[1].split("```", 1)[0]


def _outputs(out):
    """What a run gives: the CSVs and GeoJSON as bytes, metrics.json without its timing and paths."""
    files = {name: (out / name).read_bytes() for name in ("submission.csv", "objects.csv", "dice.csv")}
    files.update({f"predictions/{p.name}": p.read_bytes() for p in sorted((out / "predictions").glob("*.geojson"))})
    metrics = json.load(open(out / "metrics.json"))
    for key in ("seconds", "csv", "objects_csv", "seconds_by_stage"):
        metrics.pop(key)
    for entry in metrics["per_slide"].values():
        entry.pop("seconds")
    return files, metrics


@pytest.mark.slow
def test_readme_slurm_array_script_two_shards_and_merge_equal_one_process(tmp_path):
    """The deploy page's SLURM script (docs/deploy.md) run as two array tasks (the variables SLURM
    sets), then its merge: submission.csv, objects.csv, dice.csv, the GeoJSON and metrics.json are those of one
    process; each slide was predicted once; a merge before every shard is done names what is missing
    and writes nothing."""
    wsi, labels = _sample_slides(tmp_path / "wsi")
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    save_checkpoint(str(models / "unet.pth"), build_model(SPEC), {
        "model": SPEC, "input": {"size": 64, "reduce": 8, "mean": [0.8, 0.7, 0.8], "std": [0.15, 0.2, 0.12],
                                 "mpp": 4.0}, "threshold": 0.5, "fold": 0, "metrics": {}})
    args = ["TEST.WSI_FOLDER", wsi, "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.SIZE", 64, "TEST.LABELS_CSV", labels]
    single = run_script("test_net.py", *args, "OUTPUT_DIR", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]

    script = tmp_path / "predict.sbatch"
    script.write_text(_readme_block("slurm-script"))
    submit = _readme_block("slurm-submit")
    assert "sbatch --parsable --array=" in submit and "TEST.MERGE True" in submit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    env.update(GLOMERULI=REPO, SLIDES=str(wsi), MODELS=str(models), OUT=str(tmp_path / "sharded"),
               EXTRA=f"TEST.SIZE 64 TEST.LABELS_CSV {labels}", SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="0",
               SLURM_ARRAY_JOB_ID="123")
    merge = ["test_net.py", *args, "OUTPUT_DIR", tmp_path / "sharded", "TEST.MERGE", True]
    predicted = []
    for task in (1, 0):
        result = subprocess.run(["bash", str(script)], cwd=str(tmp_path), env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Shard {task} of 2" in result.stderr and "TEST.MERGE True" in result.stderr
        predicted += re.findall(r"\] (s\d): \d+ objects", result.stderr)
        if task == 1:  # shard 0 not run yet: the merge names its slides, writes nothing
            early = run_script(*merge)
            shard0 = shard_ids([(f"s{k}", str(wsi / f"s{k}.tif")) for k in range(3)], 0, 2)
            assert early.returncode == 1 and len(_errors(early)) == 1, early.stderr[-2000:]
            assert f"for {len(shard0)} of 3 item(s): {', '.join(shard0)}" in _errors(early)[0]
            assert not (tmp_path / "sharded" / "submission.csv").exists()
            assert not (tmp_path / "sharded" / "metrics.json").exists()
    assert sorted(predicted) == ["s0", "s1", "s2"]  # each slide once, by one shard
    again = subprocess.run(["bash", str(script)], cwd=str(tmp_path), env={**env, "SLURM_ARRAY_TASK_ID": "1"},
                           capture_output=True, text=True, timeout=600)  # a task rerun resumes: nothing to predict
    assert again.returncode == 0 and not re.findall(r"\] (s\d): \d+ objects", again.stderr)
    assert again.stderr.count("predicted earlier, skipped") == len(summary_ids := shard_ids(
        [(f"s{k}", str(wsi / f"s{k}.tif")) for k in range(3)], 1, 2)) > 0
    assert (tmp_path / "sharded" / "log_shard0.txt").exists() and (tmp_path / "sharded" / "log_shard1.txt").exists()
    summary = json.load(open(tmp_path / "sharded" / "shards" / "shard_1_of_2.json"))
    assert summary["items"] == summary_ids
    merged = run_script(*merge)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert _outputs(tmp_path / "sharded") == _outputs(tmp_path / "single")


@pytest.mark.slow
def test_train_net_writes_a_card_beside_every_checkpoint(tmp_path):
    """Every checkpoint train_net writes has its card: the same as model.card makes of it, with the
    training config."""
    from tests.test_bad_input import _tiles_args, _train_args

    wsi, labels = _sample_slides(tmp_path / "wsi", ((1024, 1280, 11), (1152, 1024, 12)))
    root = tmp_path
    (root / "train.csv").write_text(labels.read_text())
    tiles = run_script("tiles_creator.py", *_tiles_args(root))
    assert tiles.returncode == 0, tiles.stderr[-2000:]
    trained = run_script("train_net.py", *_train_args(root, "SOLVER.FINAL_MODEL", True))
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoints = sorted((root / "trained").glob("*.pth"))
    assert len(checkpoints) == 2  # fold 0 and the all-images model
    for path in checkpoints:
        card = json.load(open(card_path(str(path))))
        ckpt = load_checkpoint(str(path))
        assert card == model_card(ckpt, str(path)) | {"software": card["software"]}
        assert card["threshold"] == ckpt["threshold"] and card["input"]["mpp"] == ckpt["input"]["mpp"]
        assert "SOLVER:" in card["training"]["config"] and card["training"]["n_folds"] == 2
        assert card["software"][TOOLKIT] == VERSION


def test_dicom_segmentation_records_the_model_and_its_version(tmp_path):
    import highdicom as hd

    from tests.dicom_slides import dicomize

    image, _ = draw_slide(SampleSpec("d", "x", 600, 700, 51))
    write_pyramid(str(tmp_path / "d.tif"), image, downsamples=(), mpp=1.0)
    dicomize(str(tmp_path / "d.tif"), str(tmp_path / "wsi" / "d"), lossless=True)
    save_blob_checkpoint(tmp_path / "blobs.pth", size=64, reduce=4, mpp=4.0)
    _predict("TEST.WSI_FOLDER", tmp_path / "wsi", "TEST.MODEL_WEIGHTS_FOLDER", tmp_path / "blobs.pth", "TEST.SIZE", 64,
             "OUTPUT_DIR", tmp_path / "out", "TEST.DICOM_SEG", True)
    seg = hd.seg.segread(str(tmp_path / "out" / "predictions" / "d.seg.dcm"))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "blobs" and algorithm.AlgorithmVersion == f"{TOOLKIT} {VERSION}"
    assert seg.SoftwareVersions == f"{TOOLKIT} {VERSION}" and seg.ManufacturerModelName == TOOLKIT


def _no_outputs(folder):
    return [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f != "log.txt"] if folder.exists() else []


def test_exporting_a_file_that_is_not_a_checkpoint_writes_nothing(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    save_blob_checkpoint(models / "a.pth")  # a good one first: nothing of it is written either
    (models / "b.pth").write_text("not a checkpoint")
    result = _module("model.export", "TEST.MODEL_WEIGHTS_FOLDER", models, "OUTPUT_DIR", tmp_path / "out")
    assert result.returncode == 1 and len(_errors(result)) == 1, result.stderr[-2000:]
    assert "b.pth: not a readable checkpoint" in _errors(result)[0] and "Traceback" not in result.stderr
    assert _no_outputs(tmp_path / "out") == []


def test_an_onnx_model_without_its_card_is_refused(exported, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(exported / "glomeruli_kidney.onnx", models / "glomeruli_kidney.onnx")
    wsi, _ = _sample_slides(tmp_path / "wsi", ((600, 600, 3),))
    result = run_script("test_net.py", "TEST.BACKEND", "onnx", "TEST.MODEL_WEIGHTS_FOLDER", models,
                        "TEST.WSI_FOLDER", wsi, "OUTPUT_DIR", tmp_path / "out")
    assert result.returncode == 1 and len(_errors(result)) == 1, result.stderr[-2000:]
    assert "glomeruli_kidney.onnx: no model card glomeruli_kidney.json beside it" in _errors(result)[0]
    assert _no_outputs(tmp_path / "out") == []
    with pytest.raises(CheckpointError, match="no model card"):
        read_card(str(models / "glomeruli_kidney.onnx"))


@pytest.mark.parametrize("opts, env, code, needle", [
    (["TEST.SHARDS", 2, "TEST.SHARD_INDEX", 2], {}, 2, "TEST.SHARD_INDEX 2 must be < TEST.SHARDS 2"),
    (["TEST.SHARD_INDEX", 3], {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "0"}, 1,
     "shard index 3 (TEST.SHARD_INDEX) must be >= 0 and < the 2 shard(s) of SLURM_ARRAY_TASK_COUNT"),
])
def test_a_shard_index_past_the_shards_is_refused(tmp_path, opts, env, code, needle):
    wsi, _ = _sample_slides(tmp_path / "wsi", ((600, 600, 3),))
    result = subprocess.run([sys.executable, os.path.join(REPO, "test_net.py"), "TEST.WSI_FOLDER", str(wsi),
                             *map(str, opts), "OUTPUT_DIR", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == code and len(_errors(result)) == 1 and needle in _errors(result)[0], \
        result.stderr[-2000:]
    assert _no_outputs(tmp_path / "out") == []


def test_the_onnx_backend_runs_without_importing_torch(exported, tmp_path):
    """test_net with TEST.BACKEND onnx never imports torch (its start-up and ~0.6 GB of memory), nor
    timm or smp: python -X importtime lists every module a process imports."""
    wsi, _ = _sample_slides(tmp_path / "wsi", ((800, 900, 7),))
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(REPO, "test_net.py"), "TEST.BACKEND",
                             "onnx", "TEST.MODEL_WEIGHTS_FOLDER", str(exported), "TEST.WSI_FOLDER", str(wsi),
                             "OUTPUT_DIR", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported and "model.onnx_backend" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "timm", "segmentation_models_pytorch")}
    assert (tmp_path / "out" / "submission.csv").read_text().startswith("id,predicted\ns0,")
