"""Slide quality control: where a slide has usable tissue, and where pen, blur or folds spoil it.

    python -m data.qc [--config-file X.yaml] DATASETS.WSI_FOLDER slides/ OUTPUT_DIR out

For every slide (or plain image) of ``DATASETS.WSI_FOLDER`` it writes ``OUTPUT_DIR/qc/<id>_qc.png``
(the label map at the QC level: 0 background, 1 usable tissue, 2 pen, 3 blur, 4 fold or dark,
5 other artefact), ``OUTPUT_DIR/qc/<id>_qc_overlay.jpg`` (the thumbnail with the flagged regions
coloured, and a legend) and one row per slide in ``OUTPUT_DIR/qc.csv``: the QC level's downsample
and pixel size, the area of each class in mm² (or, without a pixel size, as a fraction of the
slide) and a verdict (ok / warn / fail) with the rule that gave it.

The slide is read once at ``QC.MPP`` µm/px (taking 0.5 µm/px when its pixel size is unknown) and
every rule works on that thumbnail with OpenCV (no other dependency; see docs/data.md for why):

* **background**: scanner padding (black, no data) and glass: pixels neither saturated
  (``QC.TISSUE_SATURATION``) nor darker than the glass by ``QC.TISSUE_CONTRAST`` grey levels (the
  glass's brightness is measured per slide, so faint tissue on a dark scan still counts), cleaned
  with a closing and an opening, pieces under ``QC.MIN_TISSUE_UM2`` dropped;
* **pen**: blue and green marker (hue 35-125 in OpenCV's 0-180, saturation above
  ``QC.PEN_SATURATION``), red marker (hue within 6 of red, saturation above
  ``QC.PEN_RED_SATURATION``) and black marker (value below ``QC.PEN_BLACK_VALUE``, grey); on glass
  or tissue, pieces under ``QC.MIN_ARTEFACT_UM2`` dropped. On the real PAS and H&E images of
  ``../shared/data`` the colour rules alone flag under 0.03 % of pixels, which the size rule removes;
* **fold or dark** (off by default): tissue whose optical density (summed over R, G and B,
  averaged over 60 µm) exceeds ``QC.FOLD_OD_RATIO`` times the 25th percentile of the slide's tissue
  (one layer). Measured at 4 µm/px on folds simulated by doubling the density of a 300-600 µm square
  of real AIDPATH tissue: a fold's density is ~1.5x (not 2x: dark nuclei and pale cytoplasm are
  averaged in a 4 µm pixel before the logarithm); 1.5 finds 77-90 % of each fold and flags nothing of
  the clean AIDPATH biopsies, but flags 12 of 15 clean HuBMAP PAS tiles (up to 21 % of their tissue),
  whose dense cortex is as dark: no setting separates the two, so it stays off until a measured rule
  does;
* **blur**: tissue whose local sharpness (the Laplacian's energy over the local contrast, in
  60 µm windows, smoothed over 120 µm) is below ``QC.BLUR_SHARPNESS``. Measured on the AIDPATH
  biopsies (PAS, 0.5 µm/px) at 4 µm/px: in-focus tissue has a median of 6.0-6.7 (10th percentile
  4.5-5.5), blurred by a Gaussian of 2 µm 4.2-4.7, of 4 µm 2.2-2.4; the default 3.0 flags blur of
  about 3 µm and more, at 4 µm/px only.

The verdict: ``fail`` when there is no tissue or the flagged share of the tissue (pen + blur + fold)
reaches ``QC.FAIL_FRACTION``, ``warn`` from ``QC.WARN_FRACTION``, else ``ok``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["tile_flags", "labels_on_grid", "drop_flagged", "write_pictures", "summary", "csv_row", "local_density", "CLASSES", "BACKGROUND", "USABLE", "PEN", "BLUR", "FOLD", "OTHER", "QCResult", "qc_image", "qc_slide",
           "verdict", "overlay", "run_qc", "QC_COLUMNS"]

logger = logging.getLogger(__name__)

BACKGROUND, USABLE, PEN, BLUR, FOLD, OTHER = range(6)
CLASSES = ("background", "usable", "pen", "blur", "fold_dark", "other")
FLAGGED = (PEN, BLUR, FOLD, OTHER)
# overlay colours (RGB) of the flagged classes
COLOURS = {PEN: (0, 90, 255), BLUR: (255, 200, 0), FOLD: (230, 0, 0), OTHER: (0, 200, 200)}
QC_COLUMNS = ["id", "downsample", "qc_mpp", "unit", *CLASSES, "flagged_fraction", "verdict", "rule"]

_SHARPNESS_WINDOW_UM, _SMOOTH_WINDOW_UM = 60.0, 120.0
# A slide without a pixel size is taken as a 20x scan for QC's sizes (its areas are then fractions).
ASSUMED_MPP = 0.5
# Blur is judged at this pixel size (µm/px), where its threshold was measured.
BLUR_MPP = 4.0
MIN_SIDE = 1024


@dataclass
class QCResult:
    """The QC of one slide: its label map at ``downsample`` (level-0 px per QC px) and what it
    measures."""

    labels: np.ndarray
    downsample: float
    qc_mpp: Optional[float]  # µm per QC pixel, None when the slide's pixel size is unknown
    areas: Dict[str, float]  # per class: mm² (qc_mpp known) or fraction of the slide
    flagged_fraction: float
    verdict: str
    rule: str

    @property
    def unit(self) -> str:
        return "mm2" if self.qc_mpp else "fraction"

    def row(self, slide_id: str) -> List[object]:
        return csv_row(slide_id, summary(self))


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` (bool) without its 8-connected pieces under ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[labels]


def _morph(mask: np.ndarray, op: int, size: int = 3) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    return cv2.morphologyEx(mask.view(np.uint8), op, kernel).astype(bool)


def sharpness(gray: np.ndarray, window: int, smooth: int, weight: Optional[np.ndarray] = None) -> np.ndarray:
    """Local sharpness: sqrt(mean Laplacian²) / (local standard deviation + 1) over ``window`` px,
    then averaged over ``smooth`` px; with ``weight`` (a 0/1 map: the tissue) every mean is taken
    over the weighted pixels only, so glass, lumens and pen strokes do not count. Texture scores
    high, the same texture blurred low, whatever the stain's strength."""
    g = gray.astype(np.float32)
    w = np.ones_like(g) if weight is None else weight.astype(np.float32)

    def mean(x, k):
        return cv2.boxFilter(x * w, -1, (k, k), normalize=False) / np.maximum(
            cv2.boxFilter(w, -1, (k, k), normalize=False), 1e-3)

    lap = cv2.Laplacian(g, cv2.CV_32F, ksize=3)
    m = mean(g, window)
    ratio = np.sqrt(mean(lap * lap, window)) / (np.sqrt(np.maximum(mean(g * g, window) - m * m, 0)) + 1.0)
    return mean(ratio, smooth)


