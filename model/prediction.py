"""``predict_slides(cfg)``: every slide of ``TEST.WSI_FOLDER`` with the checkpoint ensemble of
``TEST.MODEL_WEIGHTS_FOLDER`` -> an RLE CSV, pictures and (with labels) Dice, resumable.

Output in ``OUTPUT_DIR`` (CSV at ``TEST.OUTPUT_CSV`` when set)::

    submission.csv                 id,predicted (full-resolution Kaggle RLE; "" = empty)
    objects.csv                    one row per predicted object (TEST.MEASURE): centroid, area, equivalent
                                   diameter, perimeter, circularity, box, mean probability; um columns
                                   when the pixel size is known
    metrics.json                   per-slide summary (objects, tissue mm2, objects per mm2, median area,
                                   pixel size and its source, scale factor), with labels the pooled Dice
                                   and object precision / recall / F1
    dice.csv                       with labels (TEST.LABELS_CSV, TEST.ANNOTATIONS_FOLDER, pairs masks):
                                   per-item Dice and object-level scores
    config_test.yaml               the config of these outputs
    log.txt                        the log (appended)
    predictions/<id>.geojson       with TEST.MEASURE: QuPath annotations ("Glomerulus"), one per object,
                                   level-0 pixel coordinates, with its measurements
    predictions/<id>.seg.dcm       with TEST.DICOM_SEG, for DICOM WSI slides: the mask as a DICOM
                                   Segmentation referencing the slide (utils.dicom_seg)
    predictions/<id>_mask.png      the predicted mask at the model's scale (1/reduce)
    predictions/<id>_overlay.png   thumbnail with predicted (green) and true (red) contours, the
                                   objects numbered as in objects.csv (with TEST.MEASURE); the region
                                   of interest (blue)
    .predictions/<id>.json         per-item record (RLE, objects, settings): a rerun skips finished items

Objects are always the 8-connected components of the full-resolution mask (its runs): with
``TEST.MEASURE False`` the same objects are counted, but not measured, outlined or numbered.

Stages per item: read (:func:`_read`: open, choose the scale, the padded low-res image, the tissue
area), predict (:func:`_predict`: the probability map), post-process (:func:`_final_mask`,
:func:`_postprocess`: the mask, the full-resolution runs, the measured objects), write
(:func:`_pictures`, :func:`_write_item`: pictures, GeoJSON, the record).

Scale: each item is read at the checkpoints' physical scale (their tiles' um/px over the item's
pixel size from its metadata or TEST.MPP: any real factor, from the nearest pyramid level plus a
resize); when either pixel size is unknown, at the checkpoints' reduction, with a warning.

With ``TEST.PAIRS_FOLDER`` the items are the images of an image/mask pairs folder (laid out as
``DATASETS.PAIRS_FOLDER``, the DATASETS mask encoding applies, masks optional) instead of slides;
there ``TEST.LABELS_CSV``, when set, is a CSV whose ``id`` column picks the images.
``TEST.MODEL_WEIGHTS_FOLDER`` may also name a single checkpoint file.
"""
from __future__ import annotations

import ctypes
import datetime
import importlib.util
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np
from tqdm import tqdm
from yacs.config import CfgNode as CN

from data.qc import QC_COLUMNS, USABLE, drop_flagged, labels_on_grid, qc_slide
from data.qc import csv_row as qc_csv_row, summary as qc_summary, write_pictures as write_qc_pictures
from data.readers.dicom import is_dicom_slide, source_of
from data.stain import StainError, apply as stain_apply, slide_transform as stain_transform, stain_note
from data.stain import thumbnail_tissue as stain_tissue
from data.masks import RLEMask, mask_runs, slide_labels
from data.sources import IMAGE_EXTENSIONS, annotation_files, files_by_stem, load_pair_mask, read_labels_csv, select_ids, slide_entries
from data.tiling import TileGrid, mask_band
from data.readers import (SLIDE_EXTENSIONS, PixelSize, choose_mpp, same_scale, image_pixel_size, open_image_slide,
                      resolve_mpp)
from model.card import model_identity
from model.checkpoint import CheckpointError, load_checkpoint, model_files, model_from_loaded
from model.backend import Models, resolve_models
from model.onnx_backend import onnx_device, onnx_predictor
from model.inference import (lowres_image, predict_canvas, prob_to_runs, remove_small_objects, slide_box,
                             threshold_mask, torch_predictor)
from utils.dicom_seg import SEG_INSTALL, write_segmentation
from utils.distributed import local_rank, world_size
from utils.export import polygons_geojson
from utils.io import (atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_text, file_sha256,
                      file_stamp, read_json)
from utils.objects import (OBJECT_COLUMNS, Objects, count_objects, find_objects, match_objects, object_rows,
                           object_scores)
from utils.rle import (dice_from_counts, intersect_runs, parse_rle, rle_area, rle_encode, runs_intersection,
                       runs_to_rle)
from utils.setup import pause_point
from utils.shards import resolve_shard, shard_ids
from utils.timing import StageTimes, sum_stages

__all__ = ["load_checkpoints", "load_models", "log_file_name", "predict_slides", "list_slides", "ensemble_threshold", "integer_reduction",
           "slide_summary"]

logger = logging.getLogger(__name__)


def load_checkpoints(folder: str) -> Tuple[List[Dict[str, object]], List[str]]:
    """Every checkpoint in ``folder`` (or the one file ``folder`` names), loaded safely but not
    yet built, and its path. Checkpoints of one ensemble must agree on reduction and tile size.
    The default folder (the shipped model) is found inside the toolkit from any working folder."""
    paths = model_files(folder)
    ckpts = [load_checkpoint(path) for path in paths]
    _check_ensemble(ckpts, paths)
    return ckpts, paths


def load_models(cfg: CN) -> Models:
    """The models of ``TEST.MODEL_WEIGHTS_FOLDER`` and the backend that runs them
    (``model.backend``: checkpoints for torch, ONNX files with their cards for onnx, cached exports
    for auto on a CPU), checked to form one ensemble."""
    t = cfg.TEST
    models = resolve_models(t.MODEL_WEIGHTS_FOLDER, t.BACKEND, cfg.MODEL.DEVICE, t.ONNX_CACHE, export=not t.MERGE)
    _check_ensemble(models.infos, models.paths)
    return models


def _check_ensemble(ckpts: List[Dict[str, object]], paths: List[str]) -> None:
    first = ckpts[0]["input"]
    for path, ckpt in zip(paths, ckpts):
        if (ckpt["input"]["reduce"], ckpt["input"]["size"]) != (first["reduce"], first["size"]):
            raise CheckpointError(
                f"{path}: reduction {ckpt['input']['reduce']} / tile {ckpt['input']['size']} px, but "
                f"{paths[0]} has {first['reduce']} / {first['size']}: checkpoints of one ensemble "
                "must share scale and tile size"
            )


