"""K-fold training with a fastai ``Learner``: one checkpoint per fold (and optionally one
model trained on everything), curves, pictures and a threshold study, resumable.

Per fold ``k``, in ``OUTPUT_DIR``::

    model_<arch>_<encoder>_fold_<k>.pth   checkpoint: weights + model config + tile size,
                                          reduction, mean/std, learned threshold, metrics
    model_<arch>_<encoder>_all.pth        with SOLVER.FINAL_MODEL: trained on every image,
                                          threshold from the out-of-fold study
    fold_<k>/history.csv                  per-epoch losses and Dice (one line per epoch in log.txt too)
    fold_<k>/curves.png                   training curves
    fold_<k>/thresholds.csv, .png         validation Dice vs threshold
    fold_<k>/triplets.png                 image | ground truth | prediction (+ Dice)
    fold_<k>/last.state, best.state       resume states (not checkpoints), removed once the fold
                                          is done unless SOLVER.KEEP_RESUME_STATES
    fold_<k>/state.json, result.json      progress and result of the fold, with its settings

and after the folds ``summary.json`` and ``oof_thresholds.csv`` (out-of-fold Dice). A rerun of
the same command resumes: finished folds are kept, an unfinished one continues after its last
saved epoch; a rerun with other settings is refused (``OVERWRITE True`` starts again).

Training views: the classic fixed tiles (``INPUT.CROP_SIZE 0``), or a fresh random crop per
sample (``data.sampling``). Schedule: fastai one-cycle (warm-up, then cosine decay) over
``MAX_EPOCHS``; ``SOLVER.AVERAGE`` keeps an EMA or SWA copy of the weights, which is what
is validated and saved, its BatchNorm statistics recomputed at the end.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from yacs.config import CfgNode as CN

from config.choices import NOT_LEARNED, TRAINING_SECTIONS
from data.datasets import EpochSeeded, TileDataset, TileSet, kfold_groups, read_stats, tile_group, tile_index, tile_sources
from data.sources import source_views
from data.sampling import OUTSIDE, RandomCropDataset, ValidationTiles, crop_margin, slide_canvases
from data.tiling import TileGrid
from data.transforms import build_histology_transform, build_train_transform
from model.build import build_model, model_spec, param_groups, resolve_device
from model.callbacks import (COLLAPSE, BestState, BF16Autocast, CollapseGuard, DiceMetric, EpochLog, EpochSeed, History,
                             IgnoreOutside, ResumeState, SkipValidation, WeightAverage, ignore_outside,
                             load_opt_state, load_state, unwrap)
from model.card import model_card, write_card
from model.checkpoint import load_weights_file, save_checkpoint
from utils.distributed import is_main, rank, world_size
from utils.io import atomic_write_csv, atomic_write_json, atomic_write_text, file_stamp, read_json
from utils.losses import build_loss
from utils.metrics import THRESHOLDS, DiceAccumulator, best_threshold, dice_from_counts, pooled_table
from utils.plots import plot_curves, plot_thresholds, plot_triplets
from utils.version import machine

__all__ = ["train", "revalidate", "checkpoint_name", "make_learner", "make_dataloaders", "training_settings", "changed_settings",
           "ALL"]

logger = logging.getLogger(__name__)

ALL = "all"  # the "fold" of the model trained on every image
def checkpoint_name(cfg: CN, fold) -> str:
    encoder = cfg.MODEL.ENCODER_NAME.replace("/", "_")
    suffix = ALL if fold == ALL else f"fold_{fold}"
    return f"model_{cfg.MODEL.ARCHITECTURE}_{encoder}_{suffix}.pth"


def training_settings(cfg: CN, device: Optional[torch.device] = None) -> Dict[str, object]:
    """What a fold learns from (``SECTION.KEY: value``): every key of
    :data:`config.choices.TRAINING_SECTIONS` but those declared in
    :data:`config.choices.NOT_LEARNED`, DATASETS.TRAIN_FOLDER, each source's sampling weight, the
    starting weights file's stamp (MODEL.WEIGHTS: another file under the same name is another
    start), and where and at which precision it trains (the device kind and SOLVER.AMP resolved
    on it: bf16 and fp32 runs differ)."""
    flat: Dict[str, object] = {"DATASETS.TRAIN_FOLDER": cfg.DATASETS.TRAIN_FOLDER}
    for section in TRAINING_SECTIONS:
        for name, value in cfg[section].items():
            key = f"{section}.{name}"
            if key not in NOT_LEARNED:
                flat[key] = list(value) if isinstance(value, (list, tuple)) else value
    flat["DATASETS.SOURCES weights"] = [[str(e.get("NAME", "")), float(e.get("WEIGHT", 1.0))]
                                        for e in cfg.DATASETS.SOURCES]
    if cfg.MODEL.WEIGHTS and os.path.isfile(cfg.MODEL.WEIGHTS):
        flat["MODEL.WEIGHTS (file)"] = file_stamp(cfg.MODEL.WEIGHTS)
    device = device if device is not None else resolve_device(cfg.MODEL.DEVICE)
    flat["MODEL.DEVICE (kind)"] = device.type
    flat["SOLVER.AMP (precision)"] = training_precision(cfg.SOLVER.AMP, device)
    return flat


def changed_settings(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    """The keys recorded in both whose values differ. A key only one side has is not compared:
    records of earlier versions hold fewer keys (MODEL.DEEP_SUPERVISION was missing from them), or
    keys a later version no longer counts (DATALOADER.NUM_WORKERS)."""
    return [k for k in new if k in old and old[k] != new[k]]


def _differences(old: Dict[str, object], new: Dict[str, object]) -> str:
    keys = changed_settings(old, new)
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) + (
        f" and {', '.join(keys[4:])}" if len(keys) > 4 else "")


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


def _seed_transform(transform):
    """Seed albumentations per item from torch's RNG (seeded per item by data.datasets.EpochSeeded),
    so runs with the same MODEL.SEED are reproducible whatever the worker count."""
    if transform is None:
        return None

    def apply(**kwargs):
        transform.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        return transform(**kwargs)

    return apply


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16): there, bf16 autocast
    speeds training up; elsewhere it is emulated, and slower than float32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def make_learner(cfg: CN, dls, model, path: str, model_dir: str, cbs, device):
    """The fastai Learner of train_net: loss, Dice metrics, encoder/decoder parameter groups,
    Adam with decoupled weight decay SOLVER.WEIGHT_DECAY, mixed precision (SOLVER.AMP: fp16 on
    CUDA by default; bf16 on request, or on a CPU with native bf16 under 'auto'). fastai's
    progress bars are left out (train_net logs one line per epoch)."""
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Learner

    learn = Learner(dls, model, loss_func=build_loss(cfg), metrics=[DiceMetric("soft"), DiceMetric("th")],
                    splitter=param_groups, path=path, model_dir=model_dir, cbs=cbs, wd=cfg.SOLVER.WEIGHT_DECAY)
    if any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
    if training_precision(cfg.SOLVER.AMP, device) == "bf16":
        learn.add_cb(BF16Autocast())
    elif training_precision(cfg.SOLVER.AMP, device) == "fp16":
        learn.to_fp16()
    return learn


def training_precision(amp: str, device) -> str:
    """``SOLVER.AMP`` on ``device``: 'fp16' (CUDA, auto), 'bf16' (asked for, or auto on a CPU
    with native bfloat16) or 'fp32'."""
    if amp == "bf16":
        return "bf16"
    if amp == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
    return "fp32"


def _train_transform(cfg: CN, margin: int = 0):
    i = cfg.INPUT
    if i.AUGMENTATION == "histology":
        return build_histology_transform(i.PROB, i.CROP_SIZE or i.SIZE_TRAIN, margin, stain=i.STAIN_STRENGTH)
    transform = build_train_transform(i.PROB)
    if transform is not None and margin:
        import albumentations as A

        transform = A.Compose([*transform.transforms, A.CenterCrop(i.CROP_SIZE, i.CROP_SIZE)])
    return transform


def _grids(tiles: TileSet, cfg: CN) -> Dict[str, TileGrid]:
    """Each slide's tile grid, from the shapes the tiler recorded in its stats file."""
    shapes = tiles.stats.shapes() if tiles.stats else {}
    return {slide_id: TileGrid(*shape, cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN)
            for slide_id, shape in shapes.items()}


