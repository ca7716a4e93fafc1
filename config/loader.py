"""Merging YAML files and ``KEY VALUE`` overrides into the defaults, strictly.

yacs is strict about unknown keys but refuses ``null`` for string keys and ``1`` for float keys;
this loader keeps the strictness and adds the few conversions a user expects:

* ``null`` for a string key means ``""`` (not set), and for a list key ``[]``;
* an integer for a float key is converted (``TEST.TH 1``);
* a YAML file may start with ``_BASE_: other.yaml`` (relative to itself), as in detectron2.

Every error is a :class:`ConfigError` naming the file or option and the key.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from config.defaults import get_cfg_defaults
from config.choices import STAIN_METHODS, ARCHITECTURES, BACKENDS, LOSS_NAMES, MAX_MPP, SLIDE_READERS, SMP_ARCHITECTURES

__all__ = ["ConfigError", "load_cfg", "merge_dict", "merge_opts", "validate_cfg", "source_entries", "SOURCE_ONLY_KEYS"]

BASE_KEY = "_BASE_"

# Keys of earlier versions that no longer exist, and what replaced them: setting one is an error
# that says so (never a value silently ignored).
RETIRED_KEYS = {
    "INPUT.SIZE_TEST": "the sliding window's side is TEST.SIZE",
    "INPUT.SIZE_REDUCTION_TEST": "test_net reads at the checkpoints' scale: their reduction, or their "
                                 "pixel size in um/px with TEST.MPP / the slides' metadata",
    "TEST.REDUCE": "test_net reads at the checkpoints' scale: their reduction, or their pixel size in "
                   "um/px with TEST.MPP / the slides' metadata",
}


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it came from."""


def _coerce(value, default, key: str, source: str):
    """Convert ``value`` to the type of ``default`` where that is unambiguous, else raise."""
    if value is None:
        if isinstance(default, str):
            return ""
        if isinstance(default, (list, tuple)):
            return type(default)()
        raise ConfigError(f"{source}: {key} cannot be null (expected {type(default).__name__})")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    if isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
    raise ConfigError(f"{source}: {key} has an unsupported type {type(default).__name__}")


def _unknown(source: str, key: str) -> ConfigError:
    if key in RETIRED_KEYS:
        return ConfigError(f"{source}: {key} was removed: {RETIRED_KEYS[key]}; delete it")
    return ConfigError(f"{source}: unknown config key {key}")


