"""Checkpoints that carry everything inference needs, as plain types (safe to load).

A checkpoint is a dict saved with ``torch.save``::

    {"format": "glomeruli/1",
     "model": {"ARCHITECTURE", "ENCODER_NAME", "ENCODER_WEIGHTS", "NUM_CLASSES",
               "NORM"},                                # "batch" or "group" (absent: batch)
     "input": {"size", "reduce", "mean", "std", "mpp"},  # tile size/reduction, RGB 0..1 stats,
                                                       # tiles' um/px (None: unknown)
     "threshold": float, "fold": int (-1: the all-images model), "n_folds": int,
     "loss": str, "epochs": int, "weights": str,       # how it was trained, which weights
     "metrics": {...},                                 # validation Dice, threshold, tiles...
     "card": {...},                                    # only in shipped models (model.ship)
     "state_dict": {...}}                              # float32 (float16 in shipped models)

It is loaded with ``torch.load(weights_only=True)``: a file carrying code is refused. The
original toolkit's bare UneXt101 ``state_dict`` files load too (:func:`load_model_weights`).
"""
from __future__ import annotations

import io
import logging
import os
from typing import TYPE_CHECKING, Dict, List, Tuple

from utils.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

# torch and the model code are imported where they are used: CheckpointError and the checkpoint
# format are also what the onnx backend (which runs without torch) reads.

__all__ = ["FORMAT", "SHIPPED_FOLDER", "CheckpointError", "model_files", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "model_from_loaded",
           "load_model_weights"]

logger = logging.getLogger(__name__)

FORMAT = "glomeruli/1"

DEFAULT_FOLDER = "model/checkpoints"  # TEST.MODEL_WEIGHTS_FOLDER's default: the shipped model
SHIPPED_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def model_files(folder: str, suffix: str = ".pth", missing_hint: str = "TEST.MODEL_WEIGHTS_FOLDER") -> List[str]:
    """The model files of ``TEST.MODEL_WEIGHTS_FOLDER``: ``folder`` itself when it is a file, else its
    ``*<suffix>`` files, sorted. The default folder (the shipped model) is found inside the toolkit
    from any working folder."""
    if folder == DEFAULT_FOLDER and not os.path.exists(folder):
        folder = SHIPPED_FOLDER
    if os.path.isfile(folder):
        return [folder]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: model folder not found (TEST.MODEL_WEIGHTS_FOLDER)")
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(suffix))
    if not paths:
        what = "checkpoints" if suffix == ".pth" else "models"
        raise FileNotFoundError(f"{folder}: no {suffix} {what} ({missing_hint})")
    return paths


def save_checkpoint(path: str, model: nn.Module, info: Dict[str, object]) -> None:
    """Save ``model``'s weights with ``info`` (plain types only), atomically."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, **info, "state_dict": state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def _torch_load(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        raise CheckpointError(f"{path}: not a readable checkpoint (not a file torch.save wrote)")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects beyond tensors and plain values "
                "(it could run code when loaded); only checkpoints written by this toolkit or "
                "plain state_dicts are accepted"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}") from None


def load_checkpoint(path: str) -> Dict[str, object]:
    """Load and check a toolkit checkpoint."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this toolkit (no {FORMAT!r} format tag)")
    for key in ("model", "input"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no {key!r} section")
    return ckpt


def model_from_checkpoint(path: str) -> Tuple[nn.Module, Dict[str, object]]:
    """Rebuild the model a checkpoint describes and load its weights."""
    ckpt = load_checkpoint(path)
    return model_from_loaded(ckpt, path), ckpt


def model_from_loaded(ckpt: Dict[str, object], path: str) -> nn.Module:
    """The model of an already loaded checkpoint (``path`` names it in errors).

    The model is built on the ``meta`` device (no memory, no random initialisation: 1.5 s saved
    per UneXt101) and takes the checkpoint's tensors as they are. A model that keeps state
    outside its ``state_dict`` (non-persistent buffers) is built the ordinary way instead.
    """
    import torch

    from model.build import build_model

    try:
        with torch.device("meta"):
            model = build_model(ckpt["model"], weights=False)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # an encoder that computes while it is built
        logger.info("%s: the model cannot be built without memory (%s: %s); building it the ordinary way", path,
                    type(exc).__name__, exc)
        model = None
    if model is not None:
        load_model_weights(model, ckpt["state_dict"], path, assign=True)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return model
    model = build_model(ckpt["model"], weights=False)
    load_model_weights(model, ckpt["state_dict"], path)
    return model


def load_model_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str,
                       assign: bool = False) -> None:
    """Load a full-model ``state_dict`` (ours, or the original toolkit's UneXt) strictly.

    ``assign=True`` makes the model's tensors the state_dict's own (cast to the model's dtypes),
    for a model built on the ``meta`` device."""
    from model.unext import convert_original_state_dict, is_original_state_dict

    if is_original_state_dict(state_dict):
        state_dict = convert_original_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not fit {type(model).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]}); is it another architecture or encoder?"
        )
    if assign:
        state_dict = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, assign=assign)


def load_weights_file(model: nn.Module, path: str) -> None:
    """Initialise ``model`` from a file: a toolkit checkpoint or a bare state_dict."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state_dict")
    load_model_weights(model, obj, path)