def _rois(tiles: TileSet) -> Dict[str, list]:
    """Each slide's region of interest (shapes in grid pixels) recorded by the tiler, if any."""
    return tiles.stats.rois() if tiles.stats else {}


def make_dataloaders(cfg, tiles, train_names, valid_names, mean, std, device):
    """Training loader (fixed tiles, or INPUT.CROP_SIZE random crops, SAMPLES_PER_EPOCH per
    epoch) and validation loader (the held-out tiles, whole); returns them and the validation
    dataset."""
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    crop = cfg.INPUT.CROP_SIZE
    grids = _grids(tiles, cfg)  # the stats file, read once for the crops and the validation tiles
    if crop:
        margin = crop_margin(crop, cfg.INPUT.PROB > 0)
        canvases = slide_canvases(tiles.images, tiles.masks, train_names, grids, tile_group,
                                  tile_index, _rois(tiles))
        samples = cfg.SOLVER.SAMPLES_PER_EPOCH or len(train_names)
        weights = {name: weight for name, weight, _ in source_views(cfg) if name}
        train_ds = RandomCropDataset(canvases, crop, samples, cfg.INPUT.FOREGROUND_FRACTION, mean, std,
                                     _seed_transform(_train_transform(cfg, margin)), margin,
                                     tile_sources(tiles), weights, cfg.INPUT.COPY_PASTE)
    else:
        train_ds = TileDataset(tiles, train_names, mean, std, _seed_transform(_train_transform(cfg)))
    train_ds = EpochSeeded(train_ds)  # each item drawn from (epoch, index): model.callbacks.EpochSeed
    valid_ds = ValidationTiles(tiles, valid_names, mean, std, grids)
    bs, workers = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS
    # persistent workers: no new worker processes every epoch (the items are seeded by epoch and
    # index, EpochSeeded, so the workers' own generators do not matter)
    extra = dict(num_workers=workers, persistent_workers=workers > 0, device=device)
    train_dl = DataLoader(train_ds, bs=bs, shuffle=not crop, drop_last=len(train_ds) > bs, **extra)
    valid_dl = DataLoader(valid_ds, bs=bs, shuffle=False, **extra)
    return DataLoaders(train_dl, valid_dl, device=device), valid_ds


