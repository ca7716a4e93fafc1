"""``create_tiles(cfg)``: slides or image pairs -> PNG tile pairs + stats, resumable.

Output, inside ``DATASETS.TRAIN_FOLDER``, for tiles of ``S`` px at reduction ``R``::

    images_S_redR/<id>_<i>redR.png    RGB tiles
    masks_S_redR/<id>_<i>redR.png     0/1 single-channel masks
    stats_S_redR.json                 RGB mean/std (0..1) of the kept tiles, counts
    config_S_redR.yaml                the merged config of the run
    log.txt                           the log of every run (appended)
    .tiles_S_redR/                    settings + one record per finished slide (resume)

Every file is written atomically. A slide counts as done only when its record exists, so a
run killed at any point and started again ends with the same files as an uninterrupted run.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Deque, Dict, List, Optional, Tuple

import cv2
import numpy as np
from tqdm import tqdm
from yacs.config import CfgNode as CN

from data.annotations import Annotations, describe_classes, read_annotations
from data.readers.dicom import dicom_files
from data.masks import LabelRules, LabelSource, open_labels
from data.qc import CLASSES as QC_CLASSES, QC_COLUMNS, csv_row as qc_csv_row, qc_slide, summary as qc_summary, tile_flags
from data.qc import USABLE as QC_USABLE, write_pictures as write_qc_pictures
from data.stain import StainError, apply as stain_apply, fit_scale as stain_fit_scale, reference as stain_reference
from data.stain import slide_transform as stain_transform, thumbnail_tissue as stain_tissue
from data.sources import TileJob, annotation_jobs, pairs_jobs, source_views, wsi_jobs
from data.tile_store import TileLayout, TileStats, slide_tile_pattern, tile_name, variant
from data.tiling import TileGrid, iter_tile_rows, mask_band, pixel_limit, tile_panels, tissue_columns
from data.readers import (ArraySlide, PixelSize, ResampledSlide, Slide, SlideError, choose_mpp, decode_image, same_scale,
                      image_pixel_size, open_image_slide, open_slide, read_image)
from utils.io import atomic_write_bytes, atomic_write_csv, atomic_write_json, file_sha256, read_json
from utils.setup import pause_point, save_config

__all__ = ["TilerOutput", "create_tiles", "tile_slide", "tiles_variant", "stats_path"]

logger = logging.getLogger(__name__)


def tiles_variant(size: int, reduce: int) -> str:
    """The ``<size>_red<reduce>`` suffix of the tile folders (``data.tile_store``)."""
    return variant(size, reduce)


def stats_path(train_folder: str, size: int, reduce: int) -> str:
    return TileLayout(train_folder, size, reduce).stats


def _settings(cfg: CN) -> Dict[str, object]:
    """The config values that decide tile content; a folder holds tiles of one setting."""
    settings = {
        "DATASETS.FORMAT": cfg.DATASETS.FORMAT,
        "INPUT.SIZE_TRAIN": cfg.INPUT.SIZE_TRAIN,
        "INPUT.SIZE_REDUCTION_TRAIN": cfg.INPUT.SIZE_REDUCTION_TRAIN,
        "INPUT.SATURATION_THRESHOLD": cfg.INPUT.SATURATION_THRESHOLD,
        "INPUT.PIXEL_THRESHOLD": cfg.INPUT.PIXEL_THRESHOLD,
    }
    if cfg.INPUT.MPP_TRAIN > 0:  # only then: folders tiled before these keys existed stay valid
        settings["INPUT.MPP_TRAIN"] = cfg.INPUT.MPP_TRAIN
    # these count whenever they are not at their defaults (folders tiled at the defaults before
    # they counted stay valid): the pixel size the stats record (and checkpoints carry), the
    # channels read, the library that decodes the slides
    if cfg.INPUT.MPP_TRAIN > 0 or cfg.DATASETS.MPP:
        settings["DATASETS.MPP"] = cfg.DATASETS.MPP
    if cfg.INPUT.CHANNELS:
        settings["INPUT.CHANNELS"] = list(cfg.INPUT.CHANNELS)
    if cfg.INPUT.SLIDE_READER != "auto":
        settings["INPUT.SLIDE_READER"] = cfg.INPUT.SLIDE_READER
    if cfg.DATASETS.FORMAT == "pairs":
        settings.update(
            {
                "DATASETS.MASK_CHANNEL": cfg.DATASETS.MASK_CHANNEL,
                "DATASETS.MASK_THRESHOLD": cfg.DATASETS.MASK_THRESHOLD,
                "DATASETS.MASK_INVERT": cfg.DATASETS.MASK_INVERT,
            }
        )
    if cfg.DATASETS.FORMAT == "annotations":
        settings.update({f"DATASETS.{key}": list(cfg.DATASETS[key])
                         for key in ("ANNOTATION_CLASSES", "ANNOTATION_EXCLUDE", "ANNOTATION_ROI")})
    if cfg.INPUT.STAIN_NORM != "none":  # normalised tiles, to this reference (by content)
        settings["INPUT.STAIN_NORM"] = cfg.INPUT.STAIN_NORM
        reference = cfg.INPUT.STAIN_REFERENCE
        settings["INPUT.STAIN_REFERENCE"] = [reference, file_sha256(reference) if os.path.isfile(reference) else ""]
    if cfg.INPUT.QC:  # slide QC leaves flagged tiles out
        settings["INPUT.QC"] = True
        settings.update({f"QC.{key}": cfg.QC[key] for key in sorted(cfg.QC)})
    if cfg.DATASETS.SOURCES:  # each source's settings (its folders and keys): which tiles it makes
        settings["DATASETS.SOURCES"] = [dict(entry) for entry in cfg.DATASETS.SOURCES]
    return settings


def label_rules(cfg: CN) -> LabelRules:
    """The config's rules that turn label files into masks."""
    d = cfg.DATASETS
    return LabelRules(d.MASK_CHANNEL, d.MASK_THRESHOLD, d.MASK_INVERT, tuple(d.ANNOTATION_CLASSES),
                      tuple(d.ANNOTATION_EXCLUDE), tuple(d.ANNOTATION_ROI))


