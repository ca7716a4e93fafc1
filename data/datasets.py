"""Tile-pair datasets read from the tiler's output, and K-fold splits grouped by slide.

Both tiler modes write the same layout (``images_<S>_red<R>/<id>_<i>red<R>.png`` and
``masks_...``), so one dataset serves both; the group of a tile is its slide id (wsi_rle) or
image id (pairs), so no slide is in both training and validation.
"""
from __future__ import annotations

import os
from typing import Optional, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.tile_store import TILE_NAME, TileLayout, TileStats, list_tiles, parse_tile_name

__all__ = ["TILE_NAME", "EpochSeeded", "TileSet", "list_tiles", "tile_group", "tile_index", "kfold_groups", "tile_sources", "read_stats",
           "read_tile_pair", "normalize_tile", "TileDataset"]


def tile_group(name: str) -> str:
    """The slide (or image) id of a tile file name ``<id>_<i>red<r>.png``."""
    return parse_tile_name(name).id


def tile_index(name: str) -> int:
    """The grid index ``i`` of a tile file name ``<id>_<i>red<r>.png``."""
    return parse_tile_name(name).index


class TileSet:
    """The tiles of one ``<size>_red<reduce>`` variant in ``train_folder`` and their stats
    (``data.tile_store``: read once)."""

    def __init__(self, train_folder: str, size: int, reduce: int):
        layout = TileLayout(train_folder, size, reduce)
        self.images, self.masks, self.stats_file = layout.images, layout.masks, layout.stats
        if not os.path.isdir(self.images) or not os.path.isdir(self.masks):
            raise FileNotFoundError(
                f"{self.images}: no tiles; run tiles_creator.py with the same DATASETS.TRAIN_FOLDER, "
                f"INPUT.SIZE_TRAIN {size} and INPUT.SIZE_REDUCTION_TRAIN {reduce} first"
            )
        self.names = list_tiles(self.images)
        if not self.names:
            raise FileNotFoundError(f"{self.images}: no tiles")
        missing = [n for n in self.names if not os.path.isfile(os.path.join(self.masks, n))]
        if missing:
            raise FileNotFoundError(f"{self.masks}: no mask for {len(missing)} tile(s), e.g. {missing[:3]}")
        self.groups = [tile_group(n) for n in self.names]
        self.stats: Optional[TileStats] = TileStats.load(self.stats_file)

    @property
    def stain(self) -> Optional[Dict[str, object]]:
        """The stain reference the tiles were normalised to (``data.stain``), or None."""
        return self.stats.stain if self.stats else None

    @property
    def mpp(self) -> Optional[float]:
        """The tiles' pixel size (um/px) recorded by the tiler, when every slide's was known."""
        return self.stats.tile_mpp if self.stats else None


def kfold_groups(groups: Sequence[str], n_folds: int, strata: Optional[Dict[str, str]] = None) -> Dict[str, int]:
    """Assign each group (slide id) to a fold, balancing tile counts; deterministic.

    Groups are taken largest first (ties by name) and each goes to the fold with the fewest
    tiles so far (ties: lowest fold). With ``strata`` (group -> its data source), this is done
    for each source on its own, so that every fold holds images of every source.
    """
    counts: Dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    if n_folds < 2:
        raise ValueError(f"SOLVER.N_FOLDS must be >= 2 for cross-validation, got {n_folds}")
    by_stratum: Dict[str, List[str]] = {}
    for g in counts:
        by_stratum.setdefault((strata or {}).get(g, ""), []).append(g)
    fold_of = {}
    for stratum, members in sorted(by_stratum.items()):
        if n_folds > len(members):
            where = f" of source {stratum!r}" if stratum else ""
            raise ValueError(
                f"SOLVER.N_FOLDS {n_folds} is more than the {len(members)} slides/images{where} in the data; "
                "each fold needs at least one"
            )
        load = [0] * n_folds
        for group in sorted(members, key=lambda g: (-counts[g], g)):
            fold = min(range(n_folds), key=lambda f: (load[f], f))
            fold_of[group] = fold
            load[fold] += counts[group]
    return fold_of


def tile_sources(tiles: "TileSet") -> Dict[str, str]:
    """``{slide id: source name}`` recorded by the tiler (DATASETS.SOURCES); empty for one source."""
    return tiles.stats.sources() if tiles.stats else {}


def read_stats(tiles: TileSet, mean: Sequence[float] = (), std: Sequence[float] = ()) -> Tuple[List[float], List[float]]:
    """Normalisation stats: the config's when set, else the tiler's stats file."""
    if len(mean) == 3 and len(std) == 3:
        return [float(v) for v in mean], [float(v) for v in std]
    if tiles.stats is None:
        raise FileNotFoundError(
            f"{tiles.stats_file}: tiler stats not found; rerun tiles_creator.py or set "
            "INPUT.PIXEL_MEAN and INPUT.PIXEL_STD"
        )
    mean = list(mean) if len(mean) == 3 else tiles.stats.mean
    std = list(std) if len(std) == 3 else tiles.stats.std
    return [float(v) for v in mean], [float(v) for v in std]


def read_tile_pair(images: str, masks: str, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """The RGB uint8 tile ``name`` of folder ``images`` and its 0/1 mask in ``masks``."""
    image = cv2.imread(os.path.join(images, name), cv2.IMREAD_COLOR)
    mask = cv2.imread(os.path.join(masks, name), cv2.IMREAD_GRAYSCALE)
    if image is None or mask is None:
        raise ValueError(f"{os.path.join(images, name)}: unreadable tile or mask")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (mask > 0).astype(np.uint8)


def normalize_tile(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(3, H, W)`` float32 tensor of an RGB uint8 image, with ``mean``/``std`` in 0..255."""
    return torch.from_numpy(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())


class TileDataset(Dataset):
    """``(image, mask)`` pairs: image ``(3, S, S)`` float32 normalised, mask ``(1, S, S)`` 0/1."""

    def __init__(self, tiles: TileSet, names: Sequence[str], mean, std, transform=None):
        self.tiles = tiles
        self.names = list(names)
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw RGB uint8 tile and 0/1 mask of item ``i``."""
        return read_tile_pair(self.tiles.images, self.tiles.masks, self.names[i])

    def normalize(self, image: np.ndarray) -> torch.Tensor:
        return normalize_tile(image, self.mean, self.std)

    def __getitem__(self, i: int):
        image, mask = self.load(i)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return self.normalize(image), torch.from_numpy(mask[None].astype(np.float32))


class EpochSeeded(Dataset):
    """A training dataset whose item ``i`` is drawn from generators seeded by ``(epoch seed,
    i)``: the random crop, the augmentation and anything else an item draws depend on the
    epoch and the index alone, not on which worker makes it or what it made before. The epoch
    seed lives in shared memory (:meth:`set_epoch_seed`, called at each epoch start before the
    loader asks for items), so persistent worker processes see it. A run resumed at epoch k
    then draws what an uninterrupted run draws there, whatever the worker count."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch_seed = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch_seed(self, value: int) -> None:
        self.epoch_seed.fill_(int(value))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        value = (int(self.epoch_seed) * 1_000_003 + int(i)) % 2**31
        # the process's own generators are put back afterwards: without loader workers the items
        # are made in the training process, whose torch generator also draws the dropout masks
        torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
        try:
            torch.manual_seed(value)
            np.random.seed(value)
            return self.dataset[i]
        finally:
            torch.random.set_rng_state(torch_state)
            np.random.set_state(numpy_state)

    def __getattr__(self, name):  # names, load, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