@torch.no_grad()
def _evaluate(model, valid_ds, device, bs: int, n_pictures: int = 6, sources: Optional[Dict[str, str]] = None):
    """Dice-vs-threshold counts over the validation tiles (and, with ``sources``: slide id ->
    data source, over each source's tiles), and a few triplets."""
    model.eval()
    acc = DiceAccumulator(THRESHOLDS)
    by_source: Dict[str, DiceAccumulator] = {}
    per_tile = []  # (foreground pixels, index, probability map)
    keep = max(n_pictures * 3, 12)
    for start in range(0, len(valid_ds), bs):
        items = [valid_ds[i] for i in range(start, min(start + bs, len(valid_ds)))]
        x = torch.stack([a for a, _ in items]).to(device)
        y = torch.stack([b for _, b in items]).to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(x)
        logits, y = ignore_outside(logits, y)
        acc.update(logits, y)
        if sources:
            names = [sources.get(tile_group(valid_ds.names[i]), "") for i in range(start, start + len(items))]
            for name in sorted(set(names)):
                rows = torch.as_tensor([k for k, n in enumerate(names) if n == name], device=logits.device)
                by_source.setdefault(name, DiceAccumulator(THRESHOLDS)).update(logits[rows], y[rows])
        prob = torch.sigmoid(logits.float()).cpu().numpy()[:, 0]
        for j, p in enumerate(prob):
            per_tile.append((float(y[j].sum()), start + j, p))
        per_tile = sorted(per_tile, key=lambda t: -t[0])[:keep]
    return acc, per_tile, by_source


def _triplets(valid_ds, per_tile, threshold: float, n: int = 6):
    chosen = per_tile[: n - 1] + per_tile[-1:] if len(per_tile) > n else per_tile
    items = []
    for _, index, prob in chosen:
        image, mask = valid_ds.load(index)
        prob = np.where(mask == OUTSIDE, 0.0, prob)
        mask = (mask == 1).astype(np.uint8)
        pred = (prob > threshold).astype(np.uint8)
        inter, total = float((pred & mask).sum()), float(pred.sum() + mask.sum())
        items.append((valid_ds.names[index], image, mask, pred, dice_from_counts(inter, total)))
    return items


def _training_seconds(path: str) -> float:
    """The seconds of training a fold's ``history.csv`` records (its epochs' times, resumed runs
    included; validation passes count where they ran)."""
    total = 0.0
    if os.path.isfile(path):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                parts = (row.get("time") or "").split(":")
                try:
                    total += sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))
                except ValueError:
                    continue
    return total


def _read_history(path: str) -> Dict[str, List[float]]:
    history: Dict[str, List[float]] = {}
    if not os.path.isfile(path):
        return history
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                try:
                    history.setdefault(key, []).append(float(value))
                except (TypeError, ValueError):  # an epoch without validation: a gap in its curves
                    if key != "time":
                        history.setdefault(key, []).append(float("nan"))
    return history


