"""A small, deterministic, kidney-like sample data set that the project generates itself.

Real slides cannot ship in the repository, so the quick start draws its own: PAS-stained-looking
kidney tissue (pink stroma packed with tubules, nuclei, a few vessels) on a white background
with an irregular outline, and round glomeruli (a purple lobulated tuft of dense nuclei inside
a pale Bowman's space and a capsule). Each slide is a pyramidal tiled JPEG TIFF (level 0 plus
4x and 16x SubIFD levels, as scanners write them); the glomerulus masks (capsule included, as
in HuBMAP) go to an RLE CSV in the HuBMAP ``id,encoding`` format.

    python -m data.sample --out datasets/sample     # train/ + train.csv, test/ + test.csv

The same seed gives the same pixels, bit for bit. Everything the real workflow meets is there:
background to skip by the saturation test, tiles without glomeruli, glomeruli cut by tile
borders, JPEG artefacts, a pyramid level to read at the training reduction.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import tifffile

from utils.io import atomic_write_csv
from utils.rle import rle_encode

__all__ = ["SampleSpec", "SAMPLE", "draw_slide", "write_pyramid", "generate_sample"]

logger = logging.getLogger(__name__)

# PAS-like colours (RGB)
BACKGROUND = (241, 239, 242)
STROMA = (222, 178, 206)
TUBULE_WALL = (201, 122, 171)
LUMEN = (238, 222, 234)
NUCLEUS = (94, 58, 128)
BOWMAN = (242, 230, 238)
CAPSULE = (186, 110, 160)
TUFT = (176, 96, 160)


# Pixel size the sample slides claim (um/px), as a 10x scan: a sample glomerulus (radius 60-100 px)
# is then 120-200 um across, as real ones are.
SAMPLE_MPP = 1.0


@dataclass(frozen=True)
class SampleSpec:
    """One slide of the sample: its id, split, size (height, width) and seed."""

    slide_id: str
    split: str
    height: int
    width: int
    seed: int


SAMPLE: Tuple[SampleSpec, ...] = (
    SampleSpec("sample_a", "train", 3072, 4096, 1),
    SampleSpec("sample_b", "train", 3584, 3584, 2),
    SampleSpec("sample_c", "train", 3072, 4096, 3),
    SampleSpec("sample_d", "train", 3584, 3072, 4),
    SampleSpec("sample_e", "test", 3328, 4096, 5),
)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cell: int) -> np.ndarray:
    """Smooth random field in 0..1 with features of about ``cell`` px."""
    small = rng.random((shape[0] // cell + 3, shape[1] // cell + 3)).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), 0.8)
    field = cv2.resize(small, (shape[1] + 2 * cell, shape[0] + 2 * cell), interpolation=cv2.INTER_CUBIC)
    field = field[cell:cell + shape[0], cell:cell + shape[1]]
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _tissue_region(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An irregular biopsy outline: a wobbly ellipse, with a margin of background."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    ellipse = ((yy - h / 2) / (0.44 * h)) ** 2 + ((xx - w / 2) / (0.44 * w)) ** 2
    wobble = _smooth_noise(rng, (h, w), 384)
    return (ellipse + 0.55 * (wobble - 0.5) < 1.0).astype(np.uint8)


def _lobulated(rng: np.random.Generator, radius: float, n: int = 64) -> np.ndarray:
    """Radii of an irregular round outline (a few lobes), ``n`` angles."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.full(n, radius)
    for k in (3, 4, 5, 7):
        r += radius * rng.uniform(0.02, 0.06) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    return r


def _polygon(cy: float, cx: float, radii: np.ndarray) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return np.round(pts).astype(np.int32)


def _sprinkle(rng, image, where: np.ndarray, count: int, colour, radius=(2, 4)) -> None:
    """``count`` nuclei (small dark discs) at random points of ``where``."""
    ys, xs = np.nonzero(where)
    if ys.size == 0:
        return
    pick = rng.integers(0, ys.size, count)
    sizes = rng.integers(radius[0], radius[1] + 1, count)
    for y, x, r in zip(ys[pick], xs[pick], sizes):
        cv2.circle(image, (int(x), int(y)), int(r), colour, -1, lineType=cv2.LINE_AA)


