"""What to tile: slide + RLE jobs (``wsi_rle``), image/mask pair jobs (``pairs``) and slide +
annotation file jobs (``annotations``).

Everything here checks its input up front and raises one clear error naming the file, the
id or the config key, so that no output is written for a data set that cannot be read.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from data.annotations import ANNOTATION_EXTENSIONS, annotation_id_of, read_annotations
from data.readers.dicom import is_dicom_folder
from data.readers import SLIDE_EXTENSIONS, SlideError

__all__ = [
    "TileJob",
    "validate_id",
    "read_labels_csv",
    "read_id_list",
    "find_slide",
    "slide_id_of",
    "slide_entries",
    "files_by_stem",
    "select_ids",
    "wsi_jobs",
    "pairs_jobs",
    "annotation_jobs",
    "annotation_files",
    "source_views",
    "load_pair_mask",
    "IMAGE_EXTENSIONS",
]

logger = logging.getLogger(__name__)

RLE_COLUMNS = ("encoding", "rle", "predicted")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_LABEL_ENDINGS = (".seg.dcm", ".ann.dcm")  # DICOM labels beside their slides: never slides


@dataclass(frozen=True)
class TileJob:
    """One slide or image to tile. ``rle`` is set in wsi_rle mode, ``mask_path`` in pairs,
    ``annotation_path`` in annotations mode (``image_path`` is then the annotation file itself when
    the image is embedded in it: labelme's ``imageData``)."""

    id: str
    image_path: str
    rle: Optional[str] = None
    mask_path: Optional[str] = None
    annotation_path: Optional[str] = None
    source: str = ""  # the DATASETS.SOURCES entry it comes from ("": a single-source config)

    @property
    def embedded_image(self) -> bool:
        return self.annotation_path is not None and self.image_path == self.annotation_path


def validate_id(value, source: str) -> str:
    """An id names a file inside its folder: no separators, no '..', not absolute."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: empty id")
    if value != value.strip():
        raise ValueError(f"{source}: id {value!r} has leading or trailing spaces")
    if (
        "/" in value
        or "\\" in value
        or "\x00" in value
        or value in (".", "..")
        or os.path.isabs(value)
    ):
        raise ValueError(f"{source}: id {value!r} is not a plain file name")
    return value


@contextlib.contextmanager
def _long_csv_fields():
    """The csv module's field limit raised for a while (a slide's RLE is megabytes long), then
    put back: nothing global stays changed."""
    previous = csv.field_size_limit(1 << 31)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv(path: str, what: str, key: str = "DATASETS.LABELS_CSV") -> Dict[str, List[str]]:
    """The columns of a CSV file as ``{name: values}`` (the csv module: no pandas start-up);
    ``key`` is the config key that named it (in errors)."""
    if not path:
        raise ValueError(f"{key} is not set; it must name the {what} CSV")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} CSV not found ({key})")
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as fh, _long_csv_fields():
            rows = list(csv.reader(fh))
    except (csv.Error, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from None
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if any(c.strip() for c in r)]
    for n, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path} row {n + 2}: {len(row)} fields, expected {len(header)} ({header})")
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def _check_ids(ids: Sequence[str], path: str) -> List[str]:
    ids = [validate_id(v, f"{path} row {k + 2}") for k, v in enumerate(ids)]
    seen, duplicates = set(), []
    for v in ids:
        if v in seen:
            duplicates.append(v)
        seen.add(v)
    if duplicates:
        raise ValueError(f"{path}: duplicate ids {sorted(set(duplicates))[:5]}")
    return ids


def read_labels_csv(path: str, key: str = "DATASETS.LABELS_CSV") -> Dict[str, str]:
    """``{id: rle}`` from a CSV with an ``id`` column and an ``encoding`` (or ``rle``,
    ``predicted``) column, in file order; ``key`` names the config key in errors."""
    columns = _read_csv(path, "labels", key)
    if "id" not in columns:
        raise ValueError(f"{path}: no 'id' column (columns: {list(columns)})")
    column = next((c for c in RLE_COLUMNS if c in columns), None)
    if column is None:
        raise ValueError(
            f"{path}: no mask column; expected one of {list(RLE_COLUMNS)} (columns: {list(columns)})"
        )
    ids = _check_ids(columns["id"], path)
    return dict(zip(ids, columns[column]))


def read_id_list(path: str, key: str = "DATASETS.LABELS_CSV") -> List[str]:
    """The ``id`` column of a CSV (pairs mode: which pairs to use)."""
    columns = _read_csv(path, "id list", key)
    if "id" not in columns:
        raise ValueError(f"{path}: no 'id' column (columns: {list(columns)})")
    return _check_ids(columns["id"], path)


def find_slide(folder: str, slide_id: str) -> Optional[str]:
    """The slide ``folder/<id><ext>`` for the first extension that exists, else a DICOM WSI
    folder ``folder/<id>/``."""
    for ext in SLIDE_EXTENSIONS:
        path = os.path.join(folder, slide_id + ext)
        if os.path.isfile(path):
            return path
    path = os.path.join(folder, slide_id)
    return path if is_dicom_folder(path) else None


def slide_id_of(name: str, images: bool = False) -> Optional[str]:
    """The id of a slide file name (its name without the extension), or None; with ``images``
    plain images (PNG, JPEG, BMP) count as slides too. Annotation files written beside slides
    (``<id>.seg.dcm``, ``<id>.ann.dcm``) never do."""
    lower = name.lower()
    if lower.endswith(DICOM_LABEL_ENDINGS):
        return None
    endings = SLIDE_EXTENSIONS + (IMAGE_EXTENSIONS if images else ())
    for ext in sorted(endings, key=len, reverse=True):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def slide_entries(folder: str, images: bool = False) -> List[Tuple[str, str]]:
    """``(id, path)`` of every slide in ``folder``, sorted by id: slide files (the id is the name
    without its extension; with ``images`` plain images too) and DICOM WSI folders (the folder's
    name). Two slides with one id are an error naming both."""
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        slide_id = slide_id_of(name, images) if os.path.isfile(path) else (name if is_dicom_folder(path) else None)
        if not slide_id:
            continue
        if slide_id in found:
            raise ValueError(f"{folder}: two slides for id {slide_id!r}: {os.path.basename(found[slide_id])} and {name}")
        found[slide_id] = path
    return sorted(found.items())


def _require_folder(folder: str, key: str) -> None:
    if not folder:
        raise ValueError(f"{key} is not set")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found ({key})")


def wsi_jobs(wsi_folder: str, labels_csv: str) -> List[TileJob]:
    """One job per CSV row; every row must have a slide file in ``wsi_folder``."""
    _require_folder(wsi_folder, "DATASETS.WSI_FOLDER")
    labels = read_labels_csv(labels_csv)
    if not labels:
        raise ValueError(f"{labels_csv}: no rows")
    jobs, missing = [], []
    for slide_id, rle in labels.items():
        path = find_slide(wsi_folder, slide_id)
        if path is None:
            missing.append(slide_id)
        else:
            jobs.append(TileJob(slide_id, path, rle=rle))
    if missing:
        raise FileNotFoundError(
            f"{wsi_folder}: no slide file for {len(missing)} id(s) of {labels_csv}: "
            f"{missing[:5]} (looked for {', '.join(SLIDE_EXTENSIONS)} and DICOM folders)"
        )
    unlabelled = [sid for sid, _ in slide_entries(wsi_folder) if sid not in labels]
    if unlabelled:
        logger.warning(
            "%s: %d slide(s) have no row in %s and are not tiled: %s",
            wsi_folder, len(unlabelled), labels_csv, unlabelled[:5],
        )
    return jobs


def files_by_stem(folder: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        name = os.path.basename(path)
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(path):
            continue
        if stem in out:
            raise ValueError(f"{folder}: two files for id {stem!r}: {os.path.basename(out[stem])} and {name}")
        out[stem] = path
    return out


def select_ids(files: Dict[str, str], labels_csv: str, folder: str, key: str = "DATASETS.LABELS_CSV") -> List[str]:
    """The ids of ``files`` (``{id: path}`` of ``folder``) to use: those of the ``id`` column of
    ``labels_csv`` (each must have a file; ``key`` names it in errors), or all of them, sorted,
    when it is ""."""
    if not labels_csv:
        return sorted(files)
    wanted = read_id_list(labels_csv, key)
    absent = [i for i in wanted if i not in files]
    if absent:
        raise FileNotFoundError(f"{folder}: no image for {len(absent)} id(s) of {labels_csv}: {absent[:5]}")
    return wanted


def pairs_jobs(pairs_folder: str, images: str, masks: str, labels_csv: str = "") -> List[TileJob]:
    """One job per image in ``pairs_folder/images`` with a same-stem file in ``masks``."""
    _require_folder(pairs_folder, "DATASETS.PAIRS_FOLDER")
    image_dir, mask_dir = os.path.join(pairs_folder, images), os.path.join(pairs_folder, masks)
    _require_folder(image_dir, "DATASETS.PAIRS_IMAGES")
    _require_folder(mask_dir, "DATASETS.PAIRS_MASKS")
    image_files, mask_files = files_by_stem(image_dir), files_by_stem(mask_dir)
    wanted = select_ids(image_files, labels_csv, image_dir)
    if not wanted:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    no_mask = [i for i in wanted if i not in mask_files]
    if no_mask:
        raise FileNotFoundError(f"{mask_dir}: no mask for {len(no_mask)} image(s): {no_mask[:5]}")
    return [
        TileJob(validate_id(i, image_dir), image_files[i], mask_path=mask_files[i]) for i in wanted
    ]


def annotation_files(folder: str, same_as_slides: bool) -> Dict[str, str]:
    """``{id: path}`` of the annotation files ``<id><ending>`` in ``folder`` (endings
    ``ANNOTATION_EXTENSIONS``). In the slides' own folder a plain ``.dcm`` is a slide, not a label.
    Two files for one id are an error naming both."""
    endings = tuple(e for e in ANNOTATION_EXTENSIONS if not (same_as_slides and e == ".dcm"))
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        ann_id = annotation_id_of(name, endings) if os.path.isfile(path) else None
        if ann_id is None:
            continue
        if ann_id in found:
            raise ValueError(f"{folder}: two annotation files for id {ann_id!r}: {os.path.basename(found[ann_id])} "
                             f"and {name}; keep one")
        found[ann_id] = path
    return found


def _own_image(path: str) -> Optional[str]:
    """The image a labelme file names (``imagePath``) when it exists, else the file itself when it
    embeds its image (``imageData``); None for other annotation files."""
    annotations = read_annotations(path)  # a malformed file is an error, not an unpaired one
    if annotations.format != "labelme JSON":
        return None
    if annotations.image_path and os.path.isfile(annotations.image_path):
        return annotations.image_path
    return path if annotations.image_data else None


def annotation_jobs(wsi_folder: str, annotations_folder: str = "") -> List[TileJob]:
    """One job per slide (or plain image) of ``wsi_folder`` with its annotation file
    ``<id>.<ext>`` in ``annotations_folder`` (empty: the slides' folder). A labelme file whose
    image lies elsewhere (``imagePath``) or is embedded (``imageData``) is a job by itself.
    Slides without an annotation file and annotation files without a slide are one error that
    lists them."""
    _require_folder(wsi_folder, "DATASETS.WSI_FOLDER")
    folder = annotations_folder or wsi_folder
    _require_folder(folder, "DATASETS.ANNOTATIONS_FOLDER")
    same = os.path.realpath(folder) == os.path.realpath(wsi_folder)
    slides = dict(slide_entries(wsi_folder, images=True))
    labels = annotation_files(folder, same)
    jobs, unpaired = [], []
    for ann_id, path in sorted(labels.items()):
        image = slides.get(ann_id) or _own_image(path)
        if image is None:
            unpaired.append(os.path.basename(path))
        else:
            jobs.append(TileJob(validate_id(ann_id, folder), image, annotation_path=path))
    unlabelled = [slide_id for slide_id in slides if slide_id not in labels]
    if unlabelled or unpaired:
        parts = []
        if unlabelled:
            parts.append(f"{len(unlabelled)} slide(s) without an annotation file <id>{{{', '.join(ANNOTATION_EXTENSIONS)}}}"
                         f" in {folder}: {unlabelled[:10]}")
        if unpaired:
            parts.append(f"{len(unpaired)} annotation file(s) without a slide in {wsi_folder}: {unpaired[:10]}")
        raise FileNotFoundError(f"{wsi_folder}: " + "; ".join(parts))
    if not jobs:
        raise FileNotFoundError(f"{wsi_folder}: no slides or images with annotation files "
                                f"({', '.join(ANNOTATION_EXTENSIONS)})")
    return jobs


def source_views(cfg) -> List[Tuple[str, float, object]]:
    """``(name, weight, cfg)`` per data source: the DATASETS.SOURCES entries, each as a frozen copy of
    ``cfg`` whose DATASETS keys are the entry's; ``[("", 1.0, cfg)]`` for a single-source config."""
    from config.loader import source_entries

    entries = source_entries(cfg)
    if not entries:
        return [("", 1.0, cfg)]
    views = []
    for entry in entries:
        view = cfg.clone()
        view.defrost()
        for key, value in entry.items():
            if key in view.DATASETS:
                view.DATASETS[key] = value
        view.DATASETS.SOURCES = []
        view.freeze()
        views.append((entry["NAME"], float(entry["WEIGHT"]), view))
    return views


def load_pair_mask(path: str, channel: int = -1, threshold: int = 0, invert: bool = False) -> np.ndarray:
    """Read a mask file and binarise it: ``(H, W)`` uint8 of 0/1.

    ``channel``: -1 = the maximum over the colour channels, 0/1/2 = R/G/B, 3 = alpha.
    A pixel is foreground when its value is greater than ``threshold``; ``invert`` swaps.
    """
    if not os.path.isfile(path):
        raise SlideError(f"{path}: mask file not found")
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise SlideError(f"{path}: not a readable mask image or corrupt")
    if mask.dtype not in (np.uint8, np.uint16):
        raise SlideError(f"{path}: unsupported mask bit depth {mask.dtype}")
    if mask.ndim == 3:
        colour = mask[..., 2::-1] if mask.shape[2] >= 3 else mask  # BGR(A) -> RGB
        if channel == -1:
            mask = colour.max(axis=2)
        elif channel == 3:
            if mask.shape[2] < 4:
                raise SlideError(f"{path}: DATASETS.MASK_CHANNEL 3 (alpha) but the mask has no alpha")
            mask = mask[..., 3]
        elif channel < colour.shape[2]:
            mask = colour[..., channel]
        else:
            raise SlideError(f"{path}: DATASETS.MASK_CHANNEL {channel} but the mask has {mask.shape[2]} channels")
    fg = mask > threshold
    if invert:
        fg = ~fg
    return fg.astype(np.uint8)