# --- the stages of one fold -----------------------------------------------------------------
class _Fold:
    """What one fold (or the all-images model) trains on, and where it writes."""

    def __init__(self, cfg: CN, fold, tiles: TileSet, fold_of: Dict[str, int], sources: Dict[str, str], device):
        self.cfg, self.fold, self.tiles, self.sources, self.device = cfg, fold, tiles, sources, device
        self.settings = training_settings(cfg, device)
        self.label = "Final model" if fold == ALL else f"Fold {fold}"
        self.dir = os.path.join(cfg.OUTPUT_DIR, ALL if fold == ALL else f"fold_{fold}")
        self.checkpoint = os.path.join(cfg.OUTPUT_DIR, checkpoint_name(cfg, fold))
        self.result_file = os.path.join(self.dir, "result.json")
        self.state_file = os.path.join(self.dir, "state.json")
        held_out = set() if fold == ALL else {g for g in tiles.groups if fold_of[g] == fold}
        self.valid_ids = sorted(held_out)
        self.train_names = [n for n, g in zip(tiles.names, tiles.groups) if g not in held_out]
        self.valid_names = [n for n, g in zip(tiles.names, tiles.groups) if g in held_out]
        self.seed = cfg.MODEL.SEED + (cfg.SOLVER.N_FOLDS if fold == ALL else fold)


def _resume_point(fold: _Fold) -> Dict[str, object]:
    """``{}`` for a fresh start, or the saved progress of an unfinished run of this fold with
    the same :func:`training_settings`; an unfinished run with others is refused, naming the
    keys that changed (or, with OVERWRITE, forgotten)."""
    last = os.path.join(fold.dir, "last.state")
    if not (os.path.isfile(fold.state_file) and os.path.isfile(last)):
        return {}
    state = read_json(fold.state_file)
    if changed_settings(state.get("settings") or {}, fold.settings):
        if fold.cfg.OVERWRITE:
            return {}
        raise FileExistsError(
            f"{fold.dir}: an unfinished run with other settings "
            f"({_differences(state.get('settings') or {}, fold.settings)}); "
            "rerun it with its own settings to resume, or set OVERWRITE True to start again, or another OUTPUT_DIR")
    return state


def _callbacks(fold: _Fold, state: Dict[str, object]) -> Dict[str, object]:
    """The fold's callbacks by name; ``state`` is its resume point ({} for a fresh start)."""
    s, n_epochs, main = fold.cfg.SOLVER, fold.cfg.SOLVER.MAX_EPOCHS, is_main()
    start = int(state["epoch"]) + 1 if state else 0
    average = WeightAverage(s.AVERAGE, s.EMA_DECAY, swa_from=int(np.ceil(s.SWA_START * n_epochs)))
    best = BestState(os.path.join(fold.dir, "best.state"), float(state.get("best", -np.inf)) if state else -np.inf,
                     start, save=main)
    cbs = {"seed": EpochSeed(fold.seed, rank()),
           "history": History(os.path.join(fold.dir, "history.csv"), start, append=bool(state), save=main),
           "log": EpochLog(fold.label, n_epochs, start, log=main), "collapse": CollapseGuard(fold.label, start, main),
           "average": average, "best": best, "outside": IgnoreOutside(),
           "resume": ResumeState(fold.dir, s.CHECKPOINT_PERIOD, average, best, lambda: fold.settings, start, main)}
    every = 0 if fold.fold == ALL else s.EVAL_PERIOD
    if every != 1:
        cbs["skip_valid"] = SkipValidation(every, n_epochs)
    return cbs


def _fit(fold: _Fold, learn, cbs, start_epoch: int, device) -> None:
    cfg = fold.cfg
    if start_epoch >= cfg.SOLVER.MAX_EPOCHS:
        return
    schedule = dict(lr_max=slice(cfg.SOLVER.BASE_LR_MIN, cfg.SOLVER.BASE_LR_MAX), start_epoch=start_epoch,
                    pct_start=cfg.SOLVER.WARMUP_FRACTION, wd=cfg.SOLVER.WEIGHT_DECAY)
    if world_size() > 1:  # torchrun: DistributedDataParallel through fastai + accelerate
        _patch_fastai_distributed()
        # SyncBatchNorm is CUDA-only; gloo on CPU
        with learn.distrib_ctx(sync_bn=device.type == "cuda", cpu=device.type == "cpu"):
            learn.fit_one_cycle(cfg.SOLVER.MAX_EPOCHS, **schedule)
    else:
        learn.fit_one_cycle(cfg.SOLVER.MAX_EPOCHS, **schedule)


def _final_weights(fold: _Fold, learn, cbs, device) -> str:
    """Load the weights the fold saves; returns what they are."""
    cfg, model = fold.cfg, unwrap(learn.model)
    best_file = os.path.join(fold.dir, "best.state")
    if cfg.SOLVER.SAVE == "best" and fold.fold != ALL and os.path.isfile(best_file):
        state = load_state(best_file)
        model.load_state_dict(state["model"])
        return f"the best epoch by validation Dice ({int(state['epoch']) + 1})"
    average = cbs["average"]
    if average.avg is None or not average.avg.n_averaged:
        return "the last epoch"
    model.load_state_dict(average.avg.state)
    n = cfg.SOLVER.BN_UPDATE_BATCHES
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n and has_bn:  # BatchNorm statistics of the averaged weights, from training batches
        from torch.optim.swa_utils import update_bn

        update_bn((x for x, _ in itertools.islice(learn.dls.train, n)), model)
    return f"the {cfg.SOLVER.AVERAGE.upper()} average" + (f" (BatchNorm statistics from {n} batches)"
                                                           if n and has_bn else "")