@dataclass
class SlideRecord:
    """What one finished slide contributed; saved as JSON for resume and stats."""

    id: str
    source: str
    fingerprint: str
    n_tiles: int = 0
    kept: List[int] = field(default_factory=list)
    pixel_sum: List[int] = field(default_factory=lambda: [0, 0, 0])
    pixel_sumsq: List[int] = field(default_factory=lambda: [0, 0, 0])
    n_pixels: int = 0
    mask_pixels: int = 0
    shape: List[int] = field(default_factory=list)  # (height, width) tiled (after resampling), level 0
    mpp: Optional[float] = None  # the slide's pixel size (um/px, level 0), when known
    mpp_source: str = ""
    resample: float = 1.0  # slide px per tiled level-0 px (INPUT.MPP_TRAIN)
    tile_mpp: Optional[float] = None  # the tiles' pixel size, when known
    labels: str = ""  # annotations: the shapes per class of the slide's file
    foreground_px: Optional[int] = None  # level-0 pixels of foreground (before resampling)
    roi_dropped: int = 0  # tissue tiles not written because they lie (mostly) outside the ROI
    roi: List[list] = field(default_factory=list)  # ROI shapes (rings of [x, y]) in the tiles' grid px
    source_name: str = ""  # its DATASETS.SOURCES entry ("": a single-source config)
    qc: Dict[str, object] = field(default_factory=dict)  # INPUT.QC: the slide's QC (data.qc.summary)
    qc_dropped: Dict[str, int] = field(default_factory=dict)  # tissue tiles not written, per QC reason
    stain: Dict[str, object] = field(default_factory=dict)  # INPUT.STAIN_NORM: the slide's transform (data.stain)


def _fingerprint(job: TileJob) -> str:
    """Changes when the input of a job changes (file size/mtime, RLE text)."""
    h = hashlib.sha1()
    paths = [p for p in dict.fromkeys((job.image_path, job.mask_path, job.annotation_path)) if p]
    files = [f for p in paths for f in (dicom_files(p) if os.path.isdir(p) else [p])]  # a DICOM folder: its instances
    for file in files:
        st = os.stat(file)
        h.update(f"{os.path.abspath(file)}|{st.st_size}|{st.st_mtime_ns}".encode())
    if job.rle is not None:
        h.update(job.rle.encode())
    return h.hexdigest()


