"""Pictures of training: curves, the Dice-vs-threshold study, validation triplets."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import matplotlib.pyplot as plt  # the backend is the scripts' choice (utils.setup.configure_process: Agg)
import numpy as np

__all__ = ["plot_curves", "plot_thresholds", "plot_triplets"]


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(history: Dict[str, List[float]], path: str, title: str = "") -> None:
    """Loss (left axis) and Dice (right axis) per epoch."""
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.arange(1, len(history.get("train_loss", [])) + 1)
    def finite(key):  # epochs without validation are gaps (NaN): the line joins the others
        values = np.asarray(history[key], dtype=np.float64)
        keep = np.isfinite(values)
        return epochs[:len(values)][keep[:len(epochs)]], values[:len(epochs)][keep[:len(epochs)]]

    for key, style in (("train_loss", "o-"), ("valid_loss", "o--")):
        if history.get(key):
            ax.plot(*finite(key), style, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for key, colour in (("dice_soft", "tab:green"), ("dice_th", "tab:red")):
        if history.get(key):
            ax2.plot(*finite(key), "s-", color=colour, label=key)
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right")
    ax.set_title(title)
    _save(fig, path)


def plot_thresholds(table: Dict[float, float], path: str, title: str = "") -> None:
    th = np.array(sorted(table))
    dice = np.array([table[t] for t in th])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(th, dice, "o-")
    best = int(np.argmax(dice))
    ax.axvline(th[best], color="grey", ls=":")
    ax.set_xlabel("threshold")
    ax.set_ylabel("validation Dice")
    ax.set_title(f"{title} best {dice[best]:.4f} at {th[best]:.2f}")
    _save(fig, path)


def plot_triplets(items: Sequence, path: str, title: str = "") -> None:
    """Rows of image | ground truth | prediction, each with its Dice in the title.

    ``items``: ``(name, image uint8 RGB, mask 0/1, prediction 0/1, dice)``.
    """
    rows = max(1, len(items))
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for r, (name, image, mask, pred, dice) in enumerate(items):
        for c, (picture, label) in enumerate(((image, name), (mask, "ground truth"), (pred, f"prediction, Dice {dice:.3f}"))):
            ax = axes[r][c]
            ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray", vmin=0, vmax=None if picture.ndim == 3 else 1)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3 * rows)))
    _save(fig, path)