def _save_with_card(path: str, model, info: Dict[str, object]) -> None:
    """The checkpoint, then its model card beside it (``<stem>.json``, model.card)."""
    save_checkpoint(path, model, info)
    write_card(path, model_card(info, path))


def _report(fold: _Fold, model, valid_ds, mean, std, device, what: str,
            oof_threshold: Optional[float] = None) -> Dict[str, object]:
    """Validate the saved weights, write the checkpoint and the pictures; return the result."""
    cfg = fold.cfg
    info = {
        "model": model_spec(cfg),
        "input": {"size": cfg.INPUT.SIZE_TRAIN, "reduce": cfg.INPUT.SIZE_REDUCTION_TRAIN, "mean": mean, "std": std,
                  "mpp": fold.tiles.mpp,
                  # the stain normalisation of the tiles: test_net applies it to every slide
                  **({"stain": fold.tiles.stain} if fold.tiles.stain else {})},
        "fold": -1 if fold.fold == ALL else int(fold.fold),
        "n_folds": int(cfg.SOLVER.N_FOLDS),
        "loss": cfg.SOLVER.LOSS_FUNCTION_NAME,
        "epochs": int(cfg.SOLVER.MAX_EPOCHS),
        "weights": what,
        "config": cfg.dump(),  # the training config, for the model card
        "training_seconds": round(_training_seconds(os.path.join(fold.dir, "history.csv")), 1),
        "machine": machine(device.type),
    }
    if fold.fold == ALL:
        threshold = 0.5 if oof_threshold is None else float(oof_threshold)
        metrics = {"train_tiles": len(fold.train_names), "valid_ids": [],
                   "threshold_source": "out-of-fold study" if oof_threshold is not None else "default 0.5"}
        _save_with_card(fold.checkpoint, model, {**info, "threshold": threshold, "metrics": metrics})
        logger.info("%s: %s, threshold %.2f (%s) -> %s", fold.label, what, threshold, metrics["threshold_source"],
                    fold.checkpoint)
        return {"fold": ALL, "checkpoint": fold.checkpoint, "threshold": threshold, **metrics}
    acc, per_tile, by_source = _evaluate(model, valid_ds, device, cfg.SOLVER.IMS_PER_BATCH, sources=fold.sources)
    threshold, dice = acc.best()
    table = acc.per_threshold()
    metrics = {"dice_th": dice, "dice_soft": acc.soft, "threshold": threshold, "valid_tiles": len(fold.valid_names),
               "train_tiles": len(fold.train_names), "valid_ids": fold.valid_ids,
               "dice_at_0.5": table.get(0.5, float("nan"))}
    if by_source:  # each source's Dice at the fold's threshold (the sweep's nearest entry)
        metrics["dice_by_source"] = {name: min(a.per_threshold().items(), key=lambda kv: abs(kv[0] - threshold))[1]
                                     for name, a in sorted(by_source.items())}
    _save_with_card(fold.checkpoint, model, {**info, "threshold": float(threshold), "metrics": metrics})
    atomic_write_csv(os.path.join(fold.dir, "thresholds.csv"), ["threshold", "dice"],
                     ([f"{t:.2f}", f"{d:.6f}"] for t, d in table.items()))
    plot_thresholds(table, os.path.join(fold.dir, "thresholds.png"), f"{fold.label.lower()}:")
    plot_triplets(_triplets(valid_ds, per_tile, threshold), os.path.join(fold.dir, "triplets.png"),
                  f"{fold.label.lower()}, threshold {threshold:.2f}")
    plot_curves(_read_history(os.path.join(fold.dir, "history.csv")), os.path.join(fold.dir, "curves.png"),
                fold.label.lower())
    share = acc.foreground_fraction(threshold)
    if share > COLLAPSE:
        logger.warning("%s: the saved model marks %.0f%% of the validation pixels as foreground (%.0f%% are): "
                       "it has probably collapsed", fold.label, 100 * share, 100 * acc.true_fraction)
    logger.info("%s: %s: validation Dice %.4f at threshold %.2f (%.4f at 0.50, soft %.4f%s) -> %s", fold.label, what,
                dice, threshold, metrics["dice_at_0.5"], acc.soft, "".join(
                    f"; {name} {value:.4f}" for name, value in metrics.get("dice_by_source", {}).items()),
                fold.checkpoint)
    return {"fold": fold.fold, "checkpoint": fold.checkpoint, **metrics,
            **_counts(acc, by_source)}


