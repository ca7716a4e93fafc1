"""The AIDPATH recipe, trained and scored honestly: held-out Dice per seed, with test_net.py.

    python -m tests.bench.aidpath_heldout --seeds 1 2 3          # train (the README's commands) and score
    python -m tests.bench.aidpath_heldout --output output/aidpath # score a run trained earlier

For each seed, runs exactly the documented recipe, in a fresh process each and timed::

    python tiles_creator.py --config-file config/aidpath.yaml DATASETS.TRAIN_FOLDER <fresh> ...
    python train_net.py --config-file config/aidpath.yaml MODEL.SEED <seed> OUTPUT_DIR <out> ...

then every fold's checkpoint predicts, with test_net.py in pairs mode (whole 1024 x 1024 images,
sliding windows, Gaussian blending, full-resolution masks), exactly the images that fold held
out: each of the 12 images is scored once, by a model that never saw it. The Dice is pooled
over the 12 images (2 sum|P&G| / sum(|P|+|G|)). The main figure uses a fixed threshold of 0.5,
chosen before any run; a fold's learned threshold was picked on its held-out images, so the
figure "at the learned thresholds" is given for information only (it is slightly optimistic).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import sys
import tempfile

from tests.bench.bench_tiles import REPO
from tests.bench.kidney_heldout import run, train_recipe
from tests.slides import SHARED_REASON, has_shared, shared

RECIPE = os.path.join(REPO, "config", "aidpath.yaml")


def score(output: str, threshold: float, work: str):
    """Pooled Dice over every fold's held-out images; ``threshold`` < 0: each checkpoint's own."""
    from data.sources import load_pair_mask
    from model.checkpoint import load_checkpoint
    from utils.rle import rle_decode

    results = sorted(glob.glob(os.path.join(output, "fold_*", "result.json")))
    if not results:
        sys.exit(f"{output}: no fold_*/result.json; train config/aidpath.yaml first")
    inter = total = 0
    per_image, per_fold = {}, []
    for result_path in results:
        result = json.load(open(result_path))
        path = result["checkpoint"] if os.path.isabs(result["checkpoint"]) else os.path.join(REPO, result["checkpoint"])
        ckpt = load_checkpoint(path)
        fold, ids = int(ckpt["fold"]), ckpt["metrics"]["valid_ids"]
        id_csv = os.path.join(work, f"fold_{fold}.csv")
        with open(id_csv, "w") as fh:
            fh.write("id\n" + "".join(f"{i}\n" for i in ids))
        out = os.path.join(work, f"fold_{fold}_th{threshold:g}")
        run([sys.executable, "test_net.py", "--config-file", RECIPE, "TEST.PAIRS_FOLDER", shared("aidpath"),
              "TEST.LABELS_CSV", id_csv, "TEST.MODEL_WEIGHTS_FOLDER", path, "TEST.TH", str(threshold),
              "OUTPUT_DIR", out], "test_net.py")
        fold_inter = fold_total = 0
        with open(os.path.join(out, "submission.csv"), newline="") as fh:
            predicted = {row["id"]: row["predicted"] for row in csv.DictReader(fh)}
        for image_id in ids:  # counts from the full-resolution RLE against the true mask
            truth = load_pair_mask(shared("aidpath", "masks", f"{image_id}.png"), 0, 127) > 0
            pred = rle_decode(predicted[image_id], truth.shape) > 0
            common, both = int((pred & truth).sum()), int(pred.sum() + truth.sum())
            fold_inter, fold_total = fold_inter + common, fold_total + both
            per_image[image_id] = 2 * common / both if both else 1.0
        inter, total = inter + fold_inter, total + fold_total
        per_fold.append(2 * fold_inter / fold_total if fold_total else 1.0)
    pooled = 2 * inter / total if total else 1.0
    return pooled, per_fold, per_image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="train the recipe with these MODEL.SEED values")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "aidpath"),
                        help="without --seeds: the OUTPUT_DIR of a run to score; with: the prefix of the runs' folders")
    parser.add_argument("opts", nargs="*", help="extra KEY VALUE overrides for train_net.py (experiments)")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    work = tempfile.mkdtemp(prefix="aidpath_heldout_")
    runs = []
    if args.seeds:
        for seed in args.seeds:
            out = f"{args.output}_seed{seed}"
            minutes = sum(train_recipe(seed, out, os.path.join(work, f"tiles_seed{seed}"), RECIPE, args.opts)) / 60
            runs.append((seed, out, minutes))
    else:
        runs.append((None, args.output, float("nan")))
    rows = []
    for seed, out, minutes in runs:
        folder = os.path.join(work, os.path.basename(out))
        os.makedirs(folder, exist_ok=True)
        fixed, per_fold, per_image = score(out, 0.5, folder)
        learned, _, _ = score(out, -1.0, folder)
        oof = json.load(open(os.path.join(out, "summary.json")))
        rows.append((seed, fixed, learned, minutes))
        print(f"seed {seed}: held-out pooled Dice {fixed:.4f} at 0.5 (per fold {', '.join(f'{d:.3f}' for d in per_fold)}; "
              f"per image {', '.join(f'{k} {v:.2f}' for k, v in sorted(per_image.items()))}); "
              f"{learned:.4f} at the learned thresholds; training's out-of-fold Dice {oof['oof_dice']:.4f}", flush=True)
    print("\n| seed | held-out pooled Dice (th 0.5) | at the learned thresholds | tiles + training, min |")
    print("|---|---|---|---|")
    for seed, fixed, learned, minutes in rows:
        print(f"| {seed} | {fixed:.4f} | {learned:.4f} | {minutes:.1f} |")
    if len(rows) > 1:
        values = [r[1] for r in rows]
        print(f"\nmean {statistics.mean(values):.4f}, min {min(values):.4f}, max {max(values):.4f}, "
              f"spread (max - min) {max(values) - min(values):.4f}, stdev {statistics.stdev(values):.4f}")
    print(f"(test_net outputs, pictures included, in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
