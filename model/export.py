"""Export checkpoints for deployment: ONNX, TorchScript and a model card per checkpoint.

    python -m model.export [--config-file X.yaml] TEST.MODEL_WEIGHTS_FOLDER <dir or .pth> OUTPUT_DIR <out>

For every checkpoint (``*.pth`` of the folder, or the one file) it writes to OUTPUT_DIR:

* ``<stem>.onnx``: opset 18, input ``input`` (N x 3 x H x W float32, normalised), output ``logits``
  (N x 1 x H x W), batch and spatial size dynamic; ``test_net.py TEST.BACKEND onnx`` runs it with
  ONNX Runtime, and so can Triton, ONNX Runtime Web or any ONNX runtime;
* ``<stem>.pt``: TorchScript (``torch.jit.load``; QuPath, WSInfer);
* ``<stem>.json``: the model card (model.card): architecture, encoder, input size, normalisation,
  pixel size, threshold, classes, the training config, software versions, held-out figures when
  known, and this export's check.

Each checkpoint's exports are checked before they are written: ONNX Runtime's and TorchScript's
outputs against PyTorch's on a probe batch at the tile size and at another size (a fixed random
input); a difference above 1e-4 (relative to the logits' range) fails the export (the checkpoints
before it stay exported). Every checkpoint is loaded first, so a file that is not a checkpoint stops
the command before it writes anything.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from model.card import model_card, write_card
from model.checkpoint import CheckpointError, load_checkpoint, model_files, model_from_loaded
from model.onnx_backend import onnx_session
from utils.io import atomic_write_bytes
from utils.setup import configure_process, exit_now, launch

__all__ = ["OPSET", "ExportError", "export_checkpoint", "static_same_padding"]

logger = logging.getLogger(__name__)

OPSET = 18
TOLERANCE = 1e-4  # max |export - torch| / max(1, max |torch|), float32


class ExportError(RuntimeError):
    """An export that does not reproduce PyTorch's outputs; the message names the checkpoint."""


def _probes(size: int) -> List[torch.Tensor]:
    """A fixed random batch at the tile size and one at another size (dynamic axes really dynamic)."""
    gen = torch.Generator().manual_seed(0)
    other = size + 64 if size <= 256 else size - 64
    return [torch.randn(2, 3, size, size, generator=gen), torch.randn(1, 3, other, size + 32, generator=gen)]


def _difference(ref: torch.Tensor, out: np.ndarray) -> float:
    return float(np.abs(out - ref.numpy()).max() / max(1.0, float(ref.abs().max())))