class TilerOutput:
    """The tile folders of one ``<size>_red<reduce>`` variant and their resume state."""

    def __init__(self, train_folder: str, size: int, reduce: int, png_compression: int = 1):
        self.root = train_folder
        self.size, self.reduce = size, reduce
        layout = TileLayout(train_folder, size, reduce)  # the tile store's contract
        self.images, self.masks, self.state = layout.images, layout.masks, layout.state
        self.stats, self.config = layout.stats, layout.config
        # One fixed PNG filter + run-length deflate: 3x faster than libpng's per-row filter
        # search at the same or smaller size on tissue tiles (pixels are lossless either way).
        self._png = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression),
                     cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG,
                     cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        self._png_mask = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression),
                          cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
                          cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]

    # --- preparation -----------------------------------------------------------------
    def prepare(self, settings: Dict[str, object], overwrite: bool) -> None:
        """Create the folders; refuse tiles made with other settings unless ``overwrite``.

        With ``overwrite`` the earlier tiles of this variant are removed and everything is
        redone; without it, slides finished by an earlier run with the same settings are kept
        (resume)."""
        settings_file = os.path.join(self.state, "settings.json")
        existing = None
        if os.path.isfile(settings_file):
            existing = read_json(settings_file)
        elif any(os.listdir(d) for d in (self.images, self.masks) if os.path.isdir(d)):
            existing = "unknown"
        if existing is not None and (existing != settings or overwrite):
            if not overwrite:
                if existing == "unknown":
                    why = "holds tiles from another tool or run"
                else:
                    diff = [
                        f"{k} {existing.get(k)!r} -> {v!r}"
                        for k, v in settings.items()
                        if existing.get(k) != v
                    ]
                    why = "was made with other settings (" + ", ".join(diff) + ")"
                raise FileExistsError(
                    f"{self.images} {why}; set OVERWRITE True to replace it, or choose another "
                    "DATASETS.TRAIN_FOLDER"
                )
            logger.warning("OVERWRITE: removing earlier tiles in %s and %s", self.images, self.masks)
            for folder in (self.images, self.masks, self.state):
                shutil.rmtree(folder, ignore_errors=True)
            if os.path.exists(self.stats):
                os.remove(self.stats)
        for folder in (self.images, self.masks, self.state):
            os.makedirs(folder, exist_ok=True)
        for folder in (self.images, self.masks, self.state):
            for leftover in glob.glob(os.path.join(folder, ".tmp-*")):
                os.remove(leftover)  # from an interrupted write
        atomic_write_json(settings_file, settings)

    def rollback_if_empty(self) -> None:
        """After a failed run: if no slide was ever finished here, leave no trace."""
        if os.path.isdir(self.state) and any(
            n.endswith(".json") and n != "settings.json" for n in os.listdir(self.state)
        ):
            return
        for folder in (self.images, self.masks, self.state):
            if os.path.isdir(folder) and not [n for n in os.listdir(folder) if n != "settings.json"]:
                shutil.rmtree(folder)
        for path in (self.config, self.stats):
            if os.path.exists(path):
                os.remove(path)

    # --- records ---------------------------------------------------------------------
    def _record_path(self, slide_id: str) -> str:
        return os.path.join(self.state, f"{slide_id}.json")

    def done(self, job: TileJob, fingerprint: str) -> Optional[SlideRecord]:
        path = self._record_path(job.id)
        if not os.path.isfile(path):
            return None
        try:
            saved = read_json(path)
            record = SlideRecord(**saved)
        except (ValueError, TypeError):
            return None
        # a record without the slide's shape or pixel size is from an older tiler: redo it
        # (training needs the grid, the checkpoints the scale)
        current = len(record.shape) == 2 and "tile_mpp" in saved
        return record if record.fingerprint == fingerprint and current else None

    def save_record(self, record: SlideRecord) -> None:
        self.remove_stale(record.id, set(record.kept))
        atomic_write_json(self._record_path(record.id), record.__dict__)

    def remove_stale(self, slide_id: str, keep: set) -> None:
        """Delete tiles of ``slide_id`` that are not in ``keep`` (earlier runs, other input)."""
        pattern = slide_tile_pattern(slide_id, self.reduce)
        for folder in (self.images, self.masks):
            for name in os.listdir(folder):
                match = pattern.match(name)
                if match and int(match.group(1)) not in keep:
                    os.remove(os.path.join(folder, name))

    # --- writing ---------------------------------------------------------------------
    def write_pair(self, name: str, image: np.ndarray, mask: np.ndarray) -> None:
        ok_i, png_i = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR), self._png)
        ok_m, png_m = cv2.imencode(".png", np.ascontiguousarray(mask), self._png_mask)
        if not (ok_i and ok_m):
            raise OSError(f"{name}: PNG encoding failed")
        atomic_write_bytes(os.path.join(self.images, name), png_i.tobytes())
        atomic_write_bytes(os.path.join(self.masks, name), png_m.tobytes())


class _Writer:
    """PNG encoding and writing on a thread pool, with a bounded number of tiles in flight."""

    def __init__(self, output: TilerOutput, workers: int):
        self.output = output
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self.pending: Deque[Future] = deque()
        self.limit = 8 * workers

    def submit(self, name: str, image: np.ndarray, mask: np.ndarray) -> None:
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self.output.write_pair, name, image, mask))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


