"""Benchmark: tiling a slide from annotation polygons against tiling it from its RLE.

    python -m tests.bench.bench_annotations [--runs 3] [--reductions 4 16] [--workdir DIR]

Builds the 31278 x 25794 tiled-JPEG TIFF of ``bench_tiles`` (real AIDPATH tissue, the true size
of HuBMAP slide 2f6ecfcdf), pairs it with the real RLE of 2f6ecfcdf, and traces that RLE's
glomeruli into a QuPath GeoJSON (one Polygon per object, holes included, on pixel edges:
``utils.objects.find_objects`` from the runs, no simplification). Then, for each reduction,
``tiles_creator.py`` runs in fresh processes, alternately ``wsi_rle`` (the RLE) and
``annotations`` (the GeoJSON), and the medians of wall time and peak RSS are compared (target:
<= 1.2x each). The two tile folders must hold the same names, images and masks. Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from tests.bench.bench_tiles import REPO, SLIDE_ID, _measure
from tests.slides import SHARED_REASON, has_shared, mosaic_region, read_sizes, read_train_csv, write_slide


def trace_geojson(rle: str, shape, path: str) -> int:
    """The RLE's objects as a GeoJSON FeatureCollection of pixel-edge polygons; returns their count."""
    from utils.export import polygons_geojson
    from utils.objects import find_objects
    from utils.rle import parse_rle

    objects = find_objects(parse_rle(rle, shape, SLIDE_ID), shape, simplify=0.0)
    with open(path, "w") as fh:
        json.dump(polygons_geojson(objects.polygons), fh)
    return len(objects)


def _same_folders(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reductions", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_annotations_")
    wsi, ann = os.path.join(work, "wsi"), os.path.join(work, "ann")
    os.makedirs(wsi, exist_ok=True)
    os.makedirs(ann, exist_ok=True)
    height, width = read_sizes()[SLIDE_ID]
    slide = os.path.join(wsi, f"{SLIDE_ID}.tiff")
    rle = read_train_csv()[SLIDE_ID]
    csv = os.path.join(work, "train.csv")
    with open(csv, "w") as fh:
        fh.write(f"id,encoding\n{SLIDE_ID},{rle}\n")
    t0 = time.perf_counter()
    if not os.path.exists(slide):
        write_slide(slide, (height, width), lambda y0, y1, x0, x1, scale=1: mosaic_region(
            y0, y1, x0, x1, scale, background_every=3), tile=512, compression=("jpeg", 90))
    geojson = os.path.join(ann, f"{SLIDE_ID}.geojson")
    t1 = time.perf_counter()
    n_objects = trace_geojson(rle, (height, width), geojson)
    print(f"slide: {width} x {height} px tiled JPEG (built in {t1 - t0:.0f} s); {n_objects} glomeruli traced from "
          f"the RLE into {os.path.getsize(geojson) / 1e6:.1f} MB of GeoJSON in {time.perf_counter() - t1:.1f} s")
    print(f"machine: {os.cpu_count()} CPU cores; {args.runs} runs each, alternated, medians\n")
    results = {"slide": [height, width], "objects": n_objects, "runs": args.runs, "reductions": {}}
    for reduce in args.reductions:
        common = ["INPUT.SIZE_TRAIN", str(args.size), "INPUT.SIZE_REDUCTION_TRAIN", str(reduce)]
        outs = {"rle": os.path.join(work, f"rle_{reduce}"), "annotations": os.path.join(work, f"ann_{reduce}")}
        cmds = {"rle": [sys.executable, os.path.join(REPO, "tiles_creator.py"), "DATASETS.WSI_FOLDER", wsi,
                        "DATASETS.LABELS_CSV", csv, "DATASETS.TRAIN_FOLDER", outs["rle"], *common],
                "annotations": [sys.executable, os.path.join(REPO, "tiles_creator.py"), "DATASETS.FORMAT",
                                "annotations", "DATASETS.WSI_FOLDER", wsi, "DATASETS.ANNOTATIONS_FOLDER", ann,
                                "DATASETS.TRAIN_FOLDER", outs["annotations"], *common]}
        measured = {"rle": [], "annotations": []}
        for _ in range(args.runs):
            for kind in ("rle", "annotations"):
                shutil.rmtree(outs[kind], ignore_errors=True)
                measured[kind].append(_measure(cmds[kind]))
        row = {kind: {"s": statistics.median(w for w, _ in m), "rss_mb": statistics.median(r for _, r in m),
                      "all_s": [round(w, 2) for w, _ in m], "all_mb": [round(r) for _, r in m]}
               for kind, m in measured.items()}
        variant = f"{args.size}_red{reduce}"
        row["time_ratio"] = row["annotations"]["s"] / row["rle"]["s"]
        row["rss_ratio"] = row["annotations"]["rss_mb"] / row["rle"]["rss_mb"]
        row["tiles"] = len(os.listdir(os.path.join(outs["rle"], f"images_{variant}")))
        row["same_images"] = _same_folders(*(os.path.join(o, f"images_{variant}") for o in outs.values()))
        row["same_masks"] = _same_folders(*(os.path.join(o, f"masks_{variant}") for o in outs.values()))
        results["reductions"][reduce] = row
    print(f"{'reduce':>6} {'RLE s':>7} {'GeoJSON s':>9} {'time x':>7} {'RLE MB':>7} {'GeoJSON MB':>10} "
          f"{'RSS x':>6} {'tiles':>6} {'same images':>11} {'same masks':>10}")
    for reduce, r in results["reductions"].items():
        print(f"{reduce:>6} {r['rle']['s']:>7.2f} {r['annotations']['s']:>9.2f} {r['time_ratio']:>7.3f} "
              f"{r['rle']['rss_mb']:>7.0f} {r['annotations']['rss_mb']:>10.0f} {r['rss_ratio']:>6.3f} "
              f"{r['tiles']:>6} {str(r['same_images']):>11} {str(r['same_masks']):>10}")
    ok = all(r["time_ratio"] <= 1.2 and r["rss_ratio"] <= 1.2 and r["same_images"] and r["same_masks"]
             for r in results["reductions"].values())
    print(f"\ntarget (GeoJSON <= 1.2 x the RLE's time and peak RSS, the same tiles): {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