def _build(ckpt: Dict[str, object], path: str, device):
    import torch

    model = model_from_loaded(ckpt, path).to(device).eval()
    return model.to(memory_format=torch.channels_last)  # the tiles arrive channels-last: faster convs


def list_slides(folder: str) -> List[Tuple[str, str]]:
    """``(id, path)`` of every slide (file or DICOM folder) or plain image (PNG, JPEG, BMP) in
    ``folder``, sorted by id."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found (TEST.WSI_FOLDER)")
    found = slide_entries(folder, images=True)
    if not found:
        raise FileNotFoundError(f"{folder}: no slides ({', '.join(SLIDE_EXTENSIONS + IMAGE_EXTENSIONS)}, or DICOM "
                                "folders)")
    return found


def _overlay(image: np.ndarray, mask: np.ndarray, truth=None, max_side: int = 2048, roi=None) -> np.ndarray:
    """A thumbnail with the true (red) and predicted (green) contours, and the region of
    interest's (blue) when there is one."""
    scale = min(1.0, max_side / max(image.shape[:2]))
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    picture = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    for m, colour in ((roi, (0, 90, 255)), (truth, (255, 0, 0)), (mask, (0, 255, 0))):
        if m is None:
            continue
        small = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, colour, 2)
    return picture


def _write_png(path: str, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, data.tobytes())


class _Item(NamedTuple):
    """One slide or image to predict. ``open()`` gives its Slide; ``truth(shape)`` its true RLE
    (None: unlabelled) and ``roi(shape)`` the mask of its region of interest (None: the whole
    slide), both read only when needed (not on resume)."""

    id: str
    path: str
    open: Callable
    truth: Callable
    roi: Callable


def _nothing(shape) -> None:
    """No labels / no region of interest."""
    return None


def _pair_items(cfg: CN) -> List[_Item]:
    t, d = cfg.TEST, cfg.DATASETS
    image_dir, mask_dir = os.path.join(t.PAIRS_FOLDER, d.PAIRS_IMAGES), os.path.join(t.PAIRS_FOLDER, d.PAIRS_MASKS)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: folder not found (TEST.PAIRS_FOLDER / DATASETS.PAIRS_IMAGES)")
    images = files_by_stem(image_dir)
    masks = files_by_stem(mask_dir) if os.path.isdir(mask_dir) else {}
    if not images:
        raise FileNotFoundError(f"{image_dir}: no images")
    # pairs: TEST.LABELS_CSV's id column picks the images (e.g. a fold's held-out ones)
    images = {i: images[i] for i in select_ids(images, t.LABELS_CSV, image_dir, "TEST.LABELS_CSV")}

    def truth(mask_path, shape):
        if mask_path is None:
            return None
        return rle_encode(load_pair_mask(mask_path, d.MASK_CHANNEL, d.MASK_THRESHOLD, d.MASK_INVERT))

    channels, backend = tuple(cfg.INPUT.CHANNELS), cfg.INPUT.SLIDE_READER
    return [_Item(image_id, path, partial(open_image_slide, path, channels, backend),
                  partial(truth, masks.get(image_id)), _nothing)
            for image_id, path in sorted(images.items())]


def _unmatched(ids, labelled, source: str, folder: str, missing: str) -> None:
    """Warn about slides without labels (``missing``: what they lack) and labels without slides."""
    unlabelled = sorted(i for i in ids if i not in labelled)
    unused = sorted(i for i in labelled if i not in ids)
    if unlabelled:
        logger.warning("%s: %s for %d slide(s), not scored: %s", source, missing, len(unlabelled),
                       ", ".join(unlabelled[:10]))
    if unused:
        logger.warning("%s: %d id(s) without a slide in %s, ignored: %s", source, len(unused), folder,
                       ", ".join(unused[:10]))


def _items(cfg: CN) -> List[_Item]:
    """The slides (or pairs images) to predict; opening them and reading their labels wait
    until an item is predicted (not on resume)."""
    t, d = cfg.TEST, cfg.DATASETS
    if t.PAIRS_FOLDER:
        return _pair_items(cfg)
    slides = list_slides(t.WSI_FOLDER)
    ids = {slide_id for slide_id, _ in slides}
    truth, roi = {}, {}
    if t.LABELS_CSV:
        labels = read_labels_csv(t.LABELS_CSV, "TEST.LABELS_CSV")
        _unmatched(ids, labels, t.LABELS_CSV, t.WSI_FOLDER, "no row")
        truth = {i: (lambda shape, rle=rle: rle) for i, rle in labels.items()}
    elif t.ANNOTATIONS_FOLDER:
        if not os.path.isdir(t.ANNOTATIONS_FOLDER):
            raise FileNotFoundError(f"{t.ANNOTATIONS_FOLDER}: folder not found (TEST.ANNOTATIONS_FOLDER)")
        same = os.path.realpath(t.ANNOTATIONS_FOLDER) == os.path.realpath(t.WSI_FOLDER)
        files = annotation_files(t.ANNOTATIONS_FOLDER, same)
        _unmatched(ids, files, t.ANNOTATIONS_FOLDER, t.WSI_FOLDER, "no annotation file")
        read = lru_cache(maxsize=2)(partial(slide_labels, classes=tuple(d.ANNOTATION_CLASSES),
                                            exclude=tuple(d.ANNOTATION_EXCLUDE), roi=tuple(t.ROI)))
        truth = {i: (lambda shape, p=p: runs_to_rle(read(p, tuple(shape))[0])) for i, p in files.items()}
        roi = {i: (lambda shape, p=p: read(p, tuple(shape))[1]) for i, p in files.items()} if t.ROI else {}
    channels, backend = tuple(cfg.INPUT.CHANNELS), cfg.INPUT.SLIDE_READER
    return [_Item(slide_id, path, partial(open_image_slide, path, channels, backend),
                  truth.get(slide_id, _nothing), roi.get(slide_id, _nothing))
            for slide_id, path in slides]


@dataclass
class _Input:
    """An item read for prediction: its padded low-res image on the grid of the integer
    reduction ``grid.reduce`` and the real ``factor`` (level-0 px per model px) it is predicted at."""

    image: np.ndarray
    grid: TileGrid
    factor: float
    mpp: Optional[PixelSize]
    scale_note: str
    tissue_px: int  # level-0 pixels of tissue (the background test's saturation, per pixel)
    dicom_source: Optional[str] = None  # a DICOM slide's level-0 instance file
    roi: Optional[object] = None  # the region of interest (a data.masks mask), None: the whole slide
    roi_lr: Optional[np.ndarray] = None  # the ROI on the padded low-res grid (0/1 uint8, the image's shape)
    read_seconds: float = 0.0  # reading and decoding it (on the reader thread)
    qc: Optional[Dict[str, object]] = None  # with INPUT.QC: the slide's QC (data.qc.summary)
    qc_lr: Optional[np.ndarray] = None  # ... and its label map on the padded low-res grid
    stain: Optional[Dict[str, object]] = None  # the slide's own stain, fitted when the checkpoints normalise