def tile_slide(
    slide: Slide,
    mask,
    grid: TileGrid,
    saturation_threshold: int,
    pixel_threshold: int,
    record: SlideRecord,
    writer: Optional[_Writer] = None,
    progress: Optional[tqdm] = None,
    roi=None,
    flags: Optional[np.ndarray] = None,
    normalise=None,
) -> SlideRecord:
    """Tile one slide into ``writer``; fill ``record`` with kept indices and pixel sums. With
    ``roi`` (a mask of the region of interest), only tiles at least half inside it are kept; with
    ``flags`` (``data.qc.tile_flags``: a QC class per tile, 0 = usable), tiles QC flags are not
    written, and ``record.qc_dropped`` counts them per reason; ``normalise`` (a function of an RGB
    tile: the slide's stain normalisation) is applied to every tile written."""
    size, limit = grid.size, pixel_limit(pixel_threshold, grid.size)
    # Per-channel histograms give exact integer sums and sums of squares, independent of
    # the order tiles are visited in (so a resumed run has identical stats).
    histogram = np.zeros((3, 256), dtype=np.int64)
    record.n_tiles = grid.n_tiles
    panels = tile_panels(slide, grid)  # column panels: memory flat in the slide's width
    if progress is not None and len(panels) > 1:
        progress.reset(total=grid.n_rows * len(panels))
    for c0, c1 in panels:
        for tile_row, band in iter_tile_rows(slide, grid, (c0, c1)):
            keep = np.flatnonzero(tissue_columns(band, size, saturation_threshold, limit))
            if roi is not None and keep.size:
                inside = mask_band(roi, grid, tile_row, (c0, c1)).reshape(size, -1, size).mean(axis=(0, 2)) >= 0.5
                record.roi_dropped += int((~inside[keep]).sum())
                keep = keep[inside[keep]]
            if flags is not None and keep.size:
                reasons = flags[tile_row, c0 + keep]
                for cls in np.unique(reasons[reasons > 0]).tolist():
                    name = QC_CLASSES[cls]
                    record.qc_dropped[name] = record.qc_dropped.get(name, 0) + int((reasons == cls).sum())
                keep = keep[reasons == 0]
            masks = mask_band(mask, grid, tile_row, (c0, c1)) if keep.size else None
            for col in keep.tolist():
                tile = np.ascontiguousarray(band[:, col * size:(col + 1) * size])
                if normalise is not None:
                    tile = normalise(tile)
                tile_mask = np.ascontiguousarray(masks[:, col * size:(col + 1) * size])
                index = tile_row * grid.n_cols + c0 + col
                for channel in range(3):
                    counts = cv2.calcHist([tile], [channel], None, [256], [0, 256])
                    histogram[channel] += counts[:, 0].astype(np.int64)
                record.kept.append(index)
                record.mask_pixels += int(tile_mask.sum(dtype=np.int64))
                if writer is not None:
                    writer.submit(tile_name(record.id, index, grid.reduce), tile, tile_mask)
            if progress is not None:
                progress.update(1)
            pause_point("tiler.tile_row")
    record.kept.sort()
    values = np.arange(256, dtype=np.int64)
    record.pixel_sum = (histogram @ values).tolist()
    record.pixel_sumsq = (histogram @ (values * values)).tolist()
    record.n_pixels = len(record.kept) * size * size
    return record


def _pixel_size(job: TileJob, cfg: CN, slide: Optional[Slide] = None) -> Optional[PixelSize]:
    """The pixel size of a job's image (DATASETS.MPP, else its metadata: the open ``slide``'s,
    or the image header's), checked."""
    found = slide.pixel_size if slide is not None else image_pixel_size(job.image_path)[0]
    return choose_mpp(found, job.image_path, cfg.DATASETS.MPP, "DATASETS.MPP")


def _resample_factor(job: TileJob, cfg: CN, mpp: Optional[PixelSize], note: str) -> float:
    """Slide px per tiled px: 1, or with INPUT.MPP_TRAIN what brings the slide to
    ``MPP_TRAIN / SIZE_REDUCTION_TRAIN`` um/px (an error when its pixel size is unknown)."""
    if cfg.INPUT.MPP_TRAIN <= 0:
        return 1.0
    if mpp is None:
        raise SlideError(f"{job.image_path}: pixel size unknown ({note}); INPUT.MPP_TRAIN needs it: set "
                         "DATASETS.MPP")
    factor = cfg.INPUT.MPP_TRAIN / cfg.INPUT.SIZE_REDUCTION_TRAIN / mpp.mpp
    return 1.0 if same_scale(factor, 1.0) else factor


