"""The tile folder's contract, in one place: its layout, the tile names and the stats file.

    DATASETS.TRAIN_FOLDER/
      images_<S>_red<R>/<id>_<i>red<R>.png   tile i (row-major on the slide's grid) of slide <id>
      masks_<S>_red<R>/<id>_<i>red<R>.png    its mask (0/255)
      stats_<S>_red<R>.json                  TileStats: normalisation, pixel size, slides, sources, QC, stain
      config_<S>_red<R>.yaml                 the config that made the tiles
      .tiles_<S>_red<R>/<id>.json            the tiler's resume record of each finished slide

The tiler writes through it (``data.tiler``), and datasets, sampling and training read through it;
no other module builds or parses a tile name or reads the stats file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional

__all__ = ["TILE_NAME", "TileLayout", "TileName", "TileStats", "variant", "tile_name", "parse_tile_name",
           "slide_tile_pattern", "list_tiles"]

TILE_NAME = re.compile(r"^(?P<id>.+)_(?P<index>\d+)red(?P<reduce>\d+)\.png$")


def variant(size: int, reduce: int) -> str:
    """The ``<size>_red<reduce>`` suffix of a tile folder and its files."""
    return f"{size}_red{reduce}"


@dataclass(frozen=True)
class TileLayout:
    """The paths of one ``<size>_red<reduce>`` variant in ``root`` (``DATASETS.TRAIN_FOLDER``)."""

    root: str
    size: int
    reduce: int

    @property
    def images(self) -> str:
        return os.path.join(self.root, f"images_{variant(self.size, self.reduce)}")

    @property
    def masks(self) -> str:
        return os.path.join(self.root, f"masks_{variant(self.size, self.reduce)}")

    @property
    def stats(self) -> str:
        return os.path.join(self.root, f"stats_{variant(self.size, self.reduce)}.json")

    @property
    def config(self) -> str:
        return os.path.join(self.root, f"config_{variant(self.size, self.reduce)}.yaml")

    @property
    def state(self) -> str:
        return os.path.join(self.root, f".tiles_{variant(self.size, self.reduce)}")


class TileName(NamedTuple):
    id: str
    index: int
    reduce: int


def tile_name(slide_id: str, index: int, reduce: int) -> str:
    """``<id>_<index>red<reduce>.png``."""
    return f"{slide_id}_{index}red{reduce}.png"


def parse_tile_name(name: str) -> TileName:
    """The slide id, grid index and reduction of a tile file name; a ValueError for another name."""
    match = TILE_NAME.match(name)
    if not match:
        raise ValueError(f"{name}: not a tile name <id>_<i>red<r>.png")
    return TileName(match.group("id"), int(match.group("index")), int(match.group("reduce")))


def slide_tile_pattern(slide_id: str, reduce: int) -> "re.Pattern[str]":
    """The names of one slide's tiles at ``reduce`` (group 1: the index)."""
    return re.compile(rf"^{re.escape(slide_id)}_(\d+)red{reduce}\.png$")


def list_tiles(folder: str) -> List[str]:
    """The tile files of ``folder``, sorted."""
    return sorted(n for n in os.listdir(folder) if TILE_NAME.match(n))


@dataclass
class TileStats:
    """The tiler's ``stats_*.json``: what training needs of the tiles. ``data`` is the whole record
    (plain JSON, written by :meth:`save`); the properties read its fields."""

    data: Dict[str, Any]

    @classmethod
    def load(cls, path: str) -> Optional["TileStats"]:
        """The stats at ``path``, or None when there are none."""
        if not os.path.isfile(path):
            return None
        with open(path, "r", encoding="utf-8") as fh:
            return cls(json.load(fh))

    def save(self, path: str) -> None:
        from utils.io import atomic_write_json

        atomic_write_json(path, self.data)

    @property
    def mean(self) -> List[float]:
        return [float(v) for v in self.data["mean"]]

    @property
    def std(self) -> List[float]:
        return [float(v) for v in self.data["std"]]

    @property
    def tile_mpp(self) -> Optional[float]:
        """The tiles' pixel size (µm/px), when every slide's was known."""
        value = self.data.get("tile_mpp")
        return float(value) if value else None

    @property
    def stain(self) -> Optional[Dict[str, Any]]:
        """The stain reference the tiles were normalised to (``data.stain``), or None."""
        return self.data.get("stain") or None

    @property
    def slides(self) -> Dict[str, Dict[str, Any]]:
        """Per slide id: its grid shape, pixel size, tiles kept, source, ROI, QC, ..."""
        return self.data.get("slides", {})

    def shapes(self) -> Dict[str, List[int]]:
        """Each slide's tiled (height, width), for those the tiler recorded."""
        return {i: info["shape"] for i, info in self.slides.items() if len(info.get("shape", [])) == 2}

    def sources(self) -> Dict[str, str]:
        """``{slide id: source name}`` (``DATASETS.SOURCES``); empty for one source."""
        return {i: info["source"] for i, info in self.slides.items() if info.get("source")}

    def rois(self) -> Dict[str, list]:
        """Each slide's region of interest (shapes in grid pixels), if any."""
        return {i: info["roi"] for i, info in self.slides.items() if info.get("roi")}