def _counts(acc: DiceAccumulator, by_source: Dict[str, DiceAccumulator]) -> Dict[str, object]:
    """A validation's counts (and each source's), with their thresholds, as results record them."""
    return {"counts": acc.counts(),
            **({"counts_by_source": {name: a.counts() for name, a in sorted(by_source.items())}} if by_source else {})}


def _clean_states(fold: _Fold) -> None:
    if fold.cfg.SOLVER.KEEP_RESUME_STATES:
        return
    for name in ("last.state", "best.state"):
        path = os.path.join(fold.dir, name)
        if os.path.exists(path):
            os.remove(path)


def _learner(fold: _Fold, mean, std, state: Dict[str, object]):
    """The fold's data, model and fastai Learner (with the resume point's weights, optimiser
    and averaged copy when ``state``); returns it, its callbacks and the validation tiles."""
    cfg, device = fold.cfg, fold.device
    valid_names = fold.valid_names or fold.train_names[:1]  # fastai wants a validation set; skipped for ALL
    dls, valid_ds = make_dataloaders(cfg, fold.tiles, fold.train_names, valid_names, mean, std, device)
    model = build_model(cfg, weights=not cfg.MODEL.WEIGHTS)
    if cfg.MODEL.WEIGHTS:
        load_weights_file(model, cfg.MODEL.WEIGHTS)
        logger.info("%s: initialised from %s", fold.label, cfg.MODEL.WEIGHTS)
    cbs = _callbacks(fold, state)
    learn = make_learner(cfg, dls, model, cfg.OUTPUT_DIR, fold.dir, list(cbs.values()), device)
    if state:
        saved = load_state(os.path.join(fold.dir, "last.state"))
        learn.create_opt()
        unwrap(learn.model).load_state_dict(saved["model"])
        load_opt_state(learn.opt, saved["opt"])
        cbs["average"].pending_state = saved.get("average")
        logger.info("%s: resuming after epoch %d of %d", fold.label, int(state["epoch"]) + 1, cfg.SOLVER.MAX_EPOCHS)
    return learn, cbs, valid_ds


def _train_fold(cfg: CN, fold: _Fold, mean, std, device, oof_threshold: Optional[float] = None) -> Dict[str, object]:
    """Data -> model -> (resume) -> fit -> saved weights -> checkpoint, pictures -> clean-up."""
    import fastai.callback.schedule  # noqa: F401 - adds fit_one_cycle

    logger.info("%s: %d training tiles, %d validation tiles (%s)", fold.label, len(fold.train_names),
                len(fold.valid_names), ", ".join(fold.valid_ids)[:200] or "none: trained on every image")
    torch.manual_seed(fold.seed)
    np.random.seed(fold.seed % 2**32)
    state = _resume_point(fold)
    learn, cbs, valid_ds = _learner(fold, mean, std, state)
    os.makedirs(fold.dir, exist_ok=True)  # only once the model could be built
    if is_main():  # the config of these outputs, written once nothing can fail on bad input
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
    _fit(fold, learn, cbs, int(state["epoch"]) + 1 if state else 0, device)
    if not is_main():  # the other ranks only helped to train
        return {"fold": fold.fold, "checkpoint": fold.checkpoint}
    what = _final_weights(fold, learn, cbs, device)
    result = _report(fold, unwrap(learn.model), valid_ds, mean, std, device, what, oof_threshold)
    result["settings"] = fold.settings
    atomic_write_json(fold.result_file, result)
    _clean_states(fold)
    return result


def _finished(fold: _Fold) -> Optional[Dict[str, object]]:
    """The result of a fold finished earlier with the same settings; a finished fold with
    other settings is refused unless OVERWRITE (train again) or SOLVER.RESUME (keep it)."""
    cfg = fold.cfg
    if not os.path.exists(fold.checkpoint):
        return None
    result = read_json(fold.result_file) if os.path.isfile(fold.result_file) else None
    if result is not None and (not changed_settings(result.get("settings") or {}, fold.settings) or cfg.SOLVER.RESUME):
        return result
    if cfg.OVERWRITE:
        return None
    why = (f"with other settings ({_differences(result.get('settings') or {}, fold.settings)})"
           if result is not None else "by another run")
    raise FileExistsError(f"{fold.checkpoint} exists, trained {why}; set OVERWRITE True to train again "
                          "(SOLVER.RESUME True keeps it as it is), or use another OUTPUT_DIR")