def _open_image(job: TileJob, cfg: CN, workers: int, annotations: Optional[Annotations]) -> Slide:
    """The job's slide or image: a slide through the slide readers; a pairs image read whole (with
    its header's pixel size); an annotations job's slide or plain image (or the image its labelme
    file embeds)."""
    if job.rle is not None:
        return open_slide(job.image_path, workers=workers, channels=tuple(cfg.INPUT.CHANNELS),
                          backend=cfg.INPUT.SLIDE_READER)
    if job.embedded_image:
        slide = ArraySlide(decode_image(annotations.image_data, job.annotation_path), job.annotation_path)
        slide.mpp_note = "an image embedded in its labelme file: no pixel size"
        return slide
    if job.annotation_path is not None:
        return open_image_slide(job.image_path, tuple(cfg.INPUT.CHANNELS), cfg.INPUT.SLIDE_READER)
    slide = ArraySlide(read_image(job.image_path), job.image_path)
    slide.pixel_size, slide.mpp_note = image_pixel_size(job.image_path)
    return slide


def _open_job(job: TileJob, cfg: CN, workers: int, annotations: Optional[Annotations] = None
              ) -> Tuple[Slide, LabelSource, Optional[PixelSize], float]:
    """The job's slide and labels (resampled when INPUT.MPP_TRAIN asks), its pixel size and the
    resampling factor. Every label source answers through the same mask interface."""
    slide = _open_image(job, cfg, workers, annotations)
    try:
        labels = open_labels(job, slide.shape, label_rules(cfg), annotations)
        labels.area = labels.foreground_px()
        mpp = _pixel_size(job, cfg, slide)
        factor = _resample_factor(job, cfg, mpp, slide.mpp_note)
    except BaseException:
        slide.close()
        raise
    if factor != 1.0:
        slide = ResampledSlide(slide, factor)
        labels = labels.resampled(factor, slide.shape)
    return slide, labels, mpp, factor


def _roi_on_grid(labels: LabelSource, factor: float, grid: TileGrid) -> List[list]:
    """The ROI's shapes as rings of ``[x, y]`` in the tiles' grid pixels (the padded slide
    downscaled by the reduction), for the random crops of training."""
    def ring(points: np.ndarray) -> list:
        x = (points[:, 0] / factor + grid.pad_left) / grid.reduce
        y = (points[:, 1] / factor + grid.pad_top) / grid.reduce
        return np.round(np.stack((x, y), axis=1), 3).tolist()

    return [[ring(s.exterior)] + [ring(h) for h in s.holes] for s in labels.roi_shapes]


def _jobs(cfg: CN) -> List[Tuple[TileJob, CN]]:
    """Every job with the config of its source (DATASETS.SOURCES: one view per entry)."""
    out, seen = [], {}
    for name, _, view in source_views(cfg):
        d = view.DATASETS
        if d.FORMAT == "pairs":
            jobs = pairs_jobs(d.PAIRS_FOLDER, d.PAIRS_IMAGES, d.PAIRS_MASKS, d.LABELS_CSV)
        elif d.FORMAT == "annotations":
            jobs = annotation_jobs(d.WSI_FOLDER, d.ANNOTATIONS_FOLDER)
        else:
            jobs = wsi_jobs(d.WSI_FOLDER, d.LABELS_CSV)
        for job in jobs:
            if job.id in seen:
                raise ValueError(f"image id {job.id!r} is in two sources ({seen[job.id] or 'the config'} and {name}): "
                                 "tile names must be unique; rename one of the files")
            seen[job.id] = name
            out.append((replace(job, source=name), view))
    return out


def _check_annotations(job: TileJob, annotations: Annotations, labels: LabelSource, shape) -> None:
    """What an annotation file says about its slide: its notes, shapes past the slide (clipped,
    a warning), no shapes at all (an empty mask, a warning), a labelme image size that is not the
    slide's (an error)."""
    path = job.annotation_path
    for note in annotations.notes:
        logger.info("%s: %s", path, note)
    if annotations.image_size is not None and tuple(annotations.image_size) != tuple(shape):
        (h, w), (sh, sw) = annotations.image_size, shape
        raise SlideError(f"{path}: labelme says its image is {w} x {h} but {job.image_path} is {sw} x {sh} (W x H)")
    if not annotations.shapes and not annotations.is_raster:
        logger.warning("%s: no shapes: a slide without foreground (an empty mask)", path)
    elif not labels.used:
        logger.warning("%s: no foreground shapes (%s): an empty mask", path, describe_classes(labels.counts))
    if labels.outside:
        logger.warning("%s: %d shape(s) reach past the %d x %d slide: clipped to it", path, labels.outside,
                       shape[1], shape[0])


