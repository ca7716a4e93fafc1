"""``TEST.BACKEND``: which runtime predicts, and the ONNX exports ``auto`` keeps in a cache.

``auto`` (the default) predicts with ONNX Runtime on a CPU and with torch on a GPU:

* **a CPU, onnxruntime installed**: every checkpoint is exported to ONNX once (``model.export``,
  with the export's own check against PyTorch) into the cache folder, under the checkpoint's
  SHA-256; later runs load the cached file, and never import torch when every checkpoint is
  cached (its start-up and ~350 MB of memory saved). A checkpoint replaced under the same name
  has another SHA-256, so another export.
* **a GPU** (``MODEL.DEVICE`` auto or cuda with CUDA present): torch (mixed precision). Not
  measured against ONNX Runtime's CUDA provider on a GPU yet.
* **onnxruntime missing**, or a checkpoint whose export fails its check: torch, and one log line
  says why (a failed export is remembered in the cache, so it is not tried again on every run).

The cache folder is ``TEST.ONNX_CACHE``, by default ``$XDG_CACHE_HOME/glomeruli_segmentation/onnx``
(``~/.cache/glomeruli_segmentation/onnx``). Shards or ranks started together share it safely: an
export is made under a lock file (the others wait, then reuse it) and lands by an atomic rename,
so no process reads a file half-written. Each entry is ``<sha256>.onnx`` with its model card
``<sha256>.json``; deleting the folder only costs a new export.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from model.card import loaded_from_card, read_card, write_card
from model.checkpoint import load_checkpoint, model_files
from model.onnx_backend import load_onnx_models
from utils.io import atomic_write_bytes, atomic_write_text, file_sha256

__all__ = ["EXPORT_TAG", "Models", "cache_folder", "choose_backend", "cached_export", "file_lock", "gpu_visible",
           "resolve_models"]

logger = logging.getLogger(__name__)

# Part of every cache entry's name: an export made by an older exporter (another opset, another
# padding rule) is not reused.
EXPORT_TAG = "o18v1"


class Models(NamedTuple):
    """The models of a run: what inference reads of each (``input``, ``threshold``, ``model``; a
    whole checkpoint for the torch backend), the user's files (checkpoints or .onnx), the files
    the backend runs, the backend (``torch`` / ``onnx``) and why it was chosen."""

    infos: List[Dict[str, object]]
    paths: List[str]
    run_paths: List[str]
    backend: str
    reason: str


def cache_folder(setting: str = "") -> str:
    """``TEST.ONNX_CACHE``, or the per-user default (XDG's cache folder)."""
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glomeruli_segmentation", "onnx")


def gpu_visible() -> bool:
    """Whether this machine may have a GPU torch can use (an NVIDIA or ROCm driver, or macOS's
    Metal): only then is torch imported to ask. A CPU-only machine never pays for the import."""
    return sys.platform == "darwin" or any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl",
                                                                       "/dev/kfd"))


def choose_backend(requested: str, device: str) -> Tuple[str, str]:
    """``(backend, why)`` for ``TEST.BACKEND`` ``requested`` and ``MODEL.DEVICE`` ``device``."""
    if requested != "auto":
        return requested, f"TEST.BACKEND {requested}"
    if device != "cpu" and gpu_visible():
        from model.build import resolve_device

        if resolve_device(device).type != "cpu":
            return "torch", f"TEST.BACKEND auto: a GPU ({device}) runs torch"
    try:
        import onnxruntime  # noqa: F401  (the backend imports it next anyway)
    except ImportError:
        return "torch", ("TEST.BACKEND auto: onnxruntime is not installed, so torch runs on the CPU (python -m pip "
                         "install onnxruntime: about 1.5x faster here)")
    return "onnx", "TEST.BACKEND auto: a CPU, so ONNX Runtime runs the checkpoints' cached ONNX exports"


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed) between processes, held for the block;
    where ``fcntl`` is missing (Windows) no lock is taken, and the atomic renames still keep every
    file whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _entry(cache: str, digest: str) -> str:
    return os.path.join(cache, f"{digest}-{EXPORT_TAG}")


