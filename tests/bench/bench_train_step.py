"""CPU training speed of the shipped recipe's model: crops per second of a training step, and what
the memory layout and the thread count change.

    python -m tests.bench.bench_train_step [--steps 8] [--runs 3]

The model of ``config/kidney.yaml`` (UneXt on tf_efficientnet_lite0 with its packaged ImageNet
weights, BatchNorm), batches of ``SOLVER.IMS_PER_BATCH`` (16) random crops of ``INPUT.CROP_SIZE``
(128) px, the recipe's loss (bce_dice) and optimizer (AdamW at the recipe's learning rate): a step
is forward, loss, backward and the optimizer's update, in float32. Each variant runs ``--steps``
steps after two warm-up steps, ``--runs`` times in this process; medians are printed, with the
ratio against the default (contiguous NCHW, torch's default threads), and the forward pass of
inference (no gradients) for the same batch. Needs no data: the speed of a step does not depend on
the pixels. Run it alone: a second busy process on 2 cores slows both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from config import load_cfg
from model.build import build_model
from utils.losses import build_loss

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "config",
                      "kidney.yaml")


def _steps(model, loss_fn, optimizer, x, y, steps: int) -> float:
    """Seconds per training step (forward, loss, backward, update)."""
    model.train()
    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def _forward(model, x, steps: int) -> float:
    model.eval()
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    cfg = load_cfg(RECIPE, [])
    batch, crop = cfg.SOLVER.IMS_PER_BATCH, cfg.INPUT.CROP_SIZE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, generator=gen)
    y = (torch.rand(batch, 1, crop, crop, generator=gen) > 0.8).float()
    loss_fn = build_loss(cfg)
    default_threads = torch.get_num_threads()
    variants = [("default (NCHW)", False, default_threads), ("channels_last", True, default_threads)]
    if default_threads > 1:
        variants.append((f"NCHW, {default_threads - 1} thread(s)", False, default_threads - 1))
    results = {}
    for name, channels_last, threads in variants:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_model(cfg)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        xb = x.contiguous(memory_format=fmt)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR_MAX, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        train = [_steps(model, loss_fn, optimizer, xb, y, args.steps) for _ in range(args.runs)]
        infer = [_forward(model, xb, args.steps) for _ in range(args.runs)]
        results[name] = (statistics.median(train), statistics.median(infer), train)
    torch.set_num_threads(default_threads)
    base_train, base_infer, _ = results[variants[0][0]]
    print(f"{cfg.MODEL.ARCHITECTURE} on {cfg.MODEL.ENCODER_NAME} ({cfg.MODEL.ENCODER_WEIGHTS}, {cfg.MODEL.NORM} norm), "
          f"batch {batch} x {crop} px, {cfg.SOLVER.LOSS_FUNCTION_NAME}, AdamW, float32, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU(s), {args.runs} runs of {args.steps} steps (medians)")
    print("| variant | training step, s | crops/s | vs default | inference forward, s | crops/s | vs default |")
    print("|---|---|---|---|---|---|---|")
    for name, (train, infer, runs) in results.items():
        print(f"| {name} | {train:.3f} | {batch / train:.1f} | x{train / base_train:.3f} | {infer:.3f} | "
              f"{batch / infer:.1f} | x{infer / base_infer:.3f} |")
    epoch = cfg.SOLVER.SAMPLES_PER_EPOCH / batch * base_train
    print(f"the recipe's epoch ({cfg.SOLVER.SAMPLES_PER_EPOCH} crops) at the default's step time: {epoch:.1f} s of "
          f"training steps (data loading and validation not included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
