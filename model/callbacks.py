"""The fastai callbacks and metrics of train_net, each a top-level class configured by its
arguments (nothing read from a closure), so each can be tested on its own:

* :class:`EpochSeed`: every random draw of an epoch seeded from the run's seed and the epoch,
  so a resumed run draws what an uninterrupted one would have;
* :class:`History`: the per-epoch CSV (``history.csv``), rewritten atomically each epoch and
  kept across a resume;
* :class:`EpochLog`: one log line per epoch (a progress bar on a terminal);
* :class:`CollapseGuard`: a warning when the model marks most validation pixels;
* :class:`WeightAverage`: an EMA or SWA copy of the weights (:class:`WeightAverager`), which
  validation runs on;
* :class:`BestState`: the best epoch's weights by validation Dice, to ``best.state``;
* :class:`ResumeState`: training weights, optimiser and averaged copy to ``last.state``;
* :class:`IgnoreOutside`: validation pixels off the slide count for nothing;
* :class:`SkipValidation`: validation every ``SOLVER.EVAL_PERIOD`` epochs;
* :class:`BF16Autocast`: the forward pass under bfloat16 autocast;
* :class:`DiceMetric`: pooled validation Dice (soft, or at the best threshold).

Callbacks that write take ``save``: False on the other ranks under torchrun.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.learner import Metric, Recorder
from tqdm import tqdm

from utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_json
from utils.metrics import THRESHOLDS, DiceAccumulator
from utils.setup import pause_point

__all__ = ["COLLAPSE", "EpochSeed", "History", "EpochLog", "CollapseGuard", "WeightAverager", "WeightAverage",
           "BestState",
           "ResumeState", "IgnoreOutside", "SkipValidation", "BF16Autocast", "DiceMetric", "ignore_outside",
           "save_state", "load_state", "plain_opt_state", "load_opt_state", "unwrap", "epoch_values"]

logger = logging.getLogger(__name__)

COLLAPSE = 0.5  # warn when the model marks more than this share of the validation pixels


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model)."""
    return getattr(model, "module", model)


def epoch_values(recorder) -> Dict[str, object]:
    """``{metric name: value}`` of the epoch the recorder just logged."""
    return dict(zip(recorder.metric_names, recorder.log))


def ignore_outside(logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validation pixels off the slide (mask value 2, ``data.sampling.OUTSIDE``) count for
    nothing: their target becomes 0 and their logit a sure background (-30: ~1e-13 of loss,
    never above a threshold)."""
    outside = y > 1.5
    if not bool(outside.any()):
        return logits, y
    return logits.masked_fill(outside, -30.0), y.masked_fill(outside, 0.0)


def save_state(path: str, state: Dict[str, object]) -> None:
    """``torch.save`` to ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str) -> Dict[str, object]:
    """A resume state (tensors, lists, dicts only); an unreadable one is a ValueError naming it."""
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: unreadable resume state ({type(exc).__name__}); delete it, or set "
                         "OVERWRITE True to start the fold again") from None


def plain_opt_state(opt) -> Dict[str, object]:
    """fastai's optimiser state as plain lists and dicts (loadable with ``weights_only``)."""
    def plain(value):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):  # fastai's schedulers set numpy floats
            return float(value)
        return value

    sd = opt.state_dict()
    return {"state": [{k: plain(v) for k, v in s.items()} for s in sd["state"]],
            "hypers": [{k: plain(v) for k, v in h.items()} for h in sd["hypers"]]}


def load_opt_state(opt, saved: Dict[str, object]) -> None:
    from fastcore.foundation import L

    opt.load_state_dict({"state": list(saved["state"]), "hypers": L(dict(h) for h in saved["hypers"])})


class DiceMetric(Metric):
    """Pooled validation Dice: ``kind`` 'soft', or 'th' (thresholded at the best threshold of
    the sweep). Under torchrun the counts of every rank are pooled, once per validation."""

    def __init__(self, kind: str):
        self.kind = kind
        self.acc = DiceAccumulator(THRESHOLDS if kind == "th" else (0.5,))
        self.reduced = False

    def reset(self):
        self.acc.reset()
        self.reduced = False

    def accumulate(self, learn):
        self.acc.update(learn.pred, learn.yb[0])

    @property
    def value(self):
        if not self.reduced:
            self.acc.all_reduce()
            self.reduced = True
        return self.acc.soft if self.kind == "soft" else self.acc.best()[1]

    @property
    def name(self):
        return f"dice_{self.kind}"


