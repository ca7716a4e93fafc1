"""The toolkit's version and the versions of what computed a model's outputs (model cards, DICOM)."""
from __future__ import annotations

import importlib.metadata
import os
from typing import Dict

__all__ = ["TOOLKIT", "VERSION", "software_versions", "machine"]

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


def machine(device_type: str = "cpu") -> str:
    """What a model trained on, in words: the CPU's model name and core count, or the GPU's name."""
    if device_type == "cuda":
        import torch

        return f"GPU {torch.cuda.get_device_name()}"
    name = "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"
