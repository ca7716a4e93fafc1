"""Stain normalisation (``INPUT.STAIN_NORM``): Macenko, Reinhard or Vahadane, with torch-staintools.

A normalisation maps a slide's stain onto a reference's. Both ends are *fitted* with the
library's own normalisers (``torch_staintools.normalizer.NormalizerBuilder``): the reference once,
from ``INPUT.STAIN_REFERENCE`` (an image; empty: the Macenko reference the toolkit ships, the
stain vectors and maximal concentrations of Macenko et al. 2009, as torchstain and staintools
carry them), and every slide once, on its tissue only (a thumbnail at 4 µm/px, QC's usable tissue
when ``INPUT.QC``, else the saturated pixels). Every tile or window of the slide then gets the same
transform (the library's optical density, concentration solver and reconstruction, or its Lab
conversion for Reinhard), so tile borders do not show.

The fitted reference travels: the tiler writes it into ``stats_*.json``, training copies it into
every checkpoint (``input.stain``) and its model card, and test_net applies it to every slide it
predicts with that checkpoint, whatever the config says (a checkpoint trained on normalised tiles
never predicts on raw ones).

Vahadane's fit (dictionary learning) takes minutes per slide on a CPU; its application costs what
Macenko's does.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import cv2
import numpy as np

from config.choices import STAIN_METHODS as METHODS

__all__ = ["METHODS", "StainError", "MACENKO_REFERENCE", "fit", "reference", "slide_transform", "apply",
           "thumbnail_tissue"]

logger = logging.getLogger(__name__)

# Macenko et al. 2009's H&E reference (rows: haematoxylin, eosin; columns: R, G, B) and the 99th
# percentile concentrations, as torchstain and staintools ship them.
MACENKO_REFERENCE = {"method": "macenko", "stain_matrix": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]],
                     "max_concentration": [1.9705, 1.0308], "source": "Macenko et al. 2009 (built in)"}
FIT_MPP = 4.0  # the pixel size slides are fitted at (um/px)


class StainError(ValueError):
    """A stain normalisation that cannot be fitted; the message names the image."""


def _library():
    from torch_staintools.constants import CONFIG

    CONFIG.ENABLE_COMPILE = False  # eager: torch.compile costs ~20 s per process on a CPU
    from torch_staintools.normalizer import NormalizerBuilder

    return NormalizerBuilder


def _tensor(image: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255)


def _normalizer(method: str):
    # a fixed seed for Vahadane's dictionary learning; the others draw nothing
    return _library().build(method, concentration_solver="ls", luminosity_threshold=None,
                            rng=0 if method == "vahadane" else None)


def fit(image: np.ndarray, tissue: np.ndarray, method: str, name: str = "") -> Dict[str, object]:
    """The stain parameters of ``image`` (RGB uint8) over ``tissue`` (a bool map), by ``method``:
    plain JSON (lists of floats)."""
    import torch

    if tissue.sum() < 100:
        raise StainError(f"{name}: too little tissue to fit the {method} stain normalisation on "
                         f"({int(tissue.sum())} px)")
    norm = _normalizer(method)
    mask = torch.from_numpy(np.ascontiguousarray(tissue))[None, None]
    try:
        norm.fit(_tensor(image), mask=mask)
    except Exception as exc:  # the library's own errors: an empty mask, a singular fit
        raise StainError(f"{name}: the {method} stain fit failed ({type(exc).__name__}: {exc})") from None
    if method == "reinhard":
        return {"method": method, "means": norm.target_means.flatten().tolist(),
                "stds": norm.target_stds.flatten().tolist()}
    return {"method": method, "stain_matrix": norm.stain_matrix_target[0].tolist(),
            "max_concentration": norm.maxC_target.flatten().tolist()}


def thumbnail_tissue(image: np.ndarray, saturation_threshold: int = 20) -> np.ndarray:
    """Tissue of an image by saturation (the tiler's test), for fitting when QC is off."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1] > saturation_threshold


def reference(method: str, path: str = "") -> Dict[str, object]:
    """The reference of ``INPUT.STAIN_REFERENCE``: fitted on the image ``path`` (its tissue), or
    the built-in Macenko reference."""
    if not path:
        if method != "macenko":
            raise StainError(f"INPUT.STAIN_NORM {method} needs INPUT.STAIN_REFERENCE (an image to normalise to); "
                             "only macenko has a built-in reference")
        return dict(MACENKO_REFERENCE)
    from data.readers import read_image

    image = read_image(path)
    params = fit(image, thumbnail_tissue(image), method, path)
    params["source"] = path
    return params


def slide_transform(thumb: np.ndarray, tissue: np.ndarray, target: Dict[str, object], name: str) -> Dict[str, object]:
    """A slide's transform: its own stain fitted on its thumbnail's tissue, and the target."""
    return {"source": fit(thumb, tissue, target["method"], name), "target": target}


def apply(image: np.ndarray, transform: Dict[str, object], band: int = 1024) -> np.ndarray:
    """``image`` (RGB uint8, any size) normalised by a slide's ``transform``, band by band (bounded
    memory); pixels with no data (black padding) stay black."""
    import torch

    source, target = transform["source"], transform["target"]
    method = target["method"]
    out = np.empty_like(image)
    with torch.inference_mode():
        for top in range(0, image.shape[0], band):
            part = image[top:top + band]
            x = _tensor(part)
            if method == "reinhard":
                from torch_staintools.functional.conversion.lab import lab_to_rgb, rgb_to_lab

                lab = rgb_to_lab(x)
                mean_s, std_s = (torch.tensor(v).view(1, 3, 1, 1) for v in (source["means"], source["stds"]))
                mean_t, std_t = (torch.tensor(v).view(1, 3, 1, 1) for v in (target["means"], target["stds"]))
                y = lab_to_rgb((lab - mean_s) * (std_t / (std_s + 1e-8)) + mean_t)
            else:
                from torch_staintools.functional.conversion.od import rgb2od
                from torch_staintools.functional.utility import img_from_concentration

                od = rgb2od(x)
                matrix_s = torch.tensor(source["stain_matrix"], dtype=torch.float32)[None]
                matrix_t = torch.tensor(target["stain_matrix"], dtype=torch.float32)[None]
                solver = _normalizer(method).concentration_solver
                conc = solver(od, matrix_s, rng=None)
                scale = torch.tensor(target["max_concentration"]) / torch.tensor(source["max_concentration"])
                y = img_from_concentration(conc * scale.view(1, 1, -1), matrix_t, od.shape, (0, 1))
            rgb = (y.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            rgb[part.max(axis=2) == 0] = 0
            out[top:top + band] = rgb
    return out


def fit_scale(shape, mpp: Optional[float]) -> float:
    """The downsample a slide is fitted at: FIT_MPP µm/px (a slide without pixel size taken as
    0.5 µm/px), an image under ~8k px read finer (1024 px on its long side at least)."""
    return max(1.0, min(FIT_MPP / (mpp or 0.5), max(shape) / 1024))


def describe(transform: Optional[Dict[str, object]]) -> str:
    if not transform:
        return "none"
    return f"{transform['target']['method']} to {transform['target'].get('source', 'the reference')}"


def same_target(a: Optional[Dict[str, object]], b: Optional[Dict[str, object]]) -> bool:
    return (a or None) == (b or None)


def stain_note(targets: List[Optional[Dict[str, object]]]) -> str:
    return ", ".join(sorted({describe({"target": t}) if t else "none" for t in targets}))