def merge_dict(cfg: CN, values: dict, source: str, prefix: str = "", sources: Optional[dict] = None) -> None:
    """Merge a nested dict into ``cfg``; unknown keys and wrong types raise ConfigError.
    ``sources`` (optional) records, per key set, the file it came from."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(values).__name__}")
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in cfg:
            raise _unknown(source, key)
        current = cfg[name]
        if isinstance(current, CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} is a section; give it keys, not {value!r}")
            merge_dict(current, value, source, prefix=f"{key}.", sources=sources)
        else:
            cfg[name] = _coerce(value, current, key, source)
            if sources is not None:
                sources[key] = source


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: _BASE_ chain loops back to itself")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    merged = _read_yaml(base_path, seen + (path,))
    _deep_update(merged, data)
    return merged


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _parse_value(text: str):
    """Parse an override value the way YAML would, falling back to a plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_opts(cfg: CN, opts: Sequence[str], sources: Optional[dict] = None) -> None:
    """Merge ``["KEY", "VALUE", ...]`` command-line overrides into ``cfg``."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"command line: overrides must be KEY VALUE pairs; {opts[-1]!r} has no value"
        )
    for key, text in zip(opts[0::2], opts[1::2]):
        node = cfg
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], CN):
                raise _unknown("command line", key)
            node = node[part]
        leaf = parts[-1]
        if leaf not in node:
            raise _unknown("command line", key)
        if isinstance(node[leaf], CN):
            raise ConfigError(f"command line: {key} is a section, not a key")
        value = _parse_value(text)
        if isinstance(node[leaf], str) and not isinstance(value, str) and value is not None:
            value = text  # "MODEL.ENCODER_NAME 123" is still a name
        node[leaf] = _coerce(value, node[leaf], key, "command line")
        if sources is not None:
            sources[key] = "command line"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_cfg(cfg: CN) -> None:
    """Reject impossible values, naming the key: every check that needs no file (the scripts
    exit with code 2 before doing anything)."""
    _check_scales_and_test(cfg)
    _check_datasets(cfg)
    _check_training(cfg)
    _check_qc(cfg)


def _check_scales_and_test(cfg: CN) -> None:
    i, d, t = cfg.INPUT, cfg.DATASETS, cfg.TEST
    _check(i.SIZE_TRAIN > 0, f"INPUT.SIZE_TRAIN must be > 0, got {i.SIZE_TRAIN}")
    _check(t.SIZE > 0, f"TEST.SIZE must be > 0, got {t.SIZE}")
    _check(i.SIZE_REDUCTION_TRAIN >= 1, f"INPUT.SIZE_REDUCTION_TRAIN must be an integer >= 1, got {i.SIZE_REDUCTION_TRAIN}")
    for key, value, zero in (("INPUT.MPP_TRAIN", i.MPP_TRAIN, "the reduction alone"),
                             ("DATASETS.MPP", d.MPP, "from the metadata"), ("TEST.MPP", t.MPP, "from the metadata")):
        _check(value == 0 or 0 < value <= MAX_MPP,
               f"{key} must be 0 ({zero}) or a pixel size > 0 and <= {MAX_MPP:g} um/px, got {value:g}")
    for key, value in (("INPUT.SATURATION_THRESHOLD", i.SATURATION_THRESHOLD), ("TEST.S_TH", t.S_TH)):
        _check(0 <= value <= 255, f"{key} must be within 0..255, got {value}")
    _check(0.0 <= i.PROB <= 1.0, f"INPUT.PROB must be within 0..1, got {i.PROB}")
    _check(0.0 <= i.COPY_PASTE <= 1.0, f"INPUT.COPY_PASTE must be within 0..1, got {i.COPY_PASTE}")
    _check(i.STAIN_STRENGTH >= 0, f"INPUT.STAIN_STRENGTH must be >= 0, got {i.STAIN_STRENGTH}")
    _check(t.TH <= 1.0, f"TEST.TH must be within 0..1 (or negative: the checkpoints' own), got {t.TH}")
    _check(i.CROP_SIZE >= 0, f"INPUT.CROP_SIZE must be >= 0 (0: fixed tiles), got {i.CROP_SIZE}")
    _check(0.0 <= i.FOREGROUND_FRACTION <= 1.0,
           f"INPUT.FOREGROUND_FRACTION must be within 0..1, got {i.FOREGROUND_FRACTION}")
    _check(i.AUGMENTATION in ("classic", "histology"),
           f"INPUT.AUGMENTATION must be 'classic' or 'histology', got {i.AUGMENTATION!r}")
    _check(0.0 <= t.OVERLAP < 1.0, f"TEST.OVERLAP must be >= 0 and < 1, got {t.OVERLAP}")
    _check(t.BLEND in ("gaussian", "constant"), f"TEST.BLEND must be 'gaussian' or 'constant', got {t.BLEND!r}")
    _check(t.UPSAMPLE in ("bilinear", "nearest"), f"TEST.UPSAMPLE must be 'bilinear' or 'nearest', got {t.UPSAMPLE!r}")
    _check(t.MIN_AREA >= 0, f"TEST.MIN_AREA must be >= 0, got {t.MIN_AREA}")
    _check(t.MIN_AREA_UM2 >= 0, f"TEST.MIN_AREA_UM2 must be >= 0, got {t.MIN_AREA_UM2}")
    _check(t.BACKEND in BACKENDS, f"TEST.BACKEND must be one of {BACKENDS}, got {t.BACKEND!r}")
    _check(t.ONNX_THREADS >= 0, f"TEST.ONNX_THREADS must be >= 0 (0: ONNX Runtime's default), got {t.ONNX_THREADS}")
    _check(t.SHARDS >= 0, f"TEST.SHARDS must be >= 1 (0: from the environment), got {t.SHARDS}")
    _check(t.SHARD_INDEX >= -1, f"TEST.SHARD_INDEX must be >= 0 (-1: from the environment), got {t.SHARD_INDEX}")
    _check(t.SHARDS == 0 or t.SHARD_INDEX < t.SHARDS,
           f"TEST.SHARD_INDEX {t.SHARD_INDEX} must be < TEST.SHARDS {t.SHARDS} (shards are numbered from 0)")
    for key, value in (("INPUT.PIXEL_MEAN", i.PIXEL_MEAN), ("INPUT.PIXEL_STD", i.PIXEL_STD)):
        _check(len(value) in (0, 3), f"{key} must be empty or have 3 values (RGB), got {list(value)}")
        _check(
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
            f"{key} must hold numbers, got {list(value)}",
        )
    _check(all(v > 0 for v in i.PIXEL_STD), f"INPUT.PIXEL_STD must be > 0, got {list(i.PIXEL_STD)}")
    _check(i.SLIDE_READER in SLIDE_READERS, f"INPUT.SLIDE_READER must be one of {SLIDE_READERS}, got {i.SLIDE_READER!r}")
    _check(len(i.CHANNELS) in (0, 3) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                             for v in i.CHANNELS),
           f"INPUT.CHANNELS must be empty or three channel indices >= 0 (read as R, G, B), got {list(i.CHANNELS)}")


def _check_qc(cfg: CN) -> None:
    i = cfg.INPUT
    _check(i.STAIN_NORM in STAIN_METHODS, f"INPUT.STAIN_NORM must be one of {STAIN_METHODS}, got {i.STAIN_NORM!r}")
    _check(i.STAIN_NORM in ("none", "macenko") or bool(i.STAIN_REFERENCE),
           f"INPUT.STAIN_NORM {i.STAIN_NORM} needs INPUT.STAIN_REFERENCE (an image to normalise to); only macenko "
           "has a built-in reference")
    q = cfg.QC
    _check(q.MPP > 0, f"QC.MPP must be > 0, got {q.MPP}")
    _check(0 <= q.PEN_HUE_DISTANCE <= 90, f"QC.PEN_HUE_DISTANCE must be within 0..90, got {q.PEN_HUE_DISTANCE}")
    for key in ("TISSUE_SATURATION", "TISSUE_CONTRAST", "PEN_SATURATION", "PEN_RED_SATURATION", "PEN_BLACK_VALUE",
                "PEN_TRANSLUCENT_SATURATION"):
        _check(0 <= q[key] <= 255, f"QC.{key} must be within 0..255, got {q[key]}")
    _check(q.MIN_TISSUE_UM2 >= 0 and q.MIN_ARTEFACT_UM2 >= 0, "QC.MIN_TISSUE_UM2 and QC.MIN_ARTEFACT_UM2 must be >= 0")
    _check(q.FOLD_OD_RATIO == 0 or q.FOLD_OD_RATIO > 1, f"QC.FOLD_OD_RATIO must be 0 (off) or > 1, got {q.FOLD_OD_RATIO}")
    _check(q.BLUR_SHARPNESS >= 0, f"QC.BLUR_SHARPNESS must be >= 0, got {q.BLUR_SHARPNESS}")
    _check(0 <= q.WARN_FRACTION <= q.FAIL_FRACTION <= 1,
           f"QC fractions must satisfy 0 <= QC.WARN_FRACTION <= QC.FAIL_FRACTION <= 1, got {q.WARN_FRACTION}, "
           f"{q.FAIL_FRACTION}")


def _check_datasets(cfg: CN) -> None:
    d, t = cfg.DATASETS, cfg.TEST
    formats = ("wsi_rle", "pairs", "annotations")
    _check(d.FORMAT in formats, f"DATASETS.FORMAT must be one of {formats}, got {d.FORMAT!r}")
    for n, entry in enumerate(source_entries(cfg)):
        _check(entry["FORMAT"] in formats, f"DATASETS.SOURCES[{n}].FORMAT must be one of {formats}, got {entry['FORMAT']!r}")
        _check(entry["MPP"] == 0 or 0 < entry["MPP"] <= MAX_MPP,
               f"DATASETS.SOURCES[{n}].MPP must be 0 or a pixel size > 0 and <= {MAX_MPP:g} um/px, got {entry['MPP']:g}")
    for key, value in (("DATASETS.ANNOTATION_CLASSES", d.ANNOTATION_CLASSES), ("DATASETS.ANNOTATION_EXCLUDE",
                       d.ANNOTATION_EXCLUDE), ("DATASETS.ANNOTATION_ROI", d.ANNOTATION_ROI), ("TEST.ROI", t.ROI)):
        _check(all(isinstance(v, str) and v for v in value), f"{key} must be a list of class names, got {list(value)}")
    overlap = set(d.ANNOTATION_CLASSES) & (set(d.ANNOTATION_EXCLUDE) | set(d.ANNOTATION_ROI) | set(t.ROI))
    _check(not overlap, f"DATASETS.ANNOTATION_CLASSES names {sorted(overlap)} also as excluded or ROI classes")
    _check(not (t.ANNOTATIONS_FOLDER and t.LABELS_CSV and not t.PAIRS_FOLDER),
           "TEST.ANNOTATIONS_FOLDER and TEST.LABELS_CSV both label the slides: set one")
    _check(not (t.ANNOTATIONS_FOLDER and t.PAIRS_FOLDER),
           "TEST.ANNOTATIONS_FOLDER labels slides (TEST.WSI_FOLDER), not a pairs folder (TEST.PAIRS_FOLDER)")
    _check(not t.ROI or t.ANNOTATIONS_FOLDER, f"TEST.ROI {list(t.ROI)} needs TEST.ANNOTATIONS_FOLDER (where the ROI "
                                              "shapes are)")
    _check(-1 <= d.MASK_CHANNEL <= 3, f"DATASETS.MASK_CHANNEL must be -1, 0, 1, 2 or 3, got {d.MASK_CHANNEL}")
    _check(d.MASK_THRESHOLD >= 0, f"DATASETS.MASK_THRESHOLD must be >= 0, got {d.MASK_THRESHOLD}")


def _check_training(cfg: CN) -> None:
    i, t = cfg.INPUT, cfg.TEST
    _check(cfg.TILER.NUM_WORKERS >= 0, f"TILER.NUM_WORKERS must be >= 0, got {cfg.TILER.NUM_WORKERS}")
    _check(
        0 <= cfg.TILER.PNG_COMPRESSION <= 9,
        f"TILER.PNG_COMPRESSION must be within 0..9, got {cfg.TILER.PNG_COMPRESSION}",
    )
    _check(cfg.DATALOADER.NUM_WORKERS >= 0, f"DATALOADER.NUM_WORKERS must be >= 0, got {cfg.DATALOADER.NUM_WORKERS}")
    s = cfg.SOLVER
    _check(s.N_FOLDS >= 2, f"SOLVER.N_FOLDS must be >= 2 (cross-validation), got {s.N_FOLDS}")
    _check(s.MAX_EPOCHS >= 1, f"SOLVER.MAX_EPOCHS must be >= 1, got {s.MAX_EPOCHS}")
    _check(s.CHECKPOINT_PERIOD >= 1, f"SOLVER.CHECKPOINT_PERIOD must be >= 1, got {s.CHECKPOINT_PERIOD}")
    _check(s.EVAL_PERIOD >= 1, f"SOLVER.EVAL_PERIOD must be >= 1, got {s.EVAL_PERIOD}")
    _check(s.IMS_PER_BATCH >= 1, f"SOLVER.IMS_PER_BATCH must be >= 1, got {s.IMS_PER_BATCH}")
    _check(s.SAMPLES_PER_EPOCH >= 0, f"SOLVER.SAMPLES_PER_EPOCH must be >= 0, got {s.SAMPLES_PER_EPOCH}")
    _check(0.0 <= s.WARMUP_FRACTION < 1.0, f"SOLVER.WARMUP_FRACTION must be >= 0 and < 1, got {s.WARMUP_FRACTION}")
    _check(s.WEIGHT_DECAY >= 0, f"SOLVER.WEIGHT_DECAY must be >= 0, got {s.WEIGHT_DECAY}")
    _check(s.AVERAGE in ("none", "ema", "swa"), f"SOLVER.AVERAGE must be 'none', 'ema' or 'swa', got {s.AVERAGE!r}")
    _check(0.0 <= s.EMA_DECAY < 1.0, f"SOLVER.EMA_DECAY must be >= 0 and < 1, got {s.EMA_DECAY}")
    _check(0.0 <= s.SWA_START < 1.0, f"SOLVER.SWA_START must be >= 0 and < 1, got {s.SWA_START}")
    _check(s.BN_UPDATE_BATCHES >= 0, f"SOLVER.BN_UPDATE_BATCHES must be >= 0, got {s.BN_UPDATE_BATCHES}")
    _check(s.AMP in ("auto", "bf16", "off"), f"SOLVER.AMP must be 'auto', 'bf16' or 'off', got {s.AMP!r}")
    _check(s.SAVE in ("best", "final"), f"SOLVER.SAVE must be 'best' or 'final', got {s.SAVE!r}")
    _check(t.IMS_PER_BATCH >= 1, f"TEST.IMS_PER_BATCH must be >= 1, got {t.IMS_PER_BATCH}")
    _check(
        0 < s.BASE_LR_MIN <= s.BASE_LR_MAX,
        f"SOLVER.BASE_LR_MIN must be > 0 and <= SOLVER.BASE_LR_MAX, got {s.BASE_LR_MIN} and {s.BASE_LR_MAX}",
    )
    _check(cfg.MODEL.NORM in ("batch", "group"), f"MODEL.NORM must be 'batch' or 'group', got {cfg.MODEL.NORM!r}")
    _check(not cfg.MODEL.DEEP_SUPERVISION or cfg.MODEL.ARCHITECTURE in ARCHITECTURES,
           f"MODEL.DEEP_SUPERVISION: only the UneXt family has it, not {cfg.MODEL.ARCHITECTURE!r}")
    _check(cfg.MODEL.NUM_CLASSES == 1, f"MODEL.NUM_CLASSES must be 1 (binary segmentation: multi-class models are "
                                       f"not supported yet), got {cfg.MODEL.NUM_CLASSES}")
    arch = cfg.MODEL.ARCHITECTURE
    _check(arch in ARCHITECTURES or arch.lower() in {a.lower() for a in SMP_ARCHITECTURES},
           f"MODEL.ARCHITECTURE: unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES + SMP_ARCHITECTURES)}")
    _check(s.LOSS_FUNCTION_NAME in LOSS_NAMES, f"SOLVER.LOSS_FUNCTION_NAME: unknown loss {s.LOSS_FUNCTION_NAME!r}; "
                                               f"valid: {', '.join(sorted(LOSS_NAMES))}")
    _check(i.CROP_SIZE % 32 == 0, f"INPUT.CROP_SIZE must be a multiple of 32 px (the models' stride), got {i.CROP_SIZE}")
    _check(s.CROSS_VALIDATION or s.FINAL_MODEL, "SOLVER.CROSS_VALIDATION False trains only the model on every "
                                                "image: set SOLVER.FINAL_MODEL True too")
    bad_folds = [f for f in s.FOLDS if not (isinstance(f, int) and 0 <= f < s.N_FOLDS)]
    _check(not bad_folds, f"SOLVER.FOLDS {list(bad_folds)}: folds are numbered 0..{s.N_FOLDS - 1} (SOLVER.N_FOLDS "
                          f"{s.N_FOLDS})")
    device = cfg.MODEL.DEVICE
    _check(
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()),
        f"MODEL.DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}",
    )


# DATASETS.SOURCES entries: these keys of their own, and any DATASETS key but these.
SOURCE_ONLY_KEYS = {"NAME": "", "WEIGHT": 1.0}
NOT_PER_SOURCE = ("TRAIN_FOLDER", "SOURCES")


def source_entries(cfg: CN) -> List[Dict[str, object]]:
    """The DATASETS.SOURCES entries as plain dicts of every DATASETS key (the section's values
    overridden by the entry's, converted to the keys' types) plus NAME and WEIGHT; checked:
    known keys, a unique plain NAME, WEIGHT > 0."""
    entries, names = [], set()
    for n, raw in enumerate(cfg.DATASETS.SOURCES):
        where = f"DATASETS.SOURCES[{n}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a mapping of keys (NAME, FORMAT, ...), got {raw!r}")
        entry = {k: v for k, v in cfg.DATASETS.items() if k not in NOT_PER_SOURCE}
        entry.update(SOURCE_ONLY_KEYS)
        for key, value in raw.items():
            if key not in entry:
                raise ConfigError(f"{where}: unknown key {key!r} (a source takes NAME, WEIGHT and the DATASETS keys "
                                  f"but {', '.join(NOT_PER_SOURCE)})")
            try:
                entry[key] = _coerce(value, entry[key], f"{where}.{key}", "-")
            except ConfigError as exc:
                raise ConfigError(str(exc)[3:]) from None  # named by load_cfg after the file that set it
        name = entry["NAME"]
        _check(bool(name) and name.replace("_", "").replace("-", "").isalnum(),
               f"{where}.NAME must be a plain name (letters, digits, _ and -), got {name!r}")
        _check(name not in names, f"{where}.NAME {name!r} names two sources")
        _check(entry["WEIGHT"] > 0, f"{where}.WEIGHT must be > 0, got {entry['WEIGHT']}")
        names.add(name)
        entries.append(entry)
    return entries


def load_cfg(config_file: Optional[str] = None, opts: Optional[Iterable[str]] = None) -> CN:
    """Defaults, then ``config_file`` (if any), then ``opts``; validated and frozen."""
    cfg = get_cfg_defaults()
    sources = {}
    if config_file:
        merge_dict(cfg, _read_yaml(config_file), source=config_file, sources=sources)
    merge_opts(cfg, list(opts or []), sources=sources)
    try:
        validate_cfg(cfg)
    except ConfigError as exc:  # name where the offending key was set, as unknown keys do
        message = str(exc)
        key = message.split(" ", 1)[0].split("[")[0].rstrip(":")
        if key in sources:
            raise ConfigError(f"{sources[key]}: {message}") from None
        raise
    cfg.freeze()
    return cfg
