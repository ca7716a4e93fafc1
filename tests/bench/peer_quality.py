"""Our kidney recipe side by side with a peer: MONAI's 2D segmentation tutorial recipe, trained on
the same images, for the same minutes and seeds, scored on the same held-out images.

    python -m tests.bench.peer_quality --runs output/kidney_seed1 output/kidney_seed2 output/kidney_seed3

(MONAI needed: ``python -m pip install -r requirements-bench.txt``.) Each ``--runs`` folder is a
finished ``train_net.py --config-file config/kidney.yaml`` run (``tests.bench.kidney_heldout``
makes them); from it the peer takes the seed (``MODEL.SEED``), each fold's held-out images and the
minutes our training took per model. For every fold the peer then trains, from random weights,
for those minutes on that fold's training images and predicts that fold's held-out images:

* the images at our tiles' physical scale (2 um/px: the scale the recipe's tiles have), RGB,
  ``ScaleIntensityd`` (each image to 0..1, as the tutorial does);
* ``RandCropByPosNegLabeld`` 96 px (pos 1, neg 1, 4 samples), ``RandRotate90d``;
* ``UNet`` (2-D, channels 16, 32, 64, 128, 256, strides 2, 2 residual units);
* ``DiceLoss(sigmoid=True)``, ``Adam`` 1e-3, batches of 2 images x 4 crops;
* ``sliding_window_inference`` with a 96 px window (4 windows per batch), sigmoid, threshold 0.5,
  the probability upsampled (bilinear) to the image's full resolution.

The Dice is pooled per source over all held-out images (full resolution, the same true masks
as ``kidney_heldout``). Ours, for the same runs, comes from ``tests.bench.kidney_heldout``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Tuple

import cv2
import numpy as np

from tests.bench.kidney_heldout import truth_runs
from tests.slides import SHARED_REASON, has_shared, shared

SCALE_MPP = 2.0  # the kidney recipe's tiles (INPUT.MPP_TRAIN)
SOURCE_MPP = {"aidpath": 0.5, "hubmap_ftu": 0.95}


def _source_of(image_id: str) -> str:
    return "aidpath" if os.path.isfile(shared("aidpath", "images", f"{image_id}.png")) else "hubmap_ftu"


def load_image(image_id: str) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int]]:
    """``(image (3, h, w) float32 0..1 at 2 um/px, mask (1, h, w) float32, full-resolution shape)``."""
    from utils.rle import rle_decode, runs_to_rle

    source = _source_of(image_id)
    path = shared("aidpath", "images", f"{image_id}.png") if source == "aidpath" else shared("hubmap_ftu",
                                                                                             f"{image_id}.jpg")
    rgb = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    runs, shape = truth_runs(source, image_id)
    mask = rle_decode(runs_to_rle(runs), shape)
    factor = SOURCE_MPP[source] / SCALE_MPP
    size = (max(1, round(shape[1] * factor)), max(1, round(shape[0] * factor)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    small = (small - small.min()) / max(1e-6, float(small.max() - small.min()))  # ScaleIntensityd
    small_mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST).astype(np.float32)
    return small.transpose(2, 0, 1).copy(), small_mask[None], shape


def train_peer(items: List[Dict[str, np.ndarray]], seconds: float, seed: int):
    """MONAI's tutorial recipe for ``seconds`` of wall time; returns the model and its steps."""
    import torch
    from monai.data import DataLoader, Dataset, list_data_collate
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandRotate90d
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    transform = Compose([
        RandCropByPosNegLabeld(keys=["img", "seg"], label_key="seg", spatial_size=[96, 96], pos=1, neg=1,
                               num_samples=4),
        RandRotate90d(keys=["img", "seg"], prob=0.5, spatial_axes=[0, 1]),
    ])
    loader = DataLoader(Dataset(items, transform), batch_size=2, shuffle=True, num_workers=1,
                        collate_fn=list_data_collate)
    model = UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128, 256),
                 strides=(2, 2, 2, 2), num_res_units=2)
    loss_function = DiceLoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    start, steps = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_function(model(batch["img"]), batch["seg"])
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
    return model, steps


def predict_peer(model, image: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """The full-resolution 0/1 mask of one image (sliding window at 2 um/px, probability upsampled)."""
    import torch
    from monai.inferers import sliding_window_inference

    model.eval()
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(image)[None], (96, 96), 4, model)
    prob = torch.sigmoid(logits)[0, 0].numpy()
    return (cv2.resize(prob, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.uint8)


def peer_run(run: str) -> Dict[str, object]:
    """Train and score the peer on the folds of one of our runs."""
    import torch
    from utils.rle import rle_area, rle_encode, parse_rle, runs_intersection

    torch.set_num_threads(os.cpu_count() or 1)
    config = {}
    with open(os.path.join(run, "config.yaml")) as fh:
        import yaml

        config = yaml.safe_load(fh)
    seed = int(config["MODEL"]["SEED"])
    summary = json.load(open(os.path.join(run, "summary.json")))
    folds = [f for f in summary["folds"]]
    models = len(folds) + (1 if "final_model" in summary else 0)
    seconds = float(summary["seconds"]) / models  # our wall time per trained model
    every = sorted({i for f in folds for i in f["valid_ids"]})
    data = {i: load_image(i) for i in every}
    pooled: Dict[str, Dict[str, float]] = {}
    steps = []
    for f in folds:
        held = set(f["valid_ids"])
        items = [{"img": data[i][0], "seg": data[i][1]} for i in every if i not in held]
        model, n = train_peer(items, seconds, seed + int(f["fold"]))
        steps.append(n)
        for image_id in sorted(held):
            image, _, shape = data[image_id]
            pred = parse_rle(rle_encode(predict_peer(model, image, shape)), shape)
            truth, _ = truth_runs(_source_of(image_id), image_id)
            entry = pooled.setdefault(_source_of(image_id), {"inter": 0, "total": 0})
            entry["inter"] += runs_intersection(pred, truth)
            entry["total"] += rle_area(pred) + rle_area(truth)
    dice = {s: 2 * e["inter"] / e["total"] if e["total"] else 1.0 for s, e in pooled.items()}
    return {"run": run, "seed": seed, "seconds_per_fold": seconds, "steps": steps, "dice": dice}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="OUTPUT_DIRs of finished kidney recipe runs")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    rows = []
    for run in args.runs:
        row = peer_run(run)
        rows.append(row)
        print(f"seed {row['seed']}: MONAI tutorial recipe, {row['seconds_per_fold'] / 60:.1f} min per fold "
              f"({', '.join(map(str, row['steps']))} steps): held-out pooled Dice "
              + ", ".join(f"{s} {d:.4f}" for s, d in sorted(row["dice"].items())), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
