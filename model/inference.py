"""Sliding-window inference over a whole slide, in bounded memory.

The slide is read once, streamed and downscaled by the checkpoints' reduction into the padded
low-resolution grid of the tiler (``data.tiling.TileGrid``: centred zero padding to a multiple
of ``reduce * size``). Windows of ``size`` px with a fractional ``overlap`` slide over it;
background windows (the tiler's saturation test) are skipped; the rest go to every model of
the ensemble in batches (optionally with flip TTA), and their probabilities are blended into a
low-resolution canvas with a Gaussian (or constant) weight map. The full-resolution mask is
never allocated: the probability map is upsampled (bilinear, or nearest) column strip by column
strip, thresholded and fed straight into the RLE encoder.

Coordinates: ``(row, col)``; low-res pixel ``(i, j)`` covers level-0 rows
``i * reduce - pad_top ...`` (the tiler's convention).
"""
from __future__ import annotations

import time
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from data.tiling import TileGrid, iter_tile_rows, pixel_limit, slide_box, tissue_windows
from data.readers import Slide
from utils.rle import RLEStripEncoder, rle_area, runs_to_rle

if TYPE_CHECKING:
    import torch

__all__ = ["blend_weights", "window_starts", "lowres_image", "slide_box", "fill_outside", "predict_canvas", "threshold_mask",
           "remove_small_objects", "prob_to_rle", "prob_to_runs", "mask_to_rle", "torch_predictor"]


