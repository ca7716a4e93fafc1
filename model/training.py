"""K-fold training with a fastai ``Learner``: one checkpoint per fold, curves, pictures and a
threshold study, resumable after an interruption.

Per fold ``k``, in ``OUTPUT_DIR``::

    model_<arch>_<encoder>_fold_<k>.pth   checkpoint: weights + model config + tile size,
                                          reduction, mean/std, best threshold, metrics
    fold_<k>/history.csv                  per-epoch losses and Dice (fastai CSVLogger)
    fold_<k>/curves.png                   training curves
    fold_<k>/thresholds.csv, .png         validation Dice vs threshold
    fold_<k>/triplets.png                 image | ground truth | prediction (+ Dice)
    fold_<k>/best.pth, last.pth, state.json   fastai states for resume (SOLVER.RESUME)

and after the folds ``summary.json`` and ``oof_thresholds.csv`` (out-of-fold Dice).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from typing import Dict, List

import numpy as np
import torch
from yacs.config import CfgNode as CN

from data.datasets import TileDataset, TileSet, kfold_groups, read_stats
from data.transforms import build_train_transform
from model.build import build_model, check_architecture, model_spec, param_groups, resolve_device
from model.checkpoint import load_weights_file, save_checkpoint
from utils.io import atomic_write_json, atomic_write_text
from utils.losses import build_loss
from utils.metrics import THRESHOLDS, DiceAccumulator, dice_from_counts
from utils.plots import plot_curves, plot_thresholds, plot_triplets

__all__ = ["train", "checkpoint_name", "make_learner", "make_dataloaders"]

logger = logging.getLogger(__name__)


def checkpoint_name(cfg: CN, fold: int) -> str:
    encoder = cfg.MODEL.ENCODER_NAME.replace("/", "_")
    return f"model_{cfg.MODEL.ARCHITECTURE}_{encoder}_fold_{fold}.pth"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _patch_fastai_distributed() -> None:
    """fastai 2.8's ``DistributedDL._broadcast`` moves the index list to CUDA (NCCL only takes
    CUDA tensors); with the gloo backend (CPU) it must stay on the CPU."""
    import torch.distributed as dist
    from fastai.distributed import DistributedDL

    def _broadcast(self, t, rank):
        t = torch.tensor(t, dtype=torch.long)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    DistributedDL._broadcast = _broadcast


def _fastai_metrics():
    from fastai.learner import Metric

    class DiceMetric(Metric):
        """Pooled validation Dice: soft, or thresholded at the best threshold of the sweep."""

        def __init__(self, kind: str):
            self.kind = kind
            self.acc = DiceAccumulator(THRESHOLDS if kind == "th" else ())

        def reset(self):
            self.acc.reset()
            self.reduced = False

        def accumulate(self, learn):
            self.acc.update(learn.pred, learn.yb[0])

        @property
        def value(self):
            if not self.reduced:  # under torchrun: pool the counts of every rank, once
                self.acc.all_reduce()
                self.reduced = True
            return self.acc.soft if self.kind == "soft" else self.acc.best()[1]

        @property
        def name(self):
            return f"dice_{self.kind}"

    return [DiceMetric("soft"), DiceMetric("th")]


def _callbacks(fold: int, state_file: str, start_epoch: int, append: bool, period: int = 1):
    """CSV history, best-model tracking and the per-epoch resume state.

    fastai's ``fit(start_epoch=k)`` skips epochs by cancelling them, but its Recorder still
    closes them with empty logs, which breaks the tracker and adds empty CSV rows: these
    versions ignore the skipped epochs.
    """
    from fastai.callback.core import Callback
    from fastai.callback.progress import CSVLogger
    from fastai.callback.tracker import SaveModelCallback

    class History(Callback):
        """fastai's CSVLogger, made resumable: on resume it keeps the rows of the epochs
        before ``start_epoch`` (dropping any epoch that was logged but not saved) and appends."""

        order = CSVLogger.order

        def before_fit(self):
            self.file = None
            if _rank() != 0:
                return
            path = os.path.join(self.path, f"fold_{fold}", "history.csv")
            rows = []
            if append and os.path.isfile(path):
                with open(path, newline="") as fh:
                    rows = [r for r in csv.reader(fh)]
                rows = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start_epoch]
            if not rows:
                rows = [list(self.recorder.metric_names)]
            atomic_write_text(path, "".join(",".join(r) + "\n" for r in rows))
            self.file = open(path, "a")
            self.old_logger, self.learn.logger = self.logger, self._write_line

        def _write_line(self, log):
            if self.file is not None and len(log) >= len(self.recorder.metric_names) - 1:  # a full epoch
                self.file.write(",".join(str(t) for t in log) + "\n")
                self.file.flush()
            self.old_logger(log)

        def after_fit(self):
            if self.file is not None:
                self.file.close()
                self.learn.logger = self.old_logger

    class BestModel(SaveModelCallback):
        def after_epoch(self):
            if self.epoch >= start_epoch:
                super().after_epoch()

    class EpochState(Callback):
        """After every epoch (after the tracker), save weights + optimizer and the epoch."""

        order = SaveModelCallback.order + 1

        def after_epoch(self):
            if self.epoch < start_epoch or _rank() != 0:
                return
            if (self.epoch + 1) % period and self.epoch + 1 < self.n_epoch:
                return
            self.learn.save("last", with_opt=True)
            atomic_write_json(state_file, {"epoch": int(self.epoch), "best": float(best.best)})

    best = BestModel(monitor="dice_th", comp=np.greater, fname="best", reset_on_fit=False)
    best.best = -np.inf
    return History(), best, EpochState()


def _seed_transform(transform):
    """Seed albumentations per item from torch's RNG (seeded per worker by the DataLoader), so
    runs with the same MODEL.SEED and worker count are reproducible."""
    if transform is None:
        return None

    def apply(**kwargs):
        transform.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        return transform(**kwargs)

    return apply


def make_learner(cfg: CN, dls, model, path: str, model_dir: str, cbs, device):
    """The fastai Learner of train_net: loss, Dice metrics, encoder/decoder parameter groups,
    mixed precision on CUDA."""
    from fastai.learner import Learner

    learn = Learner(dls, model, loss_func=build_loss(cfg), metrics=_fastai_metrics(), splitter=param_groups,
                    path=path, model_dir=model_dir, cbs=cbs)
    if device.type == "cuda":
        learn.to_fp16()
    return learn


def make_dataloaders(cfg, tiles, train_names, valid_names, mean, std, device):
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    transform = _seed_transform(build_train_transform(cfg.INPUT.PROB))
    train_ds = TileDataset(tiles, train_names, mean, std, transform)
    valid_ds = TileDataset(tiles, valid_names, mean, std, None)
    bs, workers = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS
    # persistent workers: no new worker processes every epoch
    extra = dict(num_workers=workers, persistent_workers=workers > 0, device=device)
    train_dl = DataLoader(train_ds, bs=bs, shuffle=True, drop_last=len(train_ds) > bs, **extra)
    valid_dl = DataLoader(valid_ds, bs=bs, shuffle=False, **extra)
    return DataLoaders(train_dl, valid_dl, device=device), valid_ds


@torch.no_grad()
def _evaluate(model, valid_ds, device, bs: int, n_pictures: int = 6):
    """Dice-vs-threshold counts over the validation tiles, and a few triplets."""
    model.eval()
    acc = DiceAccumulator(THRESHOLDS)
    per_tile = []  # (foreground pixels, index, probability map)
    keep = max(n_pictures * 3, 12)
    for start in range(0, len(valid_ds), bs):
        items = [valid_ds[i] for i in range(start, min(start + bs, len(valid_ds)))]
        x = torch.stack([a for a, _ in items]).to(device)
        y = torch.stack([b for _, b in items]).to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(x)
        acc.update(logits, y)
        prob = torch.sigmoid(logits.float()).cpu().numpy()[:, 0]
        for j, p in enumerate(prob):
            per_tile.append((float(y[j].sum()), start + j, p))
        per_tile = sorted(per_tile, key=lambda t: -t[0])[:keep]
    return acc, per_tile


def _triplets(valid_ds, per_tile, threshold: float, n: int = 6):
    chosen = per_tile[: n - 1] + per_tile[-1:] if len(per_tile) > n else per_tile
    items = []
    for _, index, prob in chosen:
        image, mask = valid_ds.load(index)
        pred = (prob > threshold).astype(np.uint8)
        inter, total = float((pred & mask).sum()), float(pred.sum() + mask.sum())
        items.append((valid_ds.names[index], image, mask, pred, dice_from_counts(inter, total)))
    return items


def _read_history(path: str) -> Dict[str, List[float]]:
    history: Dict[str, List[float]] = {}
    if not os.path.isfile(path):
        return history
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                try:
                    history.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):
                    pass
    return history


def _train_fold(cfg: CN, fold: int, tiles: TileSet, fold_of: Dict[str, int], mean, std, device) -> Dict[str, object]:
    import fastai.callback.schedule  # noqa: F401 - adds fit_one_cycle

    out = cfg.OUTPUT_DIR
    fold_dir = os.path.join(out, f"fold_{fold}")
    ckpt_path = os.path.join(out, checkpoint_name(cfg, fold))
    train_names = [n for n, g in zip(tiles.names, tiles.groups) if fold_of[g] != fold]
    valid_names = [n for n, g in zip(tiles.names, tiles.groups) if fold_of[g] == fold]
    logger.info("Fold %d: %d training tiles, %d validation tiles (%s)", fold, len(train_names), len(valid_names),
                ", ".join(sorted({g for g in tiles.groups if fold_of[g] == fold}))[:200])
    torch.manual_seed(cfg.MODEL.SEED + fold)
    np.random.seed((cfg.MODEL.SEED + fold) % 2**32)
    dls, valid_ds = make_dataloaders(cfg, tiles, train_names, valid_names, mean, std, device)
    model = build_model(cfg, weights=not cfg.MODEL.WEIGHTS)
    if cfg.MODEL.WEIGHTS:
        load_weights_file(model, cfg.MODEL.WEIGHTS)
        logger.info("Fold %d: initialised from %s", fold, cfg.MODEL.WEIGHTS)
    os.makedirs(fold_dir, exist_ok=True)  # only once the model could be built
    if _rank() == 0:  # the config of these outputs, written once nothing can fail on bad input
        atomic_write_text(os.path.join(out, "config.yaml"), cfg.dump())
    state_file = os.path.join(fold_dir, "state.json")
    resume = cfg.SOLVER.RESUME and os.path.isfile(state_file) and os.path.isfile(os.path.join(fold_dir, "last.pth"))
    state = {}
    if resume:
        with open(state_file) as fh:
            state = json.load(fh)
    start_epoch = int(state["epoch"]) + 1 if resume else 0
    history, best, epoch_state = _callbacks(fold, state_file, start_epoch, append=resume,
                                            period=cfg.SOLVER.CHECKPOINT_PERIOD)
    if state.get("best") is not None:
        best.best = float(state["best"])
    learn = make_learner(cfg, dls, model, out, f"fold_{fold}", [history, best, epoch_state], device)
    if resume:
        learn.create_opt()
        learn.load("last", with_opt=True, device=device)
        logger.info("Fold %d: resuming after epoch %d of %d", fold, start_epoch, cfg.SOLVER.MAX_EPOCHS)
    if start_epoch < cfg.SOLVER.MAX_EPOCHS:
        schedule = dict(lr_max=slice(cfg.SOLVER.BASE_LR_MIN, cfg.SOLVER.BASE_LR_MAX), start_epoch=start_epoch)
        if _world_size() > 1:  # torchrun: DistributedDataParallel through fastai + accelerate
            _patch_fastai_distributed()
            # SyncBatchNorm is CUDA-only; gloo on CPU
            with learn.distrib_ctx(sync_bn=device.type == "cuda", cpu=device.type == "cpu"):
                learn.fit_one_cycle(cfg.SOLVER.MAX_EPOCHS, **schedule)
        else:
            learn.fit_one_cycle(cfg.SOLVER.MAX_EPOCHS, **schedule)
    learn.load("best", device=device, with_opt=False)
    if _rank() != 0:  # the other ranks only helped to train
        return {"fold": fold, "checkpoint": ckpt_path}
    acc, per_tile = _evaluate(learn.model, valid_ds, device, cfg.SOLVER.IMS_PER_BATCH)
    threshold, dice = acc.best()
    table = acc.per_threshold()
    valid_ids = sorted({g for g in tiles.groups if fold_of[g] == fold})
    metrics = {"dice_th": dice, "dice_soft": acc.soft, "threshold": threshold, "valid_tiles": len(valid_names),
               "train_tiles": len(train_names), "valid_ids": valid_ids}
    info = {
        "model": model_spec(cfg),
        "input": {"size": cfg.INPUT.SIZE_TRAIN, "reduce": cfg.INPUT.SIZE_REDUCTION_TRAIN, "mean": mean, "std": std},
        "threshold": float(threshold),
        "fold": int(fold),
        "n_folds": int(cfg.SOLVER.N_FOLDS),
        "metrics": metrics,
        "loss": cfg.SOLVER.LOSS_FUNCTION_NAME,
        "epochs": int(cfg.SOLVER.MAX_EPOCHS),
    }
    if _rank() == 0:
        save_checkpoint(ckpt_path, learn.model, info)
        atomic_write_text(os.path.join(fold_dir, "thresholds.csv"),
                          "threshold,dice\n" + "".join(f"{t:.2f},{d:.6f}\n" for t, d in table.items()))
        plot_thresholds(table, os.path.join(fold_dir, "thresholds.png"), f"fold {fold}:")
        plot_triplets(_triplets(valid_ds, per_tile, threshold), os.path.join(fold_dir, "triplets.png"),
                      f"fold {fold}, threshold {threshold:.2f}")
        plot_curves(_read_history(os.path.join(fold_dir, "history.csv")), os.path.join(fold_dir, "curves.png"),
                    f"fold {fold}")
    logger.info("Fold %d: validation Dice %.4f at threshold %.2f (soft %.4f) -> %s", fold, dice, threshold,
                acc.soft, ckpt_path)
    return {"fold": fold, "checkpoint": ckpt_path, **metrics,
            "counts": {"inter": acc.inter.tolist(), "total": acc.total.tolist()}}


def train(cfg: CN) -> Dict[str, object]:
    """Train the configured folds; return (and write) the summary."""
    start = time.time()
    device = resolve_device(cfg.MODEL.DEVICE)
    build_loss(cfg)  # a wrong loss or architecture name fails before any work
    check_architecture(cfg.MODEL.ARCHITECTURE)
    tiles = TileSet(cfg.DATASETS.TRAIN_FOLDER, cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN)
    mean, std = read_stats(tiles, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    fold_of = kfold_groups(tiles.groups, cfg.SOLVER.N_FOLDS)
    folds = list(cfg.SOLVER.FOLDS) or list(range(cfg.SOLVER.N_FOLDS))
    bad = [f for f in folds if not 0 <= f < cfg.SOLVER.N_FOLDS]
    if bad:
        raise ValueError(f"SOLVER.FOLDS {bad}: folds are numbered 0..{cfg.SOLVER.N_FOLDS - 1}")
    for fold in folds:
        path = os.path.join(cfg.OUTPUT_DIR, checkpoint_name(cfg, fold))
        if os.path.exists(path) and not cfg.SOLVER.RESUME and not cfg.OVERWRITE:
            raise FileExistsError(f"{path} exists; set SOLVER.RESUME True to keep finished folds and continue, "
                                  "OVERWRITE True to train again, or another OUTPUT_DIR")
    logger.info("Training %s/%s on %s: %d tiles from %d slides/images, folds %s, mean %s std %s",
                cfg.MODEL.ARCHITECTURE, cfg.MODEL.ENCODER_NAME, device, len(tiles.names), len(set(tiles.groups)),
                folds, [round(v, 4) for v in mean], [round(v, 4) for v in std])
    results = []
    for fold in folds:
        path = os.path.join(cfg.OUTPUT_DIR, checkpoint_name(cfg, fold))
        summary_file = os.path.join(cfg.OUTPUT_DIR, f"fold_{fold}", "result.json")
        if cfg.SOLVER.RESUME and os.path.isfile(path) and os.path.isfile(summary_file):
            with open(summary_file) as fh:
                results.append(json.load(fh))
            logger.info("Fold %d: finished earlier (%s), skipped", fold, path)
            continue
        result = _train_fold(cfg, fold, tiles, fold_of, mean, std, device)
        if _rank() != 0:
            continue
        atomic_write_json(summary_file, result)
        results.append(result)
    if _rank() != 0:
        return {}
    inter = np.sum([r["counts"]["inter"] for r in results], axis=0)
    total = np.sum([r["counts"]["total"] for r in results], axis=0)
    oof = {float(t): dice_from_counts(i, s) for t, i, s in zip(THRESHOLDS, inter, total)}
    best_th = max(oof, key=lambda t: (oof[t], -t))
    summary = {
        "folds": [{k: v for k, v in r.items() if k != "counts"} for r in results],
        "mean_fold_dice": float(np.mean([r["dice_th"] for r in results])),
        "oof_dice": oof[best_th],
        "oof_threshold": best_th,
        "seconds": round(time.time() - start, 1),
    }
    if _rank() == 0:
        atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "summary.json"), summary)
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "oof_thresholds.csv"),
                          "threshold,dice\n" + "".join(f"{t:.2f},{d:.6f}\n" for t, d in oof.items()))
    logger.info("Done in %.0f s: mean fold Dice %.4f; out-of-fold Dice %.4f at threshold %.2f",
                summary["seconds"], summary["mean_fold_dice"], summary["oof_dice"], best_th)
    logger.info("Checkpoints and pictures: %s", os.path.abspath(cfg.OUTPUT_DIR))
    return summary
