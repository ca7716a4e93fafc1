"""``predict_slides(cfg)``: every slide of ``TEST.WSI_FOLDER`` with the checkpoint ensemble of
``TEST.MODEL_WEIGHTS_FOLDER`` -> an RLE CSV, pictures and (with labels) Dice, resumable.

Output in ``OUTPUT_DIR`` (CSV at ``TEST.OUTPUT_CSV`` when set)::

    submission.csv                 id,predicted (full-resolution Kaggle RLE; "" = empty)
    predictions/<id>.geojson       QuPath annotations ("Glomerulus"), level-0 pixel coordinates
    predictions/<id>_mask.png      the predicted mask at the model's scale (1/reduce)
    predictions/<id>_overlay.png   thumbnail with predicted (green) and true (red) contours

With ``TEST.PAIRS_FOLDER`` the items are the images of an image/mask pairs folder (laid out as
``DATASETS.PAIRS_FOLDER``, the DATASETS mask encoding applies, masks optional) instead of slides;
there ``TEST.LABELS_CSV``, when set, is a CSV whose ``id`` column picks the images.
``TEST.MODEL_WEIGHTS_FOLDER`` may also name a single checkpoint file.
    dice.csv, metrics.json         with TEST.LABELS_CSV: per-slide and pooled Dice
    .predictions/<id>.json         per-slide result: a rerun skips finished slides
"""
from __future__ import annotations

import ctypes
import datetime
import glob
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Dict, List, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm
from yacs.config import CfgNode as CN

from data.sources import files_by_stem, load_pair_mask, read_labels_csv, select_ids, slide_id_of
from data.tiling import RLEMask, TileGrid, mask_band
from data.wsi import SLIDE_EXTENSIONS, ArraySlide, open_slide, read_image
from model.build import resolve_device
from model.checkpoint import CheckpointError, load_checkpoint, model_from_loaded
from model.inference import (lowres_image, predict_canvas, prob_to_rle, remove_small_objects, slide_box, threshold_mask,
                             torch_predictor)
from utils.distributed import local_rank, world_size
from utils.export import mask_polygons, polygons_geojson
from utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from utils.metrics import dice_from_counts
from utils.rle import parse_rle, rle_area, rle_encode, runs_intersection

__all__ = ["load_checkpoints", "predict_slides", "list_slides", "ensemble_threshold"]

logger = logging.getLogger(__name__)


def load_checkpoints(folder: str) -> Tuple[List[Dict[str, object]], List[str]]:
    """Every checkpoint in ``folder`` (or the one file ``folder`` names), loaded safely but not
    yet built, and its path. Checkpoints of one ensemble must agree on reduction and tile size."""
    if os.path.isfile(folder):  # one checkpoint file
        paths = [folder]
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: checkpoint folder not found (TEST.MODEL_WEIGHTS_FOLDER)")
    else:
        paths = sorted(glob.glob(os.path.join(folder, "*.pth")))
    if not paths:
        raise FileNotFoundError(f"{folder}: no .pth checkpoints (TEST.MODEL_WEIGHTS_FOLDER)")
    ckpts = [load_checkpoint(path) for path in paths]
    first = ckpts[0]["input"]
    for path, ckpt in zip(paths, ckpts):
        if (ckpt["input"]["reduce"], ckpt["input"]["size"]) != (first["reduce"], first["size"]):
            raise CheckpointError(
                f"{path}: reduction {ckpt['input']['reduce']} / tile {ckpt['input']['size']} px, but "
                f"{paths[0]} has {first['reduce']} / {first['size']}: checkpoints of one ensemble "
                "must share scale and tile size"
            )
    return ckpts, paths


def _build(ckpt: Dict[str, object], path: str, device: torch.device) -> torch.nn.Module:
    model = model_from_loaded(ckpt, path).to(device).eval()
    return model.to(memory_format=torch.channels_last)  # the tiles arrive channels-last: faster convs