def _log_plan(cfg: CN, tiles: TileSet, folds: List[int], device, mean, std) -> None:
    views = (f"random {cfg.INPUT.CROP_SIZE} px crops ({cfg.INPUT.FOREGROUND_FRACTION:.0%} on foreground), "
             f"{cfg.SOLVER.SAMPLES_PER_EPOCH or 'one per tile'} per epoch" if cfg.INPUT.CROP_SIZE
             else f"fixed {cfg.INPUT.SIZE_TRAIN} px tiles")
    logger.info("Training %s/%s%s on %s (%s): %d tiles from %d slides/images, folds %s%s; %s, %d epochs, %s augmentation, "
                "averaging %s, saving %s; mean %s std %s", cfg.MODEL.ARCHITECTURE, cfg.MODEL.ENCODER_NAME,
                " with deep supervision" if cfg.MODEL.DEEP_SUPERVISION else "", device,
                training_precision(cfg.SOLVER.AMP, device),
                len(tiles.names), len(set(tiles.groups)), folds, " + a final model on all" if cfg.SOLVER.FINAL_MODEL
                else "", views, cfg.SOLVER.MAX_EPOCHS, cfg.INPUT.AUGMENTATION, cfg.SOLVER.AVERAGE, cfg.SOLVER.SAVE,
                [round(v, 4) for v in mean], [round(v, 4) for v in std])
    logger.info("Tiles of %s: recorded in the checkpoints, so test_net reads every slide at this physical scale",
                f"{tiles.mpp:.4g} um/px" if tiles.mpp else "unknown pixel size (the tiler knew none); test_net will "
                "read slides at the reduction alone")


def _out_of_fold(cfg: CN, results: List[Dict[str, object]], sources: Dict[str, str]) -> Dict[str, object]:
    """The folds' pooled (out-of-fold) Dice per threshold, the best threshold, and each source's
    Dice at it and at 0.5; writes ``oof_thresholds.csv``."""
    oof = pooled_table([r["counts"] for r in results])
    best_th, best_dice = best_threshold(oof)
    summary = {
        "folds": [{k: v for k, v in r.items() if k not in ("counts", "counts_by_source", "settings")} for r in results],
        "mean_fold_dice": float(np.mean([r["dice_th"] for r in results])),
        "oof_dice": best_dice,
        "oof_threshold": best_th,
        "oof_dice_at_0.5": oof.get(0.5),
    }
    if sources:  # out-of-fold Dice of each source, at the run's threshold and at 0.5
        for name in sorted(set(sources.values())):
            table = pooled_table([r["counts_by_source"][name] for r in results
                                  if name in r.get("counts_by_source", {})])
            summary.setdefault("oof_dice_by_source", {})[name] = table[best_th]
            summary.setdefault("oof_dice_by_source_at_0.5", {})[name] = table[0.5]
        logger.info("Out-of-fold Dice by source (threshold %.2f): %s", best_th, ", ".join(
            f"{name} {value:.4f}" for name, value in summary["oof_dice_by_source"].items()))
    atomic_write_csv(os.path.join(cfg.OUTPUT_DIR, "oof_thresholds.csv"), ["threshold", "dice"],
                     ([f"{t:.2f}", f"{d:.6f}"] for t, d in oof.items()))
    logger.info("Out-of-fold Dice %.4f at threshold %.2f (%.4f at 0.50); mean fold Dice %.4f", summary["oof_dice"],
                best_th, oof.get(0.5, float("nan")), summary["mean_fold_dice"])
    return summary


def _normalisation(cfg: CN, tiles: TileSet):
    """The mean/std the run normalises with: INPUT.PIXEL_MEAN/STD when set; else, when training
    starts from a toolkit checkpoint (MODEL.WEIGHTS), the checkpoint's own (a fine-tuned model
    keeps the input its weights learned on); else the tiles' measured statistics."""
    if cfg.MODEL.WEIGHTS and not (len(cfg.INPUT.PIXEL_MEAN) == 3 and len(cfg.INPUT.PIXEL_STD) == 3):
        from model.checkpoint import CheckpointError, load_checkpoint

        try:
            inputs = load_checkpoint(cfg.MODEL.WEIGHTS).get("input") or {}
        except CheckpointError:  # a bare state dict: no normalisation recorded
            inputs = {}
        if inputs.get("mean") and inputs.get("std"):
            logger.info("Normalisation of %s (the starting checkpoint): mean %s std %s", cfg.MODEL.WEIGHTS,
                        [round(v, 4) for v in inputs["mean"]], [round(v, 4) for v in inputs["std"]])
            return [float(v) for v in inputs["mean"]], [float(v) for v in inputs["std"]]
    return read_stats(tiles, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)