def local_density(image: np.ndarray, tissue: np.ndarray, glass: np.ndarray, window: int) -> np.ndarray:
    """The optical density summed over R, G and B (``-ln(I / glass)`` per channel, ``glass`` the
    glass's colour), averaged over the tissue of a ``window`` px neighbourhood: additive, so two
    layers of tissue (a fold) have twice the density of one."""
    od = -np.log((image.astype(np.float32) + 1) / (np.asarray(glass, np.float32) + 1)).sum(axis=2)
    weight = tissue.astype(np.float32)
    total = cv2.boxFilter(od * weight, -1, (window, window), normalize=False)
    count = cv2.boxFilter(weight, -1, (window, window), normalize=False)
    return total / np.maximum(count, 1e-3)


def qc_image(image: np.ndarray, um: float, qc) -> np.ndarray:
    """The label map (``CLASSES``) of an RGB uint8 thumbnail at ``um`` µm/px; ``qc`` is the
    config's ``QC`` node."""
    px_area = um * um
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    nodata = image.max(axis=2) < 10
    seen = gray[~nodata]
    glass = float(np.percentile(seen, 95)) if seen.size else 255.0
    tissue = ((sat > qc.TISSUE_SATURATION) | (gray < glass - qc.TISSUE_CONTRAST)) & ~nodata
    tissue = _morph(_morph(tissue, cv2.MORPH_CLOSE), cv2.MORPH_OPEN)
    tissue = _drop_small(tissue, int(qc.MIN_TISSUE_UM2 / px_area))
    min_artefact = int(qc.MIN_ARTEFACT_UM2 / px_area)
    colour_pen = (hue >= 35) & (hue < 125) & (sat > qc.PEN_SATURATION)
    red_pen = ((hue < 6) | (hue >= 174)) & (sat > qc.PEN_RED_SATURATION)
    black_pen = (val < qc.PEN_BLACK_VALUE) & (sat < 80)
    if qc.PEN_HUE_DISTANCE > 0:  # translucent ink: a hue far from the slide's own stain, moderately saturated
        stained = tissue & (sat > 40)
        if stained.sum() > 100:
            angle = hue[stained].astype(np.float64) * (np.pi / 90)
            centre = (np.degrees(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())) / 2) % 180
            distance = np.abs(((hue.astype(np.float64) - centre + 90) % 180) - 90)
            colour_pen |= (distance > qc.PEN_HUE_DISTANCE) & (sat > qc.PEN_TRANSLUCENT_SATURATION)
        black_pen |= (sat < 30) & (gray < 0.6 * glass)  # grey and dark: black ink on glass
    pen = _morph((colour_pen | red_pen | black_pen) & ~nodata, cv2.MORPH_OPEN)
    pen = _drop_small(_morph(pen, cv2.MORPH_DILATE), min_artefact)
    labels = np.full(gray.shape, BACKGROUND, dtype=np.uint8)
    labels[tissue] = USABLE
    body = tissue & ~pen
    if body.any() and qc.FOLD_OD_RATIO > 0:
        glass_rgb = np.percentile(image[~nodata], 95, axis=0) if (~nodata).any() else np.full(3, 255.0)
        od = local_density(image, body, glass_rgb, _odd(_SHARPNESS_WINDOW_UM / um))
        single = float(np.percentile(od[body], 25))  # one layer's density: a fold, however large, stays above it
        dark = _drop_small(_morph(body & (od > qc.FOLD_OD_RATIO * single), cv2.MORPH_OPEN), min_artefact)
        labels[dark] = FOLD
        body &= ~dark
    if body.any() and qc.BLUR_SHARPNESS > 0 and um <= BLUR_MPP * 1.01:  # blur is measured at BLUR_MPP
        f = um / BLUR_MPP
        resize = (lambda a: cv2.resize(a, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)) if f < 0.99 else (lambda a: a)
        weight = resize((body & ~_morph(pen, cv2.MORPH_DILATE, 5)).astype(np.float32))
        sharp = sharpness(resize(gray), _odd(_SHARPNESS_WINDOW_UM / BLUR_MPP), _odd(_SMOOTH_WINDOW_UM / BLUR_MPP),
                          weight)
        if sharp.shape != gray.shape:
            sharp = cv2.resize(sharp, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_LINEAR)
        blurred = _drop_small(body & (sharp < qc.BLUR_SHARPNESS), min_artefact)
        labels[blurred] = BLUR
    labels[pen] = PEN
    return labels


