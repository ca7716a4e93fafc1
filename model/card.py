"""Model cards: ``<stem>.json`` beside every checkpoint (train_net) and every export (model.export).

A card says what a model needs and gives, as plain JSON, for people and for runtimes that have no
Python toolkit (ONNX Runtime, TorchScript in QuPath or WSInfer)::

    {"format": "glomeruli-card/1", "name", "version",
     "architecture", "encoder", "norm", "classes": ["Glomerulus"],
     "input": {"size", "reduce", "mean", "std", "mpp"},   # as in the checkpoint (mean/std: RGB 0..1)
     "input_format": "...",  "output_format": "...",     # the tensors, in words
     "pixel_size_um", "threshold",
     "training": {"fold", "n_folds", "loss", "epochs", "weights", "config", "minutes", "machine"},
     "pretrained_encoder": {"weights", "package", "file", "origin"} or None,
     "metrics": {...},                                   # training's validation figures
     "held_out": {...},                                  # honest held-out figures, when known
     "software": {"Glomeruli_segmentation": "0.9.0", "torch": ...},
     "checkpoint": {"file", "sha256"},
     "files": {"onnx", "torchscript"}, "export": {...}}  # exports only

The ONNX backend reads ``input`` and ``threshold`` from the card (test_net's scale, normalisation
and threshold), so an ONNX file without its card is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from model.checkpoint import CheckpointError
from model.packaged import packaged
from utils.io import atomic_write_json
from utils.version import TOOLKIT, VERSION, software_versions

__all__ = ["CARD_FORMAT", "card_path", "model_card", "write_card", "read_card", "loaded_from_card",
           "model_identity"]

CARD_FORMAT = "glomeruli-card/1"

INPUT_FORMAT = ("float32 NCHW, RGB, (pixel / 255 - mean) / std with the card's input.mean and input.std; "
                "tiles of input.size px (any size divisible by 32 works) read at pixel_size_um um/px "
                "(or 1/input.reduce of level 0 when the pixel size is unknown)")
OUTPUT_FORMAT = "float32 N x 1 x H x W logits; probability = sigmoid(logit); the mask is probability > threshold"

# held-out figures a shipped card may carry (model.ship), copied into the card as they are
_HELD_OUT_KEYS = ("heldout_dice_at_0.5", "heldout_command", "out_of_fold_dice")


def card_path(model_path: str) -> str:
    """The card of a checkpoint or export: the same path with ``.json``."""
    return os.path.splitext(model_path)[0] + ".json"


def _name_version(card: Dict[str, object], path: str) -> Tuple[str, str]:
    """A model's name and version: its card's (a shipped model's), else the file's stem and the toolkit's."""
    return (str(card.get("name") or os.path.splitext(os.path.basename(path))[0]),
            str(card.get("version") or f"{TOOLKIT} {VERSION}"))


def _minutes(seconds) -> Optional[float]:
    return round(float(seconds) / 60, 1) if isinstance(seconds, (int, float)) else None


def _pretrained(spec: Dict[str, object]) -> Optional[Dict[str, str]]:
    """Where the encoder's starting weights came from: a package of model.packaged (origin and
    licence), a file or tag as named, or None for a random start."""
    weights = str(spec.get("ENCODER_WEIGHTS") or "")
    if not weights:
        return None
    encoder = str(spec.get("ENCODER_NAME") or "")
    row = packaged(encoder[3:] if encoder.startswith("tu-") else encoder, weights)
    if row is None:
        return {"weights": weights}
    return {"weights": weights, "package": row.package, "file": row.file, "origin": row.origin}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(ckpt: Dict[str, object], path: str) -> Dict[str, object]:
    """The card of a loaded checkpoint (``path``: its file). A shipped model's own card (its name,
    version, data, licences, held-out figures, intended use) is kept under ``shipped``."""
    spec, inputs = ckpt["model"], ckpt["input"]
    shipped = ckpt.get("card") if isinstance(ckpt.get("card"), dict) else {}
    threshold = ckpt.get("threshold")
    held_out = {k: shipped[k] for k in _HELD_OUT_KEYS if k in shipped}
    name, version = _name_version(shipped, path)
    card = {
        "format": CARD_FORMAT,
        "name": name,
        "version": version,
        "architecture": spec.get("ARCHITECTURE"), "encoder": spec.get("ENCODER_NAME") or None,
        "norm": spec.get("NORM", "batch"), "classes": ["Glomerulus"],
        "input": {k: inputs.get(k) for k in ("size", "reduce", "mean", "std", "mpp", "stain") if k != "stain" or inputs.get(k)},
        "input_format": INPUT_FORMAT, "output_format": OUTPUT_FORMAT,
        "pixel_size_um": inputs.get("mpp"),
        "threshold": float(threshold) if isinstance(threshold, (int, float)) else None,
        "training": {"fold": ckpt.get("fold"), "n_folds": ckpt.get("n_folds"), "loss": ckpt.get("loss"),
                     "epochs": ckpt.get("epochs"), "weights": ckpt.get("weights"), "config": ckpt.get("config"),
                     "minutes": _minutes(ckpt.get("training_seconds")), "machine": ckpt.get("machine")},
        "pretrained_encoder": _pretrained(spec),
        "metrics": ckpt.get("metrics", {}),
        "held_out": held_out or None,
        "software": software_versions(),
        "checkpoint": {"file": os.path.basename(path), "sha256": _sha256(path)},
    }
    if shipped:
        card["shipped"] = shipped
    return json.loads(json.dumps(card))  # plain JSON types


def write_card(model_path: str, card: Dict[str, object]) -> str:
    """Write ``card`` beside ``model_path`` (atomically); returns the card's path."""
    path = card_path(model_path)
    atomic_write_json(path, card)
    return path


def read_card(model_path: str) -> Dict[str, object]:
    """The card beside ``model_path``, checked: a missing or incomplete card names the file."""
    path = card_path(model_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_path}: no model card {os.path.basename(path)} beside it (python -m "
                              "model.export writes both): the card gives the scale, normalisation and threshold")
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable model card ({type(exc).__name__}: {exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: not a model card of this toolkit (no {CARD_FORMAT!r} format tag)")
    inputs = card.get("input")
    if not isinstance(inputs, dict) or any(not inputs.get(k) for k in ("size", "reduce", "mean", "std")):
        raise CheckpointError(f"{path}: the card's input section lacks size, reduce, mean or std")
    return card


def loaded_from_card(card: Dict[str, object]) -> Dict[str, object]:
    """What inference reads from a checkpoint (``input``, ``threshold``, ``model``), from a card."""
    return {"model": {"ARCHITECTURE": card.get("architecture"), "ENCODER_NAME": card.get("encoder") or ""},
            "input": dict(card["input"]), "threshold": card.get("threshold"), "card": card}


def model_identity(ckpts: Sequence[Dict[str, object]], paths: Sequence[str]) -> Tuple[str, str]:
    """``(name, version)`` of an ensemble, for provenance (DICOM Segmentation): the models' names
    (a shipped card's, else the file stems) joined by "+", and their versions."""
    names: List[str] = []
    versions: List[str] = []
    for ckpt, path in zip(ckpts, paths):
        name, version = _name_version(ckpt.get("card") if isinstance(ckpt.get("card"), dict) else {}, path)
        names.append(name)
        if version not in versions:
            versions.append(version)
    return "+".join(names), "; ".join(versions)