class _StaticSameConv(torch.nn.Conv2d):
    """TensorFlow's "same" convolution with its padding fixed: on inputs whose sides are
    multiples of 32 (what the models take) every stride-2 layer sees an even side, where the
    padding "same" computes is always ``k - 2`` (``(k - 2) // 2`` before, the rest after). timm's
    ``Conv2dSame`` computes it from the input's shape at run time, which the ONNX exporter traces
    as symbolic arithmetic for minutes; this one exports as a plain Pad + Conv."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, self.static_pad))


def static_same_padding(model: torch.nn.Module) -> int:
    """Replace every timm ``Conv2dSame`` (EfficientNet-Lite's stride-2 layers) of ``model`` by a
    :class:`_StaticSameConv` with the same weights, in place; returns how many. The export is
    checked against the unchanged model on two input sizes, as every export is."""
    from timm.layers import Conv2dSame

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Conv2dSame):
                continue
            if any(s not in (1, 2) for s in child.stride) or any(d != 1 for d in child.dilation):
                raise ValueError(f"{name}: a 'same' convolution with stride {child.stride} and dilation "
                                 f"{child.dilation} has no fixed padding")
            pads = []
            for k, s in zip(reversed(child.kernel_size), reversed(child.stride)):  # (width, then height)
                total = k - 2 if s == 2 else k - 1
                pads += [total // 2, total - total // 2]
            static = _StaticSameConv(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                     child.dilation, child.groups, child.bias is not None)
            static.load_state_dict(child.state_dict())
            static.static_pad = tuple(pads)
            setattr(parent, name, static)
            swapped += 1
    return swapped


def _export_onnx(model: torch.nn.Module, probe: torch.Tensor) -> bytes:
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in quiet]
    for log in quiet:  # the exporter's per-step notices ("Replaced initializer ...")
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (probe,), dynamo=True, opset_version=OPSET, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=(dims,), verbose=False)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    buffer = io.BytesIO()
    program.save(buffer, external_data=False)  # one file (models < 2 GB)
    return buffer.getvalue()


def _export_torchscript(model: torch.nn.Module, probe: torch.Tensor) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, probe, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def export_checkpoint(ckpt: Dict[str, object], path: str,
                      torchscript: bool = True) -> Tuple[bytes, Optional[bytes], Dict[str, object]]:
    """``(onnx bytes, TorchScript bytes, card)`` of a loaded checkpoint, both checked against PyTorch
    (``torchscript=False``: ONNX only, ``None`` for TorchScript)."""
    model = model_from_loaded(ckpt, path).float().eval()
    probes = _probes(int(ckpt["input"]["size"]))
    with torch.inference_mode():
        refs = [model(p) for p in probes]
    exported = model_from_loaded(ckpt, path).float().eval()
    if static_same_padding(exported):
        logger.info("%s: TensorFlow 'same' padding fixed for inputs with sides divisible by 32", path)
    onnx_bytes = _export_onnx(exported, probes[0])
    script_bytes = _export_torchscript(exported, probes[0]) if torchscript else None
    session = onnx_session(onnx_bytes)
    script = torch.jit.load(io.BytesIO(script_bytes)) if torchscript else None
    onnx_diff = script_diff = 0.0
    with torch.inference_mode():
        for probe, ref in zip(probes, refs):
            onnx_diff = max(onnx_diff, _difference(ref, session.run(None, {"input": probe.numpy()})[0]))
            if script is not None:
                script_diff = max(script_diff, _difference(ref, script(probe).numpy()))
    checked = [("ONNX", onnx_diff)] + ([("TorchScript", script_diff)] if torchscript else [])
    for what, diff in checked:
        if not diff <= TOLERANCE:
            raise ExportError(f"{path}: the {what} export differs from PyTorch by {diff:.3g} (relative; "
                              f"tolerance {TOLERANCE:g}): not written")
    stem = os.path.splitext(os.path.basename(path))[0]
    card = model_card(ckpt, path)
    card["files"] = {"onnx": f"{stem}.onnx", "torchscript": f"{stem}.pt"}
    card["export"] = {"opset": OPSET, "dynamic_axes": ["batch", "height", "width"], "precision": "float32",
                      "onnx_max_difference": onnx_diff,
                      "torchscript_max_difference": script_diff if torchscript else None,
                      "check": "fixed random N x 3 x H x W inputs at two sizes, max |export - torch| / "
                               "max(1, max |torch|)"}
    return onnx_bytes, script_bytes, card


def main(cfg, args) -> int:
    out_dir = cfg.OUTPUT_DIR
    paths = model_files(cfg.TEST.MODEL_WEIGHTS_FOLDER)
    ckpts = [load_checkpoint(p) for p in paths]  # every file is a checkpoint before anything is written
    for path in paths:
        if os.path.abspath(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".pt")) == \
                os.path.abspath(path):
            raise CheckpointError(f"{path}: OUTPUT_DIR would overwrite the checkpoint with its TorchScript")
    for ckpt, path in zip(ckpts, paths):  # each written once checked: one model's exports in memory at a time
        onnx_bytes, script_bytes, card = export_checkpoint(ckpt, path)
        os.makedirs(out_dir, exist_ok=True)
        logger.info("%s: ONNX and TorchScript match PyTorch (max difference %.2g and %.2g)", path,
                    card["export"]["onnx_max_difference"], card["export"]["torchscript_max_difference"])
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        atomic_write_bytes(stem + ".onnx", onnx_bytes)
        atomic_write_bytes(stem + ".pt", script_bytes)
        write_card(stem + ".onnx", card)
        logger.info("%s -> %s.onnx (%.1f MB), %s.pt, %s.json", path, stem, len(onnx_bytes) / 1e6, stem, stem)
    logger.info("Predict with it: python test_net.py TEST.BACKEND onnx TEST.MODEL_WEIGHTS_FOLDER %s", out_dir)
    return 0


if __name__ == "__main__":
    configure_process()
    exit_now(launch(main, __doc__))