def verdict(areas: Dict[str, float], qc) -> Tuple[float, str, str]:
    """``(flagged share of the tissue, verdict, the rule that gave it)``."""
    flagged = {CLASSES[c]: areas[CLASSES[c]] for c in FLAGGED}
    tissue = areas["usable"] + sum(flagged.values())
    if tissue <= 0:
        return 0.0, "fail", "no tissue found"
    share = sum(flagged.values()) / tissue
    worst = max(flagged, key=flagged.get)
    detail = f"flagged {100 * share:.1f} % of the tissue (most: {worst} {100 * flagged[worst] / tissue:.1f} %)"
    if share >= qc.FAIL_FRACTION:
        return share, "fail", f"{detail} >= QC.FAIL_FRACTION {qc.FAIL_FRACTION:g}"
    if share >= qc.WARN_FRACTION:
        return share, "warn", f"{detail} >= QC.WARN_FRACTION {qc.WARN_FRACTION:g}"
    return share, "ok", detail


def qc_slide(slide, mpp: Optional[float], qc) -> Tuple[QCResult, np.ndarray]:
    """QC of an open slide (``mpp``: its level-0 µm/px, or None): the result and the thumbnail."""
    height, width = slide.shape
    # at QC.MPP, but a small image keeps at least MIN_SIDE px on its long side
    downsample = max(1.0, min(qc.MPP / (mpp or ASSUMED_MPP), max(height, width) / MIN_SIDE))
    image = slide.read(0, 0, height, width, downsample)
    qc_mpp = mpp * downsample if mpp else None
    labels = qc_image(image, (mpp or ASSUMED_MPP) * downsample, qc)
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES)).astype(float)
    if qc_mpp:
        areas = {c: counts[k] * qc_mpp * qc_mpp / 1e6 for k, c in enumerate(CLASSES)}
    else:
        areas = {c: counts[k] / labels.size for k, c in enumerate(CLASSES)}
    share, outcome, rule = verdict(areas, qc)
    return QCResult(labels, downsample, qc_mpp, areas, share, outcome, rule), image


