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
from model.checkpoint import model_from_checkpoint
from tests.conftest import REPO, kill_9_when, run_script, start_script
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
                        "INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 8, "DATASETS.TRAIN_FOLDER", root / "tiles")
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


def test_one_epoch_writes_every_output(aidpath_tiles, tmp_path):
    out = tmp_path / "out"
    result = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0, 2]"))
    assert result.returncode == 0, result.stderr[-3000:]
    for fold in (0, 2):
        ckpt = out / f"model_UneXt_resnet18_fold_{fold}.pth"
        model, info = model_from_checkpoint(str(ckpt))
        assert info["model"]["ARCHITECTURE"] == "UneXt" and info["fold"] == fold
        assert info["input"]["size"] == 64 and info["input"]["reduce"] == 8 and len(info["input"]["mean"]) == 3
        assert 0.1 <= info["threshold"] <= 0.9 and 0 <= info["metrics"]["dice_th"] <= 1
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
        folder = out / f"fold_{fold}"
        for name in ("history.csv", "curves.png", "thresholds.csv", "thresholds.png", "triplets.png"):
            assert (folder / name).stat().st_size > 0, name
        rows = list(csv.DictReader(open(folder / "history.csv")))
        assert len(rows) == 1 and "dice_th" in rows[0]
    assert not (out / "model_UneXt_resnet18_fold_1.pth").exists()  # only the selected folds
    summary = json.load(open(out / "summary.json"))
    assert [f["fold"] for f in summary["folds"]] == [0, 2] and 0 <= summary["oof_dice"] <= 1
    assert (out / "config.yaml").exists() and "out-of-fold Dice" in (out / "log.txt").read_text()
    # a second run does not overwrite the first
    again = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0]"))
    assert again.returncode == 1 and "SOLVER.RESUME" in again.stderr


def test_resume_continues_from_the_saved_epoch(aidpath_tiles, tmp_path):
    out = tmp_path / "out"
    args = _train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 3, "SOLVER.FOLDS", "[1]")
    proc = start_script("train_net.py", *args)
    state = out / "fold_1" / "state.json"
    kill_9_when(proc, state.exists, poll=0.05)
    done = json.load(open(state))["epoch"]
    assert done < 2
    result = run_script("train_net.py", *args, "SOLVER.RESUME", True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {done + 1} of 3" in result.stderr
    rows = list(csv.DictReader(open(out / "fold_1" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(3))  # no epoch lost or repeated
    assert (out / "model_UneXt_resnet18_fold_1.pth").exists()


def test_two_process_ddp_on_cpu(aidpath_tiles, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): one short epoch, rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(REPO, "train_net.py"),
           *map(str, _train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 1, "SOLVER.FOLDS", "[0]"))]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model, info = model_from_checkpoint(str(out / "model_UneXt_resnet18_fold_0.pth"))
    assert info["fold"] == 0 and 0 <= info["metrics"]["dice_th"] <= 1
    rows = list(csv.DictReader(open(out / "fold_0" / "history.csv")))
    assert len(rows) == 1  # written once, by rank 0
    assert result.stderr.count("out-of-fold Dice") == 1  # only rank 0 reports


def test_same_seed_same_run(aidpath_tiles, tmp_path):
    """Two runs with the same MODEL.SEED train identically (augmentation included)."""
    histories = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = run_script("train_net.py", *_train_args(aidpath_tiles, out, "SOLVER.MAX_EPOCHS", 2,
                                                          "SOLVER.FOLDS", "[0]", "INPUT.PROB", 1.0))
        assert result.returncode == 0, result.stderr[-2000:]
        rows = list(csv.DictReader(open(out / "fold_0" / "history.csv")))
        histories.append([(r["train_loss"], r["valid_loss"]) for r in rows])
    assert histories[0] == histories[1] and len(histories[0]) == 2