def _validate(jobs: List[Tuple[TileJob, CN]], workers: int) -> Dict[str, Annotations]:
    """Check every input before writing anything: slides open and their RLE parses or their
    annotation file reads (classes, sizes); pair images and masks are readable images of the
    same size (headers only). Returns the annotation files read, by path."""
    from PIL import Image, UnidentifiedImageError

    read: Dict[str, Annotations] = {}
    for job, cfg in jobs:
        if job.mask_path is None:
            annotations = None
            if job.annotation_path is not None:
                annotations = read[job.annotation_path] = read_annotations(job.annotation_path)
            with _open_image(job, cfg, workers, annotations) as slide:
                labels = open_labels(job, slide.shape, label_rules(cfg), annotations)
                if annotations is not None:
                    _check_annotations(job, annotations, labels, slide.shape)
                _resample_factor(job, cfg, _pixel_size(job, cfg, slide), slide.mpp_note)
            continue
        _resample_factor(job, cfg, _pixel_size(job, cfg), "no pixel size in its header")
        sizes = []
        for path in (job.image_path, job.mask_path):
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except (UnidentifiedImageError, OSError) as exc:
                raise SlideError(f"{path}: not a readable image ({exc})") from None
        if sizes[0] != sizes[1]:
            raise SlideError(
                f"{job.mask_path}: mask is {sizes[1][0]} x {sizes[1][1]} but image "
                f"{job.image_path} is {sizes[0][0]} x {sizes[0][1]} (W x H)"
            )
    return read


def _stats(records: List[SlideRecord], size: int, reduce: int, weights: Optional[Dict[str, float]] = None
           ) -> Dict[str, object]:
    n = sum(r.n_pixels for r in records)
    total = np.sum([r.pixel_sum for r in records], axis=0, dtype=np.float64)
    total_sq = np.sum([r.pixel_sumsq for r in records], axis=0, dtype=np.float64)
    if n:
        mean = total / n / 255.0
        std = np.sqrt(np.maximum(total_sq / n / 255.0**2 - mean**2, 0.0))
    else:
        mean = std = np.full(3, float("nan"))
    return {
        "size": size,
        "reduce": reduce,
        "mean": [round(float(v), 8) for v in mean],
        "std": [round(float(v), 8) for v in std],
        "n_slides": len(records),
        "n_tiles": int(sum(len(r.kept) for r in records)),
        "n_grid_tiles": int(sum(r.n_tiles for r in records)),
        "mask_fraction": round(float(sum(r.mask_pixels for r in records) / n), 8) if n else 0.0,
        "tile_mpp": _common_tile_mpp(records),
        "slides": {r.id: {"kept": len(r.kept), "tiles": r.n_tiles, "shape": list(r.shape), "mpp": r.mpp,
                          "mpp_source": r.mpp_source, "resample": r.resample, "tile_mpp": r.tile_mpp,
                          "foreground_px": r.foreground_px,
                          **({"labels": r.labels} if r.labels else {}),
                          **({"source": r.source_name} if r.source_name else {}),
                          **({"roi": r.roi, "roi_dropped": r.roi_dropped} if r.roi else {}),
                          **({"stain_source": r.stain["source"]} if r.stain else {}),
                          **({"qc": {"verdict": r.qc["verdict"], "rule": r.qc["rule"],
                                     "flagged_fraction": r.qc["flagged_fraction"],
                                     "tiles_dropped": dict(sorted(r.qc_dropped.items()))}} if r.qc else {})}
                   for r in records},
        **({"qc_tiles_dropped": _qc_dropped(records)} if any(r.qc for r in records) else {}),
        **({"sources": _source_stats(records, weights)} if weights else {}),
    }


def _qc_dropped(records: List[SlideRecord]) -> Dict[str, int]:
    """Tissue tiles not written because QC flags them, per reason, over every slide."""
    total: Dict[str, int] = {}
    for r in records:
        for reason, n in r.qc_dropped.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


def _source_stats(records: List[SlideRecord], weights: Dict[str, float]) -> Dict[str, object]:
    """Per source: its slides/images, kept tiles, mask fraction and sampling weight."""
    out = {}
    for name, weight in weights.items():
        mine = [r for r in records if r.source_name == name]
        pixels = sum(r.n_pixels for r in mine)
        out[name] = {"slides": len(mine), "tiles": int(sum(len(r.kept) for r in mine)), "weight": weight,
                     "mask_fraction": round(sum(r.mask_pixels for r in mine) / pixels, 8) if pixels else 0.0,
                     "tile_mpp": sorted({r.tile_mpp for r in mine if r.tile_mpp})}
    return out