def draw_slide(spec: SampleSpec) -> Tuple[np.ndarray, np.ndarray]:
    """``(image (H, W, 3) uint8 RGB, glomerulus mask (H, W) uint8)`` of one sample slide."""
    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    tissue = _tissue_region(rng, h, w)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BACKGROUND
    # stroma with a slow stain variation
    stain = _smooth_noise(rng, (h, w), 256)[..., None]
    stroma = np.asarray(STROMA, np.float32) * (0.92 + 0.12 * stain)
    image[tissue > 0] = np.clip(stroma, 0, 255).astype(np.uint8)[tissue > 0]
    # glomeruli first (positions), so tubules do not run through them
    mask = np.zeros((h, w), np.uint8)
    glomeruli = []
    inner = cv2.erode(tissue, np.ones((161, 161), np.uint8))
    ys, xs = np.nonzero(inner[::8, ::8])
    for _ in range(400):
        if len(glomeruli) >= int(h * w / 1.1e6) or ys.size == 0:
            break
        k = int(rng.integers(ys.size))
        cy, cx, radius = ys[k] * 8, xs[k] * 8, float(rng.uniform(60, 100))
        if all((cy - y) ** 2 + (cx - x) ** 2 > (radius + r + 60) ** 2 for y, x, r in glomeruli):
            glomeruli.append((cy, cx, radius))
    keep_out = np.zeros((h, w), np.uint8)
    for cy, cx, radius in glomeruli:
        cv2.circle(keep_out, (int(cx), int(cy)), int(radius * 1.25), 1, -1)
    # tubules: rings of pink epithelium around a pale lumen, packed in the stroma
    n_tubules = int(tissue.sum() / 2600)
    ty, tx = np.nonzero(tissue & (1 - keep_out))
    pick = rng.integers(0, ty.size, n_tubules)
    walls = np.zeros((h, w), np.uint8)
    for y, x in zip(ty[pick], tx[pick]):
        axes = (int(rng.uniform(18, 34)), int(rng.uniform(14, 28)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(image, (int(x), int(y)), axes, angle, 0, 360, TUBULE_WALL, -1, lineType=cv2.LINE_AA)
        cv2.ellipse(walls, (int(x), int(y)), axes, angle, 0, 360, 1, 7)
        lumen = (max(2, axes[0] - 9), max(2, axes[1] - 9))
        cv2.ellipse(image, (int(x), int(y)), lumen, angle, 0, 360, LUMEN, -1, lineType=cv2.LINE_AA)
    # a few vessels: elongated pale lumens with a dark wall (round-ish distractors)
    for _ in range(int(tissue.sum() / 2.5e6) + 2):
        k = int(rng.integers(ty.size))
        axes = (int(rng.uniform(40, 90)), int(rng.uniform(15, 30)))
        angle = float(rng.uniform(0, 180))
        centre = (int(tx[k]), int(ty[k]))
        cv2.ellipse(image, centre, (axes[0] + 8, axes[1] + 8), angle, 0, 360, CAPSULE, -1, lineType=cv2.LINE_AA)
        cv2.ellipse(image, centre, axes, angle, 0, 360, (246, 236, 240), -1, lineType=cv2.LINE_AA)
    image[tissue == 0] = BACKGROUND
    _sprinkle(rng, image, walls & tissue & (1 - keep_out), int(tissue.sum() / 900), NUCLEUS)
    _sprinkle(rng, image, tissue & (1 - walls) & (1 - keep_out), int(tissue.sum() / 4000), NUCLEUS, (2, 3))
    # glomeruli: capsule, Bowman's space, then the lobulated tuft packed with nuclei
    for cy, cx, radius in glomeruli:
        outline = _polygon(cy, cx, _lobulated(rng, radius))
        cv2.fillPoly(image, [outline], CAPSULE, lineType=cv2.LINE_AA)
        cv2.fillPoly(image, [_polygon(cy, cx, _lobulated(rng, radius - 6))], BOWMAN, lineType=cv2.LINE_AA)
        tuft_outline = _polygon(cy + rng.uniform(-6, 6), cx + rng.uniform(-6, 6), _lobulated(rng, radius * 0.78))
        cv2.fillPoly(image, [tuft_outline], TUFT, lineType=cv2.LINE_AA)
        tuft = np.zeros((h, w), np.uint8)
        cv2.fillPoly(tuft, [tuft_outline], 1)
        _sprinkle(rng, image, tuft, int(radius * radius / 30), NUCLEUS)
        for _ in range(3):  # pale capillary loops
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, radius * 0.5)
            cv2.circle(image, (int(cx + d * np.cos(a)), int(cy + d * np.sin(a))), int(rng.uniform(6, 12)),
                       BOWMAN, -1, lineType=cv2.LINE_AA)
        cv2.fillPoly(mask, [outline], 1)
    # optics and sensor: a slight blur and noise
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    noise = rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, mask


def write_pyramid(path: str, image: np.ndarray, downsamples: Sequence[int] = (4, 16), tile: int = 256,
                  quality: int = 90, mpp: float = SAMPLE_MPP) -> None:
    """A tiled JPEG TIFF with reduced-resolution SubIFD levels (written atomically); level 0's
    pixel size ``mpp`` (um/px) goes in its resolution tags (0: none)."""
    kwargs = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": quality})
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    tmp = path + ".tmp"
    with tifffile.TiffWriter(tmp) as tif:
        tif.write(image, subifds=len(downsamples), **kwargs, **resolution)
        for d in downsamples:
            size = (max(1, image.shape[1] // d), max(1, image.shape[0] // d))
            tif.write(cv2.resize(image, size, interpolation=cv2.INTER_AREA), subfiletype=1, **kwargs)
    os.replace(tmp, path)


def generate_sample(out: str, specs: Sequence[SampleSpec] = SAMPLE, force: bool = False) -> Dict[str, str]:
    """Write the sample under ``out``: ``<split>/<id>.tiff`` and ``<split>.csv`` per split.

    Returns ``{split: csv path}``. Existing complete output is kept unless ``force``.
    """
    splits: Dict[str, List[SampleSpec]] = {}
    for spec in specs:
        splits.setdefault(spec.split, []).append(spec)
    csvs = {split: os.path.join(out, f"{split}.csv") for split in splits}
    if not force and all(os.path.isfile(p) for p in csvs.values()) and all(
            os.path.isfile(os.path.join(out, s.split, f"{s.slide_id}.tiff")) for s in specs):
        logger.info("Sample data already in %s", out)
        return csvs
    for split, members in splits.items():
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for spec in members:
            image, mask = draw_slide(spec)
            write_pyramid(os.path.join(folder, f"{spec.slide_id}.tiff"), image)
            rows.append([spec.slide_id, rle_encode(mask)])
            logger.info("Sample slide %s/%s: %d x %d, %.1f%% glomerulus", split, spec.slide_id, spec.width,
                        spec.height, 100.0 * mask.mean())
        atomic_write_csv(csvs[split], ["id", "encoding"], rows)  # the CSV last: it marks completion
    return csvs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="datasets/sample", help="output folder (default: datasets/sample)")
    parser.add_argument("--force", action="store_true", help="write again even if complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    csvs = generate_sample(args.out, force=args.force)
    logger.info("Wrote %s", ", ".join(f"{split}: {path}" for split, path in csvs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