def list_slides(folder: str) -> List[Tuple[str, str]]:
    """``(id, path)`` of every slide file in ``folder``, sorted by id."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder not found (TEST.WSI_FOLDER)")
    found = []
    for name in sorted(os.listdir(folder)):
        slide_id = slide_id_of(name)
        if slide_id and os.path.isfile(os.path.join(folder, name)):
            found.append((slide_id, os.path.join(folder, name)))
    if not found:
        raise FileNotFoundError(f"{folder}: no slides ({', '.join(SLIDE_EXTENSIONS)})")
    return found


def _overlay(image: np.ndarray, mask: np.ndarray, truth=None, max_side: int = 2048) -> np.ndarray:
    scale = min(1.0, max_side / max(image.shape[:2]))
    size = (max(1, int(image.shape[1] * scale)), max(1, int(image.shape[0] * scale)))
    picture = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    for m, colour in ((truth, (255, 0, 0)), (mask, (0, 255, 0))):
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


def _items(cfg: CN):
    """``(id, source path, open() -> Slide, truth() -> true RLE or None)`` for slides or
    pairs; opening and reading the truth wait until an item is predicted (not on resume)."""
    t, d = cfg.TEST, cfg.DATASETS
    if t.PAIRS_FOLDER:
        image_dir, mask_dir = os.path.join(t.PAIRS_FOLDER, d.PAIRS_IMAGES), os.path.join(t.PAIRS_FOLDER, d.PAIRS_MASKS)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir}: folder not found (TEST.PAIRS_FOLDER / DATASETS.PAIRS_IMAGES)")
        images = files_by_stem(image_dir)
        masks = files_by_stem(mask_dir) if os.path.isdir(mask_dir) else {}
        if not images:
            raise FileNotFoundError(f"{image_dir}: no images")
        # pairs: TEST.LABELS_CSV's id column picks the images (e.g. a fold's held-out ones)
        images = {i: images[i] for i in select_ids(images, t.LABELS_CSV, image_dir)}

        def truth(mask_path):
            if mask_path is None:
                return None
            return rle_encode(load_pair_mask(mask_path, d.MASK_CHANNEL, d.MASK_THRESHOLD, d.MASK_INVERT))

        return [(image_id, path, lambda p=path: ArraySlide(read_image(p), p),
                 lambda m=masks.get(image_id): truth(m))
                for image_id, path in sorted(images.items())]
    labels = read_labels_csv(t.LABELS_CSV) if t.LABELS_CSV else {}
    slides = list_slides(t.WSI_FOLDER)
    if labels:
        ids = {slide_id for slide_id, _ in slides}
        unlabelled = [i for i in ids if i not in labels]
        unused = [i for i in labels if i not in ids]
        if unlabelled:
            logger.warning("%s: no row for %d slide(s), not scored: %s", t.LABELS_CSV, len(unlabelled),
                           ", ".join(sorted(unlabelled)[:10]))
        if unused:
            logger.warning("%s: %d id(s) without a slide in %s, ignored: %s", t.LABELS_CSV, len(unused),
                           t.WSI_FOLDER, ", ".join(sorted(unused)[:10]))
    return [(slide_id, path, lambda p=path: open_slide(p), lambda r=labels.get(slide_id): r)
            for slide_id, path in slides]


def _read(opener, size: int, reduce: int) -> Tuple[np.ndarray, TileGrid]:
    """The item's padded low-res image (as the tiler sees it) and its grid."""
    with opener() as slide:
        height, width = slide.shape
        grid = TileGrid(height, width, size, reduce)
        return lowres_image(slide, grid), grid


def _predict_one(cfg, slide_id, image, grid, truth_rle, predict, out_dir, progress, helper,
                 threshold: float) -> Dict[str, object]:
    t = cfg.TEST
    height, width, reduce, size = grid.height, grid.width, grid.reduce, grid.size
    start = time.perf_counter()
    prob, n_windows = predict_canvas(image, predict, size, t.OVERLAP, t.BLEND, t.IMS_PER_BATCH, t.S_TH, t.P_TH,
                                     progress, box=slide_box(grid), helper=helper)
    windows_s = time.perf_counter() - start
    y0, y1, x0, x1 = slide_box(grid, whole=False)  # nothing is predicted off the slide
    prob[:y0] = 0
    prob[y1:] = 0
    prob[:, :x0] = 0
    prob[:, x1:] = 0
    mask = threshold_mask(prob, threshold)
    if t.MIN_AREA > 0:
        kept = remove_small_objects(mask, int(round(t.MIN_AREA / reduce**2)))
        prob[mask > kept] = 0  # removed objects stay out of the upsampled map too
        mask = kept
    exports = helper.submit(_export, slide_id, image, mask, grid, truth_rle, out_dir)  # while the RLE is encoded
    try:
        rle, area = prob_to_rle(prob, grid, threshold, t.UPSAMPLE)
        del prob
    finally:
        wait([exports])  # the pictures are finished (or failed) before anything else happens
    n_objects = exports.result()
    return {"id": slide_id, "predicted": rle, "area": area,
            "objects": n_objects, "windows": n_windows, "shape": [height, width],
            "seconds": {"windows": round(windows_s, 3), "outputs": round(time.perf_counter() - start - windows_s, 3)}}


