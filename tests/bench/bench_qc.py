"""Slide QC and stain normalisation measured against a known truth, on real tissue.

    python -m tests.bench.bench_qc [--slides 6] [--out folder]

Slides are mosaics of real tissue (2 x 2 AIDPATH biopsies at 0.5 µm/px, or 3 x 3 HuBMAP FTU tiles
at 0.95 µm/px); onto each, with the truth kept:

* **pen**: translucent marker strokes in four colours (blue, green, black, red), blended in optical
  density as ink is (the ink's density added to the tissue's), 60 µm wide;
* **blur**: a Gaussian-blurred patch (sigma 4 µm at full resolution);
* **fold**: a patch of doubled tissue (its optical density twice: two layers).

Each slide gets one artefact kind at a time (so a fold never lies under a stroke), and QC runs at
its defaults except the fold rule, which is off by default and measured here at 1.5. Reported per
class: the share of the drawn pixels that are tissue or glass under the artefact caught as that
class (goal >= 0.90 pen and blur, >= 0.80 folds), and the share of the clean tissue (the same
slide without artefacts) flagged as anything (goal <= 0.05).

Stain: each real image against a stain-shifted copy (its haematoxylin and eosin vectors turned in
optical density: another lab's stain), both normalised to the same reference (Macenko with the
built-in reference; Reinhard to the first image): the mean absolute RGB difference over tissue
between the two, normalised against the raw pair's (goal < 1).
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys

import cv2
import numpy as np

from config import get_cfg_defaults
from data import stain
from data.qc import BACKGROUND, BLUR, FOLD, PEN, overlay, qc_image
from tests.slides import SHARED_REASON, has_shared, shared

UM = 4.0
INKS = {"blue": (0.9, 0.55, 0.1), "green": (0.85, 0.2, 0.75), "black": (0.9, 0.9, 0.9), "red": (0.1, 0.8, 0.7)}


def _mosaics(count: int):
    """(name, RGB image, µm/px): 2 x 2 AIDPATH biopsies and 3 x 3 HuBMAP tiles, alternately."""
    aidpath = sorted(glob.glob(shared("aidpath", "images", "*.png")))
    hubmap = sorted(glob.glob(shared("hubmap_ftu", "*.jpg")))
    read = lambda p: cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)  # noqa: E731
    out = []
    for k in range(count):
        if k % 2 == 0:
            files = [aidpath[(4 * (k // 2) + j) % len(aidpath)] for j in range(4)]
            tiles = [read(p) for p in files]
            image = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
            out.append((f"aidpath_{k // 2}", image, 0.5))
        else:
            files = [hubmap[(9 * (k // 2) + j) % len(hubmap)] for j in range(9)]
            tiles = [read(p) for p in files]
            rows = [np.concatenate(tiles[3 * r:3 * r + 3], 1) for r in range(3)]
            out.append((f"hubmap_{k // 2}", np.concatenate(rows, 0), 0.95))
    return out


def _od(image):
    return -np.log((image.astype(np.float64) + 1) / 256)


def _rgb(od):
    return np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8)


def _pen(image, mpp, rng):
    h, w = image.shape[:2]
    truth = np.zeros((h, w), np.uint8)
    od = _od(image)
    for k, (name, density) in enumerate(INKS.items()):
        stroke = np.zeros((h, w), np.uint8)
        y0, y1 = int(h * (0.15 + 0.2 * k)), int(h * (0.25 + 0.2 * k))
        cv2.line(stroke, (int(0.05 * w), y0), (int(0.95 * w), y1), 1, max(2, int(60 / mpp)))
        od += stroke[..., None] * np.asarray(density)
        truth |= stroke
    return _rgb(od), truth.astype(bool)


def _blur(image, mpp, rng):
    h, w = image.shape[:2]
    truth = np.zeros((h, w), bool)
    y, x = h // 4, w // 4
    truth[y:y + h // 2, x:x + w // 2] = True
    blurred = cv2.GaussianBlur(image, (0, 0), 4.0 / mpp)
    out = image.copy()
    out[truth] = blurred[truth]
    return out, truth


def _fold(image, mpp, rng):
    h, w = image.shape[:2]
    truth = np.zeros((h, w), bool)
    y, x = h // 3, w // 3
    truth[y:y + h // 3, x:x + w // 3] = True
    out = image.copy()
    out[truth] = _rgb(2 * _od(image))[truth]
    return out, truth


def _at_qc(image, mpp, nearest=False):
    f = mpp / UM
    return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _shift_stain(image):
    """Another lab's stain: the optical density rotated between the channels (H and E vectors turned)."""
    od = _od(image)
    turn = np.array([[0.85, 0.15, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.8]])
    return _rgb(od @ turn.T * 1.15)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--out", default="", help="also write the overlays of every drawn slide here")
    args = parser.parse_args(argv)
    if not has_shared():
        sys.exit(SHARED_REASON)
    qc = get_cfg_defaults().QC
    qc.defrost()
    qc.FOLD_OD_RATIO = 1.5  # off by default: measured here
    rng = np.random.default_rng(0)
    defaults = get_cfg_defaults().QC
    caught = {PEN: [], BLUR: [], FOLD: []}
    clean_flagged, clean_default = [], []
    for name, image, mpp in _mosaics(args.slides):
        labels = qc_image(_at_qc(image, mpp), UM, qc)
        tissue = labels != BACKGROUND
        clean_flagged.append(float(np.isin(labels[tissue], [PEN, BLUR, FOLD]).mean()))
        plain = qc_image(_at_qc(image, mpp), UM, defaults)
        clean_default.append(float(np.isin(plain[plain != BACKGROUND], [PEN, BLUR, FOLD]).mean()))
        for cls, draw in ((PEN, _pen), (BLUR, _blur), (FOLD, _fold)):
            drawn, truth = draw(image, mpp, rng)
            got = qc_image(_at_qc(drawn, mpp), UM, qc)
            truth_qc = _at_qc(truth.astype(np.uint8), mpp, nearest=True) > 0
            region = truth_qc if cls == PEN else truth_qc & (got != BACKGROUND)  # blur and folds: on tissue
            caught[cls].append(float((got[region] == cls).mean()))
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                picture = overlay(_at_qc(drawn, mpp), got)
                cv2.imwrite(os.path.join(args.out, f"{name}_{cls}.jpg"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"QC at {UM:g} um/px on {args.slides} real-tissue mosaics (AIDPATH PAS, HuBMAP PAS), defaults, fold rule at 1.5")
    print("| class | drawn pixels caught (per slide) | median | goal |")
    print("|---|---|---|---|")
    for cls, name, goal in ((PEN, "pen (4 translucent inks)", 0.90), (BLUR, "blur (sigma 4 um)", 0.90),
                            (FOLD, "fold (doubled density)", 0.80)):
        values = caught[cls]
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} | >= {goal} |")
    print(f"| clean tissue flagged (fold rule at 1.5) | {', '.join(f'{v:.3f}' for v in clean_flagged)} | "
          f"{statistics.median(clean_flagged):.3f} | <= 0.05 |")
    print(f"| clean tissue flagged (defaults: fold off) | {', '.join(f'{v:.3f}' for v in clean_default)} | "
          f"{statistics.median(clean_default):.3f} | <= 0.05 |")
    # stain: a real image and a stain-shifted copy, normalised to one reference
    images = [img for _, img, _ in _mosaics(min(args.slides, 4))]
    ref_path = os.path.join(args.out or "/tmp", "bench_qc_reference.png")
    cv2.imwrite(ref_path, cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR))
    print("\nStain: mean |RGB difference| over tissue between an image and its stain-shifted copy, normalised / raw")
    for method in ("macenko", "reinhard"):
        target = stain.reference(method, "" if method == "macenko" else ref_path)
        ratios = []
        for image in images:
            small = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
            shifted = _shift_stain(small)
            tissue = stain.thumbnail_tissue(small)
            a = stain.apply(small, stain.slide_transform(small, tissue, target, "raw"))
            b = stain.apply(shifted, stain.slide_transform(shifted, stain.thumbnail_tissue(shifted), target, "shifted"))
            raw = np.abs(small.astype(float) - shifted.astype(float))[tissue].mean()
            norm = np.abs(a.astype(float) - b.astype(float))[tissue].mean()
            ratios.append(norm / raw)
        print(f"{method}: normalised / raw = {', '.join(f'{r:.2f}' for r in ratios)} (median "
              f"{statistics.median(ratios):.2f}; goal < 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