class EpochSeed(Callback):
    """At the start of every epoch: torch's, numpy's and Python's generators, the data
    loaders' shuffling and the training items' seed (a dataset with ``set_epoch_seed``,
    ``data.datasets.EpochSeeded``: each item drawn from the epoch's seed and its index) seeded
    from ``seed`` and the epoch number. An epoch's crops, augmentation, shuffle and dropout then
    depend on the seed and the epoch alone: a run resumed at epoch k draws exactly what an
    uninterrupted run draws there (same device and precision). Under torchrun each rank
    (``rank``) draws its own crops (fastai's distributed loader shares rank 0's shuffle)."""

    order = -20  # before anything of the epoch draws

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)

    def before_epoch(self):
        value = (self.seed * 1_000_003 + int(self.epoch) * 1_009 + self.rank) % 2**31
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)
        for k, dl in enumerate((self.dls.train, self.dls.valid)):
            dl.rng = random.Random(value + k)
            if hasattr(dl.dataset, "set_epoch_seed"):
                dl.dataset.set_epoch_seed(value)


class History(Callback):
    """The per-epoch CSV at ``path`` (fastai's CSVLogger, made resumable and atomic): with
    ``append`` the rows of the epochs before ``start_epoch`` are kept; every epoch the whole
    file is rewritten atomically (a kill leaves the last complete file). Also silences
    fastai's own printing (:class:`EpochLog` writes the lines)."""

    order = Recorder.order + 1

    def __init__(self, path: str, start_epoch: int = 0, append: bool = False, save: bool = True):
        self.path, self.start_epoch, self.append, self.save = path, start_epoch, append, save
        self.header: List[str] = []
        self.rows: List[List[str]] = []

    def before_fit(self):
        self.learn.logger = lambda *_: None
        self.header, self.rows = list(self.recorder.metric_names), []
        if self.append and os.path.isfile(self.path):
            with open(self.path, newline="") as fh:
                old = list(csv.reader(fh))
            self.rows = [r for r in old[1:] if r and r[0].isdigit() and int(r[0]) < self.start_epoch]
        if self.save:
            atomic_write_csv(self.path, self.header, self.rows)

    def before_epoch(self):
        # train_loss is fastai's smoothed loss over this epoch's batches only (it would run on
        # across epochs): an epoch's row then does not depend on the epochs before it, and a
        # resumed run records what an uninterrupted one does
        self.recorder.smooth_loss.reset()

    def after_epoch(self):
        if self.epoch < self.start_epoch:
            return
        row = [str(t) for t in self.recorder.log]
        missing = len(self.header) - len(row)  # an epoch without validation: empty metric cells
        if missing > 0:
            row = row[:-1] + [""] * missing + row[-1:]
        self.rows.append(row)
        if self.save:
            atomic_write_csv(self.path, self.header, self.rows)


class EpochLog(Callback):
    """A progress bar over the batches on a terminal only; one log line per epoch always (so a
    log file holds one readable line per epoch, not bar redraws)."""

    order = Recorder.order + 2

    def __init__(self, label: str, n_epochs: int, start_epoch: int = 0, log: bool = True):
        self.label, self.n_epochs, self.start_epoch, self.log = label, n_epochs, start_epoch, log
        self.start, self.bar = 0.0, None

    def before_epoch(self):
        self.start = time.time()
        tty = sys.stderr.isatty() and self.log
        self.bar = tqdm(total=len(self.dls.train), desc=f"{self.label} epoch {self.epoch + 1}/{self.n_epochs}",
                        unit="batch", leave=False, disable=not tty or self.epoch < self.start_epoch)

    def after_batch(self):
        if self.training:
            self.bar.update(1)

    def after_epoch(self):
        self.bar.close()
        if self.epoch < self.start_epoch or not self.log:
            return
        parts = [f"{k} {v:.4f}" for k, v in epoch_values(self.recorder).items()
                 if k not in ("epoch", "time") and isinstance(v, (float, np.floating))]
        logger.info("%s epoch %d/%d: %s (%.0f s)", self.label, self.epoch + 1, self.n_epochs, ", ".join(parts),
                    time.time() - self.start)


