"""Training throughput of train_net's fastai loop against a plain PyTorch loop, on CPU.

    python -m tests.bench.bench_train [--runs 3] [--batches 12]

Same model (UneXt on resnet18, random init), batch, loss (bce_dice), optimizer (Adam, the
same learning rate and weight decay), data (AIDPATH tiles with the training augmentation) and
data-loader settings. Each run trains ``--batches`` batches; reported: tiles/s of the training
phase (medians of ``--runs`` runs in one process), the ratio, and the data loader alone.
Needs ../shared/data.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from config import get_cfg_defaults
from data.datasets import TileDataset, TileSet, read_stats
from data.tiler import create_tiles
from data.transforms import build_train_transform
from model.build import build_model
from model.training import make_dataloaders, make_learner
from tests.slides import SHARED_REASON, has_shared, shared
from utils.losses import build_loss


def _cfg(work: str, batch: int, workers: int):
    cfg = get_cfg_defaults()
    cfg.DATASETS.FORMAT = "pairs"
    cfg.DATASETS.PAIRS_FOLDER = shared("aidpath")
    cfg.DATASETS.LABELS_CSV = ""
    cfg.DATASETS.MASK_CHANNEL, cfg.DATASETS.MASK_THRESHOLD = 0, 127
    cfg.DATASETS.TRAIN_FOLDER = work
    cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN, cfg.INPUT.PIXEL_THRESHOLD = 128, 4, -1
    cfg.MODEL.ARCHITECTURE, cfg.MODEL.ENCODER_NAME, cfg.MODEL.ENCODER_WEIGHTS = "UneXt", "resnet18", ""
    cfg.SOLVER.LOSS_FUNCTION_NAME = "bce_dice"
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.SOLVER.AMP = "off"  # float32 like the plain loop (SOLVER.AMP auto would use bf16 on a CPU with AMX)
    return cfg


def _fastai_run(cfg, tiles, names, mean, std, n_batches):
    from fastai.callback.core import Callback, CancelFitException

    device = torch.device("cpu")
    dls, _ = make_dataloaders(cfg, tiles, names, names[:1], mean, std, device)
    model = build_model(cfg)

    class Timer(Callback):
        order = 99

        def before_fit(self):
            self.seen, self.batches, self.start, self.elapsed = 0, 0, None, None

        def after_batch(self):
            if not self.training:
                return
            self.batches += 1
            if self.start is None:  # the first batch warms up (workers, allocator)
                self.start = time.perf_counter()
                return
            self.seen += find_bs(self.learn.yb)
            if self.batches >= n_batches:
                self.elapsed = time.perf_counter() - self.start
                raise CancelFitException

        def before_validate(self):  # time training only: validation does not count
            if self.start is not None:
                self.paused = time.perf_counter()

        def after_validate(self):
            if self.start is not None:
                self.start += time.perf_counter() - self.paused

    from fastai.torch_core import find_bs

    timer = Timer()
    learn = make_learner(cfg, dls, model, tempfile.mkdtemp(), "models", [timer], device)
    learn.fit(1000, lr=cfg.SOLVER.BASE_LR_MAX)
    return timer.seen / timer.elapsed


def _loader(cfg, tiles, names, mean, std):
    ds = TileDataset(tiles, names, mean, std, build_train_transform(cfg.INPUT.PROB))
    return torch.utils.data.DataLoader(ds, batch_size=cfg.SOLVER.IMS_PER_BATCH, shuffle=True, drop_last=True,
                                       num_workers=cfg.DATALOADER.NUM_WORKERS)


def _rate(dl, n_batches, step=None):
    """Tiles/s over ``n_batches`` batches (epochs repeat as needed); the first one warms up."""
    seen, start, i = 0, None, 0
    while i < n_batches:
        for x, y in dl:
            if step is not None:
                step(x, y)
            if start is None:
                start = time.perf_counter()
            else:
                seen += x.shape[0]
            i += 1
            if i >= n_batches:
                break
    return seen / (time.perf_counter() - start)


def _plain_run(cfg, tiles, names, mean, std, n_batches):
    model = build_model(cfg)
    loss_fn = build_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR_MAX, weight_decay=0.01, betas=(0.9, 0.99))
    model.train()

    def step(x, y):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return _rate(_loader(cfg, tiles, names, mean, std), n_batches, step)


def _loader_run(cfg, tiles, names, mean, std, n_batches):
    return _rate(_loader(cfg, tiles, names, mean, std), n_batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    work = tempfile.mkdtemp(prefix="bench_train_")
    cfg = _cfg(work, args.batch, args.workers)
    create_tiles(cfg)
    tiles = TileSet(work, 128, 4)
    mean, std = read_stats(tiles)
    names = tiles.names
    torch.manual_seed(0)
    results = {"train_net (fastai)": [], "plain PyTorch": [], "data loader alone": []}
    for _ in range(args.runs):  # interleaved, so drift on a noisy machine hits both alike
        results["plain PyTorch"].append(_plain_run(cfg, tiles, names, mean, std, args.batches))
        results["train_net (fastai)"].append(_fastai_run(cfg, tiles, names, mean, std, args.batches))
        results["data loader alone"].append(_loader_run(cfg, tiles, names, mean, std, args.batches * 2))
    print(f"CPU, {torch.get_num_threads()} torch threads, batch {args.batch}, {args.workers} loader worker(s), "
          f"{args.batches} batches of 128 px tiles per run, {args.runs} runs (medians)")
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in results.items():
        print(f"  {k:22s} {med[k]:7.1f} tiles/s   runs: {', '.join(f'{x:.1f}' for x in v)}")
    print(f"  ratio train_net / plain: {med['train_net (fastai)'] / med['plain PyTorch']:.3f} (target >= 0.9)")
    print(f"  data loader / plain training: {med['data loader alone'] / med['plain PyTorch']:.1f}x "
          "(> 1: the loader is not the bottleneck)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
