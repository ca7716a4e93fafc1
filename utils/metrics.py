"""Dice metrics: soft Dice, thresholded Dice over a sweep of thresholds (pure torch/numpy)."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

from utils.rle import dice_from_counts  # (pure: inference imports it from utils.rle, without torch)

__all__ = ["THRESHOLDS", "DiceAccumulator", "best_threshold", "dice_from_counts", "pooled_table"]

# Thresholds of the Dice-vs-threshold study (probabilities).
THRESHOLDS = np.round(np.arange(0.10, 0.91, 0.05), 2)


def pooled_table(counts: Sequence[Dict[str, Sequence[float]]], thresholds: Sequence[float] = THRESHOLDS
                 ) -> Dict[float, float]:
    """Dice per threshold of several validations pooled: each entry of ``counts`` holds the
    ``inter`` and ``total`` pixel counts at every threshold of ``thresholds``."""
    inter = np.sum([c["inter"] for c in counts], axis=0)
    total = np.sum([c["total"] for c in counts], axis=0)
    return {float(t): dice_from_counts(float(i), float(s)) for t, i, s in zip(thresholds, inter, total)}


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
        return {float(t): dice_from_counts(float(i), float(s))
                for t, i, s in zip(self.thresholds, self.inter, self.total)}

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