class CollapseGuard(Callback):
    """After a validation: a warning when the model marks more than :data:`COLLAPSE` of the
    validation pixels as foreground (a collapsed model), with what to try."""

    order = Recorder.order + 2

    def __init__(self, label: str, start_epoch: int = 0, log: bool = True):
        self.label, self.start_epoch, self.log = label, start_epoch, log

    def after_epoch(self):
        if self.epoch < self.start_epoch or not self.log:
            return
        acc = self.learn.metrics[0].acc
        share = acc.foreground_fraction(0.5)
        if acc.pixels and share > COLLAPSE:
            logger.warning("%s epoch %d: the model marks %.0f%% of the validation pixels as foreground "
                           "(%.0f%% are): it may have collapsed; try a lower SOLVER.BASE_LR_MAX, SOLVER.AVERAGE "
                           "ema, or more INPUT.FOREGROUND_FRACTION", self.label, self.epoch + 1, 100 * share,
                           100 * acc.true_fraction)


class WeightAverager:
    """An exponential (``ema``) or equal (``swa``) running average of a model's state_dict.

    Kept as plain tensors rather than a deep copy of the model (``AveragedModel``), which
    modules with weight normalisation (fastai's pixel shuffle in UneXt) cannot give. Integer
    buffers (BatchNorm's batch counts) take the latest value. The EMA decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` so that early weights fade quickly."""

    def __init__(self, kind: str, decay: float = 0.99):
        if kind not in ("ema", "swa"):
            raise ValueError(f"weight averaging must be 'ema' or 'swa', got {kind!r}")
        self.kind, self.decay = kind, float(decay)
        self.state: Dict[str, torch.Tensor] = {}
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        if not self.n_averaged:
            self.state = {k: v.detach().clone() for k, v in current.items()}
        else:
            n = self.n_averaged
            weight = 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)) if self.kind == "ema" else 1.0 / (n + 1)
            keys = [k for k, v in self.state.items() if v.is_floating_point()]
            torch._foreach_lerp_([self.state[k] for k in keys], [current[k].detach() for k in keys], weight)
            for k, v in self.state.items():
                if not v.is_floating_point():
                    v.copy_(current[k])
        self.n_averaged += 1

    def state_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "n_averaged": self.n_averaged, "state": self.state}

    def load_state_dict(self, saved: Dict[str, object]) -> None:
        self.n_averaged = int(saved["n_averaged"])
        self.state = {k: v.clone() for k, v in saved["state"].items()}


class WeightAverage(Callback):
    """An EMA (``kind`` 'ema': every step) or SWA ('swa': every epoch from ``swa_from`` on) copy
    of the weights ('none': nothing); validation runs on it, and at the end of the epoch, once
    :class:`BestState` and :class:`ResumeState` have saved what they save, the training weights
    go back. ``pending_state`` (a saved :class:`WeightAverager` state) is loaded at the start of
    the fit (resume)."""

    order = Recorder.order + 5  # its after_epoch: the last of the epoch

    def __init__(self, kind: str = "none", decay: float = 0.99, swa_from: int = 0):
        self.kind, self.decay, self.swa_from = kind, decay, swa_from
        self.avg: Optional[WeightAverager] = None
        self.raw: Optional[Dict[str, torch.Tensor]] = None
        self.pending_state = None

    def before_fit(self):
        if self.kind == "none":
            return
        self.avg = WeightAverager(self.kind, self.decay)
        if self.pending_state is not None:
            self.avg.load_state_dict(self.pending_state)
            self.pending_state = None

    @property
    def active(self) -> bool:
        return self.avg is not None and self.avg.n_averaged > 0

    def after_step(self):
        if self.kind == "ema":
            self.avg.update(unwrap(self.learn.model))

    def after_train(self):
        if self.kind == "swa" and self.epoch >= self.swa_from:
            self.avg.update(unwrap(self.learn.model))

    def before_validate(self):
        if self.active:
            base = unwrap(self.learn.model)
            self.raw = {k: v.detach().clone() for k, v in base.state_dict().items()}
            base.load_state_dict(self.avg.state)

    def after_epoch(self):
        self.restore()

    def restore(self):
        """The training weights back in the model after a validation on the average."""
        if self.raw is not None:
            unwrap(self.learn.model).load_state_dict(self.raw)
            self.raw = None

    def training_state(self) -> Dict[str, torch.Tensor]:
        """The training (not averaged) weights, whatever is loaded now."""
        if self.raw is not None:
            return self.raw
        return unwrap(self.learn.model).state_dict()