def overlay(image: np.ndarray, labels: np.ndarray, max_side: int = 2048) -> np.ndarray:
    """The thumbnail with the flagged classes blended in their colours, and a legend (RGB)."""
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    out = image.astype(np.float32)
    for cls, colour in COLOURS.items():
        where = labels == cls
        out[where] = 0.5 * out[where] + 0.5 * np.array(colour, np.float32)
    out = out.astype(np.uint8)
    tissue_edge = cv2.morphologyEx((labels != BACKGROUND).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    out[tissue_edge > 0] = (0, 160, 0)
    legend = np.full((22 * (len(COLOURS) + 1) + 6, max(out.shape[1], 220), 3), 255, np.uint8)
    entries = [((0, 160, 0), "tissue outline")] + [(COLOURS[c], CLASSES[c]) for c in FLAGGED]
    for k, (colour, name) in enumerate(entries):
        y = 6 + 22 * k
        cv2.rectangle(legend, (6, y), (24, y + 16), colour, -1)
        cv2.putText(legend, name, (32, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if legend.shape[1] > out.shape[1]:
        out = cv2.copyMakeBorder(out, 0, 0, 0, legend.shape[1] - out.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return np.concatenate([out, legend])


def labels_on_grid(labels: np.ndarray, downsample: float, grid) -> np.ndarray:
    """The QC label map (at ``downsample`` level-0 px per pixel) on the padded low-res grid of
    ``grid`` (``data.tiling.TileGrid``: ``n_rows * size`` x ``n_cols * size``), nearest pixel;
    background off the slide."""
    r = grid.reduce
    rows = (np.arange(grid.n_rows * grid.size) * r - grid.pad_top + r / 2) / downsample
    cols = (np.arange(grid.n_cols * grid.size) * r - grid.pad_left + r / 2) / downsample
    inside_r = (rows >= 0) & (rows < labels.shape[0])
    inside_c = (cols >= 0) & (cols < labels.shape[1])
    out = labels[np.clip(rows.astype(int), 0, labels.shape[0] - 1)][:, np.clip(cols.astype(int), 0, labels.shape[1] - 1)]
    out[~inside_r] = BACKGROUND
    out[:, ~inside_c] = BACKGROUND
    return out


def tile_flags(labels: np.ndarray, downsample: float, grid) -> np.ndarray:
    """Per tile of ``grid`` (``(n_rows, n_cols)``, row-major as the tiler numbers them): the flagged
    class covering at least half of the tile (by area, the most common one), else 0."""
    flags = np.zeros((grid.n_rows, grid.n_cols), dtype=np.uint8)
    span, qh, qw = grid.span, labels.shape[0], labels.shape[1]
    for row in range(grid.n_rows):
        y0 = max(0, int((row * span - grid.pad_top) / downsample))
        y1 = min(qh, max(y0 + 1, int(round(((row + 1) * span - grid.pad_top) / downsample))))
        for col in range(grid.n_cols):
            x0 = max(0, int((col * span - grid.pad_left) / downsample))
            x1 = min(qw, max(x0 + 1, int(round(((col + 1) * span - grid.pad_left) / downsample))))
            part = labels[y0:y1, x0:x1]
            if part.size == 0:
                continue
            counts = np.bincount(part.ravel(), minlength=len(CLASSES))
            worst = max(FLAGGED, key=lambda c: counts[c])
            if counts[list(FLAGGED)].sum() * 2 >= part.size and counts[worst] > 0:
                flags[row, col] = worst
    return flags


def drop_flagged(prob: np.ndarray, qc_lr: np.ndarray, threshold: float) -> Dict[str, int]:
    """Remove from ``prob`` (in place) every object (8-connected above ``threshold``) that lies
    mostly on a flagged region, and every probability on one; returns the objects dropped per
    reason (pen, blur, fold_dark, other)."""
    flagged = np.isin(qc_lr, FLAGGED)
    dropped = {CLASSES[c]: 0 for c in FLAGGED}
    mask = (prob > threshold).astype(np.uint8)
    if flagged.any() and mask.any():
        n, comps, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        area = stats[:, cv2.CC_STAT_AREA]
        gone = np.zeros(n, dtype=bool)
        for cls in FLAGGED:
            on = np.bincount(comps[qc_lr == cls], minlength=n)
            hit = on * 2 > area
            hit[0] = False
            dropped[CLASSES[cls]] = int((hit & ~gone).sum())
            gone |= hit
        prob[gone[comps]] = 0
    prob[flagged] = 0
    return dropped


def write_pictures(folder: str, slide_id: str, result: QCResult, image: np.ndarray) -> None:
    """``<id>_qc.png`` (the label map) and ``<id>_qc_overlay.jpg`` into ``folder``, atomically."""
    from utils.io import atomic_write_bytes

    os.makedirs(folder, exist_ok=True)
    _, png = cv2.imencode(".png", result.labels)
    atomic_write_bytes(os.path.join(folder, f"{slide_id}_qc.png"), png.tobytes())
    _, jpg = cv2.imencode(".jpg", cv2.cvtColor(overlay(image, result.labels), cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, 90])
    atomic_write_bytes(os.path.join(folder, f"{slide_id}_qc_overlay.jpg"), jpg.tobytes())


def summary(result: QCResult) -> Dict[str, object]:
    """The QC of a slide as plain JSON (a test_net record's ``qc``)."""
    return {"downsample": result.downsample, "qc_mpp": result.qc_mpp, "unit": result.unit,
            "areas": {k: float(v) for k, v in result.areas.items()}, "flagged_fraction": float(result.flagged_fraction), "verdict": result.verdict, "rule": result.rule}


def csv_row(slide_id: str, qc: Dict[str, object]) -> List[object]:
    """A ``qc.csv`` row from :func:`summary`'s dict."""
    return [slide_id, f"{qc['downsample']:.6g}", f"{qc['qc_mpp']:.6g}" if qc["qc_mpp"] else "", qc["unit"],
            *(f"{qc['areas'][c]:.6g}" for c in CLASSES), f"{qc['flagged_fraction']:.4f}", qc["verdict"], qc["rule"]]


def run_qc(cfg, slides: Sequence[Tuple[str, str]], out_dir: str) -> List[Tuple[str, QCResult]]:
    """QC of every ``(id, path)``: the pictures of each slide as it is done, then ``qc.csv``.
    Every slide is opened and its pixel size checked before any is processed."""
    from data.readers import open_image_slide, resolve_mpp
    from utils.io import atomic_write_csv

    channels, backend = tuple(cfg.INPUT.CHANNELS), cfg.INPUT.SLIDE_READER
    for _, path in slides:  # bad input fails before anything is written
        with open_image_slide(path, channels, backend) as slide:
            resolve_mpp(slide, cfg.DATASETS.MPP, "DATASETS.MPP")
    folder = os.path.join(out_dir, "qc")
    results = []
    for slide_id, path in slides:
        with open_image_slide(path, channels, backend) as slide:
            mpp = resolve_mpp(slide, cfg.DATASETS.MPP, "DATASETS.MPP")
            result, image = qc_slide(slide, mpp.mpp if mpp else None, cfg.QC)
        write_pictures(folder, slide_id, result, image)
        if result.rule == "no tissue found":
            logger.warning("%s: QC found no tissue (a 'fail' row in qc.csv)", slide_id)
        unit = "mm2" if result.qc_mpp else "of the slide"
        logger.info("%s: %s (%s); usable tissue %.4g %s, pen %.4g, blur %.4g, fold/dark %.4g (QC at 1/%.3g%s)",
                    slide_id, result.verdict, result.rule, result.areas["usable"], unit, result.areas["pen"],
                    result.areas["blur"], result.areas["fold_dark"], result.downsample,
                    f", {result.qc_mpp:.3g} um/px" if result.qc_mpp else ", pixel size unknown")
        results.append((slide_id, result))
    atomic_write_csv(os.path.join(out_dir, "qc.csv"), QC_COLUMNS, (r.row(i) for i, r in results))
    counts = {v: sum(r.verdict == v for _, r in results) for v in ("ok", "warn", "fail")}
    logger.info("QC of %d slide(s): %d ok, %d warn, %d fail -> %s", len(results), counts["ok"], counts["warn"],
                counts["fail"], os.path.join(out_dir, "qc.csv"))
    return results


def main(cfg, args) -> int:
    from data.sources import slide_entries
    from utils.setup import add_log_file

    folder = cfg.DATASETS.WSI_FOLDER
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found (DATASETS.WSI_FOLDER)")
    slides = slide_entries(folder, images=True)
    if not slides:
        raise FileNotFoundError(f"{folder}: no slides or images (DATASETS.WSI_FOLDER)")
    add_log_file(cfg.OUTPUT_DIR, "log_qc.txt")
    run_qc(cfg, slides, cfg.OUTPUT_DIR)
    return 0


if __name__ == "__main__":
    from utils.setup import configure_process, launch

    configure_process(models=False)
    raise SystemExit(launch(main, __doc__))
