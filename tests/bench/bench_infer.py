"""Whole-slide inference: test_net.py against MONAI's sliding window and the model-only floor.

    python -m pip install -r requirements-bench.txt   # MONAI
    python -m tests.bench.bench_infer [--runs 3]

A 31278 x 25794 tiled-JPEG slide of real tissue (as tests/bench/bench_tiles.py builds it), an
smp Unet-resnet18 with random weights (seed 0) saved as a checkpoint at reduction 16, tile 256,
overlap 0.5, CPU with 2 threads. Measured in the same run:

* test_net.py, as a user runs it, the default command (no backend key: ``TEST.BACKEND auto``,
  ONNX Runtime on this CPU from its cached export; fresh process: reads the slide, skips
  background, writes the full-resolution RLE CSV and pictures): wall time, peak RSS, windows
  evaluated, the seconds of each stage; its first run, which exports the model into the cache
  (the bench's own), is timed apart; target <= 0.5 x MONAI's time, peak RSS <= 1.3 GB here and
  <= 1.4 GB on the 44k slide;
* test_net with ``TEST.BACKEND torch``, alternating with the default runs: its time, and the RLE
  Dice of the default's masks against its masks (target >= 0.999);
* (a) MONAI ``sliding_window_inference`` (overlap 0.5, Gaussian) on the same downscaled image,
  already in memory, same model;
* (b) the floor: the model's forward pass alone on as many tiles as test_net evaluated, in the
  channels-last layout test_net feeds it (about 20 % faster than contiguous NCHW on CPU);
* (c) start-up: a fresh Python that imports what test_net needs (torch, segmentation_models_pytorch
  and this toolkit's modules) and exits as test_net does, the cost every fresh test_net process
  pays before it can run a model; test_net's time without it is printed against the floor too.

``--height 44066 --width 31299 --skip-baselines`` measures test_net alone on a larger slide.

``--onnx`` also exports the model (``python -m model.export``, not timed) and runs test_net with
``TEST.BACKEND onnx`` on the exported folder, alternating with the other runs.

``--measure`` also runs test_net with ``TEST.MEASURE False`` (no objects.csv, no per-object
measurements), alternating with the default runs, and prints the cost of the measurements: the
ratio of the median times and of the peak RSS (target: within 5 %), with the objects measured.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from tests.bench.bench_tiles import REPO, SLIDE_ID, _measure
from tests.slides import SHARED_REASON, has_shared, mosaic_region, read_sizes, write_slide


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reduce", type=int, default=16)
    parser.add_argument("--height", type=int, default=0, help="slide height (default: the real 2f6ecfcdf size)")
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--copies", type=int, default=1,
                        help="predict this many copies of the slide in one test_net run (start-up amortised); "
                             "the baselines are then counted that many times")
    parser.add_argument("--skip-baselines", action="store_true", help="only test_net (e.g. for the RSS of a larger slide)")
    parser.add_argument("--model", choices=["random", "blobs"], default="random",
                        help="random: an smp Unet-resnet18 with random weights (its output is noise around 0.5: "
                             "thousands of specks, a stress case for the measurements); blobs: tests/blob_model.py's "
                             "DarkBlobs, whose objects follow the tissue (a few hundred, as a trained model's)")
    parser.add_argument("--measure", action="store_true",
                        help="also time test_net without measurements (TEST.MEASURE False) and print the ratio")
    parser.add_argument("--onnx", action="store_true",
                        help="also run test_net with TEST.BACKEND onnx (the model exported first) and print the ratio")
    parser.add_argument("--layout", choices=["ellipse", "mosaic"], default="ellipse",
                        help="ellipse: tissue in a central ellipse (~57%% of the slide) on background, as on a "
                             "real slide; mosaic: tissue everywhere (nothing to skip)")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    from monai.inferers import sliding_window_inference

    from data.tiling import TileGrid
    from data.readers import open_slide
    from model.build import build_model
    from model.checkpoint import save_checkpoint
    from model.inference import lowres_image

    torch.set_num_threads(2)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_infer_")
    models = os.path.join(work, "models")
    os.makedirs(models, exist_ok=True)
    height, width = read_sizes()[SLIDE_ID]
    height, width = args.height or height, args.width or width
    wsi = os.path.join(work, f"wsi_{args.layout}_{height}x{width}")
    os.makedirs(wsi, exist_ok=True)
    slide_path = os.path.join(wsi, f"{SLIDE_ID}.tiff")

    def region(a, b, c, d, s=1):
        pixels = mosaic_region(a, b, c, d, s, background_every=3)
        if args.layout == "ellipse":
            yy, xx = np.mgrid[a:b, c:d]
            outside = ((yy - height / 2) / (0.45 * height)) ** 2 + ((xx - width / 2) / (0.40 * width)) ** 2 > 1
            pixels[outside] = 242
        return pixels

    if not os.path.exists(slide_path):
        write_slide(slide_path, (height, width), region, tile=512)
    if args.copies > 1:  # the same slide under other ids, in a folder of its own
        copies = os.path.join(work, f"copies{args.copies}_{args.layout}_{height}x{width}")
        os.makedirs(copies, exist_ok=True)
        for k in range(args.copies):
            link = os.path.join(copies, f"{SLIDE_ID}_{k}.tiff")
            if not os.path.exists(link):
                os.symlink(slide_path, link)
        wsi = copies
    for name in os.listdir(models):
        os.remove(os.path.join(models, name))
    script = [sys.executable, os.path.join(REPO, "test_net.py")]
    if args.model == "blobs":
        from tests.blob_model import DarkBlobs, save_blob_checkpoint

        model, norm = DarkBlobs().eval(), ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        save_blob_checkpoint(os.path.join(models, "blobs.pth"), size=args.size, reduce=args.reduce)
        script = [sys.executable, "-m", "tests.blob_model", os.path.join(REPO, "test_net.py")]  # registers it
    else:
        spec = {"ARCHITECTURE": "Unet", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}
        torch.manual_seed(0)
        model, norm = build_model(spec).eval(), ([0.8, 0.7, 0.8], [0.15, 0.2, 0.12])
        save_checkpoint(os.path.join(models, "unet.pth"), model, {
            "model": spec, "input": {"size": args.size, "reduce": args.reduce, "mean": norm[0], "std": norm[1]},
            "threshold": 0.5, "fold": 0, "metrics": {}})

    exported = os.path.join(work, "exported")
    if args.onnx:
        shutil.rmtree(exported, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "model.export", "TEST.MODEL_WEIGHTS_FOLDER", models, "OUTPUT_DIR",
                               exported], cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-2000:])
    cache = os.path.join(work, "onnx_cache")  # TEST.BACKEND auto's exports, for this bench only
    shutil.rmtree(cache, ignore_errors=True)
    common = ["TEST.SIZE", str(args.size), "TEST.OVERLAP", "0.5", "TEST.ONNX_CACHE", cache]

    def run(name, extra):
        out = os.path.join(work, f"out_{name}")
        shutil.rmtree(out, ignore_errors=True)
        timing = _measure([*script, "TEST.WSI_FOLDER", wsi, "TEST.MODEL_WEIGHTS_FOLDER",
                           exported if name == "onnx" else models, *common, *extra, "OUTPUT_DIR", out], cwd=REPO)
        return timing, out

    # the default command exports the model once (cached): that first run is timed on its own
    (first_wall, first_rss), _ = run("default", [])
    variants = [("default", []), ("torch", ["TEST.BACKEND", "torch"])]
    if args.measure:
        variants.append(("bare", ["TEST.MEASURE", "False"]))
    if args.onnx:
        variants.append(("onnx", ["TEST.BACKEND", "onnx"]))
    runs = {name: [] for name, _ in variants}
    records = {}
    for _ in range(args.runs):  # alternated, so a slower minute of the machine hits every variant alike
        for name, extra in variants:
            timing, out = run(name, extra)
            runs[name].append(timing)
            records[name] = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, ".predictions", "*.json")))]
    wall, rss = statistics.median(w for w, _ in runs["default"]), max(r for _, r in runs["default"])
    record = records["default"][0]
    windows, objects = record["windows"], (record["objects"], record["area"])
    print(f"{args.copies} x slide {width} x {height} ({args.layout} layout), {args.model} model, reduction {args.reduce}, "
          f"tile {args.size}, overlap 0.5, CPU 2 threads, {args.runs} runs (medians)")
    print(f"test_net, the default command (TEST.BACKEND auto): {wall:6.2f} s (runs "
          f"{', '.join(f'{w:.2f}' for w, _ in runs['default'])}), peak RSS {rss:.0f} MB, {windows} windows evaluated "
          f"per slide; {objects[0]} objects measured ({objects[1]} px of foreground)")
    print(f"  its first run, the ONNX export into the cache included: {first_wall:6.2f} s, peak RSS {first_rss:.0f} MB")
    from utils.timing import sum_stages

    stages = sum_stages([record["seconds"].get("stages", {})])  # in the stages' order
    print("  seconds by stage (slide 1, last run): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f"; slide wall {record['seconds'].get('wall', float('nan')):.2f}")
    from utils.rle import parse_rle, rle_dice

    def agreement(name):
        return min(rle_dice(parse_rle(a["predicted"], tuple(a["shape"])), parse_rle(b["predicted"], tuple(b["shape"])))
                   for a, b in zip(records["default"], records[name]))

    torch_wall, torch_rss = statistics.median(w for w, _ in runs["torch"]), max(r for _, r in runs["torch"])
    print(f"test_net TEST.BACKEND torch: {torch_wall:6.2f} s (runs {', '.join(f'{w:.2f}' for w, _ in runs['torch'])}), "
          f"peak RSS {torch_rss:.0f} MB; default / torch: time x{wall / torch_wall:.3f}; RLE Dice of the default's "
          f"masks against torch's {agreement('torch'):.5f} (target >= 0.999)")
    if args.measure:
        bare_wall, bare_rss = statistics.median(w for w, _ in runs["bare"]), max(r for _, r in runs["bare"])
        print(f"without measurements (TEST.MEASURE False): {bare_wall:6.2f} s (runs "
              f"{', '.join(f'{w:.2f}' for w, _ in runs['bare'])}), peak RSS {bare_rss:.0f} MB")
        print(f"measurements cost: time x{wall / bare_wall:.3f}, peak RSS x{rss / bare_rss:.3f} (target <= 1.05 each)")
    if args.onnx:
        onnx_wall, onnx_rss = statistics.median(w for w, _ in runs["onnx"]), max(r for _, r in runs["onnx"])
        print(f"test_net TEST.BACKEND onnx (python -m model.export first): {onnx_wall:6.2f} s, peak RSS {onnx_rss:.0f} MB; "
              f"RLE Dice against the default's {agreement('onnx'):.5f}")
    if args.skip_baselines:
        return 0

    with open_slide(slide_path) as slide:
        grid = TileGrid(height, width, args.size, args.reduce)
        image = lowres_image(slide, grid)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    mean = torch.tensor(norm[0]).view(1, 3, 1, 1) * 255
    std = torch.tensor(norm[1]).view(1, 3, 1, 1) * 255
    x = (x - mean) / std
    monai_times = []
    with torch.no_grad():
        for _ in range(args.runs):
            start = time.perf_counter()
            sliding_window_inference(x, (args.size, args.size), 8, model, overlap=0.5, mode="gaussian")
            monai_times.append(time.perf_counter() - start)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        monai_cl_times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            sliding_window_inference(x_cl, (args.size, args.size), 8, model, overlap=0.5, mode="gaussian")
            monai_cl_times.append(time.perf_counter() - start)
        # test_net's tiles arrive channels-last (a view of the HWC image), the fast layout for
        # CPU convolutions: the floor uses it too, so it is the fastest forward of this model.
        batch = torch.randn(8, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        model(batch)  # warm-up
        floor_times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            done = 0
            while done < windows:
                n = min(8, windows - done)
                model(batch[:n])
                done += n
            floor_times.append(time.perf_counter() - start)
    monai_s, floor_s = statistics.median(monai_times) * args.copies, statistics.median(floor_times) * args.copies
    n_all = len(range(0, image.shape[0] - args.size + 1, args.size // 2)) * len(range(0, image.shape[1] - args.size + 1, args.size // 2))
    print(f"windows in the whole padded image: about {n_all}")
    print(f"(a) MONAI sliding window, in memory: {monai_s:6.2f} s  -> test_net (default) / MONAI = {wall / monai_s:.2f} "
          f"(target <= 0.5); TEST.BACKEND torch / MONAI = {torch_wall / monai_s:.2f}")
    monai_cl = statistics.median(monai_cl_times) * args.copies
    print(f"    MONAI given a channels-last image: {monai_cl:6.2f} s  -> test_net / MONAI = {wall / monai_cl:.2f}")
    print(f"(b) floor, model forward on {windows} tiles: {floor_s:6.2f} s  -> test_net / floor = {wall / floor_s:.2f} (target <= 1.3)")
    # ends as test_net ends (exit_now: no module teardown), so the difference is test_net's own work
    startup_cmd = "import model.prediction, segmentation_models_pytorch, utils.setup; utils.setup.exit_now(0)"
    startup = statistics.median(_measure([sys.executable, "-c", startup_cmd], cwd=REPO)[0] for _ in range(args.runs))
    print(f"(c) start-up, python + imports alone: {startup:6.2f} s  -> test_net without it / floor = "
          f"{(wall - startup) / floor_s:.2f}; the floor target leaves {1.3 * floor_s - floor_s:.2f} s for everything "
          f"but the forward passes, start-up included")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
