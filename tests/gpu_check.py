"""A short check of the CUDA path (not a test: CI has no GPU).

    python -m tests.gpu_check [--arch UneXt --encoder resnet34 --size 256 --batch 16 --steps 30
                               --slide-reduce 2 --slide-batches 16,64]

Trains a few mixed-precision (fp16 autocast + GradScaler, as fastai's to_fp16) steps on random
tiles, saves and reloads a checkpoint, checks the reloaded model gives the same output, runs
an inference batch, and prints training and inference throughput (tiles/s) and peak memory.
Then a timed whole-slide inference: test_net.py (fp16 autocast on CUDA) on a generated
kidney-like slide (data/sample.py, 8192 x 8192, pyramidal) with the trained checkpoint at
reduction 2 (``--slide-reduce``), on CUDA at each ``TEST.IMS_PER_BATCH`` of ``--slide-batches``
and once on the CPU: wall time, the time spent on the windows and on the outputs, the
start-up (Python + imports) for reference, and the Dice between the CUDA (fp16) and CPU
(fp32) predictions. Exits with an error when no CUDA device is present.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="UneXt")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--slide-reduce", type=int, default=2, help="test_net's reduction on the 8192 px slide")
    parser.add_argument("--slide-batches", default="16,64", help="TEST.IMS_PER_BATCH values timed on CUDA")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU")

    from config import get_cfg_defaults
    from model.build import build_model
    from model.checkpoint import model_from_checkpoint, save_checkpoint
    from model.build import resolve_device
    from utils.losses import build_loss

    device = resolve_device("auto")
    cfg = get_cfg_defaults()
    cfg.MODEL.ARCHITECTURE, cfg.MODEL.ENCODER_NAME, cfg.MODEL.ENCODER_WEIGHTS = args.arch, args.encoder, ""
    cfg.SOLVER.LOSS_FUNCTION_NAME = "sym_lovasz_focal_dice"
    model = build_model(cfg).to(device)
    loss_fn = build_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.7).float()
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    model.train()
    losses = []
    for step in range(args.steps + 3):
        if step == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)
            loss = loss_fn(logits, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    torch.cuda.synchronize()
    train_rate = args.steps * args.batch / (time.perf_counter() - start)
    assert all(torch.isfinite(torch.tensor(losses))), "non-finite loss in fp16 training"
    print(f"fp16 training: {train_rate:.1f} tiles/s ({args.arch}/{args.encoder}, {args.size} px, batch {args.batch}); "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, logits {logits.dtype} under autocast")

    path = os.path.join(tempfile.mkdtemp(), "gpu_check.pth")
    info = {"model": {"ARCHITECTURE": args.arch, "ENCODER_NAME": args.encoder, "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1},
            "input": {"size": args.size, "reduce": 1, "mean": [0.5] * 3, "std": [0.25] * 3},
            "threshold": 0.5, "fold": 0, "metrics": {}}
    save_checkpoint(path, model, info)
    reloaded, _ = model_from_checkpoint(path)
    reloaded = reloaded.to(device).eval()
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(x[:2]).float(), reloaded(x[:2]).float(), atol=1e-4)
    print(f"checkpoint save/load: {'identical outputs' if same else 'OUTPUTS DIFFER'}")

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for i in range(args.steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            prob = torch.sigmoid(reloaded(x))
        torch.cuda.synchronize()
    infer_rate = args.steps * args.batch / (time.perf_counter() - start)
    print(f"fp16 inference: {infer_rate:.1f} tiles/s; output {tuple(prob.shape)}; "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    slide_ok = _slide_inference(model, info, args)
    return 0 if same and slide_ok else 1


def _slide_inference(model, info, args) -> bool:
    """test_net.py on a generated 8192 x 8192 slide, on CUDA and on the CPU: time, windows, CSV equality."""
    import json
    import subprocess

    from data.sample import SampleSpec, draw_slide, write_pyramid
    from model.checkpoint import save_checkpoint
    from utils.metrics import dice_from_counts
    from utils.rle import parse_rle, rle_area, runs_intersection

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(os.path.join(work, "wsi"))
    os.makedirs(os.path.join(work, "models"))
    image, _ = draw_slide(SampleSpec("gpu_slide", "test", 8192, 8192, 7))
    write_pyramid(os.path.join(work, "wsi", "gpu_slide.tiff"), image)
    info = dict(info, input=dict(info["input"], reduce=args.slide_reduce))
    save_checkpoint(os.path.join(work, "models", "m.pth"), model, info)
    startup = []
    for _ in range(2):  # the first also warms the file cache for the runs below
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import model.prediction, segmentation_models_pytorch"], cwd=repo,
                       check=True)
        startup.append(time.perf_counter() - start)
    print(f"start-up (python + imports test_net needs): {startup[0]:.1f} s cold, {startup[1]:.1f} s warm")
    runs = [("cuda", int(b)) for b in args.slide_batches.split(",")] + [("cpu", args.batch)]
    times, csvs = {}, {}
    for device, batch in runs:
        out = os.path.join(work, f"{device}{batch}")
        cmd = [sys.executable, os.path.join(repo, "test_net.py"), "TEST.WSI_FOLDER", os.path.join(work, "wsi"),
               "TEST.MODEL_WEIGHTS_FOLDER", os.path.join(work, "models"), "TEST.SIZE", str(args.size),
               "TEST.IMS_PER_BATCH", str(batch), "MODEL.DEVICE", device, "OUTPUT_DIR", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        times[device] = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"test_net on {device} failed: {proc.stderr[-1500:]}")
            return False
        record = json.load(open(os.path.join(out, ".predictions", "gpu_slide.json")))
        csvs[device] = record["predicted"]
        seconds = record["seconds"]
        print(f"test_net whole slide on {device}, batch {batch}: {times[device]:.1f} s wall (process start included), "
              f"{record['windows']} windows of {args.size} px at reduction {args.slide_reduce} in "
              f"{seconds['windows']:.1f} s ({record['windows'] / seconds['windows']:.0f} windows/s), "
              f"RLE/GeoJSON/pictures {seconds['outputs']:.1f} s, {record['objects']} objects")
    shape = (8192, 8192)
    cuda_runs, cpu_runs = parse_rle(csvs["cuda"], shape), parse_rle(csvs["cpu"], shape)
    agreement = dice_from_counts(runs_intersection(cuda_runs, cpu_runs), rle_area(cuda_runs) + rle_area(cpu_runs))
    print(f"whole-slide speed-up CUDA / CPU: {times['cpu'] / times['cuda']:.1f}x wall; "
          f"RLE {'identical' if csvs['cuda'] == csvs['cpu'] else 'differs'} (Dice CUDA fp16 vs CPU fp32 {agreement:.4f})")
    return agreement > 0.95


if __name__ == "__main__":
    sys.exit(main())