def blend_weights(size: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """``(size, size)`` float32 weights for blending overlapping windows.

    ``gaussian``: a 2-D Gaussian centred on the window, sigma = ``sigma_scale * size``,
    normalised to a maximum of 1 and floored at 1e-3 (edges still count a little, so a pixel
    covered only by window edges is never 0/0). ``constant``: all ones.
    """
    if mode == "constant":
        return np.ones((size, size), dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"TEST.BLEND must be 'gaussian' or 'constant', got {mode!r}")
    centre = (size - 1) / 2.0
    sigma = max(sigma_scale * size, 1e-3)
    g = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
    w = np.outer(g, g)
    w = w / w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def window_starts(length: int, size: int, overlap: float) -> List[int]:
    """Start offsets of windows of ``size`` covering ``[0, length)`` with the given overlap
    (fraction of the window, ``0 <= overlap < 1``); the last window ends at ``length``.

    >>> window_starts(10, 4, 0.5)
    [0, 2, 4, 6]
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}")
    if size <= 0 or length <= 0:
        raise ValueError(f"size and length must be > 0, got {size} and {length}")
    if length <= size:
        return [0]
    stride = max(1, int(round(size * (1 - overlap))))
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def lowres_image(slide: Slide, grid: TileGrid) -> np.ndarray:
    """The padded slide downscaled by ``grid.reduce``: ``(n_rows * size, n_cols * size, 3)``."""
    out = np.zeros((grid.n_rows * grid.size, grid.n_cols * grid.size, 3), dtype=np.uint8)
    for row, band in iter_tile_rows(slide, grid):
        out[row * grid.size:(row + 1) * grid.size] = band
    return out


def fill_outside(image: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
    """``image`` with everything outside ``box = (y0, y1, x0, x1)`` replaced by the mirror
    image of the inside (``BORDER_REFLECT_101``): the model sees slide-like pixels at the
    slide's edges instead of the black padding it never met in training."""
    y0, y1, x0, x1 = box
    h, w = image.shape[:2]
    if (y0, y1, x0, x1) == (0, h, 0, w):
        return image
    inside = np.ascontiguousarray(image[y0:y1, x0:x1])
    return cv2.copyMakeBorder(inside, y0, h - y1, x0, w - x1, cv2.BORDER_REFLECT_101)


def _batches(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def predict_canvas(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    size: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 16,
    saturation_threshold: int = 40,
    pixel_threshold: int = 200,
    progress=None,
    box: Optional[Tuple[int, int, int, int]] = None,
    helper: Optional[Executor] = None,
    keep: Optional[np.ndarray] = None,
    times=None,
) -> Tuple[np.ndarray, int]:
    """Blend window predictions over a low-res ``image`` into a probability map.

    ``predict`` maps a ``(n, size, size, 3)`` uint8 batch to ``(n, size, size)`` probabilities.
    Windows failing the background test are not predicted (probability 0 there). With ``box``
    (the part of ``image`` on the slide, :func:`slide_box`), windows are chosen on ``image``
    as it is, but the model sees the outside filled by :func:`fill_outside`. ``helper`` (a
    one-thread executor, kept across calls by a caller that predicts many slides) blends the
    batches; by default one is made for the call. With ``keep`` (a 0/1 map of ``image``'s shape:
    a region of interest) only windows that hold some of it are predicted. With ``times`` (a
    ``utils.timing.StageTimes``) the blending is timed as ``blend``.
    Returns ``(probability map float32 (H, W), number of windows predicted)``.
    """
    h, w = image.shape[:2]
    weights = blend_weights(size, blend)
    acc = np.zeros((h, w), dtype=np.float32)
    norm = np.zeros((h, w), dtype=np.float32)
    limit = pixel_limit(pixel_threshold, size)
    ys, xs = window_starts(h, size, overlap), window_starts(w, size, overlap)
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h or pad_w:  # an image smaller than one window: pad it
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    windows = tissue_windows(image, ys, xs, size, saturation_threshold, limit)
    if keep is not None:
        windows = [(y, x) for y, x in windows if keep[y:y + size, x:x + size].any()]
    if box is not None:
        image = fill_outside(image, box)
    if progress is not None:
        progress.reset(total=len(windows))

    def add(chunk, probs):
        probs = np.multiply(probs, weights, dtype=np.float32)
        for (y, x), p in zip(chunk, probs):
            hh, ww = min(size, h - y), min(size, w - x)
            acc[y:y + hh, x:x + ww] += p[:hh, :ww]
            norm[y:y + hh, x:x + ww] += weights[:hh, :ww]
        if progress is not None:
            progress.update(len(chunk))

    # Each batch is blended on a helper thread while the model works on the next one, so a GPU
    # is not left waiting on numpy. The model stays on the calling thread (one set of torch
    # threads and allocator arenas for the whole run); one helper blends the batches in order,
    # so the sums are those of a sequential loop.
    with ExitStack() as stack:
        if helper is None:
            helper = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        blended = []
        for chunk in _batches(windows, batch_size):
            probs = predict(np.stack([image[y:y + size, x:x + size] for y, x in chunk]))
            blended.append(helper.submit(times.wrap("blend", add) if times is not None else add, chunk, probs))
            if len(blended) > 2:  # at most two batches wait: bounded memory, errors surface early
                blended.pop(0).result()
        for future in blended:
            future.result()
    start = time.perf_counter()
    np.divide(acc, norm, out=acc, where=norm > 0)
    if times is not None:
        times.add("blend", time.perf_counter() - start)
    return acc, len(windows)


def threshold_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    return (prob > threshold).astype(np.uint8)


def remove_small_objects(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected objects smaller than ``min_area`` pixels (of this mask's resolution)."""
    if min_area <= 0:
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, dtype=np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


UPSAMPLE_MODES = ("bilinear", "nearest")


def prob_to_rle(prob: np.ndarray, grid: TileGrid, threshold: float, upsample: str = "bilinear",
                strip_pixels: int = 1 << 24) -> Tuple[str, int]:
    """:func:`prob_to_runs` as ``(rle, foreground pixels)``."""
    runs = prob_to_runs(prob, grid, threshold, upsample, strip_pixels)
    return runs_to_rle(runs), rle_area(runs)


def prob_to_runs(prob: np.ndarray, grid: TileGrid, threshold: float, upsample: str = "bilinear",
                 strip_pixels: int = 1 << 24) -> np.ndarray:
    """Full-resolution runs (``utils.rle``) of ``upsampled prob > threshold``, built column strip by column
    strip: never the full-resolution mask nor the full-resolution probability map.

    ``prob`` is the padded low-res map of ``grid``. ``bilinear`` upsamples it by ``grid.reduce``
    as ``cv2.resize(prob, None, fx=r, fy=r, interpolation=cv2.INTER_LINEAR)`` of the whole map
    would (pixel centres aligned, edges replicated), then crops the padding; ``nearest`` makes
    each low-res pixel a ``reduce x reduce`` block. Strips (and, inside a strip, the rows) whose
    low-res neighbourhood is all at or below the threshold cost nothing: a bilinear value is a
    convex combination of its four neighbours. A strip holds at most ``strip_pixels`` pixels.
    """
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"TEST.UPSAMPLE must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    r, height, width = grid.reduce, grid.height, grid.width
    lr_w = prob.shape[1]
    margin = 1 if upsample == "bilinear" else 0
    # Work transposed: a strip of full-res columns is then a C-ordered (w, height) array, whose
    # flat order is the RLE's (column-major) order.
    prob_t = np.ascontiguousarray(prob.T, dtype=np.float32)
    encoder = RLEStripEncoder(height)
    strip_cols = max(1, min(width, strip_pixels // height))
    for x0 in range(0, width, strip_cols):
        x1 = min(width, x0 + strip_cols)
        px0, px1 = x0 + grid.pad_left, x1 + grid.pad_left  # padded full-res columns
        c0, c1 = max(0, px0 // r - margin), min(lr_w, (px1 - 1) // r + 1 + margin)
        above = prob_t[c0:c1] > threshold
        rows = np.flatnonzero(above.any(axis=0))
        if rows.size == 0:
            encoder.add_empty(x1 - x0)
            continue
        if rows.size == above.shape[1] and above.all():
            encoder.add_full(x1 - x0)
            continue
        a0, a1 = max(0, rows[0] - margin), min(above.shape[1], rows[-1] + 1 + margin)
        if upsample == "bilinear":
            block = prob_t[c0:c1, a0:a1]
            up = cv2.resize(block, ((a1 - a0) * r, (c1 - c0) * r), interpolation=cv2.INTER_LINEAR) > threshold
        else:
            up = np.repeat(np.repeat(above[:, a0:a1], r, axis=0), r, axis=1)
        y0, y1 = max(0, a0 * r - grid.pad_top), min(height, a1 * r - grid.pad_top)
        strip = np.zeros((x1 - x0, height), dtype=bool)
        off_x, off_y = px0 - c0 * r, grid.pad_top - a0 * r
        if y1 > y0:  # else the foreground lies in the padding only
            strip[:, y0:y1] = up[off_x:off_x + (x1 - x0), y0 + off_y:y1 + off_y]
        encoder.add(strip.T)
    return encoder.runs()


def mask_to_rle(mask_lr: np.ndarray, grid: TileGrid, strip_cols: int = 2048) -> Tuple[str, int]:
    """Full-resolution RLE of a padded low-res 0/1 mask, each pixel a ``reduce x reduce``
    block (:func:`prob_to_rle` with ``nearest``)."""
    return prob_to_rle(mask_lr.astype(np.float32), grid, 0.5, "nearest",
                       strip_pixels=max(1, strip_cols) * grid.height)


def torch_predictor(models: Sequence[torch.nn.Module], means, stds, device: torch.device, tta: bool = False):
    """A ``predict`` for :func:`predict_canvas`: the mean sigmoid of an ensemble (each model
    with its own normalisation), optionally averaged over horizontal/vertical flips."""
    import torch  # here only: the onnx backend runs without torch

    params = [(torch.tensor(m, device=device).view(1, 3, 1, 1) * 255, torch.tensor(s, device=device).view(1, 3, 1, 1) * 255)
              for m, s in zip(means, stds)]
    flips = [[], [3], [2]] if tta else [[]]

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        # (n, h, w, 3) uint8 viewed as NCHW is channels-last already: convolutions are faster so
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
        x = x.contiguous(memory_format=torch.channels_last)
        total = None
        for model, (mean, std) in zip(models, params):
            xn = (x - mean) / std
            for dims in flips:
                inp = torch.flip(xn, dims) if dims else xn
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    logits = model(inp)
                prob = torch.sigmoid(logits.float())
                prob = torch.flip(prob, dims) if dims else prob
                total = prob if total is None else total + prob
        return (total / (len(models) * len(flips)))[:, 0].cpu().numpy()

    return predict