def cached_export(path: str, cache: str, digest: Optional[str] = None) -> Tuple[Optional[str], str]:
    """``(the cached .onnx of checkpoint path, how it was got)``: the cache's file when there is one,
    else a fresh export (checked against PyTorch, written atomically under a lock). ``(None, why)``
    when the checkpoint does not export (remembered: not tried again)."""
    digest = digest or file_sha256(path)
    stem = _entry(cache, digest)
    onnx_path, failed = stem + ".onnx", stem + ".failed"
    if os.path.isfile(onnx_path):
        return onnx_path, "cached"
    if os.path.isfile(failed):
        with open(failed, encoding="utf-8") as fh:
            return None, f"its export failed earlier ({fh.read().strip()}; {failed})"
    os.makedirs(cache, exist_ok=True)
    with file_lock(stem + ".lock"):
        if os.path.isfile(onnx_path):  # another process exported it while this one waited
            return onnx_path, "exported by another process"
        from model.export import ExportError, export_checkpoint

        start = time.perf_counter()
        logger.info("%s: exporting it to ONNX once, into the cache %s (a minute or so)", path, cache)
        try:
            onnx_bytes, _, card = export_checkpoint(load_checkpoint(path), path, torchscript=False)
        except OSError:
            raise
        except Exception as exc:  # ExportError (outputs differ), or the exporter's own errors
            why = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            atomic_write_text(failed, why)
            return None, f"its export failed ({why})"
        card["files"] = {"onnx": os.path.basename(onnx_path)}
        write_card(onnx_path, card)  # the card first: an .onnx in the cache always has its card
        atomic_write_bytes(onnx_path, onnx_bytes)
        return onnx_path, f"exported in {time.perf_counter() - start:.0f} s"


def _onnx_infos(run_paths: Sequence[str]) -> List[Dict[str, object]]:
    return [loaded_from_card(read_card(p)) for p in run_paths]


def resolve_models(folder: str, requested: str, device: str, cache_setting: str = "", export: bool = True) -> Models:
    """The models of ``TEST.MODEL_WEIGHTS_FOLDER`` and the backend that runs them. With ``auto``
    on a CPU, a folder of checkpoints runs from the cache (exported on first use) and a folder of
    .onnx files (``python -m model.export``) runs as it is. ``export=False`` (assembling outputs,
    nothing to predict): checkpoints are only read, never exported."""
    backend, reason = choose_backend(requested, device)
    if backend == "onnx" and requested == "auto":
        checkpoints = _checkpoint_files(folder)
        if checkpoints is None:  # exported models only
            infos, paths = load_onnx_models(folder)
            return Models(infos, paths, paths, "onnx", reason + " (the folder's .onnx files)")
        if not export:
            return _torch_models(checkpoints, "nothing to predict: the checkpoints are only read")
        cache = cache_folder(cache_setting)
        run_paths, how = [], []
        for path in checkpoints:
            onnx_path, got = cached_export(path, cache)
            if onnx_path is None:
                logger.warning("%s: %s; TEST.BACKEND auto runs torch", path, got)
                return _torch_models(checkpoints, f"TEST.BACKEND auto: {os.path.basename(path)} does not export")
            run_paths.append(onnx_path)
            how.append(got)
        counts = {g: how.count(g) for g in dict.fromkeys(how)}
        detail = ", ".join(f"{n} {g}" for g, n in counts.items())
        infos = _onnx_infos(run_paths)
        for info in infos:  # provenance as the torch backend gives it: the checkpoint's own card, the current file
            info["card"] = info["card"].get("shipped") or {}
        return Models(infos, checkpoints, run_paths, "onnx", f"{reason} ({detail}; {cache})")
    if backend == "onnx":
        infos, paths = load_onnx_models(folder)
        return Models(infos, paths, paths, "onnx", reason)
    return _torch_models(model_files(folder), reason)


def _checkpoint_files(folder: str) -> Optional[List[str]]:
    """The checkpoints of ``folder`` (or the one file), or None when it holds .onnx files only."""
    if os.path.isfile(folder) and folder.endswith(".onnx"):
        return None
    try:
        return model_files(folder)
    except FileNotFoundError:
        if os.path.isdir(folder) and any(n.endswith(".onnx") for n in os.listdir(folder)):
            return None
        raise


def _torch_models(paths: List[str], reason: str) -> Models:
    ckpts = [load_checkpoint(p) for p in paths]
    return Models(ckpts, paths, paths, "torch", reason)