def _common_tile_mpp(records: List[SlideRecord]) -> Optional[float]:
    """The tiles' pixel size (um/px) when every slide's is known and they agree (:func:`same_scale`)
    (it reaches the checkpoints); else None, with a warning saying why."""
    values = [r.tile_mpp for r in records]
    if not values:
        return None
    if not all(values):
        missing = [r.id for r in records if not r.tile_mpp]
        if len(missing) < len(records):
            logger.warning("Pixel size unknown for %d of %d slides (%s): the tiles' scale is not recorded; set "
                           "DATASETS.MPP, or INPUT.MPP_TRAIN to tile at one physical scale", len(missing),
                           len(records), ", ".join(missing[:5]))
        return None
    if not same_scale(max(values), min(values)):
        logger.warning("The tiles' pixel sizes differ (%.4g to %.4g um/px): set INPUT.MPP_TRAIN to tile every "
                       "slide at one physical scale; the scale is not recorded", min(values), max(values))
        return None
    return round(float(np.mean(values)), 6)


def _tile_job(job: TileJob, cfg: CN, output: TilerOutput, writer: _Writer, workers: int,
              fingerprint: str, label: str, annotations: Optional[Annotations] = None,
              target: Optional[Dict[str, object]] = None) -> SlideRecord:
    """Tile one job; on any failure its tiles written so far are removed."""
    size, reduce = cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN
    slide, labels, mpp, factor = _open_job(job, cfg, workers, annotations)
    record = SlideRecord(job.id, os.path.abspath(job.image_path), fingerprint, source_name=job.source)
    if mpp is not None:
        record.mpp, record.mpp_source = round(mpp.mpp, 6), mpp.source
        record.tile_mpp = round(mpp.mpp * factor * reduce, 6)
    record.resample = round(factor, 6)
    record.labels = describe_classes(labels.counts) if job.annotation_path else ""
    record.foreground_px = labels.area
    with slide:
        record.shape = [int(v) for v in slide.shape]
        grid = TileGrid(*slide.shape, size, reduce)
        record.roi = _roi_on_grid(labels, factor, grid)
        qc = _quality_control(slide, mpp, factor, grid, record, cfg) if cfg.INPUT.QC else None
        flags = qc[0] if qc else None
        normalise = None
        skip = qc is not None and record.qc.get("rule") == "no tissue found"
        if skip:
            logger.warning("%s: QC found no tissue: no tiles written (a 'fail' row in qc.csv)", job.id)
        elif target:
            try:
                record.stain = _stain_transform(slide, mpp, factor, qc, target, job.id)
            except StainError as exc:  # a near-white slide: nothing to normalise, nothing to learn from
                logger.warning("%s; no tiles written for it", exc)
                skip = True
            normalise = partial(stain_apply, transform=record.stain) if record.stain else None
        bar = tqdm(total=grid.n_rows, desc=label, unit="row", leave=False, dynamic_ncols=True)
        try:
            if skip:
                record.n_tiles = grid.n_tiles
            else:
                tile_slide(slide, labels.mask, grid, cfg.INPUT.SATURATION_THRESHOLD,
                           cfg.INPUT.PIXEL_THRESHOLD, record, writer, bar, labels.roi, flags, normalise)
            writer.drain()
        except BaseException:
            writer.close()
            output.remove_stale(job.id, set())  # no half-written slide
            raise
        finally:
            bar.close()
        description = slide.describe()
    output.save_record(record)
    logger.info("%s%s: %s -> %d of %d tiles kept%s", job.id, f" ({job.source})" if job.source else "", description,
                len(record.kept), record.n_tiles, _label_note(record, job))
    pause_point("tiler.slide_done")
    return record


def _quality_control(slide: Slide, mpp: Optional[PixelSize], factor: float, grid: TileGrid, record: SlideRecord,
                     cfg: CN) -> np.ndarray:
    """``INPUT.QC``: the slide's QC (``data.qc``; its pictures in ``TRAIN_FOLDER/qc/``), saved in
    its record; returns the QC class of every tile of ``grid``, the QC thumbnail and its usable
    tissue."""
    result, thumbnail = qc_slide(slide, mpp.mpp * factor if mpp else None, cfg.QC)
    write_qc_pictures(os.path.join(cfg.DATASETS.TRAIN_FOLDER, "qc"), record.id, result, thumbnail)
    record.qc = qc_summary(result)
    return tile_flags(result.labels, result.downsample, grid), thumbnail, result.labels == QC_USABLE


