"""``TEST.BACKEND onnx``: the exported models (model.export) run by ONNX Runtime.

:func:`load_onnx_models` finds the ``*.onnx`` files of a folder (or the one file) and their
model cards; :func:`onnx_predictor` is the ONNX Runtime twin of ``model.inference.torch_predictor``
(same normalisation, flips and ensemble mean), so test_net's outputs are those of the torch
backend within float32 rounding.

Sessions: every graph optimisation, ``TEST.ONNX_THREADS`` intra-op threads (0: ORT's default, the
physical cores), CUDA's execution provider when the installed ONNX Runtime has it (the
onnxruntime-gpu package) and ``MODEL.DEVICE`` allows a GPU, else the CPU's. Inputs and outputs go
through I/O binding: the output is allocated by the runtime on its device and copied out once.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy.special import expit

from model.card import loaded_from_card, read_card
from model.checkpoint import CheckpointError, model_files

__all__ = ["ONNX_INSTALL", "load_onnx_models", "onnx_device", "onnx_providers", "onnx_session", "onnx_predictor"]

logger = logging.getLogger(__name__)

ONNX_INSTALL = "python -m pip install onnxruntime (onnxruntime-gpu for CUDA)"


def load_onnx_models(folder: str) -> Tuple[List[Dict[str, object]], List[str]]:
    """``(what inference reads of each model, from its card; the .onnx paths)``; a model without
    its card is refused (the card gives the scale, normalisation and threshold)."""
    paths = model_files(folder, ".onnx", "TEST.BACKEND onnx; python -m model.export writes them from checkpoints")
    for path in paths:
        if not path.endswith(".onnx"):
            raise CheckpointError(f"{path}: TEST.BACKEND onnx reads .onnx files (python -m model.export)")
    return [loaded_from_card(read_card(p)) for p in paths], paths


def onnx_device(name: str) -> str:
    """``MODEL.DEVICE`` for ONNX Runtime: "cuda" when asked for ("auto" or "cuda...") and the installed
    ONNX Runtime has CUDA's provider (the onnxruntime-gpu package), else "cpu" (with a warning when
    CUDA was asked for by name)."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if (name == "auto" or name.startswith("cuda")) and has_cuda:
        return "cuda"
    if name.startswith("cuda"):
        logger.warning("TEST.BACKEND onnx, MODEL.DEVICE %s: this ONNX Runtime has no CUDA provider (install "
                       "onnxruntime-gpu): running on the CPU", name)
    return "cpu"


def onnx_providers(device_type: str) -> List[str]:
    """The execution providers for ``device_type`` (:func:`onnx_device`): CUDA's first, then the CPU's."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device_type == "cuda" else ["CPUExecutionProvider"]


def onnx_session(path_or_bytes, threads: int = 0, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session with every graph optimisation (measured 15 % faster than the
    extended level on CPU for a Unet-resnet18) and ``threads`` intra-op threads (0: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-node placement notices
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path_or_bytes, options, providers=list(providers))


def _sessions(paths: Sequence[str], threads: int, providers: Sequence[str]):
    sessions = []
    for path in paths:
        try:
            sessions.append(onnx_session(path, threads, providers))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
            raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from None
    return sessions


def onnx_predictor(paths: Sequence[str], means, stds, tta: bool = False, threads: int = 0,
                   device_type: str = "cpu"):
    """A ``predict`` for ``model.inference.predict_canvas``: ``(n, h, w, 3)`` uint8 -> ``(n, h, w)``
    probabilities, the mean sigmoid of the ensemble (optionally over horizontal / vertical flips)."""
    providers = onnx_providers(device_type)
    sessions = _sessions(paths, threads, providers)
    output_device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    params = [((np.asarray(m, np.float32) * 255).reshape(1, 3, 1, 1), (np.asarray(s, np.float32) * 255).reshape(1, 3, 1, 1))
              for m, s in zip(means, stds)]
    flips = [None, 3, 2] if tta else [None]

    def run(session, x: np.ndarray) -> np.ndarray:
        binding = session.io_binding()
        binding.bind_cpu_input(session.get_inputs()[0].name, x)
        binding.bind_output(session.get_outputs()[0].name, output_device)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict(batch: np.ndarray) -> np.ndarray:
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)  # NCHW, contiguous
        total = None
        for session, (mean, std) in zip(sessions, params):
            xn = (x - mean) / std
            for axis in flips:
                inp = np.ascontiguousarray(np.flip(xn, axis)) if axis else xn
                prob = expit(run(session, inp).astype(np.float32, copy=False))
                prob = np.flip(prob, axis) if axis else prob
                total = prob if total is None else total + prob
        return (total / (len(sessions) * len(flips)))[:, 0]

    return predict
