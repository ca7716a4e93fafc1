"""The training augmentations (albumentations 2.x).

``INPUT.AUGMENTATION classic``: the original toolkit's pipeline. Geometry (flips, rot90, perspective, shift-scale-rotate, optical/grid/piecewise distortion)
applies to image and mask alike (masks with nearest-neighbour interpolation); colour (channel
shuffle, RGB shift, median blur, to-gray, Gaussian noise, HSV/CLAHE/brightness-contrast/gamma)
to the image only. ``INPUT.PROB`` scales how often each group fires (0 = no augmentation).

``INPUT.AUGMENTATION histology``: made for random crops of stained tissue
(:func:`build_histology_transform`). Geometry: flips, rot90, then a rotation by any angle with a
zoom of 0.8-1.25x and a little shear on the crop *with its margin* (reflect padding only where
the margin is not enough), a light grid distortion, then the centre crop. Colour, mild as PAS
needs: stain-matrix jitter (``HEStain``, concentrations scaled by +-8 %), hue/saturation/value,
brightness/contrast, gamma, and rarely blur or noise. The geometric part is the same call on
image and mask (nearest-neighbour for the mask), so they stay aligned (tested).
"""
from __future__ import annotations

import warnings

import cv2

__all__ = ["build_train_transform", "build_histology_transform", "AUGMENTATIONS"]

AUGMENTATIONS = ("classic", "histology")


def build_train_transform(prob: float, seed: int = None):
    """The augmentation pipeline, or None when ``prob`` is 0."""
    import albumentations as A

    if prob <= 0:
        return None
    p = float(prob)
    reflect = dict(border_mode=cv2.BORDER_REFLECT_101)
    with warnings.catch_warnings():  # PiecewiseAffine warns that it is slow: it is rare here
        warnings.simplefilter("ignore", UserWarning)
        piecewise = A.PiecewiseAffine(scale=(0.01, 0.03), nb_rows=3, nb_cols=3, p=0.3)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.8, 1.2), rotate=(-15, 15),
                     p=min(1.0, 0.9 * p * 2), **reflect),
            A.OneOf(
                [
                    A.Perspective(scale=(0.02, 0.05), p=1.0),
                    A.OpticalDistortion(distort_limit=0.05, p=1.0),
                    A.GridDistortion(distort_limit=0.2, p=1.0, **reflect),
                    piecewise,
                ],
                p=0.3 * p * 2,
            ),
            A.OneOf(
                [
                    A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=1.0),
                    A.CLAHE(clip_limit=2, p=1.0),
                    A.RandomBrightnessContrast(p=1.0),
                    A.RandomGamma(p=1.0),
                ],
                p=min(1.0, 0.3 * p * 2),
            ),
            A.OneOf(
                [
                    A.ChannelShuffle(p=1.0),
                    A.RGBShift(r_shift_limit=15, g_shift_limit=15, b_shift_limit=15, p=1.0),
                    A.ToGray(p=1.0),
                ],
                p=0.1 * p * 2,
            ),
            A.OneOf(
                [A.MedianBlur(blur_limit=3, p=1.0), A.GaussNoise(std_range=(0.02, 0.06), p=1.0)],
                p=0.1 * p * 2,
            ),
        ],
        seed=seed,
    )


def build_histology_transform(prob: float, crop: int, margin: int = 0, seed: int = None, colour: bool = True,
                              stain: float = 1.0):
    """The histology pipeline for ``crop`` px crops read with ``margin`` px on each side;
    ``prob`` scales how often each transform fires (0: only the centre crop). ``colour=False``
    keeps only the geometry (for alignment checks). ``stain`` scales the ranges of the stain and
    colour jitter (1: +-8 % stain concentrations, hue +-6, saturation +-15, ...; 2: twice that)."""
    import albumentations as A

    p = float(prob)
    reflect = dict(border_mode=cv2.BORDER_REFLECT_101)
    nearest_mask = dict(interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
    geometry = []
    if p > 0:
        geometry = [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(scale=(0.8, 1.25), rotate=(-180, 180), shear=(-6, 6), balanced_scale=True, p=min(1.0, p),
                     **reflect, **nearest_mask),
            A.GridDistortion(num_steps=5, distort_limit=0.15, p=0.2 * p, **reflect, **nearest_mask),
        ]
    geometry.append(A.CenterCrop(crop, crop) if margin else A.NoOp())
    colours = []
    if colour and p > 0:
        k = float(stain)
        colours = [
            A.HEStain(method="preset", preset="standard", intensity_scale_range=(1 - 0.08 * k, 1 + 0.08 * k),
                      intensity_shift_range=(-0.03 * k, 0.03 * k), augment_background=False, p=0.5 * p),
            A.HueSaturationValue(hue_shift_limit=6 * k, sat_shift_limit=15 * k, val_shift_limit=10 * k, p=0.5 * p),
            A.RandomBrightnessContrast(brightness_limit=0.12 * k, contrast_limit=0.12 * k, p=0.5 * p),
            A.RandomGamma(gamma_limit=(100 - 15 * k, 100 + 15 * k), p=0.3 * p),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 3), p=1.0), A.GaussNoise(std_range=(0.01, 0.04), p=1.0)],
                    p=0.15 * p),
        ]
    return A.Compose(geometry + colours, seed=seed)
