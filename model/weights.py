"""Reading a weights file (``.pth``/``.safetensors``) as a state dict, and the error of weights
that were asked for but cannot be had (model.build, model.packaged)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:  # imported where a file is read: model cards use this module's error without torch
    import torch

__all__ = ["WeightsError", "load_weights_file"]


class WeightsError(RuntimeError):
    """Pretrained weights that were asked for but cannot be loaded."""


def load_weights_file(path: str) -> Dict[str, "torch.Tensor"]:
    import torch

    if not os.path.isfile(path):
        raise WeightsError(f"{path}: MODEL.ENCODER_WEIGHTS file not found")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state_dict")
    return state
