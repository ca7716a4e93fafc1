"""The kidney recipe (config/kidney.yaml: AIDPATH + HuBMAP FTU), trained and scored honestly:
held-out Dice per source and seed, with test_net.py.

    python -m tests.bench.kidney_heldout --seeds 1 2 3                 # tile, train, score
    python -m tests.bench.kidney_heldout --output output/kidney_seed1   # score a run trained earlier
    python -m tests.bench.kidney_heldout --seeds 1 -- SOLVER.MAX_EPOCHS 10   # an experiment (KEY VALUE)

For each seed it runs the two documented commands in fresh processes, timed::

    python tiles_creator.py --config-file config/kidney.yaml DATASETS.TRAIN_FOLDER <fresh>
    python train_net.py --config-file config/kidney.yaml MODEL.SEED <seed> OUTPUT_DIR <out>

then every fold's checkpoint predicts, with test_net.py, exactly the images that fold held out
(each image is scored once, by a model that never saw it): the AIDPATH biopsies in pairs mode
(TEST.PAIRS_FOLDER, red-channel masks, 0.5 um/px), the HuBMAP tiles as a folder of images with
their labelme files (TEST.WSI_FOLDER + TEST.ANNOTATIONS_FOLDER, 0.95 um/px). The Dice is pooled
per source over all its images (2 sum|P&G| / sum(|P|+|G|), from the full-resolution RLE against
the true masks) at a threshold of 0.5 fixed before any run; nothing is chosen on these images.

With ``--nested`` each fold is scored a second time at the threshold the recipe's own rule (the
best pooled Dice, ``utils.metrics.best_threshold``) learns from the *other* folds' validations: a
learned threshold, as the shipped model uses one, chosen without any image of the fold it scores.

    python -m tests.bench.kidney_heldout --nested --output output/kidney_seed1
    python -m tests.bench.kidney_heldout --nested --output output/kidney_seed1 --revalidate datasets/kidney_tiles

``--revalidate`` learns those thresholds from each fold validated again from its checkpoint on the
recipe's tiles at the current threshold grid (``model.training.revalidate``): for runs whose
``result.json`` recorded an older, narrower grid.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from tests.bench.bench_tiles import REPO
from tests.slides import SHARED_REASON, has_shared, shared
from utils.metrics import best_threshold, pooled_table

RECIPE = os.path.join(REPO, "config", "kidney.yaml")
THRESHOLD = 0.5  # fixed in advance
OBJECT_IOU = 0.5  # a predicted glomerulus counts as found at IoU >= 0.5 with a true one
FAILURE_DICE = 0.5  # images scoring below this get their picture kept


def run(cmd: List[str], what: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def train_recipe(seed: int, out: str, tiles: str, recipe: str = RECIPE, extra=()) -> Tuple[float, float]:
    """Tile and train ``recipe`` for ``seed``; returns the wall seconds of each command."""
    tile_s = run([sys.executable, "tiles_creator.py", "--config-file", recipe, "DATASETS.TRAIN_FOLDER", tiles],
                 "tiles_creator.py")
    train_s = run([sys.executable, "train_net.py", "--config-file", recipe, "DATASETS.TRAIN_FOLDER", tiles,
                   "MODEL.SEED", str(seed), "OUTPUT_DIR", out, *extra], "train_net.py")
    print(f"seed {seed}: tiles_creator {tile_s:.0f} s + train_net {train_s:.0f} s = {(tile_s + train_s) / 60:.1f} min",
          flush=True)
    return tile_s, train_s


def truth_runs(source: str, image_id: str):
    """The true mask of a held-out image as RLE runs: AIDPATH's red-channel PNG, HuBMAP's labelme file."""
    from data.masks import slide_labels
    from data.sources import load_pair_mask
    from utils.rle import parse_rle, rle_encode

    if source == "aidpath":
        mask = load_pair_mask(shared("aidpath", "masks", f"{image_id}.png"), 0, 127)
        return parse_rle(rle_encode(mask), mask.shape), mask.shape
    runs, _ = slide_labels(shared("hubmap_ftu", f"{image_id}.json"), (1200, 1600))
    return runs, (1200, 1600)


def nested_thresholds(counts: Dict[int, Dict[str, List[float]]]) -> Dict[int, float]:
    """For each fold of ``counts`` (fold -> its validation's pixel counts, with their thresholds),
    the threshold learned from the other folds' counts pooled."""
    return {fold: best_threshold(pooled_table([c for f, c in counts.items() if f != fold]))[0] for fold in counts}


def revalidated_counts(output: str, tiles: str) -> Dict[int, Dict[str, List[float]]]:
    """Each fold's validation counts of the run in ``output``, measured again from its checkpoint
    on ``tiles`` at the current threshold grid (``model.training.revalidate``)."""
    from config.loader import load_cfg
    from model.training import revalidate

    cfg = load_cfg(os.path.join(output, "config.yaml"), ["DATASETS.TRAIN_FOLDER", tiles, "OUTPUT_DIR", output])
    return {fold: result["counts"] for fold, result in revalidate(cfg).items()}


def _predict(source: str, ids: List[str], checkpoint: str, out: str, work: str,
             threshold: float = THRESHOLD) -> Dict[str, str]:
    """test_net on the held-out images of one source; returns {id: predicted RLE}."""
    common = [sys.executable, "test_net.py", "--config-file", RECIPE, "TEST.MODEL_WEIGHTS_FOLDER", checkpoint,
              "TEST.TH", str(threshold), "OUTPUT_DIR", out]
    if source == "aidpath":
        id_csv = os.path.join(work, "ids.csv")
        with open(id_csv, "w") as fh:
            fh.write("id\n" + "".join(f"{i}\n" for i in ids))
        run(common + ["TEST.PAIRS_FOLDER", shared("aidpath"), "TEST.LABELS_CSV", id_csv, "TEST.MPP", "0.5",
                      "DATASETS.MASK_CHANNEL", "0", "DATASETS.MASK_THRESHOLD", "127"], "test_net.py (aidpath)")
    else:
        folder = os.path.join(work, "hubmap_ftu")
        os.makedirs(folder, exist_ok=True)
        for image_id in ids:
            for ext in (".jpg", ".json"):
                link = os.path.join(folder, image_id + ext)
                if not os.path.exists(link):
                    os.symlink(shared("hubmap_ftu", image_id + ext), link)
        run(common + ["TEST.PAIRS_FOLDER", "", "TEST.WSI_FOLDER", folder, "TEST.ANNOTATIONS_FOLDER", folder,
                      "TEST.LABELS_CSV", "", "TEST.MPP", "0.95"], "test_net.py (hubmap_ftu)")
    with open(os.path.join(out, "submission.csv"), newline="") as fh:
        return {row["id"]: row["predicted"] for row in csv.DictReader(fh)}


def fold_results(output: str) -> Dict[int, Dict[str, object]]:
    """Each fold's ``result.json`` of the run in ``output`` (fold -> result)."""
    paths = sorted(glob.glob(os.path.join(output, "fold_*", "result.json")))
    if not paths:
        sys.exit(f"{output}: no fold_*/result.json; train config/kidney.yaml first")
    results = [json.load(open(path)) for path in paths]
    return {int(r["fold"]): r for r in results}


def score(output: str, work: str, thresholds: Optional[Dict[int, float]] = None) -> Dict[str, Dict[str, object]]:
    """Pooled held-out Dice per source over every fold of the run in ``output``, each fold at its
    entry of ``thresholds`` (default: all at THRESHOLD)."""
    from model.checkpoint import load_checkpoint
    from utils.objects import match_objects
    from utils.rle import dice_from_counts, parse_rle, rle_area, runs_intersection

    pooled: Dict[str, Dict[str, object]] = {}
    for fold, result in sorted(fold_results(output).items()):
        path = result["checkpoint"] if os.path.isabs(result["checkpoint"]) else os.path.join(REPO, result["checkpoint"])
        ckpt = load_checkpoint(path)
        threshold = THRESHOLD if thresholds is None else thresholds[fold]
        by_source: Dict[str, List[str]] = {}
        for image_id in ckpt["metrics"]["valid_ids"]:
            source = "aidpath" if os.path.isfile(shared("aidpath", "images", f"{image_id}.png")) else "hubmap_ftu"
            by_source.setdefault(source, []).append(image_id)
        for source, ids in sorted(by_source.items()):
            folder = os.path.join(work, f"fold_{fold}_{source}_th{threshold:.2f}")
            os.makedirs(folder, exist_ok=True)
            predicted = _predict(source, ids, path, os.path.join(folder, "out"), folder, threshold)
            entry = pooled.setdefault(source, {"inter": 0, "total": 0, "per_image": {}, "per_fold": {}, "objects": {},
                                               "pictures": {}})
            fold_inter = fold_total = 0
            for image_id in ids:
                truth, shape = truth_runs(source, image_id)
                pred = parse_rle(predicted[image_id], shape)
                inter, total = runs_intersection(pred, truth), rle_area(pred) + rle_area(truth)
                fold_inter, fold_total = fold_inter + inter, fold_total + total
                entry["per_image"][image_id] = dice_from_counts(inter, total)
                entry["objects"][image_id] = match_objects(pred, truth, shape[0], iou=OBJECT_IOU)
                entry["pictures"][image_id] = os.path.join(folder, "out", "predictions", f"{image_id}_overlay.png")
            entry["inter"] += fold_inter
            entry["total"] += fold_total
            entry["per_fold"][fold] = dice_from_counts(fold_inter, fold_total)
    for entry in pooled.values():
        entry["dice"] = dice_from_counts(entry["inter"], entry["total"])
        entry.update(counting(entry["objects"]))
    return pooled


def counting(objects: Dict[str, Dict[str, int]]) -> Dict[str, float]:
    """Object F1 (IoU >= OBJECT_IOU) over the images of ``objects`` (id -> match counts), the
    count error per image (predicted minus true glomeruli: mean, and mean absolute), and the
    pooled count error relative to the true count."""
    from utils.objects import object_scores

    counts = list(objects.values())
    errors = [c["predicted"] - c["true"] for c in counts]
    true = sum(c["true"] for c in counts)
    return {"object_f1": object_scores(counts)["object_f1"],
            "count_error_mean": statistics.mean(errors) if errors else 0.0,
            "count_error_abs_mean": statistics.mean(abs(e) for e in errors) if errors else 0.0,
            "count_error_pct": 100.0 * (sum(c["predicted"] for c in counts) - true) / true if true else 0.0}


def keep_failures(pooled: Dict[str, Dict[str, object]], folder: str, below: float = FAILURE_DICE) -> List[str]:
    """Copy the overlay (true contours red, predicted green) of every image scoring below
    ``below`` into ``folder``, named ``<source>_<id>_dice<d>.png``; returns the lines to print."""
    import shutil

    lines = []
    for source, entry in sorted(pooled.items()):
        for image_id, dice in sorted(entry["per_image"].items(), key=lambda kv: kv[1]):
            if dice >= below:
                break
            c = entry["objects"][image_id]
            name = f"{source}_{image_id}_dice{dice:.2f}.png"
            if os.path.isfile(entry["pictures"][image_id]):
                os.makedirs(folder, exist_ok=True)
                shutil.copyfile(entry["pictures"][image_id], os.path.join(folder, name))
            lines.append(f"{source} {image_id}: Dice {dice:.3f}, {c['predicted']} predicted / {c['true']} true objects, "
                         f"{c['matched']} matched ({os.path.join(folder, name)})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="train the recipe with these MODEL.SEED values")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "kidney"),
                        help="without --seeds: the OUTPUT_DIR of a run to score; with: the prefix of the runs' folders")
    parser.add_argument("--recipe", default=RECIPE, help="the recipe to train (default config/kidney.yaml)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--nested", action="store_true",
                        help="also score each fold at the threshold learned from the other folds")
    parser.add_argument("--score-only", action="store_true",
                        help="with --seeds: score the runs <output>_seed<N> trained earlier, without training")
    parser.add_argument("--revalidate", default="", metavar="TILES",
                        help="with --nested: learn the thresholds from each fold validated again on TILES (the "
                             "recipe's tiles, e.g. datasets/kidney_tiles) on the current threshold grid, instead of "
                             "the counts its result.json recorded (for runs made with an older grid)")
    parser.add_argument("opts", nargs="*", help="extra KEY VALUE overrides for train_net.py (experiments)")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    work = tempfile.mkdtemp(prefix="kidney_heldout_")
    runs = []
    for seed in args.seeds:
        out = f"{args.output}_seed{seed}"
        if args.score_only:
            runs.append((seed, out, float("nan")))
            continue
        tile_s, train_s = train_recipe(seed, out, os.path.join(work, f"tiles_seed{seed}"), args.recipe, args.opts)
        runs.append((seed, out, (tile_s + train_s) / 60))
    if not args.seeds:
        runs.append((None, args.output, float("nan")))
    rows = []
    for seed, out, minutes in runs:
        summary = json.load(open(os.path.join(out, "summary.json")))
        row = {"seed": seed, "minutes": minutes, "oof": summary.get("oof_dice_by_source", {})}
        ways = [("held_out", f"at {THRESHOLD}", None)]
        if args.nested:
            counts = (revalidated_counts(out, args.revalidate) if args.revalidate
                      else {f: r["counts"] for f, r in fold_results(out).items()})
            learned = nested_thresholds(counts)
            row["nested_thresholds"] = learned
            row["oof_threshold"] = best_threshold(pooled_table(list(counts.values())))[0]
            ways.append(("nested", "at the threshold learned from the other folds", learned))
        for key, how, thresholds in ways:
            pooled = score(out, os.path.join(work, os.path.basename(out)), thresholds)
            row[key] = {source: entry["dice"] for source, entry in pooled.items()}
            row[f"{key}_counting"] = {source: {k: entry[k] for k in ("object_f1", "count_error_mean",
                                                                      "count_error_abs_mean", "count_error_pct")}
                                      for source, entry in pooled.items()}
            row[f"{key}_per_image"] = {source: entry["per_image"] for source, entry in pooled.items()}
            for source, entry in sorted(pooled.items()):
                print(f"seed {seed} {source}: held-out pooled Dice {entry['dice']:.4f} {how} (per fold "
                      f"{', '.join(f'{k}: {v:.3f}' for k, v in sorted(entry['per_fold'].items()))}; worst images "
                      f"{', '.join(f'{k} {v:.2f}' for k, v in sorted(entry['per_image'].items(), key=lambda kv: kv[1])[:4])}); "
                      f"object F1 {entry['object_f1']:.3f}, count error per image {entry['count_error_mean']:+.2f} "
                      f"(mean |error| {entry['count_error_abs_mean']:.2f}; pooled {entry['count_error_pct']:+.1f} %)",
                      flush=True)
            failures = os.path.join(work, os.path.basename(out), f"below_{FAILURE_DICE}_{key}")
            for line in keep_failures(pooled, failures):
                print(f"  seed {seed} below {FAILURE_DICE} ({key}): {line}", flush=True)
        if args.nested:
            print(f"seed {seed}: thresholds learned from the other folds: "
                  f"{', '.join(f'fold {f}: {t:.2f}' for f, t in sorted(row['nested_thresholds'].items()))}; "
                  f"from all folds (the final model's): {row['oof_threshold']:.2f}", flush=True)
        rows.append(row)
    sources = sorted({s for r in rows for s in r["held_out"]})
    for key, title in [("held_out", f"threshold {THRESHOLD} fixed in advance"),
                       ("nested", "threshold learned from the other folds")]:
        if key not in rows[0]:
            continue
        print(f"\n{title}:\n| seed | " + " | ".join(f"{s} held-out Dice | {s} object F1 | {s} count error/image (pooled)"
                                                      for s in sources)
              + " | out-of-fold (training) | tiles + training, min |")
        print("|---" * (3 * len(sources) + 3) + "|")
        for r in rows:
            oof = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["oof"].items()))
            c = r[f"{key}_counting"]
            print(f"| {r['seed']} | " + " | ".join(
                f"{r[key][s]:.4f} | {c[s]['object_f1']:.3f} | {c[s]['count_error_mean']:+.2f} ({c[s]['count_error_pct']:+.1f} %)"
                for s in sources) + f" | {oof} | {r['minutes']:.1f} |")
        if len(rows) > 1:
            for s in sources:
                values = [r[key][s] for r in rows]
                print(f"{s}: mean {statistics.mean(values):.4f}, min {min(values):.4f}, max {max(values):.4f}, "
                      f"spread (max - min) {max(values) - min(values):.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    print(f"(test_net outputs, pictures included, in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