def _export(slide_id, image, mask, grid, truth_rle, out_dir) -> int:
    """``predictions/<id>.geojson``, ``_mask.png`` and ``_overlay.png`` (with the true contours
    when ``truth_rle`` is given); returns the number of objects (8-connected, at model scale)."""
    height, width = grid.height, grid.width
    truth_lr = None
    if truth_rle is not None:  # for the overlay; the Dice is computed when the outputs are assembled
        truth_mask = RLEMask(parse_rle(truth_rle, (height, width), slide_id), (height, width))
        truth_lr = np.concatenate([mask_band(truth_mask, grid, r) for r in range(grid.n_rows)])
    pictures = os.path.join(out_dir, "predictions")
    os.makedirs(pictures, exist_ok=True)
    polygons = mask_polygons(mask, scale=grid.reduce, offset=(grid.pad_left, grid.pad_top),
                             clip=(float(width), float(height)))
    atomic_write_text(os.path.join(pictures, f"{slide_id}.geojson"), json.dumps(polygons_geojson(polygons)))
    y0, y1, x0, x1 = slide_box(grid)  # the pictures show the slide, not the grid's padding
    crop = (slice(y0, y1), slice(x0, x1))
    _write_png(os.path.join(pictures, f"{slide_id}_mask.png"), mask[crop] * 255)
    _write_png(os.path.join(pictures, f"{slide_id}_overlay.png"),
               cv2.cvtColor(_overlay(image[crop], mask[crop], None if truth_lr is None else truth_lr[crop]),
                            cv2.COLOR_RGB2BGR))
    return max(0, cv2.connectedComponents(mask, connectivity=8)[0] - 1)


def _score(record: Dict[str, object], truth_rle: str) -> Dict[str, object]:
    """Dice of a prediction record against the true RLE, from the runs (no masks)."""
    shape = tuple(record["shape"])
    pred_runs = parse_rle(record["predicted"], shape, record["id"])
    true_runs = parse_rle(truth_rle, shape, record["id"])
    inter, total = runs_intersection(pred_runs, true_runs), rle_area(pred_runs) + rle_area(true_runs)
    return {"id": record["id"], "dice": dice_from_counts(inter, total), "intersection": inter, "total": total}


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
    return {"checkpoints": [os.path.abspath(p) for p in paths], "reduce": reduce, "size": size,
            "overlap": t.OVERLAP, "blend": t.BLEND, "tta": t.TTA, "th": threshold, "min_area": t.MIN_AREA,
            "upsample": t.UPSAMPLE, "s_th": t.S_TH, "p_th": t.P_TH}


def _finished(record_path: str, settings: Dict[str, object], source: str):
    """The saved record of an item predicted earlier with the same settings, else None."""
    if not os.path.isfile(record_path):
        return None
    record = read_json(record_path)
    if record.get("settings") == settings and record.get("source") == os.path.abspath(source):
        return record
    return None


