"""Benchmark of tiles_creator.py against the original's whole-slide approach.

    python -m tests.bench.bench_tiles [--runs 3] [--reductions 4 16] [--workdir DIR]

Builds a 31278 x 25794 single-level tiled-JPEG TIFF (the true size of HuBMAP slide 2f6ecfcdf)
from real AIDPATH tissue, pairs it with the real RLE of 2f6ecfcdf, and for each reduction
measures, each in a fresh subprocess (wall time and peak RSS from wait4):

* ours: ``python tiles_creator.py ...`` as a user runs it;
* reference: the original's way: read the whole slide, decode the whole mask, pad, resize,
  cut, filter, write PNGs (``tests/reference.py``);
* floor: decoding the slide once (tifffile, all cores).

It checks that both produce the same tiles, prints medians and ratios, and then tiles a
pyramidal copy (levels at 4x and 16x) to show that a matching level is read instead of level 0.
Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from tests.slides import has_shared, mosaic_region, read_sizes, read_train_csv, SHARED_REASON, write_slide

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLIDE_ID = "2f6ecfcdf"


def _measure(cmd, cwd=REPO):
    """Run ``cmd``; return (wall seconds, peak RSS in MB) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({code}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def _reference_main(slide_path, csv_path, out, size, reduce):
    """The original tiler: everything in memory."""
    import cv2
    import pandas as pd
    import tifffile

    from tests.reference import reference_tiles
    from utils.rle import rle_decode

    image = tifffile.imread(slide_path)
    encoding = pd.read_csv(csv_path).set_index("id").loc[SLIDE_ID, "encoding"]
    mask = np.ascontiguousarray(rle_decode(encoding, image.shape[:2]))
    kept, _ = reference_tiles(image, mask, size, reduce)
    del image, mask
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    means, stds = [], []
    for i, (tile, tile_mask) in kept.items():
        means.append((tile / 255.0).reshape(-1, 3).mean(0))
        stds.append(((tile / 255.0) ** 2).reshape(-1, 3).mean(0))
        name = f"{SLIDE_ID}_{i}red{reduce}.png"
        cv2.imwrite(os.path.join(out, "images", name), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
        cv2.imwrite(os.path.join(out, "masks", name), tile_mask)


def _floor_main(slide_path):
    import tifffile

    tifffile.imread(slide_path)


def _same_tiles(ours, reference, reduce, size):
    import cv2

    names = sorted(os.listdir(os.path.join(reference, "images")))
    ours_images = os.path.join(ours, f"images_{size}_red{reduce}")
    if names != sorted(os.listdir(ours_images)):
        return False
    for name in names[:: max(1, len(names) // 40)]:  # a spread sample of the tiles
        for kind, flag in (("images", cv2.IMREAD_COLOR), ("masks", cv2.IMREAD_UNCHANGED)):
            a = cv2.imread(os.path.join(reference, kind, name), flag)
            b = cv2.imread(os.path.join(ours, f"{kind}_{size}_red{reduce}", name), flag)
            if a is None or b is None or a.shape != b.shape or not (a == b).all():
                return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reductions", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--reference", nargs=5, metavar=("SLIDE", "CSV", "OUT", "SIZE", "REDUCE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--floor", metavar="SLIDE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        slide, csv, out, size, reduce = args.reference
        return _reference_main(slide, csv, out, int(size), int(reduce))
    if args.floor:
        return _floor_main(args.floor)
    if not has_shared():
        sys.exit(SHARED_REASON)

    work = args.workdir or tempfile.mkdtemp(prefix="bench_tiles_")
    os.makedirs(work, exist_ok=True)
    height, width = read_sizes()[SLIDE_ID]
    wsi = os.path.join(work, "wsi")
    pyramid_wsi = os.path.join(work, "wsi_pyramid")
    os.makedirs(wsi, exist_ok=True)
    os.makedirs(pyramid_wsi, exist_ok=True)
    slide = os.path.join(wsi, f"{SLIDE_ID}.tiff")
    pyramid = os.path.join(pyramid_wsi, f"{SLIDE_ID}.tiff")
    csv = os.path.join(work, "train.csv")
    with open(csv, "w") as fh:
        fh.write(f"id,encoding\n{SLIDE_ID},{read_train_csv()[SLIDE_ID]}\n")

    def region(y0, y1, x0, x1, scale=1):
        return mosaic_region(y0, y1, x0, x1, scale, background_every=3)

    t0 = time.perf_counter()
    if not os.path.exists(slide):
        write_slide(slide, (height, width), region, tile=512, compression=("jpeg", 90))
    if not os.path.exists(pyramid):
        write_slide(pyramid, (height, width), region, tile=512, compression=("jpeg", 90), downsamples=(4, 16))
    print(f"slide: {width} x {height} px tiled JPEG, {os.path.getsize(slide) / 1e6:.0f} MB "
          f"(+ pyramidal copy), built in {time.perf_counter() - t0:.0f} s; real RLE of {SLIDE_ID}")
    print(f"machine: {os.cpu_count()} CPU cores; {args.runs} runs each, medians\n")

    results = {"slide": [height, width], "runs": args.runs, "reductions": {}}
    floor = [_measure([sys.executable, "-m", "tests.bench.bench_tiles", "--floor", slide]) for _ in range(args.runs)]
    floor_wall = statistics.median(w for w, _ in floor)
    results["floor_decode_s"] = floor_wall
    for reduce in args.reductions:
        ours_out = os.path.join(work, f"ours_{reduce}")
        ref_out = os.path.join(work, f"ref_{reduce}")
        ours_cmd = [sys.executable, os.path.join(REPO, "tiles_creator.py"),
                    "DATASETS.WSI_FOLDER", wsi, "DATASETS.LABELS_CSV", csv,
                    "DATASETS.TRAIN_FOLDER", ours_out, "INPUT.SIZE_TRAIN", str(args.size),
                    "INPUT.SIZE_REDUCTION_TRAIN", str(reduce)]
        ours, ref = [], []
        for _ in range(args.runs):
            shutil.rmtree(ref_out, ignore_errors=True)
            ref.append(_measure([sys.executable, "-m", "tests.bench.bench_tiles", "--reference",
                                 slide, csv, ref_out, str(args.size), str(reduce)]))
            shutil.rmtree(ours_out, ignore_errors=True)  # both write into a fresh folder
            ours.append(_measure(ours_cmd))
        stats = json.load(open(os.path.join(ours_out, f"stats_{args.size}_red{reduce}.json")))
        row = {
            "ours_s": statistics.median(w for w, _ in ours),
            "ours_rss_mb": max(r for _, r in ours),
            "reference_s": statistics.median(w for w, _ in ref),
            "reference_rss_mb": max(r for _, r in ref),
            "tiles_kept": stats["n_tiles"],
            "tiles_total": stats["n_grid_tiles"],
            "identical_tiles": _same_tiles(ours_out, ref_out, reduce, args.size),
            "ours_all_s": [round(w, 2) for w, _ in ours],
            "reference_all_s": [round(w, 2) for w, _ in ref],
        }
        row["time_ratio"] = row["ours_s"] / row["reference_s"]
        row["rss_ratio"] = row["ours_rss_mb"] / row["reference_rss_mb"]
        results["reductions"][reduce] = row

        pyr_out = os.path.join(work, f"pyramid_{reduce}")
        pyr_cmd = list(ours_cmd)
        pyr_cmd[pyr_cmd.index(wsi)] = pyramid_wsi
        pyr_cmd[pyr_cmd.index(ours_out)] = pyr_out
        pyr = []
        for _ in range(args.runs):
            shutil.rmtree(pyr_out, ignore_errors=True)
            pyr.append(_measure(pyr_cmd))
        from data.readers import open_slide

        with open_slide(pyramid) as s:
            level = s.best_level(reduce)
            t0 = time.perf_counter()
            for _ in s.iter_strips(level):
                pass
            level_decode = time.perf_counter() - t0
        row["pyramid"] = {"level": level, "level_shape": list(s.levels[level].shape),
                          "level_decode_s": level_decode,
                          "tiles_creator_s": statistics.median(w for w, _ in pyr),
                          "rss_mb": max(r for _, r in pyr)}

    print(f"floor (decode the slide once, tifffile, all cores): {floor_wall:.2f} s\n")
    header = f"{'reduce':>6} {'ours s':>8} {'ref s':>8} {'time x':>7} {'ours MB':>8} {'ref MB':>8} {'RSS x':>6} {'tiles':>11} {'same':>5}"
    print(header)
    for reduce, r in results["reductions"].items():
        print(f"{reduce:>6} {r['ours_s']:>8.2f} {r['reference_s']:>8.2f} {r['time_ratio']:>7.3f} "
              f"{r['ours_rss_mb']:>8.0f} {r['reference_rss_mb']:>8.0f} {r['rss_ratio']:>6.3f} "
              f"{r['tiles_kept']:>5}/{r['tiles_total']:<5} {str(r['identical_tiles']):>5}")
    print("\npyramidal copy (levels 1, 4, 16):")
    for reduce, r in results["reductions"].items():
        p = r["pyramid"]
        print(f"  reduction {reduce}: reads level {p['level']} {p['level_shape'][1]} x {p['level_shape'][0]}, "
              f"decoding it takes {p['level_decode_s']:.2f} s; tiles_creator {p['tiles_creator_s']:.2f} s, "
              f"peak {p['rss_mb']:.0f} MB")
    targets_ok = all(r["rss_ratio"] * r["reference_rss_mb"] <= 1536 and r["time_ratio"] <= 0.25
                     for r in results["reductions"].values())
    print(f"\ntargets (peak RSS <= 1.5 GB, time <= 0.25 x reference): {'met' if targets_ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
