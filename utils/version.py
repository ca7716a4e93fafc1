"""The toolkit's version and the versions of what computed a model's outputs (model cards, DICOM)."""
from __future__ import annotations

import importlib.metadata
from typing import Dict

__all__ = ["TOOLKIT", "VERSION", "software_versions"]

TOOLKIT = "Glomeruli_segmentation"
VERSION = "0.9.0"  # raised with each change of the checkpoint, card or output formats

_PACKAGES = ("torch", "segmentation-models-pytorch", "timm", "onnx", "onnxruntime")


def software_versions() -> Dict[str, str]:
    """``{name: version}`` of the toolkit and of the installed packages that build or run models."""
    found = {TOOLKIT: VERSION}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
