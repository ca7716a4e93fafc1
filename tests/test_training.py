"""Training: K-fold split, datasets, and train_net.py end to end on real AIDPATH tiles."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.datasets import TileDataset, TileSet, kfold_groups, tile_group
from data.transforms import build_train_transform
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.callbacks import WeightAverager
from tests.conftest import REPO, free_port, kill_9_at_pause, run_script, start_script
from tests.slides import shared


def test_kfold_groups_never_leak_and_balance():
    groups = [f"s{i % 7}" for i in range(100)] + ["big"] * 40
    for n in (2, 3, 4, 7):
        fold_of = kfold_groups(groups, n)
        assert set(fold_of) == set(groups) and set(fold_of.values()) == set(range(n))
        for k in range(n):  # a slide is in exactly one validation fold
            valid = {g for g in groups if fold_of[g] == k}
            train = {g for g in groups if fold_of[g] != k}
            assert valid and not (valid & train)
        assert fold_of == kfold_groups(list(reversed(groups)), n)  # deterministic
    with pytest.raises(ValueError, match="more than the 8 slides"):
        kfold_groups(groups, 9)
    assert tile_group("2f6ecfcdf_12red16.png") == "2f6ecfcdf" and tile_group("a_b_3red4.png") == "a_b"


@pytest.fixture(scope="module")
def aidpath_tiles(tmp_path_factory):
    if not os.path.isdir(shared("aidpath")):
        pytest.skip("needs ../shared/data")
    root = tmp_path_factory.mktemp("aidpath")
    result = run_script("tiles_creator.py", "DATASETS.FORMAT", "pairs", "DATASETS.PAIRS_FOLDER", shared("aidpath"),
                        "DATASETS.LABELS_CSV", "", "DATASETS.MASK_CHANNEL", 0, "DATASETS.MASK_THRESHOLD", 127,
                        "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 8, "DATASETS.TRAIN_FOLDER", root / "tiles",
                        "DATASETS.MPP", 0.5)  # PNGs carry no pixel size: AIDPATH is 20x, ~0.5 um/px
    assert result.returncode == 0, result.stderr
    return root / "tiles"


def test_dataset_items_and_augmentation_alignment(aidpath_tiles):
    tiles = TileSet(str(aidpath_tiles), 64, 8)
    assert len(set(tiles.groups)) == 12
    ds = TileDataset(tiles, tiles.names, [0.5] * 3, [0.25] * 3)
    x, y = ds[0]
    image, mask = ds.load(0)
    assert x.shape == (3, 64, 64) and y.shape == (1, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy((image[..., 0] / 255.0 - 0.5) / 0.25).float(), atol=1e-5)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    # geometric augmentation moves image and mask together: encode the mask into the image
    transform = build_train_transform(1.0, seed=3)
    probe = np.zeros((64, 64, 3), np.uint8)
    probe[..., 1] = mask * 255
    for _ in range(20):
        out = transform(image=probe.copy(), mask=mask.copy())
        assert set(np.unique(out["mask"])) <= {0, 1}


def _train_args(tiles, out, *extra):
    return ["DATASETS.TRAIN_FOLDER", tiles, "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 8,
            "MODEL.ARCHITECTURE", "UneXt", "MODEL.ENCODER_NAME", "resnet18", "MODEL.ENCODER_WEIGHTS", "",
            "SOLVER.N_FOLDS", 3, "SOLVER.IMS_PER_BATCH", 8, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", out, *extra]


@pytest.mark.slow
def test_one_epoch_writes_every_output(aidpath_tiles, tmp_path):
    out = tmp_path / "out"
    result = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0, 2]"))
    assert result.returncode == 0, result.stderr[-3000:]
    for fold in (0, 2):
        ckpt = out / f"model_UneXt_resnet18_fold_{fold}.pth"
        model, info = model_from_checkpoint(str(ckpt))
        assert info["model"]["ARCHITECTURE"] == "UneXt" and info["fold"] == fold
        assert info["input"]["size"] == 64 and info["input"]["reduce"] == 8 and len(info["input"]["mean"]) == 3
        assert info["input"]["mpp"] == 4.0  # the tiles' pixel size: 0.5 um/px x 8, for test_net's scale
        assert 0.1 <= info["threshold"] <= 0.99 and 0 <= info["metrics"]["dice_th"] <= 1
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
        folder = out / f"fold_{fold}"
        for name in ("history.csv", "curves.png", "thresholds.csv", "thresholds.png", "triplets.png"):
            assert (folder / name).stat().st_size > 0, name
        rows = list(csv.DictReader(open(folder / "history.csv")))
        assert len(rows) == 1 and "dice_th" in rows[0]
    assert not (out / "model_UneXt_resnet18_fold_1.pth").exists()  # only the selected folds
    summary = json.load(open(out / "summary.json"))
    assert [f["fold"] for f in summary["folds"]] == [0, 2] and 0 <= summary["oof_dice"] <= 1
    # the folds validated again from their checkpoints (a run studied on another threshold
    # grid) give exactly the counts their results recorded, with the grid's thresholds
    from config.loader import load_cfg
    from model.training import revalidate
    from utils.metrics import THRESHOLDS

    again = revalidate(load_cfg(str(out / "config.yaml"), ["OUTPUT_DIR", str(out)]))
    for fold in (0, 2):
        recorded = json.load(open(out / f"fold_{fold}" / "result.json"))
        assert recorded["counts"]["thresholds"] == [round(float(t), 4) for t in THRESHOLDS]
        assert again[fold] == {k: recorded[k] for k in ("counts", "counts_by_source") if k in recorded}
    log = (out / "log.txt").read_text()
    assert (out / "config.yaml").exists() and "Out-of-fold Dice" in log
    # a log a person can read: one line per epoch, no progress-bar redraws
    assert log.count("Fold 0 epoch 1/1: train_loss") == 1 and "\r" not in log and "ERROR" not in log
    # every .pth at the top level is a checkpoint; the resume states are gone once a fold is done
    assert sorted(p.name for p in out.glob("*.pth")) == [f"model_UneXt_resnet18_fold_{k}.pth" for k in (0, 2)]
    assert not list(out.rglob("*.state")) and not list(out.glob("fold_*/*.pth"))
    # the same command again keeps the finished folds; other settings are refused, nothing touched
    again = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0]"))
    assert again.returncode == 0 and "Fold 0: finished earlier" in again.stderr
    before = (out / "model_UneXt_resnet18_fold_0.pth").stat().st_mtime_ns
    other = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 2, "SOLVER.FOLDS", "[0]"))
    errors = [line for line in other.stderr.splitlines() if "ERROR" in line]
    assert other.returncode == 1 and len(errors) == 1 and "SOLVER.MAX_EPOCHS 1 -> 2" in errors[0]
    assert "OVERWRITE True" in errors[0]
    assert (out / "model_UneXt_resnet18_fold_0.pth").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.parametrize("views", ["tiles", "crops"])
def test_a_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(aidpath_tiles, tmp_path, views):
    """kill -9 right after a resume state is saved, rerun: the same epochs, and bit for bit the
    weights of a run never interrupted (CPU, fp32, same workers). The crops variant also keeps its
    resume state every 2 epochs (SOLVER.CHECKPOINT_PERIOD), an EMA and a loader worker."""
    out, epochs = tmp_path / "out", 3 if views == "tiles" else 4
    extra = (["INPUT.CROP_SIZE", 32, "SOLVER.SAMPLES_PER_EPOCH", 24, "SOLVER.AVERAGE", "ema", "INPUT.PROB", 1.0,
              "SOLVER.CHECKPOINT_PERIOD", 2, "DATALOADER.NUM_WORKERS", 1] if views == "crops" else [])
    args = _train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", epochs, "SOLVER.FOLDS", "[1]", "SOLVER.AMP", "off",
                       *extra)
    pause = tmp_path / "paused"  # killed right after the first resume state, on any machine
    proc = start_script("train_net.py", *args, pause_at="training.state_saved@1", pause_file=pause)
    kill_9_at_pause(proc, pause)
    state = out / "fold_1" / "state.json"
    done = json.load(open(state))["epoch"]
    assert done == (0 if views == "tiles" else 1) and (out / "fold_1" / "last.state").exists()
    changed = run_script("train_net.py", *args, "SOLVER.BASE_LR_MAX", 0.01)  # other settings: refused
    assert changed.returncode == 1 and "an unfinished run with other settings" in changed.stderr
    assert "SOLVER.BASE_LR_MAX" in changed.stderr
    result = run_script("train_net.py", *args, "TILER.NUM_WORKERS", 1)  # a key training does not read: resumes
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {done + 1} of {epochs}" in result.stderr
    rows = list(csv.DictReader(open(out / "fold_1" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))  # no epoch lost or repeated
    assert (out / "model_UneXt_resnet18_fold_1.pth").exists() and not list(out.rglob("*.state"))
    whole = tmp_path / "whole"
    assert run_script("train_net.py", *_train_args(aidpath_tiles, whole, *args[args.index("SOLVER.MAX_EPOCHS"):]
                                                   )).returncode == 0
    resumed = torch.load(out / "model_UneXt_resnet18_fold_1.pth", weights_only=True)["state_dict"]
    uninterrupted = torch.load(whole / "model_UneXt_resnet18_fold_1.pth", weights_only=True)["state_dict"]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    history = list(csv.DictReader(open(whole / "fold_1" / "history.csv")))
    assert [(r["train_loss"], r["valid_loss"]) for r in history] == [(r["train_loss"], r["valid_loss"]) for r in rows]


@pytest.mark.slow
def test_swa_end_to_end_saves_the_equal_average_of_its_epochs(aidpath_tiles, tmp_path):
    """SOLVER.AVERAGE swa from SWA_START: the checkpoint holds the equal average of the epochs
    from ceil(SWA_START x epochs) on (here epochs 2 and 3 of 3), as the resume state records it."""
    out = tmp_path / "out"
    result = run_script("train_net.py", *_train_args(
        aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 3, "SOLVER.FOLDS", "[0]", "SOLVER.AVERAGE", "swa", "SOLVER.SWA_START",
        0.3, "SOLVER.SAVE", "final", "SOLVER.BN_UPDATE_BATCHES", 0, "SOLVER.KEEP_RESUME_STATES", True, "SOLVER.AMP", "off"))
    assert result.returncode == 0, result.stderr[-3000:]
    _, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))
    assert info["weights"] == "the SWA average"
    saved = torch.load(out / "model_UneXt_resnet18_fold_0.pth", weights_only=True)["state_dict"]
    last = torch.load(out / "fold_0" / "last.state", weights_only=True)
    assert last["average"]["kind"] == "swa" and last["average"]["n_averaged"] == 2  # epochs 2 and 3
    average = last["average"]["state"]
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert not all(torch.equal(saved[k], last["model"][k]) for k in saved)  # not the last epoch's weights


@pytest.mark.slow
def test_two_process_ddp_on_cpu(aidpath_tiles, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): one short epoch, rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "train_net.py"),
           *map(str, _train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0]"))]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))
    assert info["fold"] == 0 and 0 <= info["metrics"]["dice_th"] <= 1
    rows = list(csv.DictReader(open(out / "fold_0" / "history.csv")))
    assert len(rows) == 1  # written once, by rank 0
    assert result.stderr.count("out-of-fold Dice") == 1  # only rank 0 reports


@pytest.mark.slow
@pytest.mark.parametrize("views", ["tiles", "crops"])
def test_same_seed_same_run(aidpath_tiles, tmp_path, views):
    """Two runs with the same MODEL.SEED train identically (augmentation and crops included)."""
    extra = (["INPUT.CROP_SIZE", 64, "SOLVER.SAMPLES_PER_EPOCH", 16, "INPUT.AUGMENTATION", "histology",
              "SOLVER.AVERAGE", "ema", "DATALOADER.NUM_WORKERS", 1] if views == "crops" else [])
    histories = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 2,
                                                          "SOLVER.FOLDS", "[0]", "INPUT.PROB", 1.0, *extra))
        assert result.returncode == 0, result.stderr[-2000:]
        rows = list(csv.DictReader(open(out / "fold_0" / "history.csv")))
        histories.append([(r["train_loss"], r["valid_loss"]) for r in rows])
    assert histories[0] == histories[1] and len(histories[0]) == 2


def test_weight_averager_is_an_ema_or_an_equal_average():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema, swa = WeightAverager("ema", decay=0.5), WeightAverager("swa")
    seen = []
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        model[1].num_batches_tracked.fill_(step)
        ema.update(model)
        swa.update(model)
        seen.append(float(step))
    expected = seen[0]
    for n, value in enumerate(seen[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(ema.state["0.weight"], torch.full((2, 3), expected))
    assert torch.allclose(swa.state["0.weight"], torch.full((2, 3), float(np.mean(seen))))
    assert int(ema.state["1.num_batches_tracked"]) == 5  # integer buffers: the latest value
    again = WeightAverager("ema", 0.5)
    again.load_state_dict(ema.state_dict())
    assert again.n_averaged == 6 and torch.equal(again.state["0.weight"], ema.state["0.weight"])


@pytest.mark.slow
def test_crops_ema_final_weights_and_a_model_on_all_images(aidpath_tiles, tmp_path):
    out = tmp_path / "out"
    result = run_script("train_net.py", *_train_args(
        aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 2, "SOLVER.FOLDS", "[0, 1]", "INPUT.CROP_SIZE", 64,
        "SOLVER.SAMPLES_PER_EPOCH", 16, "INPUT.AUGMENTATION", "histology", "SOLVER.AVERAGE", "ema", "SOLVER.SAVE",
        "final", "SOLVER.FINAL_MODEL", True, "SOLVER.KEEP_RESUME_STATES", True, "SOLVER.BN_UPDATE_BATCHES", 2,
        "SOLVER.AMP", "bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cpu (bf16)" in result.stderr  # bfloat16 autocast asked for: forward in bf16, weights in fp32
    assert "random 64 px crops (33% on foreground), 16 per epoch" in result.stderr
    summary = json.load(open(out / "summary.json"))
    for fold in (0, 1):
        model, info = model_from_checkpoint(str(out / f"model_UneXt_resnet18_fold_{fold}.pth"))
        assert info["weights"].startswith("the EMA average (BatchNorm statistics from 2 batches)")
        assert (out / f"fold_{fold}" / "last.state").exists()  # kept on request
    model, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_all.pth"))
    assert info["fold"] == -1 and info["metrics"]["valid_ids"] == [] and info["metrics"]["train_tiles"] == len(TileSet(str(aidpath_tiles), 64, 8).names)
    assert info["threshold"] == summary["oof_threshold"] and info["metrics"]["threshold_source"] == "out-of-fold study"
    assert summary["final_model"]["checkpoint"].endswith("model_UneXt_resnet18_all.pth")
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    log = (out / "log.txt").read_text()
    assert log.count("Final model epoch") == 2 and "Final model: the EMA average" in log


@pytest.mark.slow
def test_deep_supervision_trains_and_saves_its_heads(aidpath_tiles, tmp_path):
    out = tmp_path / "out"
    result = run_script("train_net.py", *_train_args(
        aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0]", "INPUT.CROP_SIZE", 64,
        "SOLVER.SAMPLES_PER_EPOCH", 16, "SOLVER.AVERAGE", "ema", "SOLVER.SAVE", "final", "MODEL.NORM", "group",
        "MODEL.DEEP_SUPERVISION", True, "SOLVER.AMP", "bf16"))  # bf16: the heads' logits go through autocast too
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UneXt/resnet18 with deep supervision on cpu (bf16)" in result.stderr
    model, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))
    assert info["model"]["DEEP_SUPERVISION"] is True and len(model.aux_heads) == 3
    # the heads are saved with the weights; inference gives the main output alone
    saved = load_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))
    assert any(k.startswith("aux_heads.") for k in saved["state_dict"])
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert 0 <= json.load(open(out / "fold_0" / "result.json"))["dice_at_0.5"] <= 1


@pytest.mark.slow
def test_fine_tuning_on_every_image_keeps_the_starting_models_normalisation(aidpath_tiles, tmp_path):
    """SOLVER.CROSS_VALIDATION False with MODEL.WEIGHTS (config/finetune.yaml): no folds, only the
    model on every image, started from the checkpoint's weights and normalised with its mean/std."""
    from model.build import build_model
    from model.checkpoint import save_checkpoint

    spec = {"ARCHITECTURE": "UneXt", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}
    torch.manual_seed(3)
    start = build_model(spec)
    start_path = str(tmp_path / "start.pth")
    save_checkpoint(start_path, start, {"model": spec, "input": {"size": 64, "reduce": 8, "mean": [0.1, 0.2, 0.3],
                                                                 "std": [0.4, 0.5, 0.6], "mpp": None}})
    out = tmp_path / "out"
    bad = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.CROSS_VALIDATION", False))
    assert bad.returncode != 0 and "set SOLVER.FINAL_MODEL True too" in bad.stderr and not out.exists()
    result = run_script("train_net.py", *_train_args(
        aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "INPUT.CROP_SIZE", 64, "SOLVER.SAMPLES_PER_EPOCH", 16,
        "SOLVER.CROSS_VALIDATION", False, "SOLVER.FINAL_MODEL", True, "MODEL.WEIGHTS", start_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob("model_*_fold_*.pth")) and not list(out.glob("fold_*"))
    model, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_all.pth"))
    assert info["input"]["mean"] == [0.1, 0.2, 0.3] and info["input"]["std"] == [0.4, 0.5, 0.6]
    assert info["threshold"] == 0.5 and info["metrics"]["threshold_source"] == "default 0.5"
    assert info["training_seconds"] >= 0 and "cores" in info["machine"]  # one short epoch may log 00:00
    # it started from the checkpoint: the encoder's first weights moved only a little from it
    moved = (model.encoder.conv1.weight - start.encoder.conv1.weight).abs().max().item()
    assert 0 < moved < 0.05
    assert json.load(open(out / "summary.json"))["folds"] == []


@pytest.mark.slow
def test_the_worker_count_does_not_change_what_a_fold_learns(aidpath_tiles, tmp_path):
    """Training items are seeded by (epoch, index) (data.datasets.EpochSeeded): 0, 1 or 2 loader
    workers draw the same crops and augmentation, and the training process's own generator (dropout)
    is left alone, so the weights are the same bit for bit, and a rerun with another count keeps the
    finished fold (DATALOADER.NUM_WORKERS is not a training setting). Before, 0 workers differed:
    the items reseeded the training process's generator."""
    weights = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        result = run_script("train_net.py", *_train_args(
            aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 2, "SOLVER.FOLDS", "[0]", "INPUT.CROP_SIZE", 64,
            "SOLVER.SAMPLES_PER_EPOCH", 16, "INPUT.AUGMENTATION", "histology", "SOLVER.SAVE", "final",
            "DATALOADER.NUM_WORKERS", workers))
        assert result.returncode == 0, result.stderr[-3000:]
        weights[workers] = model_from_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))[0].state_dict()
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    again = run_script("train_net.py", *_train_args(
        aidpath_tiles, tmp_path / "w0", "SOLVER.MAX_EPOCHS", 2, "SOLVER.FOLDS", "[0]", "INPUT.CROP_SIZE", 64,
        "SOLVER.SAMPLES_PER_EPOCH", 16, "INPUT.AUGMENTATION", "histology", "SOLVER.SAVE", "final",
        "DATALOADER.NUM_WORKERS", 1))
    assert again.returncode == 0 and "Fold 0: finished earlier" in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_toggling_deep_supervision_trains_the_finished_fold_again_or_says_why(aidpath_tiles, tmp_path):
    """A key that changes what a fold learns needs no list: MODEL.DEEP_SUPERVISION (missing from
    the old hand-kept list: its finished folds were kept) is now refused with one line naming it."""
    out = tmp_path / "out"
    args = _train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0]", "INPUT.CROP_SIZE", 64,
                       "SOLVER.SAMPLES_PER_EPOCH", 8, "SOLVER.SAVE", "final")
    assert run_script("train_net.py", *args).returncode == 0
    again = run_script("train_net.py", *args, "MODEL.DEEP_SUPERVISION", True)
    assert again.returncode != 0
    assert "trained with other settings (MODEL.DEEP_SUPERVISION False -> True)" in again.stderr, again.stderr[-2000:]
    assert run_script("train_net.py", *args, "MODEL.DEEP_SUPERVISION", True, "OVERWRITE", True).returncode == 0
    _, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))
    assert info["model"]["DEEP_SUPERVISION"] is True