class BestState(Callback):
    """After validation: the evaluated weights (averaged when averaging) of the best epoch by
    validation Dice (``dice_th``) above ``best``, to ``path``."""

    order = Recorder.order + 3

    def __init__(self, path: str, best: float = -np.inf, start_epoch: int = 0, save: bool = True):
        self.path, self.best, self.start_epoch, self.save = path, float(best), start_epoch, save

    def after_epoch(self):
        if self.epoch < self.start_epoch:
            return
        value = epoch_values(self.recorder).get("dice_th")
        if isinstance(value, (float, np.floating)) and value > self.best:
            self.best = float(value)
            if self.save:
                save_state(self.path, {"model": unwrap(self.learn.model).state_dict(), "epoch": int(self.epoch)})


class ResumeState(Callback):
    """Every ``period`` epochs (and after the last): the training weights, the optimiser, the
    averaged copy and the progress to ``folder/last.state`` + ``folder/state.json`` (with
    ``settings``, what a resume compares); the weights saved are the training ones, whichever
    :class:`WeightAverage` has loaded for the validation."""

    order = Recorder.order + 4

    def __init__(self, folder: str, period: int, average: WeightAverage, best: BestState,
                 settings: Callable[[], Dict[str, object]], start_epoch: int = 0, save: bool = True):
        self.folder, self.period, self.average, self.best = folder, max(1, int(period)), average, best
        self.settings, self.start_epoch, self.save = settings, start_epoch, save

    def after_epoch(self):
        due = (self.epoch + 1) % self.period == 0 or self.epoch + 1 == self.n_epoch
        if self.epoch >= self.start_epoch and self.save and due:
            self._save()

    def _save(self):
        save_state(os.path.join(self.folder, "last.state"), {
            "model": self.average.training_state(),
            "opt": plain_opt_state(self.learn.opt),
            "average": self.average.avg.state_dict() if self.average.avg is not None else None,
            "epoch": int(self.epoch)})
        atomic_write_json(os.path.join(self.folder, "state.json"),
                          {"epoch": int(self.epoch), "best": float(self.best.best), "settings": self.settings()})
        pause_point("training.state_saved")


class IgnoreOutside(Callback):
    """Validation tiles' pixels off the slide count for nothing in the loss and the Dice."""

    order = -5  # after the prediction, before the loss and the metrics

    def after_pred(self):
        if not self.training and self.learn.yb:
            pred, y = ignore_outside(self.learn.pred, self.learn.yb[0])
            self.learn.pred, self.learn.yb = pred, (y,)


class SkipValidation(Callback):
    """Validation every ``every`` epochs and after the last of ``n_epochs``; none at all with
    ``every`` 0 (the model trained on everything has no validation images)."""

    def __init__(self, every: int, n_epochs: int):
        self.every, self.n_epochs = every, n_epochs

    def before_validate(self):
        if not self.every or ((self.epoch + 1) % self.every and self.epoch + 1 != self.n_epochs):
            raise CancelValidException()


class BF16Autocast(Callback):
    """The forward pass under bfloat16 autocast; the loss, the gradients' accumulation, the
    weights and the optimiser stay float32."""

    order = 10

    def __init__(self):
        self.ctx = None

    def before_batch(self):
        self.ctx = torch.autocast(self.dls.device.type, dtype=torch.bfloat16)
        self.ctx.__enter__()

    def after_pred(self):
        self._leave()
        pred = self.learn.pred
        self.learn.pred = (pred.float() if isinstance(pred, torch.Tensor)  # deep supervision: (logits, [heads])
                           else (pred[0].float(), [head.float() for head in pred[1]]))

    def after_batch(self):
        self._leave()

    def after_cancel_batch(self):
        self._leave()

    def _leave(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None