def train(cfg: CN) -> Dict[str, object]:
    """Train the configured folds (and the all-images model); return (and write) the summary."""
    start = time.time()
    device = resolve_device(cfg.MODEL.DEVICE)
    tiles = TileSet(cfg.DATASETS.TRAIN_FOLDER, cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN)
    mean, std = _normalisation(cfg, tiles)
    sources = tile_sources(tiles)
    fold_of = kfold_groups(tiles.groups, cfg.SOLVER.N_FOLDS, sources)
    folds = (list(cfg.SOLVER.FOLDS) or list(range(cfg.SOLVER.N_FOLDS))) if cfg.SOLVER.CROSS_VALIDATION else []
    if cfg.INPUT.CROP_SIZE and not _grids(tiles, cfg):
        raise ValueError(f"{tiles.stats_file}: no slide shapes recorded (tiles of an older tiles_creator.py); "
                         "INPUT.CROP_SIZE needs them: rerun tiles_creator.py with OVERWRITE True")
    runs = [_Fold(cfg, f, tiles, fold_of, sources, device) for f in folds]
    final = _Fold(cfg, ALL, tiles, fold_of, sources, device) if cfg.SOLVER.FINAL_MODEL else None
    done = {run.fold: _finished(run) for run in runs + ([final] if final else [])}  # refuses other settings first
    if cfg.SOLVER.RESUME:
        logger.info("SOLVER.RESUME is no longer needed: a rerun with the same settings resumes")
    _log_plan(cfg, tiles, folds, device, mean, std)
    results = []
    for run in runs:
        if done[run.fold] is not None:
            logger.info("%s: finished earlier (%s), skipped", run.label, run.checkpoint)
        results.append(done[run.fold] or _train_fold(cfg, run, mean, std, device))
    if not is_main():  # under torchrun the other ranks help with the final model too
        if final is not None and done[ALL] is None:
            _train_fold(cfg, final, mean, std, device)
        return {}
    summary = _out_of_fold(cfg, results, sources) if results else {"folds": []}
    if final is not None:
        if done[ALL] is not None:
            logger.info("%s: finished earlier (%s), skipped", final.label, final.checkpoint)
        result = done[ALL] or _train_fold(cfg, final, mean, std, device, oof_threshold=summary.get("oof_threshold"))
        summary["final_model"] = {k: v for k, v in result.items() if k != "settings"}
    summary["seconds"] = round(time.time() - start, 1)
    atomic_write_json(os.path.join(cfg.OUTPUT_DIR, "summary.json"), summary)
    if results:
        logger.info("Done in %.0f s: mean fold Dice %.4f; out-of-fold Dice %.4f at threshold %.2f",
                    summary["seconds"], summary["mean_fold_dice"], summary["oof_dice"], summary["oof_threshold"])
    else:
        logger.info("Done in %.0f s: the model on every image only (SOLVER.CROSS_VALIDATION False)", summary["seconds"])
    logger.info("Checkpoints and pictures: %s", os.path.abspath(cfg.OUTPUT_DIR))
    return summary


def revalidate(cfg: CN) -> Dict[int, Dict[str, object]]:
    """Each fold of a finished run validated again, from its checkpoint in ``OUTPUT_DIR`` and its
    validation tiles in ``DATASETS.TRAIN_FOLDER``, on the current threshold grid: ``{fold: {"counts": ...,
    "counts_by_source": ...}}`` as ``result.json`` records them. It studies a run made with an
    older threshold grid on the current one without training again; the fold's held-out images
    are checked against those its result recorded (the same tiles and split)."""
    from model.checkpoint import model_from_checkpoint

    device = resolve_device(cfg.MODEL.DEVICE)
    tiles = TileSet(cfg.DATASETS.TRAIN_FOLDER, cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN)
    sources = tile_sources(tiles)
    fold_of = kfold_groups(tiles.groups, cfg.SOLVER.N_FOLDS, sources)
    grids = _grids(tiles, cfg)
    out: Dict[int, Dict[str, object]] = {}
    for f in list(cfg.SOLVER.FOLDS) or range(cfg.SOLVER.N_FOLDS):
        fold = _Fold(cfg, f, tiles, fold_of, sources, device)
        recorded = read_json(fold.result_file).get("valid_ids") if os.path.isfile(fold.result_file) else None
        if recorded is not None and sorted(recorded) != fold.valid_ids:
            raise ValueError(f"{fold.result_file}: fold {f} held out other images than {tiles.images} gives it "
                             "(other tiles, N_FOLDS or data?)")
        model, ckpt = model_from_checkpoint(fold.checkpoint)
        valid_ds = ValidationTiles(tiles, fold.valid_names, ckpt["input"]["mean"], ckpt["input"]["std"], grids)
        acc, _, by_source = _evaluate(model.to(device), valid_ds, device, cfg.SOLVER.IMS_PER_BATCH, sources=sources)
        logger.info("%s: validated again: Dice %.4f at threshold %.2f", fold.label, *acc.best())
        out[int(f)] = _counts(acc, by_source)
    return out