def test_every_training_key_counts_unless_declared_otherwise():
    from config import get_cfg_defaults
    from config.choices import NOT_LEARNED, TRAINING_SECTIONS
    from model.training import changed_settings, training_settings

    cfg = get_cfg_defaults()
    settings = training_settings(cfg, torch.device("cpu"))
    for section in TRAINING_SECTIONS:
        for name in cfg[section]:
            key = f"{section}.{name}"
            assert (key in settings) != (key in NOT_LEARNED), key
    assert "MODEL.DEEP_SUPERVISION" in settings and "DATALOADER.NUM_WORKERS" not in settings
    old = {k: v for k, v in settings.items() if k != "MODEL.DEEP_SUPERVISION"}  # a record of an earlier version
    assert changed_settings(old, settings) == []
    assert changed_settings({**settings, "SOLVER.MAX_EPOCHS": 3}, settings) == ["SOLVER.MAX_EPOCHS"]


def test_training_seconds_add_up_the_epochs_a_history_records(tmp_path):
    from model.training import _training_seconds

    path = tmp_path / "history.csv"
    path.write_text("epoch,train_loss,time\n0,1.0,00:15\n1,0.9,01:05\n2,0.8,1:02:03\n3,0.7,\n")
    assert _training_seconds(str(path)) == 15 + 65 + 3723
    assert _training_seconds(str(tmp_path / "absent.csv")) == 0.0
