"""The training augmentation: an albumentations 2.x pipeline equivalent to the original's.

Geometry (flips, rot90, perspective, shift-scale-rotate, optical/grid/piecewise distortion)
applies to image and mask alike (masks with nearest-neighbour interpolation); colour (channel
shuffle, RGB shift, median blur, to-gray, Gaussian noise, HSV/CLAHE/brightness-contrast/gamma)
to the image only. ``INPUT.PROB`` scales how often each group fires (0 = no augmentation).
"""
from __future__ import annotations

import warnings

import cv2

__all__ = ["build_train_transform"]


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
