"""Segmentation losses for binary masks, registered under the original toolkit's names.

Every loss takes ``logits`` of shape ``(N, 1, H, W)`` (any float dtype: fp16/bf16 are computed
in float32) and ``target`` of shape ``(N, 1, H, W)`` or ``(N, H, W)`` with values 0/1, works for
any batch size and for empty masks, and returns a scalar.

``SOLVER.LOSS_FUNCTION_NAME`` picks one through :func:`build_loss`; an unknown name is an error
that lists the valid ones.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "build_loss",
    "lovasz_hinge",
    "symmetric_lovasz",
    "soft_dice_loss",
    "focal_loss",
    "DeepSupervision",
    "DEEP_SUPERVISION_WEIGHTS",
]

# Weights of the deep-supervision heads (strides 4, 8, 16) against 1 for the main output.
DEEP_SUPERVISION_WEIGHTS = (0.5, 0.25, 0.125)


def _prepare(logits: torch.Tensor, target: torch.Tensor):
    logits = logits.float()
    target = target.float()
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    return logits, target


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def _lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.numel() == 0:
        return logits.sum() * 0.0
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    return torch.dot(F.relu(errors_sorted), _lovasz_grad(labels[perm]))


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge (Berman et al. 2018), computed per image and averaged over the batch."""
    logits, target = _prepare(logits, target)
    losses = [
        _lovasz_hinge_flat(lg.reshape(-1), tg.reshape(-1)) for lg, tg in zip(logits, target)
    ]
    return torch.stack(losses).mean()


def symmetric_lovasz(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of the Lovasz hinge of the foreground and of the background (the original's)."""
    logits, target = _prepare(logits, target)
    return 0.5 * (lovasz_hinge(logits, target) + lovasz_hinge(-logits, 1.0 - target))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over the whole batch,
    ``p = sigmoid(logits)``. The target is used as is (the original wrongly applied a sigmoid
    to it)."""
    logits, target = _prepare(logits, target)
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    cardinality = prob.sum() + target.sum()
    return 1.0 - (2.0 * intersection + smooth) / (cardinality + smooth).clamp_min(1e-7)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over pixels; ``alpha < 0`` disables the
    class weighting."""
    logits, target = _prepare(logits, target)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1.0 - prob) * (1.0 - target)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1.0 - alpha) * (1.0 - target)) * loss
    return loss.mean()


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits, target = _prepare(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class Loss(nn.Module):
    """A named loss: a sum of weighted terms, each ``f(logits, target)``."""

    def __init__(self, name: str, terms):
        super().__init__()
        self.name = name
        self.terms = list(terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for weight, fn in self.terms:
            total = total + weight * fn(logits, target)
        return total

    def __repr__(self) -> str:
        return f"Loss({self.name})"


def _focal(cfg):
    alpha, gamma = cfg.SOLVER.FOCAL_ALPHA, cfg.SOLVER.FOCAL_GAMMA
    return lambda x, y: focal_loss(x, y, alpha=alpha, gamma=gamma)


def _dice(cfg):
    smooth = cfg.SOLVER.DICE_SMOOTH
    return lambda x, y: soft_dice_loss(x, y, smooth=smooth)


# name -> factory(cfg) -> list of (weight, fn)
LOSSES: Dict[str, Callable] = {
    "symmetric_lovasz": lambda cfg: [(1.0, symmetric_lovasz)],
    "lovasz_hinge": lambda cfg: [(1.0, lovasz_hinge)],
    "dice_coef_loss": lambda cfg: [(1.0, _dice(cfg))],
    "sym_lovasz_dice": lambda cfg: [(1.0, symmetric_lovasz), (1.0, _dice(cfg))],
    "loss_focal_corrected": lambda cfg: [(1.0, _focal(cfg))],
    "loss_sym_lovasz_focal_corrected": lambda cfg: [(1.0, symmetric_lovasz), (1.0, _focal(cfg))],
    "sym_lovasz_focal_dice": lambda cfg: [(1.0, symmetric_lovasz), (1.0, _focal(cfg)), (1.0, _dice(cfg))],
    "bce": lambda cfg: [(1.0, bce)],
    "bce_dice": lambda cfg: [(1.0, bce), (1.0, _dice(cfg))],
}


class DeepSupervision(nn.Module):
    """``loss`` on a deep-supervised output ``(logits, [aux logits at strides 4, 8, 16])``: the
    weighted mean of the main output's loss (weight 1) and each head's (``weights``), each head
    scored against the target averaged down to its size (a soft target at the borders). A plain
    ``logits`` tensor (validation: the model in eval mode) gets ``loss`` alone."""

    def __init__(self, loss: nn.Module, weights=DEEP_SUPERVISION_WEIGHTS):
        super().__init__()
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, pred, target: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.loss(pred, target)
        logits, heads = pred
        target = _prepare(logits, target)[1]  # float, (N, 1, H, W)
        total, norm = self.loss(logits, target), 1.0
        for weight, head in zip(self.weights, heads):
            factor = target.shape[-1] // head.shape[-1]
            total = total + weight * self.loss(head, F.avg_pool2d(target, factor) if factor > 1 else target)
            norm += weight
        return total / norm

    def __repr__(self) -> str:
        return f"DeepSupervision({self.loss!r}, weights {self.weights})"


def build_loss(cfg) -> nn.Module:
    """The loss named by ``cfg.SOLVER.LOSS_FUNCTION_NAME`` (with ``MODEL.DEEP_SUPERVISION``,
    wrapped in :class:`DeepSupervision`)."""
    name = cfg.SOLVER.LOSS_FUNCTION_NAME
    if name not in LOSSES:
        raise ValueError(
            f"SOLVER.LOSS_FUNCTION_NAME: unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}"
        )
    loss = Loss(name, LOSSES[name](cfg))
    return DeepSupervision(loss) if cfg.MODEL.get("DEEP_SUPERVISION", False) else loss