def _scale(slide, ckpt_mpp: Optional[float], reduce: int, override: float) -> Tuple[float, Optional[PixelSize], str]:
    """``(factor, the slide's pixel size, how the scale was chosen)``: the checkpoints' physical
    scale when both pixel sizes are known, else their reduction."""
    mpp = resolve_mpp(slide, override, "TEST.MPP")
    if mpp is not None and ckpt_mpp:
        factor = ckpt_mpp / mpp.mpp
        return factor, mpp, (f"{mpp.mpp:.4g} um/px ({mpp.source}), read at 1/{factor:.4g} for the checkpoints' "
                             f"{ckpt_mpp:.4g} um/px")
    if not ckpt_mpp:
        why = "the checkpoints carry no pixel size"
    else:
        why = f"pixel size unknown ({slide.mpp_note}; TEST.MPP sets it)"
        logger.warning("%s: %s: read at the checkpoints' reduction %d, whatever its scale", slide.path, why, reduce)
    return float(reduce), mpp, f"read at the checkpoints' reduction {reduce} ({why})"


def integer_reduction(factor: float) -> int:
    """The integer reduction whose grid an item of real ``factor`` is read on: ``factor`` itself
    when it is one (:func:`same_scale`), else the next integer below (then resized by the rest)."""
    nearest = max(1, round(factor))
    if same_scale(factor, nearest):
        return nearest
    return max(1, math.floor(factor))


def _tissue_pixels(image: np.ndarray, grid: TileGrid, saturation_threshold: int, band: int = 512,
                   roi_lr: Optional[np.ndarray] = None) -> int:
    """Level-0 pixels of tissue: low-res pixels on the slide (and in ``roi_lr``, when given) whose
    HSV saturation exceeds the threshold (the tiler's per-pixel test), times ``reduce**2``; band by
    band (bounded memory)."""
    y0, y1, x0, x1 = slide_box(grid, whole=False)
    count = 0
    for top in range(y0, y1, band):
        part = np.ascontiguousarray(image[top:min(top + band, y1), x0:x1])
        tissue = (cv2.cvtColor(part, cv2.COLOR_RGB2HSV)[..., 1] > saturation_threshold).view(np.uint8)
        if roi_lr is not None:
            tissue &= roi_lr[top:min(top + band, y1), x0:x1]
        count += int(cv2.countNonZero(tissue))
    return count * grid.reduce ** 2


def grid_window(mask, grid: TileGrid) -> np.ndarray:
    """A level-0 mask on the padded low-res grid of ``grid`` (INTER_NEAREST by the reduction):
    ``(n_rows * size, n_cols * size)`` uint8, the shape of :func:`lowres_image`."""
    return mask.window((-grid.pad_top, grid.n_rows * grid.span - grid.pad_top),
                       (-grid.pad_left, grid.n_cols * grid.span - grid.pad_left), grid.reduce)


def _read(item: _Item, size: int, ckpt_mpp: Optional[float], reduce: int, cfg: CN,
          stain_target: Optional[Dict[str, object]] = None) -> _Input:
    """Stage 1: open the item, choose its scale, read it as the padded low-res image (and its
    region of interest, when it has one)."""
    start = time.perf_counter()
    with item.open() as slide:
        factor, mpp, note = _scale(slide, ckpt_mpp, reduce, cfg.TEST.MPP)
        height, width = slide.shape
        grid = TileGrid(height, width, size, integer_reduction(factor))
        image = lowres_image(slide, grid)
        dicom_source = source_of(slide)
        qc = quality_control(slide, mpp, grid, item.id, cfg) if cfg.INPUT.QC else None
    roi = item.roi((height, width))
    roi_lr = grid_window(roi, grid) if roi is not None else None
    transform = None
    if stain_target:  # the checkpoints' stain normalisation, fitted on this slide's tissue
        usable = qc[1] == USABLE if qc is not None else stain_tissue(image, cfg.TEST.S_TH)
        try:
            transform = _fit_stain(image, usable, stain_target, item.id)
            image = stain_apply(image, transform)
        except StainError as exc:  # (almost) no tissue: nothing the model could find either
            logger.warning("%s; predicted without normalisation (the record says so)", exc)
            transform = {"source": {"not_fitted": str(exc)}}
    if qc is None:
        tissue = _tissue_pixels(image, grid, cfg.TEST.S_TH, roi_lr=roi_lr)
    else:  # usable tissue only: QC's, not the saturation test's
        usable = qc[1] == USABLE
        tissue = int(np.count_nonzero(usable if roi_lr is None else usable & (roi_lr > 0))) * grid.reduce ** 2
    return _Input(image, grid, factor, mpp, note, tissue, dicom_source, roi, roi_lr, time.perf_counter() - start,
                  *(qc or (None, None)), transform["source"] if transform else None)