def predict_slides(cfg: CN) -> Dict[str, object]:
    """Predict every slide (or pair image); returns the summary (rank 0 under torchrun)."""
    start = time.time()
    t = cfg.TEST
    rank, world = _distributed()
    device = resolve_device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank())
    items = _items(cfg)
    ckpts, paths = load_checkpoints(t.MODEL_WEIGHTS_FOLDER)
    reduce, size = int(ckpts[0]["input"]["reduce"]), int(t.SIZE)
    threshold, threshold_source = ensemble_threshold(t.TH, ckpts)
    logger.info("Threshold %.3f: %s", threshold, threshold_source)
    settings = _settings(cfg, paths, reduce, size, threshold)
    out_dir = cfg.OUTPUT_DIR
    state = os.path.join(out_dir, ".predictions")
    csv_path = t.OUTPUT_CSV or os.path.join(out_dir, "submission.csv")
    kind = "image(s)" if t.PAIRS_FOLDER else "slide(s)"
    shapes = {}  # one read of the earlier records: the items finished with these settings
    for slide_id, path, _, _ in items:
        record = _finished(os.path.join(state, f"{slide_id}.json"), settings, path)
        if record is not None:
            shapes[slide_id] = tuple(record["shape"])
    mine = [item for i, item in enumerate(items) if i % world == rank]  # torchrun: a share per rank
    todo = [item for item in mine if item[0] not in shapes]
    for slide_id, _, _, _ in mine:
        if slide_id in shapes:
            logger.info("%s: predicted earlier, skipped", slide_id)
    if not t.PAIRS_FOLDER:  # check every slide and label before spending time on any
        for slide_id, path, opener, truth in items:
            shape = shapes.get(slide_id)
            if shape is None:
                with opener() as slide:
                    shape = slide.shape
            truth_rle = truth()
            if truth_rle is not None:
                parse_rle(truth_rle, shape, slide_id)
    os.makedirs(state, exist_ok=True)
    logger.info("Predicting %d %s (%d done earlier%s) with %d checkpoint(s) at reduction %d, %d px windows, "
                "overlap %.2f, threshold %.2f on %s", len(todo), kind, len(mine) - len(todo),
                f", rank {rank}/{world}" if world > 1 else "", len(ckpts), reduce, size, t.OVERLAP, threshold, device)
    fresh = {}  # the scores of the items predicted in this run, with this run's labels
    # one reader thread and one blending helper for the whole run (threads made per slide
    # would each leave a malloc arena behind: +85 MB peak over 3 slides, measured)
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as helper:
        # Slide reading (C code, outside the GIL) overlaps building the models, then each next
        # slide is read while the current one is predicted.
        queue = [reader.submit(_read, item[2], size, reduce) for item in todo[:1]]
        models = [_build(ckpt, path, device) for ckpt, path in zip(ckpts, paths)] if todo else []
        predict = torch_predictor(models, [c["input"]["mean"] for c in ckpts], [c["input"]["std"] for c in ckpts],
                                  device, tta=t.TTA)
        del ckpts
        bar = tqdm(total=0, unit="window", dynamic_ncols=True, leave=False, position=rank)
        try:
            for n, (slide_id, path, _, truth) in enumerate(todo):
                image, grid = queue.pop(0).result()
                if n + 1 < len(todo):
                    queue.append(reader.submit(_read, todo[n + 1][2], size, reduce))
                bar.set_description(f"[{n + 1}/{len(todo)}] {slide_id}")
                truth_rle = truth()
                record = _predict_one(cfg, slide_id, image, grid, truth_rle, predict, out_dir, bar, helper, threshold)
                del image
                _release_freed_memory()
                record["settings"] = settings
                record["source"] = os.path.abspath(path)
                atomic_write_json(os.path.join(state, f"{slide_id}.json"), record)
                fresh[slide_id] = _score(record, truth_rle) if truth_rle is not None else None
                logger.info("%s: %d objects, %d windows (%.1f s; RLE, GeoJSON and pictures %.1f s)%s", slide_id,
                            record["objects"], record["windows"], record["seconds"]["windows"],
                            record["seconds"]["outputs"], f", Dice {fresh[slide_id]['dice']:.4f}" if fresh[slide_id] else "")
        finally:
            bar.close()
            for future in queue:
                future.cancel()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's records are saved
        if rank != 0:
            return {"slides": len(todo), "rank": rank}
    records, scores = [], []
    for slide_id, path, _, truth in items:
        record = _finished(os.path.join(state, f"{slide_id}.json"), settings, path)
        if record is None:
            raise RuntimeError(f"{slide_id}: no prediction record in {state} (did a rank fail?)")
        records.append(record)
        if slide_id in fresh:
            score = fresh[slide_id]
        else:  # predicted earlier: scored now, with this run's labels (they may have changed)
            truth_rle = truth()
            score = _score(record, truth_rle) if truth_rle is not None else None
        if score is not None:
            scores.append(score)
    return _write_outputs(records, scores, csv_path, out_dir, start, cfg, (threshold, threshold_source))


def _write_outputs(records: List[Dict[str, object]], scored: List[Dict[str, object]], csv_path: str, out_dir: str,
                   start: float, cfg: CN, threshold: Tuple[float, str]) -> Dict[str, object]:
    """The CSV (atomically), and with labels dice.csv and metrics.json, then the config that
    made them (so a failed run leaves the earlier outputs and their config as they were)."""
    atomic_write_text(csv_path, "id,predicted\n" + "".join(f"{r['id']},{r['predicted']}\n" for r in records))
    summary = {"slides": len(records), "seconds": round(time.time() - start, 1), "csv": csv_path,
               "objects": int(sum(r["objects"] for r in records)),
               "threshold": threshold[0], "threshold_source": threshold[1]}
    if scored:
        inter = sum(r["intersection"] for r in scored)
        total = sum(r["total"] for r in scored)
        summary.update(overall_dice=dice_from_counts(inter, total),
                       mean_dice=float(np.mean([r["dice"] for r in scored])), scored=len(scored))
        atomic_write_text(os.path.join(out_dir, "dice.csv"),
                          "id,dice\n" + "".join(f"{r['id']},{r['dice']:.6f}\n" for r in scored))
        atomic_write_json(os.path.join(out_dir, "metrics.json"), summary)
        logger.info("Dice: overall %.4f, mean per image/slide %.4f (%d scored) -> %s", summary["overall_dice"],
                    summary["mean_dice"], len(scored), os.path.join(out_dir, "dice.csv"))
    atomic_write_text(os.path.join(out_dir, "config_test.yaml"), cfg.dump())
    logger.info("Done in %.1f s: %d images/slides, %d objects -> %s (GeoJSON, masks and overlays in %s)",
                summary["seconds"], len(records), summary["objects"], csv_path, os.path.join(out_dir, "predictions"))
    return summary
