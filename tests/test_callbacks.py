"""Each training callback on its own, on a tiny fastai Learner (a 1x1 convolution on random
4 x 4 images): what it writes, when, and what it leaves in the model."""
import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner

from model import callbacks as cb
from model.callbacks import (BestState, CollapseGuard, DiceMetric, EpochLog, EpochSeed, History, IgnoreOutside,
                             ResumeState, SkipValidation, WeightAverage, ignore_outside)


def _learner(cbs, n_epochs=0, bias=0.0, seed=0, n=16):
    torch.manual_seed(seed)
    items = [(torch.randn(3, 4, 4), (torch.rand(1, 4, 4) > 0.7).float()) for _ in range(n)]
    dls = DataLoaders(DataLoader(items, bs=4, shuffle=True), DataLoader(items[:8], bs=4), device="cpu")
    model = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        model.bias.fill_(bias)
    learn = Learner(dls, model, loss_func=torch.nn.BCEWithLogitsLoss(), metrics=[DiceMetric("soft"), DiceMetric("th")],
                    cbs=cbs, lr=1e-2)
    from fastai.callback.progress import ProgressCallback

    learn.remove_cb(ProgressCallback)
    if n_epochs:
        learn.fit(n_epochs)
    return learn


def test_history_is_atomic_and_a_resume_keeps_the_earlier_epochs(tmp_path):
    path = str(tmp_path / "history.csv")
    _learner([History(path)], n_epochs=3)
    rows = list(csv.DictReader(open(path)))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and {"train_loss", "valid_loss", "dice_th"} <= set(rows[0])
    assert not [n for n in os.listdir(tmp_path) if n != "history.csv"]  # no temporary file left
    # a resume from epoch 2: the rows of epochs 0 and 1 are kept, epoch 2 is written again
    learn = _learner([History(path, start_epoch=2, append=True)])
    learn.fit(3, start_epoch=2)
    again = list(csv.DictReader(open(path)))
    assert [int(r["epoch"]) for r in again] == [0, 1, 2] and again[:2] == rows[:2]
    # without append (a fresh start), the file starts again
    _learner([History(path)], n_epochs=1)
    assert [int(r["epoch"]) for r in csv.DictReader(open(path))] == [0]


def test_history_does_not_write_on_other_ranks(tmp_path):
    _learner([History(str(tmp_path / "history.csv"), save=False)], n_epochs=1)
    assert not os.listdir(tmp_path)


def test_skip_validation_validates_every_n_epochs_and_after_the_last(tmp_path):
    path = str(tmp_path / "history.csv")
    _learner([History(path), SkipValidation(every=2, n_epochs=5)], n_epochs=5)
    rows = list(csv.DictReader(open(path)))
    assert [r["valid_loss"] != "" for r in rows] == [False, True, False, True, True]
    _learner([History(path), SkipValidation(every=0, n_epochs=2)], n_epochs=2)  # never (the all-images model)
    assert all(r["valid_loss"] == "" for r in csv.DictReader(open(path)))


def test_epoch_log_writes_one_line_per_epoch_after_the_resume_point(caplog):
    with caplog.at_level(logging.INFO, logger="model.callbacks"):
        learn = _learner([EpochLog("Fold 7", 3, start_epoch=1)])
        learn.fit(3)
    lines = [r.getMessage() for r in caplog.records if r.name == "model.callbacks"]
    assert [line.split(":")[0] for line in lines] == ["Fold 7 epoch 2/3", "Fold 7 epoch 3/3"]
    assert "train_loss" in lines[0] and "dice_th" in lines[0]


def test_collapse_guard_warns_only_when_most_pixels_are_marked(caplog):
    with caplog.at_level(logging.WARNING, logger="model.callbacks"):
        _learner([CollapseGuard("Fold 0")], n_epochs=1, bias=-20.0)  # marks nothing
        assert not caplog.records
        learn = _learner([CollapseGuard("Fold 0")], bias=20.0)  # marks everything
        learn.fit(1, lr=0.0)
    assert len(caplog.records) == 1 and "may have collapsed" in caplog.records[0].getMessage()
    assert "100% of the validation pixels" in caplog.records[0].getMessage()


