"""Score the AIDPATH recipe's fold checkpoints on their held-out images with test_net.py.

    python train_net.py --config-file config/aidpath.yaml     # first (about 17 min on 2 cores)
    python -m tests.bench.aidpath_heldout [--output output/aidpath]

Each fold's checkpoint predicts, as whole 1024 x 1024 images in test_net's pairs mode (sliding
windows, Gaussian blending, full-resolution masks), exactly the images that fold held out, so
every image is scored once by a model that never saw it. Prints per-fold and pooled Dice
(pooled = 2 sum|P&G| / sum(|P|+|G|) over all images), at each checkpoint's own threshold.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from tests.bench.bench_tiles import REPO
from tests.slides import SHARED_REASON, has_shared, shared


def _held_out(output: str, fold: int):
    """A fold's held-out ids recomputed from the run's tiles (checkpoints older than the
    ``valid_ids`` they now carry): the same deterministic split training made."""
    from config import load_cfg
    from data.datasets import TileSet, kfold_groups

    cfg = load_cfg(os.path.join(output, "config.yaml"))
    tiles = TileSet(cfg.DATASETS.TRAIN_FOLDER, cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN)
    fold_of = kfold_groups(tiles.groups, cfg.SOLVER.N_FOLDS)
    return sorted(g for g, f in fold_of.items() if f == fold)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "aidpath"), help="the recipe's OUTPUT_DIR")
    parser.add_argument("--size", type=int, default=128, help="TEST.SIZE, windows in model pixels (training tiles: 128)")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    results = sorted(glob.glob(os.path.join(args.output, "fold_*", "result.json")))
    if not results:
        sys.exit(f"{args.output}: no fold_*/result.json; train config/aidpath.yaml first")
    from model.checkpoint import load_checkpoint

    inter = total = 0
    per_image = []
    work = tempfile.mkdtemp(prefix="aidpath_heldout_")
    for result_path in results:
        result = json.load(open(result_path))
        ckpt = load_checkpoint(result["checkpoint"] if os.path.isabs(result["checkpoint"])
                               else os.path.join(REPO, result["checkpoint"]))
        fold = int(ckpt["fold"])
        ids = ckpt["metrics"].get("valid_ids") or _held_out(args.output, fold)
        id_csv = os.path.join(work, f"fold_{fold}.csv")
        with open(id_csv, "w") as fh:
            fh.write("id\n" + "".join(f"{i}\n" for i in ids))
        out = os.path.join(work, f"fold_{fold}")
        cmd = [sys.executable, os.path.join(REPO, "test_net.py"), "--config-file", os.path.join(REPO, "config", "aidpath.yaml"),
               "TEST.PAIRS_FOLDER", shared("aidpath"), "TEST.LABELS_CSV", id_csv,
               "TEST.MODEL_WEIGHTS_FOLDER", os.path.join(REPO, result["checkpoint"]), "TEST.SIZE", str(args.size),
               "TEST.TH", str(ckpt["threshold"]), "TEST.P_TH", "-1", "OUTPUT_DIR", out]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-2000:])
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        for rec_path in sorted(glob.glob(os.path.join(out, ".predictions", "*.json"))):
            rec = json.load(open(rec_path))
            inter += rec["intersection"]
            total += rec["total"]
            per_image.append(rec["dice"])
        print(f"fold {fold}: {len(ids)} held-out images ({', '.join(ids)}), threshold {ckpt['threshold']:.2f}: "
              f"overall Dice {metrics['overall_dice']:.4f}, mean {metrics['mean_dice']:.4f}")
    print(f"all folds, each image scored by the fold that held it out ({len(per_image)} images): "
          f"pooled Dice {2 * inter / total if total else 1.0:.4f}, mean per image {sum(per_image) / len(per_image):.4f}")
    print(f"(outputs, pictures included, in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
