"""Dice metrics: soft Dice, thresholded Dice over a sweep of thresholds (pure torch/numpy)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from utils.rle import dice_from_counts  # (pure: inference imports it from utils.rle, without torch)

__all__ = ["LEGACY_THRESHOLDS", "THRESHOLDS", "DiceAccumulator", "best_threshold", "count_thresholds",
           "dice_from_counts", "pooled_table"]

# Thresholds of the Dice-vs-threshold study (probabilities). The top reaches 0.99 so that the
# study shows where the Dice falls off for over-confident models (trained on crops centred on
# objects), instead of stopping at 0.90, next to where their best threshold lies.
THRESHOLDS = np.round(np.concatenate([np.arange(0.10, 0.96, 0.05), [0.97, 0.99]]), 2)
# The grid of runs made before the counts recorded their thresholds (0.10 .. 0.90).
LEGACY_THRESHOLDS = np.round(np.arange(0.10, 0.91, 0.05), 2)


def _keys(thresholds) -> List[float]:
    """Thresholds as the keys of Dice tables: rounded, so float32 and float64 values agree."""
    return [round(float(t), 4) for t in thresholds]


def count_thresholds(counts: Dict[str, Sequence[float]]) -> List[float]:
    """The thresholds of one validation's ``counts``: their own ``thresholds`` entry, or (counts
    of older runs, which had none) :data:`LEGACY_THRESHOLDS`."""
    thresholds = _keys(counts["thresholds"] if "thresholds" in counts else LEGACY_THRESHOLDS)
    if len(thresholds) != len(counts["inter"]) or len(thresholds) != len(counts["total"]):
        raise ValueError(f"Dice counts of {len(counts['inter'])} thresholds match no known threshold grid")
    return thresholds


def pooled_table(counts: Sequence[Dict[str, Sequence[float]]]) -> Dict[float, float]:
    """Dice per threshold of several validations pooled: each entry of ``counts`` holds the
    ``inter`` and ``total`` pixel counts at each of its thresholds (:func:`count_thresholds`).
    Validations made on different grids (a run resumed across versions) pool on the thresholds
    they share."""
    grids = [count_thresholds(c) for c in counts]
    shared = sorted(set(grids[0]).intersection(*grids[1:])) if grids else []
    inter = {t: 0.0 for t in shared}
    total = {t: 0.0 for t in shared}
    for c, grid in zip(counts, grids):
        for t, i, s in zip(grid, c["inter"], c["total"]):
            if t in inter:
                inter[t] += float(i)
                total[t] += float(s)
    return {t: dice_from_counts(inter[t], total[t]) for t in shared}


def best_threshold(table: Dict[float, float]):
    """``(threshold, dice)`` of the best entry of a Dice-per-threshold ``table`` (the lowest
    threshold on ties): the rule every learned threshold follows."""
    th = max(table, key=lambda t: (table[t], -t))
    return th, table[th]


class DiceAccumulator:
    """Pooled Dice over many batches: soft, and hard at every threshold of ``thresholds``."""

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS):
        self.thresholds = torch.as_tensor(np.asarray(thresholds, dtype=np.float32))
        self.reset()

    def reset(self) -> None:
        self.soft_inter = 0.0
        self.soft_total = 0.0
        self.inter = torch.zeros(len(self.thresholds), dtype=torch.float64)
        self.total = torch.zeros(len(self.thresholds), dtype=torch.float64)
        self.pixels = 0.0  # pixels seen, and how many of them are foreground in the truth
        self.target_sum = 0.0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        prob = torch.sigmoid(logits.float()).reshape(-1)
        target = target.float().reshape(-1)
        self.soft_inter += float((prob * target).sum())
        self.soft_total += float(prob.sum() + target.sum())
        target_sum = float(target.sum())
        self.pixels += float(target.numel())
        self.target_sum += target_sum
        th = self.thresholds.to(prob.device)
        # pixels above each threshold: count through a histogram of probabilities
        for k, t in enumerate(th):
            pred = prob > t
            self.inter[k] += float((pred & (target > 0.5)).sum())
            self.total[k] += float(pred.sum()) + target_sum

    def all_reduce(self) -> None:
        """Sum the counts of every process (torch.distributed), so all ranks agree."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = torch.cat([torch.tensor([self.soft_inter, self.soft_total, self.pixels, self.target_sum],
                                         dtype=torch.float64), self.inter, self.total])
        dist.all_reduce(counts)
        self.soft_inter, self.soft_total, self.pixels, self.target_sum = (float(v) for v in counts[:4])
        n = len(self.thresholds)
        self.inter, self.total = counts[4:4 + n].clone(), counts[4 + n:].clone()

    @property
    def soft(self) -> float:
        return dice_from_counts(self.soft_inter, self.soft_total)

    def per_threshold(self) -> Dict[float, float]:
        return {t: dice_from_counts(float(i), float(s))
                for t, i, s in zip(_keys(self.thresholds), self.inter, self.total)}

    def foreground_fraction(self, threshold: float = 0.5) -> float:
        """Share of the pixels predicted foreground at the sweep threshold nearest ``threshold``
        (0 before any update)."""
        if not self.pixels:
            return 0.0
        k = int(torch.argmin((self.thresholds - threshold).abs()))
        return float(self.total[k] - self.target_sum) / self.pixels

    @property
    def true_fraction(self) -> float:
        """Share of the pixels that are foreground in the truth."""
        return self.target_sum / self.pixels if self.pixels else 0.0

    def best(self):
        """``(threshold, dice)`` of the best threshold (the lowest on ties)."""
        return best_threshold(self.per_threshold())

    def counts(self) -> Dict[str, List[float]]:
        """The hard counts with their thresholds, as results record them (:func:`pooled_table`)."""
        return {"thresholds": _keys(self.thresholds), "inter": self.inter.tolist(),
                "total": self.total.tolist()}