def _stain_transform(slide: Slide, mpp: Optional[PixelSize], factor: float, qc, target: Dict[str, object],
                     slide_id: str) -> Dict[str, object]:
    """The slide's stain transform (``data.stain``), fitted on its tissue: QC's usable tissue when
    QC ran (on its thumbnail), else the saturated pixels of a thumbnail at 4 um/px."""
    if qc is not None:
        return stain_transform(qc[1], qc[2], target, slide_id)
    height, width = slide.shape
    thumb = slide.read(0, 0, height, width, stain_fit_scale(slide.shape, mpp.mpp * factor if mpp else None))
    return stain_transform(thumb, stain_tissue(thumb), target, slide_id)


def _label_note(record: SlideRecord, job: TileJob) -> str:
    """The log's word on a slide's labels: shapes per class, foreground area, ROI."""
    parts = []
    if job.annotation_path:
        parts.append(f"labels {os.path.basename(job.annotation_path)}: {record.labels}")
    if record.foreground_px is not None:
        area = f"foreground {record.foreground_px} px"
        if record.mpp:
            area += f" ({record.foreground_px * record.mpp ** 2 / 1e6:.4g} mm2)"
        parts.append(area)
    if record.roi:
        parts.append(f"ROI of {len(record.roi)} shape(s): {record.roi_dropped} tissue tile(s) outside it not written")
    return ("; " + "; ".join(parts)) if parts else ""


def create_tiles(cfg: CN) -> Dict[str, object]:
    """Tile every slide (or pair) of the config; return the stats written to disk."""
    start = time.time()
    size, reduce = cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN
    workers = cfg.TILER.NUM_WORKERS or os.cpu_count() or 1
    what = {"wsi_rle": "slides", "pairs": "image pairs", "annotations": "annotated slides/images"}[cfg.DATASETS.FORMAT]
    if cfg.DATASETS.SOURCES:
        what = f"slides/images of {len(cfg.DATASETS.SOURCES)} sources"
    jobs = _jobs(cfg)
    annotations = _validate(jobs, workers)
    target = stain_reference(cfg.INPUT.STAIN_NORM, cfg.INPUT.STAIN_REFERENCE) if cfg.INPUT.STAIN_NORM != "none" else None
    output = TilerOutput(cfg.DATASETS.TRAIN_FOLDER, size, reduce, cfg.TILER.PNG_COMPRESSION)
    output.prepare(_settings(cfg), cfg.OVERWRITE)
    logger.info("Tiling %d %s at %d px, reduction %d%s -> %s", len(jobs), what, size, reduce,
                f" of slides resampled to {cfg.INPUT.MPP_TRAIN / reduce:.4g} um/px (tiles of {cfg.INPUT.MPP_TRAIN:g} "
                "um/px)" if cfg.INPUT.MPP_TRAIN > 0 else "", output.root)
    records, skipped = [], 0
    writer = _Writer(output, workers)
    try:
        save_config(cfg, output.config)
        for n, (job, view) in enumerate(jobs, 1):
            fingerprint = _fingerprint(job)
            record = output.done(job, fingerprint)
            if record is not None:
                skipped += 1
            else:
                record = _tile_job(job, view, output, writer, workers, fingerprint,
                                   f"[{n}/{len(jobs)}] {job.id}", annotations.get(job.annotation_path), target)
            records.append(record)
        stats = _stats(records, size, reduce, {name: weight for name, weight, _ in source_views(cfg) if name})
        if target:  # the reference every tile was normalised to: training copies it into the checkpoints
            stats["stain"] = target
        TileStats(stats).save(output.stats)
        if cfg.INPUT.QC:
            atomic_write_csv(os.path.join(cfg.DATASETS.TRAIN_FOLDER, "qc.csv"), QC_COLUMNS,
                             (qc_csv_row(r.id, r.qc) for r in records if r.qc))
    except BaseException:
        output.rollback_if_empty()
        raise
    finally:
        writer.close()
    if skipped:
        logger.info("%d of %d %s already tiled (resumed); OVERWRITE True redoes them",
                    skipped, len(jobs), what)
    logger.info(
        "Done in %.1f s: %d of %d tiles kept from %d %s; mean %s std %s (0..1 RGB)",
        time.time() - start, stats["n_tiles"], stats["n_grid_tiles"], len(jobs), what,
        [round(v, 4) for v in stats["mean"]], [round(v, 4) for v in stats["std"]],
    )
    logger.info("Images: %s", output.images)
    logger.info("Masks:  %s", output.masks)
    logger.info("Stats:  %s", output.stats)
    return stats