def _fit_stain(image: np.ndarray, tissue: np.ndarray, target: Dict[str, object], slide_id: str) -> Dict[str, object]:
    """A slide's stain transform, fitted on its low-res image (at most 2048 px a side) over ``tissue``."""
    scale = min(1.0, 2048 / max(image.shape[:2]))
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        tissue = cv2.resize(tissue.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return stain_transform(image, tissue, target, slide_id)


def ensemble_stain(ckpts: List[Dict[str, object]], paths: List[str]) -> Optional[Dict[str, object]]:
    """The stain normalisation the checkpoints were trained with (their tiles'), the same for all."""
    targets = [c["input"].get("stain") or None for c in ckpts]
    for path, target in zip(paths, targets):
        if target != targets[0]:
            raise CheckpointError(f"{path}: stain normalisation {stain_note([target])}, but {paths[0]} has "
                                  f"{stain_note([targets[0]])}: checkpoints of one ensemble must share it")
    return targets[0]


def quality_control(slide, mpp: Optional[PixelSize], grid: TileGrid, slide_id: str, cfg: CN):
    """``INPUT.QC``: the slide's QC (``data.qc``), its pictures in ``OUTPUT_DIR/qc/``, and its label
    map on the prediction grid."""
    result, thumbnail = qc_slide(slide, mpp.mpp if mpp else None, cfg.QC)
    write_qc_pictures(os.path.join(cfg.OUTPUT_DIR, "qc"), slide_id, result, thumbnail)
    return qc_summary(result), labels_on_grid(result.labels, result.downsample, grid)


def _predict(cfg: CN, item: _Input, predict, progress, helper, times: Optional[StageTimes] = None
             ) -> Tuple[np.ndarray, int]:
    """Stage 2: the probability map on ``item.grid`` (0 off the slide) and the windows run.
    At a real factor the image is resized to it, predicted, and the map resized back."""
    t, grid, image = cfg.TEST, item.grid, item.image
    size, box = grid.size, slide_box(grid)
    options = dict(overlap=t.OVERLAP, blend=t.BLEND, batch_size=t.IMS_PER_BATCH, saturation_threshold=t.S_TH,
                   pixel_threshold=t.P_TH, progress=progress, helper=helper, times=times)
    if same_scale(item.factor, grid.reduce):  # an integer: no resize
        prob, n_windows = predict_canvas(image, predict, size, box=box, keep=item.roi_lr, **options)
    else:
        h, w = image.shape[:2]
        scale = grid.reduce / item.factor
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        y0, y1, x0, x1 = box
        small_box = (math.ceil(y0 * sh / h), max(math.ceil(y0 * sh / h) + 1, math.floor(y1 * sh / h)),
                     math.ceil(x0 * sw / w), max(math.ceil(x0 * sw / w) + 1, math.floor(x1 * sw / w)))
        keep = None if item.roi_lr is None else cv2.resize(item.roi_lr, (sw, sh), interpolation=cv2.INTER_NEAREST)
        small_prob, n_windows = predict_canvas(small, predict, size, box=small_box, keep=keep, **options)
        del small
        prob = cv2.resize(small_prob, (w, h), interpolation=cv2.INTER_LINEAR)
    y0, y1, x0, x1 = slide_box(grid, whole=False)  # nothing is predicted off the slide
    prob[:y0] = 0
    prob[y1:] = 0
    prob[:, :x0] = 0
    prob[:, x1:] = 0
    if item.roi_lr is not None:  # nor outside the region of interest
        prob[item.roi_lr == 0] = 0
    return prob, n_windows


def min_area_px(min_area: int, min_area_um2: float, mpp: Optional[float], slide_id: str = "") -> float:
    """The smallest object kept, in level-0 pixels: the larger of ``TEST.MIN_AREA`` (px) and
    ``TEST.MIN_AREA_UM2`` converted with the slide's pixel size (ignored, with a warning, when
    the pixel size is unknown)."""
    area = float(min_area)
    if min_area_um2 > 0:
        if mpp:
            area = max(area, min_area_um2 / (mpp * mpp))
        else:
            logger.warning("%s: TEST.MIN_AREA_UM2 needs the pixel size (unknown; TEST.MPP sets it): not applied",
                           slide_id)
    return area


def _final_mask(cfg: CN, item: "_Input", prob: np.ndarray, threshold: float, slide_id: str = "") -> np.ndarray:
    """Stage 3a: the low-res mask; objects under ``TEST.MIN_AREA`` (px) / ``TEST.MIN_AREA_UM2``
    are removed from it and from ``prob`` (in place), so they stay out of the upsampled mask too."""
    grid = item.grid
    mask = threshold_mask(prob, threshold)
    smallest = min_area_px(cfg.TEST.MIN_AREA, cfg.TEST.MIN_AREA_UM2, item.mpp.mpp if item.mpp else None, slide_id)
    if smallest > 0:
        kept = remove_small_objects(mask, int(round(smallest / grid.reduce**2)))
        prob[mask > kept] = 0
        mask = kept
    return mask


# The GeoJSON outlines stay within this many level-0 px of the mask (Douglas-Peucker): read back as
# labels they give the mask at Dice >= 0.99 (tested); 2 px lost ~1-2 % on small objects.
GEOJSON_SIMPLIFY = 1.0


def _postprocess(cfg: CN, item: _Input, prob: np.ndarray, threshold: float, times: Optional[StageTimes] = None):
    """Stage 3b: the full-resolution runs of the mask and its measured objects (with
    ``TEST.MEASURE``; else None)."""
    grid = item.grid
    times = times or StageTimes()
    with times("threshold_rle"):
        runs = prob_to_runs(prob, grid, threshold, cfg.TEST.UPSAMPLE)
        if item.roi is not None:  # exactly inside the region of interest, at full resolution
            runs = intersect_runs(runs, mask_runs(item.roi))
    objects = None
    if cfg.TEST.MEASURE:
        with times("objects"):
            objects = find_objects(runs, (grid.height, grid.width), prob, (grid.pad_top, grid.pad_left), grid.reduce,
                                   simplify=GEOJSON_SIMPLIFY)
    return runs, objects


def slide_summary(n_objects: int, areas_px, tissue_px: int, mpp: Optional[float]) -> Dict[str, object]:
    """What a pathologist reads off a slide: object count, tissue area (mm2), objects per mm2
    of tissue, median object area (um2; px when the pixel size is unknown)."""
    median = float(np.median(areas_px)) if len(areas_px) else None
    summary = {"objects": int(n_objects), "tissue_px": int(tissue_px), "median_area_px": median,
               "mpp": mpp, "tissue_mm2": None, "objects_per_mm2": None, "median_area_um2": None}
    if mpp:
        tissue_mm2 = tissue_px * mpp * mpp / 1e6
        summary.update(tissue_mm2=round(tissue_mm2, 4),
                       objects_per_mm2=round(n_objects / tissue_mm2, 4) if tissue_mm2 > 0 else None,
                       median_area_um2=None if median is None else round(median * mpp * mpp, 2))
    return summary


def _geojson(slide_id: str, objects: Objects, rows: List[Dict[str, object]]) -> Dict[str, object]:
    """The objects as QuPath annotations, each with its measurements (QuPath's
    ``measurements`` map: they show in its measurement table)."""
    collection = polygons_geojson(objects.polygons)
    for feature, row in zip(collection["features"], rows):
        feature["properties"]["name"] = f"{slide_id} #{row['object']}"
        feature["properties"]["measurements"] = {
            name: row[key] for name, key in GEOJSON_MEASUREMENTS if row[key] != ""
        }
    return collection


# QuPath measurement names of the objects.csv columns.
GEOJSON_MEASUREMENTS = (("Object", "object"), ("Centroid X px", "x"), ("Centroid Y px", "y"),
                        ("Centroid X um", "x_um"), ("Centroid Y um", "y_um"), ("Area px", "area_px"),
                        ("Area um^2", "area_um2"), ("Equivalent diameter um", "diameter_um"),
                        ("Perimeter um", "perimeter_um"), ("Circularity", "circularity"),
                        ("Mean probability", "mean_prob"))


def _predict_one(cfg, slide_id, item: _Input, truth_rle, predict, out_dir, progress, helper,
                 threshold: float, identity: Tuple[str, str] = ("", "")) -> Dict[str, object]:
    """Stages 2-4 for one item; returns its record, with the seconds of each stage
    (``utils.timing.STAGES``) under ``seconds``."""
    grid = item.grid
    times = StageTimes()
    times.add("read", item.read_seconds)
    start = time.perf_counter()
    prob, n_windows = _predict(cfg, item, times.wrap("forward", predict), progress, helper, times)
    windows_s = time.perf_counter() - start
    dropped = drop_flagged(prob, item.qc_lr, threshold) if item.qc_lr is not None else None
    with times("threshold_rle"):
        mask = _final_mask(cfg, item, prob, threshold, slide_id)
    # the pictures are drawn while the RLE is encoded (and the objects measured)
    pictures = helper.submit(times.wrap("pictures", _pictures), slide_id, item.image, mask, grid, truth_rle, out_dir,
                             item.roi_lr)
    try:
        runs, objects = _postprocess(cfg, item, prob, threshold, times)
        del prob
    finally:
        wait([pictures])  # the pictures are finished (or failed) before anything else happens
    with times("write"):
        record = _write_item(slide_id, item, runs, objects, pictures.result(), n_windows, out_dir)
        if cfg.TEST.DICOM_SEG and item.dicom_source:
            seg_path = os.path.join(out_dir, "predictions", f"{slide_id}.seg.dcm")
            frames = write_segmentation(item.dicom_source, runs, (grid.height, grid.width), seg_path,
                                        model_name=identity[0], model_version=identity[1])
            record["dicom_seg"] = os.path.relpath(seg_path, out_dir)
            logger.info("%s: DICOM Segmentation %s (%d frames) of %s", slide_id, seg_path, frames,
                        item.dicom_source)
    if item.stain is not None:
        record["stain"] = item.stain
    if item.qc is not None:
        record["qc"] = {**item.qc, "objects_dropped": dropped}
        logger.info("%s: QC %s (%s); objects dropped on flagged regions: %s", slide_id, item.qc["verdict"],
                    item.qc["rule"], ", ".join(f"{k} {v}" for k, v in dropped.items()))
    wall = time.perf_counter() - start
    record["seconds"] = {"windows": round(windows_s, 3), "outputs": round(wall - windows_s, 3),
                         "wall": round(wall, 3), "stages": times.as_dict()}
    return record


def _write_item(slide_id, item: _Input, runs, objects: Optional[Objects], overlay, n_windows: int,
                out_dir: str) -> Dict[str, object]:
    """Stage 4: the GeoJSON with measurements and the numbered overlay (with ``objects``; without,
    TEST.MEASURE False, the same objects are only counted from the runs and the overlay is not
    numbered); returns the item's record (RLE, scale, objects table, summary)."""
    grid = item.grid
    mpp = item.mpp.mpp if item.mpp else None
    record = {"id": slide_id, "predicted": runs_to_rle(runs), "area": rle_area(runs), "windows": n_windows,
              "shape": [grid.height, grid.width], "factor": round(item.factor, 6), "scale": item.scale_note,
              "mpp": mpp, "mpp_source": item.mpp.source if item.mpp else None}
    if objects is None:
        record["objects"] = count_objects(runs, grid.height)
        record["summary"] = slide_summary(record["objects"], [], item.tissue_px, mpp)
        _write_png(os.path.join(out_dir, "predictions", f"{slide_id}_overlay.png"),
                   cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        return record
    rows = object_rows(slide_id, objects, mpp)
    atomic_write_text(os.path.join(out_dir, "predictions", f"{slide_id}.geojson"),
                      json.dumps(_geojson(slide_id, objects, rows)))
    _write_png(os.path.join(out_dir, "predictions", f"{slide_id}_overlay.png"),
               cv2.cvtColor(_number_objects(overlay, objects, grid), cv2.COLOR_RGB2BGR))
    record["objects"] = len(objects)
    record["object_table"] = [[row[c] for c in OBJECT_COLUMNS] for row in rows]
    record["summary"] = slide_summary(len(objects), objects.area, item.tissue_px, mpp)
    return record


def _pictures(slide_id, image, mask, grid, truth_rle, out_dir, roi_lr=None):
    """Stage 4 (pictures): ``predictions/<id>_mask.png``; returns the overlay (with the true
    contours when ``truth_rle`` is given), numbered and written once the objects are known
    (:func:`_write_item`)."""
    height, width = grid.height, grid.width
    truth_lr = None
    if truth_rle is not None:  # for the overlay; the Dice is computed when the outputs are assembled
        truth_mask = RLEMask(parse_rle(truth_rle, (height, width), slide_id), (height, width))
        truth_lr = np.concatenate([mask_band(truth_mask, grid, r) for r in range(grid.n_rows)])
    pictures = os.path.join(out_dir, "predictions")
    os.makedirs(pictures, exist_ok=True)
    y0, y1, x0, x1 = slide_box(grid)  # the pictures show the slide, not the grid's padding
    crop = (slice(y0, y1), slice(x0, x1))
    _write_png(os.path.join(pictures, f"{slide_id}_mask.png"), mask[crop] * 255)
    return _overlay(image[crop], mask[crop], None if truth_lr is None else truth_lr[crop],
                    roi=None if roi_lr is None else roi_lr[crop])


def _number_objects(overlay: np.ndarray, objects: Objects, grid: TileGrid) -> np.ndarray:
    """The overlay with each object's number (objects.csv's ``object``) at its centroid, for the
    objects at least 8 px across in the picture."""
    y0, y1, x0, x1 = slide_box(grid)
    scale = overlay.shape[1] / max(1, x1 - x0)  # picture px per low-res px
    for k in range(len(objects)):
        if 2 * math.sqrt(objects.area[k] / math.pi) / grid.reduce * scale < 8:
            continue
        x = int(((objects.cx[k] + grid.pad_left) / grid.reduce - x0) * scale)
        y = int(((objects.cy[k] + grid.pad_top) / grid.reduce - y0) * scale)
        text = str(k + 1)
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        origin = (x - w // 2, y + h // 2)
        cv2.putText(overlay, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(overlay, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
    return overlay


def _score(record: Dict[str, object], truth_rle: str) -> Dict[str, object]:
    """Dice and object-level counts of a prediction record against the true RLE, from the
    runs (no masks)."""
    shape = tuple(record["shape"])
    pred_runs = parse_rle(record["predicted"], shape, record["id"])
    true_runs = parse_rle(truth_rle, shape, record["id"])
    inter, total = runs_intersection(pred_runs, true_runs), rle_area(pred_runs) + rle_area(true_runs)
    counts = match_objects(pred_runs, true_runs, shape[0])
    return {"id": record["id"], "dice": dice_from_counts(inter, total), "intersection": inter, "total": total,
            "counts": counts, **object_scores([counts]), "count_error": counts["predicted"] - counts["true"]}


def _release_freed_memory() -> None:
    """Give the heap memory freed with a slide back to the system (glibc ``malloc_trim``):
    the next slide's buffers then start from a low-water mark, not from the arenas' leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _distributed() -> Tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` joins the (gloo) process group."""
    world = world_size()
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():  # a long slide must not trip the default 30 min barrier timeout
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), world


DEFAULT_THRESHOLD = 0.45  # the original toolkit's, for checkpoints that carry no threshold


def ensemble_threshold(th: float, ckpts: List[Dict[str, object]]) -> Tuple[float, str]:
    """The probability threshold of a run and where it comes from: ``TEST.TH`` when it is set
    (>= 0), else the mean of the thresholds the checkpoints learned in training."""
    if th >= 0:
        return float(th), "TEST.TH"
    learned = [float(c["threshold"]) for c in ckpts if isinstance(c.get("threshold"), (int, float))]
    if not learned:
        return DEFAULT_THRESHOLD, f"default {DEFAULT_THRESHOLD} (the checkpoints carry no threshold)"
    if len(learned) == 1:
        return learned[0], "learned in training by the checkpoint"
    mean = float(np.mean(learned))
    return mean, "mean of the thresholds learned in training by the checkpoints (" + \
        ", ".join(f"{v:.2f}" for v in learned) + ")"


def _settings(cfg: CN, paths: List[str], reduce: int, size: int, threshold: float) -> Dict[str, object]:
    t = cfg.TEST
    # checkpoints by content: one retrained into the same path is another model
    return {"checkpoints": [[os.path.abspath(p), file_sha256(p)] for p in paths], "reduce": reduce, "size": size,
            "overlap": t.OVERLAP, "blend": t.BLEND, "tta": t.TTA, "th": threshold, "min_area": t.MIN_AREA, "min_area_um2": t.MIN_AREA_UM2,
            "upsample": t.UPSAMPLE, "s_th": t.S_TH, "p_th": t.P_TH, "mpp": t.MPP, "measure": t.MEASURE,
            # (these two are absent at their defaults: records of earlier versions stay valid)
            **({"dicom_seg": True} if t.DICOM_SEG else {}),
            **({"backend": t.BACKEND} if t.BACKEND != "torch" else {}),
            **({"roi": [os.path.abspath(t.ANNOTATIONS_FOLDER), list(t.ROI)]} if t.ROI else {}),
            **({"qc": {k: cfg.QC[k] for k in sorted(cfg.QC)}} if cfg.INPUT.QC else {})}


def _finished(record_path: str, settings: Dict[str, object], source: str):
    """The saved record of an item predicted earlier with the same settings, else None."""
    if not os.path.isfile(record_path):
        return None
    record = read_json(record_path)
    if (record.get("settings") == settings and record.get("source") == os.path.abspath(source)
            and record.get("source_stamp") == _stamp(source)):
        return record
    return None


def _stamp(source: str) -> Optional[List[int]]:
    """The item's file stamp (size, mtime): a slide replaced under the same name is predicted again."""
    return file_stamp(source) if os.path.exists(source) else None


def _check_items(cfg: CN, items, shapes: Dict[str, tuple]) -> None:
    """Check every item before spending time on any: slides open and their pixel sizes are
    possible (pairs images that are read whole: their header's), every slide's labels parse."""
    t = cfg.TEST
    if t.DICOM_SEG:
        if importlib.util.find_spec("highdicom") is None:
            raise ValueError(f"TEST.DICOM_SEG needs highdicom: {SEG_INSTALL}")
        other = [item.id for item in items if not is_dicom_slide(item.path)]
        if other:
            logger.warning("TEST.DICOM_SEG: %d item(s) are not DICOM WSI and get no DICOM Segmentation: %s",
                           len(other), ", ".join(other[:10]))
    for item in items:
        if t.PAIRS_FOLDER and not item.path.lower().endswith(SLIDE_EXTENSIONS):
            if item.id not in shapes:
                choose_mpp(image_pixel_size(item.path)[0], item.path, t.MPP, "TEST.MPP")
            continue
        shape = shapes.get(item.id)
        if shape is None:
            with item.open() as slide:
                shape = slide.shape
                resolve_mpp(slide, t.MPP, "TEST.MPP")
        truth_rle = item.truth(shape) if not t.PAIRS_FOLDER else None  # pairs masks are read when scored
        if truth_rle is not None:
            parse_rle(truth_rle, shape, item.id)


def _checkpoint_mpp(ckpts: List[Dict[str, object]], paths: List[str]) -> Optional[float]:
    """The pixel size (um/px) of the checkpoints' tiles, when they all record it."""
    values = [c["input"].get("mpp") for c in ckpts]
    if not all(values):
        if any(values):
            logger.warning("Some checkpoints carry no pixel size: the ensemble reads at its reduction")
        else:
            logger.warning("The checkpoints carry no pixel size (trained before it was recorded, or on slides "
                           "without one): every item is read at their reduction %d, whatever its scale",
                           int(ckpts[0]["input"]["reduce"]))
        return None
    if not same_scale(max(values), min(values)):
        raise CheckpointError(f"{paths[int(np.argmax(values))]}: tiles of {max(values):g} um/px, but "
                              f"{paths[int(np.argmin(values))]} has {min(values):g}: checkpoints of one ensemble "
                              "must share their scale")
    return float(np.mean(values))


def _log_item(record: Dict[str, object], score: Optional[Dict[str, object]]) -> None:
    summary = record["summary"]
    parts = [f"{record['objects']} objects"]
    if summary.get("tissue_mm2") is not None:
        parts.append(f"{summary['tissue_mm2']:.2f} mm2 of tissue")
        if summary.get("objects_per_mm2") is not None:
            parts.append(f"{summary['objects_per_mm2']:.2f} per mm2")
    if summary.get("median_area_um2") is not None:
        parts.append(f"median area {summary['median_area_um2']:.0f} um2")
    elif summary.get("median_area_px") is not None:
        parts.append(f"median area {summary['median_area_px']:.0f} px")
    seconds = record["seconds"]
    parts.append(f"{record['windows']} windows ({seconds['windows']:.1f} s; outputs {seconds['outputs']:.1f} s)")
    if seconds.get("stages"):
        parts.append("seconds by stage: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds["stages"].items()))
    if score:
        parts.append(f"Dice {score['dice']:.4f}, objects F1 {score['object_f1']:.3f} "
                     f"({score['counts']['matched']} of {score['counts']['true']} true found)")
    logger.info("%s: %s", record["id"], ", ".join(parts))


def log_file_name(cfg: CN) -> str:
    """The run's log file in OUTPUT_DIR: ``log.txt``, or ``log_shard<k>.txt`` for shard k (the
    shards of an array job share OUTPUT_DIR)."""
    if cfg.TEST.MERGE:
        return "log.txt"
    shard, shards = resolve_shard(cfg.TEST.SHARDS, cfg.TEST.SHARD_INDEX)
    return "log.txt" if shards == 1 else f"log_shard{shard}.txt"


def _device(cfg: CN, world: int, backend: str):
    """The device of the run: torch's (``MODEL.DEVICE``; under torchrun this rank's GPU), or, for
    the onnx backend, its kind ("cpu" / "cuda"): torch is then never imported (measured: ~2 s of start-up
    and ~350 MB of peak memory less)."""
    name = cfg.MODEL.DEVICE
    if backend == "onnx":
        return onnx_device(name if cfg.TEST.BACKEND == "onnx" else "cpu")  # auto chose ONNX for a CPU
    import torch

    from model.build import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank())
    return device


def _predictor(cfg: CN, models: Models, device):
    """The ensemble's ``predict`` for the backend that runs it."""
    t, infos = cfg.TEST, models.infos
    means, stds = [c["input"]["mean"] for c in infos], [c["input"]["std"] for c in infos]
    if models.backend == "onnx":
        return onnx_predictor(models.run_paths, means, stds, tta=t.TTA, threads=t.ONNX_THREADS, device_type=device)
    built = [_build(ckpt, path, device) for ckpt, path in zip(infos, models.paths)]
    return torch_predictor(built, means, stds, device, tta=t.TTA)


def predict_slides(cfg: CN) -> Dict[str, object]:
    """Predict every slide (or pair image) of this process's share; returns the summary (rank 0
    under torchrun). With ``TEST.MERGE`` only assembles the outputs from the saved records."""
    start = time.time()
    t = cfg.TEST
    items = _items(cfg)
    models = load_models(cfg)
    ckpts, paths = models.infos, models.paths
    reduce, size = int(ckpts[0]["input"]["reduce"]), int(t.SIZE)
    ckpt_mpp = _checkpoint_mpp(ckpts, paths)
    threshold, threshold_source = ensemble_threshold(t.TH, ckpts)
    logger.info("Threshold %.3f: %s", threshold, threshold_source)
    stain_target = ensemble_stain(ckpts, paths)
    if stain_target:
        logger.info("Stain normalisation of every slide: %s (the checkpoints were trained on tiles normalised so)",
                    stain_note([stain_target]))
    settings = _settings(cfg, paths, reduce, size, threshold)
    out_dir = cfg.OUTPUT_DIR
    state = os.path.join(out_dir, ".predictions")
    csv_path = t.OUTPUT_CSV or os.path.join(out_dir, "submission.csv")
    if t.MERGE:
        records, scores = _collect(items, settings, state, {})
        logger.info("Merging the records of %d item(s) from %s", len(records), state)
        return _write_outputs(records, scores, csv_path, out_dir, start, cfg, (threshold, threshold_source))
    shard, shards = resolve_shard(t.SHARDS, t.SHARD_INDEX)
    rank, world = _distributed()
    device = _device(cfg, world, models.backend)
    logger.info("Backend %s: %s", models.backend, models.reason)
    kind = "image(s)" if t.PAIRS_FOLDER else "slide(s)"
    share = items
    if shards > 1:
        ids = set(shard_ids([(item.id, item.path) for item in items], shard, shards))
        share = [item for item in items if item.id in ids]
        logger.info("Shard %d of %d (0-based): %d of the %d %s", shard, shards, len(share), len(items), kind)
    shapes = {}  # one read of the earlier records: the items finished with these settings
    for item in share:
        record = _finished(os.path.join(state, f"{item.id}.json"), settings, item.path)
        if record is not None:
            shapes[item.id] = tuple(record["shape"])
    mine = [item for i, item in enumerate(share) if i % world == rank]  # torchrun: a share per rank
    todo = [item for item in mine if item.id not in shapes]
    for item in mine:
        if item.id in shapes:
            logger.info("%s: predicted earlier, skipped", item.id)
    _check_items(cfg, share, shapes)
    os.makedirs(state, exist_ok=True)
    scale = f"{ckpt_mpp:.4g} um/px (reduction {reduce} in training)" if ckpt_mpp else f"reduction {reduce}"
    logger.info("Predicting %d %s (%d done earlier%s) with %d %s model(s) at %s, %d px windows, "
                "overlap %.2f, threshold %.2f on %s", len(todo), kind, len(mine) - len(todo),
                f", rank {rank}/{world}" if world > 1 else "", len(ckpts), models.backend, scale, size, t.OVERLAP,
                threshold, device)
    fresh = {}  # the scores of the items predicted in this run, with this run's labels
    identity = model_identity(ckpts, paths)
    # one reader thread and one blending helper for the whole run (threads made per slide
    # would each leave a malloc arena behind: +85 MB peak over 3 slides, measured)
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as helper:
        # Slide reading (C code, outside the GIL) overlaps building the models, then each next
        # slide is read while the current one is predicted.
        queue = [reader.submit(_read, item, size, ckpt_mpp, reduce, cfg, stain_target) for item in todo[:1]]
        predict = _predictor(cfg, models, device) if todo else None
        del ckpts, models
        bar = tqdm(total=0, unit="window", dynamic_ncols=True, leave=False, position=rank)
        try:
            for n, (slide_id, path, _, truth, _) in enumerate(todo):
                item = queue.pop(0).result()
                if n + 1 < len(todo):
                    queue.append(reader.submit(_read, todo[n + 1], size, ckpt_mpp, reduce, cfg, stain_target))
                bar.set_description(f"[{n + 1}/{len(todo)}] {slide_id}")
                logger.info("%s: %s%s", slide_id, item.scale_note, "; inside its region of interest only"
                            if item.roi is not None else "")
                truth_rle = truth((item.grid.height, item.grid.width))
                record = _predict_one(cfg, slide_id, item, truth_rle, predict, out_dir, bar, helper, threshold,
                                      identity)
                del item
                _release_freed_memory()
                record["settings"] = settings
                record["source"] = os.path.abspath(path)
                record["source_stamp"] = _stamp(path)
                atomic_write_json(os.path.join(state, f"{slide_id}.json"), record)
                fresh[slide_id] = _score(record, truth_rle) if truth_rle is not None else None
                _log_item(record, fresh[slide_id])
                pause_point("test_net.item_done")
        finally:
            bar.close()
            for future in queue:
                future.cancel()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's records are saved
        if rank != 0:
            return {"slides": len(todo), "rank": rank}
    if shards > 1:
        return _shard_done(cfg, share, settings, state, shard, shards, start)
    records, scores = _collect(items, settings, state, fresh)
    return _write_outputs(records, scores, csv_path, out_dir, start, cfg, (threshold, threshold_source))


def _shard_done(cfg: CN, share, settings, state: str, shard: int, shards: int, start: float) -> Dict[str, object]:
    """A shard's summary, ``shards/shard_<k>_of_<n>.json`` (its items and objects; the outputs of the
    whole run come from ``TEST.MERGE True``)."""
    records = _saved_records(share, settings, state)
    summary = {"shard": shard, "shards": shards, "items": [item.id for item in share],
               "objects": int(sum(r["objects"] for r in records)), "seconds": round(time.time() - start, 1)}
    path = os.path.join(cfg.OUTPUT_DIR, "shards", f"shard_{shard}_of_{shards}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, summary)
    logger.info("Shard %d of %d done: %d item(s), %d objects -> %s. When every shard is done, assemble the outputs "
                "with the same command and TEST.MERGE True", shard, shards, len(share), summary["objects"], path)
    return summary


def _saved_records(items, settings: Dict[str, object], state: str) -> List[Dict[str, object]]:
    """The saved record of every item, predicted with ``settings``; one error names those without."""
    found = [_finished(os.path.join(state, f"{item.id}.json"), settings, item.path) for item in items]
    missing = [item.id for item, record in zip(items, found) if record is None]
    if missing:
        raise RuntimeError(
            f"{state}: no prediction record with these settings for {len(missing)} of {len(items)} item(s): "
            f"{', '.join(missing[:20])}{', ...' if len(missing) > 20 else ''} (a shard or rank not run, failed "
            "or unfinished, or run with other settings: rerun it, then merge again)")
    return found


def _collect(items, settings: Dict[str, object], state: str, fresh: Dict[str, Optional[Dict[str, object]]]):
    """Every item's saved record, and the scores of those with labels: ``fresh`` ones from this
    run, the others scored now with this run's labels (they may have changed)."""
    records, scores = [], []
    for (slide_id, path, _, truth, _), record in zip(items, _saved_records(items, settings, state)):
        records.append(record)
        if slide_id in fresh:
            score = fresh[slide_id]
        else:
            truth_rle = truth(tuple(record["shape"]))
            score = _score(record, truth_rle) if truth_rle is not None else None
        if score is not None:
            scores.append(score)
    return records, scores


DICE_COLUMNS = ["id", "dice", "true_objects", "predicted_objects", "matched_objects", "object_precision",
                "object_recall", "object_f1", "count_error"]


def _write_outputs(records: List[Dict[str, object]], scored: List[Dict[str, object]], csv_path: str, out_dir: str,
                   start: float, cfg: CN, threshold: Tuple[float, str]) -> Dict[str, object]:
    """The CSV (atomically), objects.csv, with labels dice.csv, then metrics.json and the
    config that made them (so a failed run leaves the earlier outputs and their config as they
    were). Every CSV goes through the csv module."""
    atomic_write_csv(csv_path, ["id", "predicted"], ([r["id"], r["predicted"]] for r in records))
    summary = {"slides": len(records), "seconds": round(time.time() - start, 1), "csv": csv_path,
               "objects": int(sum(r["objects"] for r in records)),
               "threshold": threshold[0], "threshold_source": threshold[1],
               "per_slide": {r["id"]: {**r.get("summary", {}), "mpp_source": r.get("mpp_source"),
                                       "factor": r.get("factor"), "seconds": r.get("seconds")} for r in records}}
    stages = sum_stages(r["seconds"]["stages"] for r in records if (r.get("seconds") or {}).get("stages"))
    if stages:  # where the time went, summed over the slides (stages on helper threads overlap)
        summary["seconds_by_stage"] = stages
        logger.info("Seconds by stage, all slides: %s (reading and blending overlap the forward passes)",
                    ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    qc = [r for r in records if r.get("qc")]
    if qc:  # INPUT.QC: qc.csv, and the objects dropped on flagged regions
        atomic_write_csv(os.path.join(out_dir, "qc.csv"), QC_COLUMNS, (qc_csv_row(r["id"], r["qc"]) for r in qc))
        summary["objects_dropped_by_qc"] = {k: int(sum(r["qc"]["objects_dropped"][k] for r in qc))
                                            for k in qc[0]["qc"]["objects_dropped"]}
        for r in qc:
            summary["per_slide"][r["id"]]["qc"] = r["qc"]
    if cfg.TEST.MEASURE:
        objects_csv = os.path.join(out_dir, "objects.csv")
        atomic_write_csv(objects_csv, OBJECT_COLUMNS, (row for r in records for row in r.get("object_table", [])))
        summary["objects_csv"] = objects_csv
    if scored:
        inter = sum(r["intersection"] for r in scored)
        total = sum(r["total"] for r in scored)
        pooled = object_scores([r["counts"] for r in scored])
        summary.update(overall_dice=dice_from_counts(inter, total),
                       mean_dice=float(np.mean([r["dice"] for r in scored])), scored=len(scored), **pooled,
                       true_objects=int(sum(r["counts"]["true"] for r in scored)),
                       matched_objects=int(sum(r["counts"]["matched"] for r in scored)))
        for r in scored:
            summary["per_slide"][r["id"]].update(
                dice=r["dice"], true_objects=r["counts"]["true"], matched_objects=r["counts"]["matched"],
                object_f1=r["object_f1"], count_error=r["count_error"])
        atomic_write_csv(os.path.join(out_dir, "dice.csv"), DICE_COLUMNS, (
            [r["id"], f"{r['dice']:.6f}", r["counts"]["true"], r["counts"]["predicted"], r["counts"]["matched"],
             f"{r['object_precision']:.4f}", f"{r['object_recall']:.4f}", f"{r['object_f1']:.4f}", r["count_error"]]
            for r in scored))
        logger.info("Dice: overall %.4f, mean per image/slide %.4f (%d scored) -> %s", summary["overall_dice"],
                    summary["mean_dice"], len(scored), os.path.join(out_dir, "dice.csv"))
        logger.info("Objects (IoU >= 0.5): precision %.3f, recall %.3f, F1 %.3f (%d of %d true objects found)",
                    pooled["object_precision"], pooled["object_recall"], pooled["object_f1"],
                    summary["matched_objects"], summary["true_objects"])
    atomic_write_json(os.path.join(out_dir, "metrics.json"), summary)
    atomic_write_text(os.path.join(out_dir, "config_test.yaml"), cfg.dump())
    logger.info("Done in %.1f s: %d images/slides, %d objects -> %s (objects.csv, metrics.json; GeoJSON, masks "
                "and overlays in %s)", summary["seconds"], len(records), summary["objects"], csv_path,
                os.path.join(out_dir, "predictions"))
    return summary
