"""Adapting a model to a new lab in CPU minutes: fine-tuning (config/finetune.yaml) on k of a
lab's images against training from ImageNet weights alone on the same k, scored on that lab's
images that neither saw.

    python -m tests.bench.finetune_heldout                  # k = 4, 8, 16; seed 1
    python -m tests.bench.finetune_heldout --k 4 8 --seed 2
    python -m tests.bench.finetune_heldout --k 4 16 --held-out 36   # quicker: 36 of the 72 scored

The "new lab" is HuBMAP: the starting model is the kidney recipe trained on AIDPATH only (the
model on every AIDPATH image, config/kidney.yaml with that one source). The 88 HuBMAP tiles are
shuffled once (``--split-seed``); the first 16 are the pool the k training tiles come from (k = 4
takes the first 4, and so on), the other 72 are held out and scored, by test_net in the way the
kidney bench scores them (pooled Dice at 0.5, fixed in advance; object F1 at IoU >= 0.5).

For each k, two models train on the same k tiles:
  * fine-tuned: ``--config-file config/finetune.yaml`` with MODEL.WEIGHTS the AIDPATH model;
  * from ImageNet: ``--config-file config/kidney.yaml`` (the recipe, its epochs and rates),
    every image in training (SOLVER.CROSS_VALIDATION False), as a lab without our model would.
The AIDPATH model before any fine-tuning is scored too (k = 0). Minutes are the wall time of
tiles_creator + train_net for each.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from typing import Dict, List

import yaml

from tests.bench.bench_tiles import REPO
from tests.bench.kidney_heldout import OBJECT_IOU, THRESHOLD, _predict, counting, run, truth_runs
from tests.slides import SHARED_REASON, has_shared, shared

RECIPE = os.path.join(REPO, "config", "kidney.yaml")
FINETUNE = os.path.join(REPO, "config", "finetune.yaml")
POOL = 16


def hubmap_split(split_seed: int):
    """(pool of training candidates, held-out ids) of the HuBMAP tiles."""
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(shared("hubmap_ftu")) if f.endswith(".json"))
    random.Random(split_seed).shuffle(ids)
    return ids[:POOL], sorted(ids[POOL:])


def link_folder(folder: str, ids: List[str]) -> str:
    os.makedirs(folder, exist_ok=True)
    for image_id in ids:
        for ext in (".jpg", ".json"):
            link = os.path.join(folder, image_id + ext)
            if not os.path.exists(link):
                os.symlink(shared("hubmap_ftu", image_id + ext), link)
    return folder


def write_config(path: str, base: str, source: Dict[str, object], train_folder: str, out: str) -> str:
    """A YAML on top of ``base`` training on one source only, into ``out``."""
    with open(path, "w") as fh:
        yaml.safe_dump({"_BASE_": base, "DATASETS": {"SOURCES": [source], "TRAIN_FOLDER": train_folder},
                        "OUTPUT_DIR": out, "TEST": {"MODEL_WEIGHTS_FOLDER": out}}, fh)
    return path


def train_only_all(config: str, seed: int, extra=()) -> float:
    """tiles_creator + train_net of ``config`` (the model on every image only); minutes."""
    seconds = run([sys.executable, "tiles_creator.py", "--config-file", config], "tiles_creator.py")
    seconds += run([sys.executable, "train_net.py", "--config-file", config, "MODEL.SEED", str(seed),
                    "SOLVER.CROSS_VALIDATION", "False", "SOLVER.FINAL_MODEL", "True", *extra], "train_net.py")
    return seconds / 60


def checkpoint_of(out: str) -> str:
    found = [f for f in os.listdir(out) if f.endswith("_all.pth")]
    if len(found) != 1:
        sys.exit(f"{out}: expected one *_all.pth, found {found}")
    return os.path.join(out, found[0])


def score_hubmap(checkpoint: str, ids: List[str], work: str) -> Dict[str, float]:
    """Pooled Dice at THRESHOLD and object F1 of ``checkpoint`` on the HuBMAP tiles ``ids``."""
    from utils.objects import match_objects
    from utils.rle import dice_from_counts, parse_rle, rle_area, runs_intersection

    os.makedirs(work, exist_ok=True)
    predicted = _predict("hubmap_ftu", ids, checkpoint, os.path.join(work, "out"), work, THRESHOLD)
    inter = total = 0
    objects = {}
    for image_id in ids:
        truth, shape = truth_runs("hubmap_ftu", image_id)
        pred = parse_rle(predicted[image_id], shape)
        inter += runs_intersection(pred, truth)
        total += rle_area(pred) + rle_area(truth)
        objects[image_id] = match_objects(pred, truth, shape[0], iou=OBJECT_IOU)
    return {"dice": dice_from_counts(inter, total), **counting(objects)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="*", default=[4, 8, 16], help="training tiles of the new lab")
    parser.add_argument("--seed", type=int, default=1, help="MODEL.SEED of every training")
    parser.add_argument("--split-seed", type=int, default=0, help="the shuffle of the HuBMAP tiles")
    parser.add_argument("--held-out", type=int, default=0,
                        help="score only the first N held-out tiles (sorted ids; default: all 72)")
    parser.add_argument("--work", default="", help="a folder for the runs (default: a new temporary one)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    if max(args.k) > POOL:
        sys.exit(f"--k: at most {POOL} training tiles")
    work = args.work or tempfile.mkdtemp(prefix="finetune_heldout_")
    os.makedirs(work, exist_ok=True)
    pool, held_out = hubmap_split(args.split_seed)
    held_out = held_out[:args.held_out] if args.held_out else held_out
    print(f"HuBMAP: training pool {pool}; {len(held_out)} tiles held out", flush=True)
    with open(RECIPE) as fh:
        sources = {s["NAME"]: s for s in yaml.safe_load(fh)["DATASETS"]["SOURCES"]}
    aidpath = dict(sources["aidpath"], PAIRS_FOLDER=shared("aidpath"))
    base_out = os.path.join(work, "aidpath_only")
    base_cfg = write_config(os.path.join(work, "aidpath_only.yaml"), RECIPE, aidpath,
                            os.path.join(work, "tiles_aidpath"), base_out)
    rows = [{"k": 0, "how": "AIDPATH model, not fine-tuned", "minutes": train_only_all(base_cfg, args.seed)}]
    base = checkpoint_of(base_out)
    rows[0].update(score_hubmap(base, held_out, os.path.join(work, "score_k0")))
    print(f"k 0: {rows[0]}", flush=True)
    for k in args.k:
        folder = link_folder(os.path.join(work, f"hubmap_k{k}"), pool[:k])
        # labelme beside each tile, every class ("Glomeruli"), no ROI: as config/kidney.yaml reads them
        source = dict(sources["hubmap_ftu"], WSI_FOLDER=folder, ANNOTATIONS_FOLDER=folder, ANNOTATION_CLASSES=[],
                      ANNOTATION_ROI=[])
        for how, recipe, extra in (("fine-tuned from the AIDPATH model", FINETUNE, ("MODEL.WEIGHTS", base)),
                                   ("from ImageNet weights (the recipe)", RECIPE, ())):
            name = f"k{k}_{'finetuned' if recipe == FINETUNE else 'imagenet'}"
            out = os.path.join(work, name)
            cfg = write_config(os.path.join(work, f"{name}.yaml"), recipe, source, os.path.join(work, f"tiles_{name}"),
                               out)
            row = {"k": k, "how": how, "minutes": train_only_all(cfg, args.seed, extra)}
            row.update(score_hubmap(checkpoint_of(out), held_out, os.path.join(work, f"score_{name}")))
            print(f"k {k}: {row}", flush=True)
            rows.append(row)
    print(f"\nHuBMAP tiles held out: {len(held_out)} (pooled Dice at {THRESHOLD}; object F1 at IoU >= {OBJECT_IOU})")
    print("| k | model | held-out Dice | object F1 | count error/image | tiles + training, min |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['how']} | {r['dice']:.4f} | {r['object_f1']:.3f} | {r['count_error_mean']:+.2f} | "
              f"{r['minutes']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    print(f"(runs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
