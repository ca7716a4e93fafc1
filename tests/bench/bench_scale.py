"""Scale: tiling and inference on a 60000 x 60000 slide against the 31278 x 25794 one.

    python -m tests.bench.bench_scale [--runs 1] [--workdir DIR] [--sizes 31278x25794 60000x60000]
                                      [--reader tifffile|openslide] [--skip-infer]

For each size, a single-level tiled-JPEG TIFF of real AIDPATH tissue (the mosaic of
tests/slides.py, tissue in a central ellipse on background, as on a real slide) and a large
synthetic RLE (glomerulus-like discs all over the tissue, encoded strip by strip: the full mask
is never built here either). Then, each in a fresh process (wall time and peak RSS):

* ``tiles_creator.py`` at reduction 4, 256 px tiles, through ``INPUT.SLIDE_READER`` ``--reader`` (a
  slide wide enough to be tiled in column panels is tiled again in one full-width pass, and the
  tiles compared byte for byte; with ``--reader openslide`` they are also compared with the
  tifffile reader's);
* ``test_net.py`` at reduction 16, 256 px windows, overlap 0.5, scored against the RLE, with
  ``--model blobs`` (default) tests/blob_model.py's DarkBlobs (objects that follow the tissue,
  as a trained model's) or ``random`` an smp Unet-resnet18 with random weights.

The slides say 0.5 um/px in their resolution tags and the checkpoint 8 um/px (0.5 x 16), so
test_net measures in um. It prints the figures, the tissue area, the growth ratios from the
first size to the last (time should grow like the tissue area, memory should stay flat), and
for each size the per-slide summary (objects, tissue mm2, density, median area, object-level
scores against the discs) and the head of objects.csv. Needs ../shared/data; the 60k slide takes
~3 GB of disk and a few minutes to write.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import subprocess

import numpy as np

from data.tiling import PANEL_PIXELS
from tests.bench.bench_tiles import REPO, _measure
from tests.slides import SHARED_REASON, has_shared, mosaic_region, write_slide
from utils.rle import RLEStripEncoder

DISC_SPACING = 1400  # level-0 px between glomerulus centres
DISC_RADIUS = 180


def _inside(yy, xx, height, width):
    return ((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.42 * width)) ** 2 <= 1


def _region(height, width):
    def region(a, b, c, d, s=1):
        pixels = mosaic_region(a, b, c, d, s, background_every=5)
        yy, xx = np.mgrid[a:b, c:d]
        pixels[~_inside(yy, xx, height, width)] = 242
        return pixels
    return region


def _mask_rle(height, width, strip=1024):
    """Discs on a jittered grid inside the tissue ellipse, encoded column strip by column strip."""
    rng = np.random.default_rng(0)
    cy, cx = np.mgrid[DISC_SPACING // 2:height:DISC_SPACING, DISC_SPACING // 2:width:DISC_SPACING]
    cy = cy.ravel() + rng.integers(-300, 300, cy.size)
    cx = cx.ravel() + rng.integers(-300, 300, cx.size)
    keep = _inside(cy, cx, height, width)
    cy, cx = cy[keep], cx[keep]
    encoder = RLEStripEncoder(height)
    yy = np.arange(height)[:, None]
    for x0 in range(0, width, strip):
        x1 = min(width, x0 + strip)
        xs = np.arange(x0, x1)[None, :]
        block = np.zeros((height, x1 - x0), bool)
        for y, x in zip(cy, cx):
            if x + DISC_RADIUS < x0 or x - DISC_RADIUS >= x1:
                continue
            y0, y1 = max(0, y - DISC_RADIUS), min(height, y + DISC_RADIUS + 1)
            block[y0:y1] |= (yy[y0:y1] - y) ** 2 + (xs - x) ** 2 <= DISC_RADIUS ** 2
        encoder.add(block)
    return encoder.encode(), int(keep.sum())


def _tissue_fraction(height, width):
    yy, xx = np.mgrid[0:height:64, 0:width:64]
    return float(_inside(yy, xx, height, width).mean())


SLIDE_MPP = 0.5  # um/px the slides claim


def make_checkpoint(path: str, kind: str = "blobs") -> None:
    """Reduction 16, 256 px, tiles of 16 x SLIDE_MPP um/px: DarkBlobs, or an smp Unet-resnet18
    with random weights (seed 0)."""
    import torch

    from model.build import build_model
    from model.checkpoint import save_checkpoint

    if kind == "blobs":
        from tests.blob_model import save_blob_checkpoint

        save_blob_checkpoint(path, size=256, reduce=16, mpp=16 * SLIDE_MPP)
        return
    spec = {"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}
    torch.manual_seed(0)
    save_checkpoint(path, build_model(spec).eval(), {
        "model": spec, "input": {"size": 256, "reduce": 16, "mean": [0.8, 0.7, 0.8], "std": [0.15, 0.2, 0.12],
                                 "mpp": 16 * SLIDE_MPP},
        "threshold": 0.5, "fold": 0, "metrics": {}})


def _print_objects(pred: str, head: int = 5) -> None:
    """The per-slide summary of metrics.json and the head of objects.csv."""
    import csv as csv_module

    metrics = json.load(open(os.path.join(pred, "metrics.json")))
    per = metrics["per_slide"]["big"]
    print(f"  objects {per['objects']} on {per['tissue_mm2']:.1f} mm2 of tissue ({per['objects_per_mm2']:.2f} per mm2), "
          f"median area {per['median_area_um2']:.0f} um2; against the {metrics['true_objects']} discs: object "
          f"precision {metrics['object_precision']:.3f}, recall {metrics['object_recall']:.3f}, F1 "
          f"{metrics['object_f1']:.3f}, count error {per['count_error']:+d}; Dice {metrics['overall_dice']:.3f}")
    with open(os.path.join(pred, "objects.csv"), newline="") as fh:
        rows = list(csv_module.reader(fh))
    width = [max(len(r[i]) for r in rows[:head + 1]) for i in range(len(rows[0]))]
    for r in rows[:head + 1]:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(r, width)))
    print(f"  ... {len(rows) - 1} rows in {os.path.join(pred, 'objects.csv')}")


def _same_tiles(folder: str, wsi: str, csv: str, code: str = "", opts=()) -> str:
    """Tile the slide again in a child process (``code`` run first there, config overrides
    ``opts``) and compare the tiles with ``folder/tiles`` byte for byte."""
    ref = os.path.join(folder, "tiles_reference")
    shutil.rmtree(ref, ignore_errors=True)
    code = (code + "from config import load_cfg; from data.tiler import create_tiles; "
            f"create_tiles(load_cfg(None, ['DATASETS.WSI_FOLDER', {wsi!r}, 'DATASETS.LABELS_CSV', {csv!r}, "
            f"'DATASETS.TRAIN_FOLDER', {ref!r}, 'INPUT.SIZE_TRAIN', '256', 'INPUT.SIZE_REDUCTION_TRAIN', '4', "
            f"*{list(opts)!r}]))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, stderr=subprocess.DEVNULL)
    verdicts = []
    for sub in ("images_256_red4", "masks_256_red4"):
        ours, theirs = os.path.join(folder, "tiles", sub), os.path.join(ref, sub)
        names = sorted(os.listdir(ours))
        same = names == sorted(os.listdir(theirs)) and all(
            open(os.path.join(ours, n), "rb").read() == open(os.path.join(theirs, n), "rb").read() for n in names)
        verdicts.append(f"{sub.split('_')[0]} {'byte-identical' if same else 'DIFFERENT'} ({len(names)})")
    shutil.rmtree(ref, ignore_errors=True)
    return ", ".join(verdicts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--sizes", nargs="+", default=["31278x25794", "60000x60000"], help="HEIGHTxWIDTH")
    parser.add_argument("--model", choices=["blobs", "random"], default="blobs")
    parser.add_argument("--reader", choices=["tifffile", "openslide"], default="tifffile",
                        help="INPUT.SLIDE_READER of the tiling (openslide: its tiles are also compared with the "
                             "tifffile reader's)")
    parser.add_argument("--skip-infer", action="store_true", help="tiling only")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_scale_")
    models = os.path.join(work, f"models_{args.model}")
    os.makedirs(models, exist_ok=True)
    # in a child: this process stays small, so the children's peak RSS (wait4) is theirs alone
    subprocess.run([sys.executable, "-c", f"from tests.bench.bench_scale import make_checkpoint; "
                    f"make_checkpoint({os.path.join(models, 'model.pth')!r}, {args.model!r})"], cwd=REPO, check=True)
    test_net = [sys.executable, "-m", "tests.blob_model"] if args.model == "blobs" else [sys.executable]
    rows = []
    for size in args.sizes:
        height, width = map(int, size.split("x"))
        folder = os.path.join(work, size)
        wsi = os.path.join(folder, "wsi")
        os.makedirs(wsi, exist_ok=True)
        slide = os.path.join(wsi, "big.tiff")
        csv = os.path.join(folder, "labels.csv")
        if os.path.exists(slide):
            from data.readers import open_slide

            with open_slide(slide) as existing:  # slides of earlier versions carry no pixel size
                if existing.pixel_size is None:
                    os.remove(csv)
        if not os.path.exists(csv):
            write_slide(slide, (height, width), _region(height, width), tile=512, mpp=SLIDE_MPP)
            rle, n_discs = _mask_rle(height, width)
            with open(csv + ".tmp", "w") as fh:
                fh.write(f"id,encoding\nbig,{rle}\n")
            os.replace(csv + ".tmp", csv)
        tissue = _tissue_fraction(height, width) * height * width
        tiles, infer = [], []
        for _ in range(args.runs):
            out = os.path.join(folder, "tiles")
            shutil.rmtree(out, ignore_errors=True)
            tiles.append(_measure([sys.executable, os.path.join(REPO, "tiles_creator.py"), "DATASETS.WSI_FOLDER", wsi,
                                   "DATASETS.LABELS_CSV", csv, "DATASETS.TRAIN_FOLDER", out, "INPUT.SIZE_TRAIN", "256",
                                   "INPUT.SIZE_REDUCTION_TRAIN", "4", "INPUT.SLIDE_READER", args.reader]))
            if args.skip_infer:
                continue
            pred = os.path.join(folder, "pred")
            shutil.rmtree(pred, ignore_errors=True)
            infer.append(_measure([*test_net, os.path.join(REPO, "test_net.py"), "TEST.WSI_FOLDER", wsi,
                                   "TEST.MODEL_WEIGHTS_FOLDER", models, "TEST.LABELS_CSV", csv, "OUTPUT_DIR", pred]))
        stats = json.load(open(os.path.join(folder, "tiles", "stats_256_red4.json")))
        row = {"size": f"{width} x {height}", "tissue_mpx": tissue / 1e6,
               "tile_s": float(np.median([w for w, _ in tiles])), "tile_mb": max(r for _, r in tiles),
               "tiles": stats["n_tiles"]}
        line = (f"{row['size']}: tissue {row['tissue_mpx']:.0f} Mpx | tiles_creator red 4 ({args.reader}): "
                f"{row['tile_s']:.1f} s, {row['tile_mb']:.0f} MB peak, {row['tiles']} tiles kept")
        if not args.skip_infer:
            record = json.load(open(os.path.join(folder, "pred", ".predictions", "big.json")))
            row.update(infer_s=float(np.median([w for w, _ in infer])), infer_mb=max(r for _, r in infer),
                       windows=record["windows"])
            line += (f" | test_net red 16: {row['infer_s']:.1f} s, {row['infer_mb']:.0f} MB peak, "
                     f"{row['windows']} windows")
        rows.append(row)
        print(line, flush=True)
        if not args.skip_infer:
            _print_objects(pred)
        if width >= 2 * PANEL_PIXELS:  # tiled in column panels: the tiles of one full-width pass?
            print("  column-panel tiles against one full-width pass: "
                  + _same_tiles(folder, wsi, csv, "import data.tiling as T; T.PANEL_PIXELS = 10**12; ",
                                ["INPUT.SLIDE_READER", args.reader]))
        if args.reader != "tifffile":
            print(f"  {args.reader} tiles against the tifffile reader's: "
                  + _same_tiles(folder, wsi, csv, opts=["INPUT.SLIDE_READER", "tifffile"]))
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = (f"growth {a['size']} -> {b['size']}: tissue area x{b['tissue_mpx'] / a['tissue_mpx']:.2f}; "
                  f"tiling time x{b['tile_s'] / a['tile_s']:.2f}, memory x{b['tile_mb'] / a['tile_mb']:.2f}")
        if not args.skip_infer:
            growth += (f"; inference time x{b['infer_s'] / a['infer_s']:.2f} (windows "
                       f"x{b['windows'] / a['windows']:.2f}), memory x{b['infer_mb'] / a['infer_mb']:.2f}")
        print(growth)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