def test_weight_average_validates_on_the_ema_and_puts_the_training_weights_back():
    average = WeightAverage("ema", decay=0.5)
    seen = {}

    class Spy(cb.Callback):
        order = cb.Recorder.order + 10

        def before_validate(self):
            seen["validated"] = {k: v.clone() for k, v in self.learn.model.state_dict().items()}

    learn = _learner([average, Spy()])
    learn.fit(2)
    # validation saw the average, not the training weights, and the training weights are back
    assert all(torch.equal(seen["validated"][k], average.avg.state[k]) for k in average.avg.state)
    assert not torch.equal(learn.model.weight, average.avg.state["weight"])
    assert average.avg.n_averaged == 2 * len(learn.dls.train)  # every step
    swa = WeightAverage("swa", swa_from=1)
    _learner([swa], n_epochs=3)
    assert swa.avg.n_averaged == 2  # epochs 2 and 3
    none = WeightAverage("none")
    _learner([none], n_epochs=1)
    assert none.avg is None and not none.active


def test_best_state_saves_only_on_improvement(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(cb, "save_state", lambda path, state: saved.append((path, state["epoch"])))
    best = BestState(str(tmp_path / "best.state"), best=2.0)  # above any Dice: never saved
    _learner([best], n_epochs=2)
    assert saved == [] and best.best == 2.0
    best = BestState(str(tmp_path / "best.state"))
    _learner([best], n_epochs=3)
    assert saved and saved[0][1] == 0 and all(a[1] < b[1] for a, b in zip(saved, saved[1:]))
    assert 0 <= best.best <= 1


def test_resume_state_every_period_and_after_the_last_epoch(tmp_path, monkeypatch):
    saved = []
    real = cb.save_state
    monkeypatch.setattr(cb, "save_state", lambda path, state: (saved.append(state["epoch"]), real(path, state)))
    average = WeightAverage("ema")
    best = BestState(str(tmp_path / "best.state"), save=False)
    resume = ResumeState(str(tmp_path), period=2, average=average, best=best, settings=lambda: {"KEY": 1})
    learn = _learner([average, best, resume], n_epochs=5)
    assert saved == [1, 3, 4]  # epochs 2 and 4 (every 2), and the last
    state = torch.load(tmp_path / "last.state", weights_only=True)
    assert state["epoch"] == 4 and state["average"]["n_averaged"] == average.avg.n_averaged
    assert all(torch.equal(state["model"][k], v) for k, v in learn.model.state_dict().items())  # training weights
    assert json.load(open(tmp_path / "state.json")) == {"epoch": 4, "best": best.best, "settings": {"KEY": 1}}
    # and it loads back into the optimiser
    fresh = _learner([])
    fresh.create_opt()
    cb.load_opt_state(fresh.opt, state["opt"])
    assert fresh.opt.state_dict()["hypers"][0]["lr"] == pytest.approx(state["opt"]["hypers"][0]["lr"])


def test_ignore_outside_takes_pixels_off_the_slide_out_of_loss_and_dice():
    logits, y = torch.tensor([[2.0, -1.0, 5.0]]), torch.tensor([[1.0, 0.0, 2.0]])
    pred, target = ignore_outside(logits, y)
    assert target.tolist() == [[1.0, 0.0, 0.0]] and pred[0, 2] == -30.0 and pred[0, :2].tolist() == [2.0, -1.0]
    inside_logits, inside_y = logits[:, :2], y[:, :2]
    assert ignore_outside(inside_logits, inside_y) == (inside_logits, inside_y)  # nothing outside: unchanged
    seen = []

    class Spy(cb.Callback):
        order = 0

        def after_pred(self):
            if not self.training:
                seen.append(float(self.learn.yb[0].max()))

    learn = _learner([IgnoreOutside(), Spy()])
    learn.dls.valid.dataset[:] = [(x, torch.full_like(m, 2.0)) for x, m in learn.dls.valid.dataset]  # all outside
    learn.fit(1)
    assert seen and max(seen) == 0.0  # the loss and the metrics saw no outside pixel


def test_epoch_seed_makes_an_epoch_depend_on_the_seed_and_the_epoch_alone():
    draws = {}

    class Spy(cb.Callback):
        order = 0

        def before_epoch(self):
            draws.setdefault(self.epoch, []).append((float(torch.rand(1)), np.random.rand(), [
                int(i) for i in self.dls.train.shuffle_fn(list(range(8)))]))

    _learner([EpochSeed(5), Spy()], n_epochs=3)
    learn = _learner([EpochSeed(5), Spy()])
    learn.fit(3, start_epoch=2)  # a run resumed at epoch 3
    assert draws[2][0] == draws[2][1] and draws[0][0] != draws[1][0]
