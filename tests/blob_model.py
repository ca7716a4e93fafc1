"""A deterministic, scale-dependent stand-in for a trained glomerulus model (tests, benchmarks).

``DarkBlobs`` averages the darkness of the tissue over 15 x 15 model pixels and calls the dense,
dark regions objects (glomeruli are dense and dark in PAS): its objects follow the tissue, as a
trained model's do, and change with the scale it reads at. Importing this module registers it as
the architecture ``TestDarkBlobs``, so ``python -c "import tests.blob_model; ..."`` can run
test_net on its checkpoints (see ``tests/bench/bench_infer.py``).
"""
from __future__ import annotations

import runpy
import sys

import torch
from torch import nn

from model.build import MODELS
from model.checkpoint import save_checkpoint

__all__ = ["DarkBlobs", "SPEC", "save_blob_checkpoint"]

SPEC = {"ARCHITECTURE": "TestDarkBlobs", "ENCODER_NAME": "", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1}


class DarkBlobs(nn.Module):
    def __init__(self, level: float = 0.30, window: int = 15):
        super().__init__()
        self.level, self.window = level, window
        self.register_buffer("gain", torch.ones(1))

    def forward(self, x):  # x: RGB in 0..1 (a checkpoint with mean 0, std 1)
        dark = 1 - x.mean(1, keepdim=True)
        smooth = nn.functional.avg_pool2d(dark, self.window, 1, self.window // 2, count_include_pad=False)
        return 40 * (smooth - self.level) * self.gain


if "TestDarkBlobs" not in MODELS:
    MODELS.register("TestDarkBlobs")(lambda spec: DarkBlobs())


def save_blob_checkpoint(path, size: int = 64, reduce: int = 4, mpp=None) -> None:
    inputs = {"size": size, "reduce": reduce, "mean": [0, 0, 0], "std": [1, 1, 1]}
    if mpp:
        inputs["mpp"] = mpp
    save_checkpoint(str(path), DarkBlobs(), {"model": SPEC, "input": inputs, "threshold": 0.5, "fold": 0,
                                             "metrics": {}})


if __name__ == "__main__":  # python -m tests.blob_model test_net.py [ARGS]: the script with the model registered
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
