"""Fresh random views for training: crops sampled anywhere on each slide's tile grid.

The tiler cuts every slide (or pair image) into a regular grid of ``S x S`` tiles numbered
row-major (``data.tiling.TileGrid``). :class:`SlideCanvas` puts a slide's kept tiles back on
that grid, so any low-res region can be read, across tile borders; outside the slide it is the
slide's mirror image (as test_net fills the grid's padding), and a tile the tiler dropped as
background reads as white glass with an empty mask.

:class:`RandomCropDataset` draws, for every sample, a crop of ``crop`` px:

* with probability ``foreground`` it is centred (with a random jitter of up to a quarter of
  the crop) on a foreground pixel drawn uniformly among all the training masks' foreground
  pixels (nnU-Net forces a third of its patches to hold foreground);
* otherwise its centre is uniform over the area of the kept tiles.

With several data sources (``DATASETS.SOURCES``), each draw first picks a source with probability
proportional to its ``WEIGHT``, then draws as above among that source's tiles only, so that a
source of 12 images is not drowned by one of 800 tiles.

On a slide with a region of interest (``DATASETS.ANNOTATION_ROI``: the tiler records its shapes),
a crop is drawn again (up to :data:`ROI_DRAWS` times) until it lies wholly inside the region;
when none does (a region smaller than a crop), the draw that covers most of it is kept. So
tissue that nobody annotated is not taught as background.

A ``margin`` around the crop is read as well, so that rotations and zooms of the
augmentation see real tissue, not a reflected border; the transform ends with a centre crop.
An epoch is ``samples`` draws. Draws use torch's random generator, which
``data.datasets.EpochSeeded`` seeds for each item from the epoch and the item's index: the same
``MODEL.SEED`` gives the same run whatever the worker count (tested with 0 and 2).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.annotations import Shape
from data.datasets import TileDataset, normalize_tile, read_tile_pair, tile_group, tile_index
from data.masks import ShapeMask
from data.tiling import TileGrid, slide_box

__all__ = ["SlideCanvas", "RandomCropDataset", "ValidationTiles", "slide_canvases", "crop_margin", "OUTSIDE"]

WHITE = 255  # a tile dropped by the background filter: glass
OUTSIDE = 2  # validation masks: the grid's padding (off the slide), ignored by the loss and the Dice
ROI_DRAWS = 20  # draws tried for a crop wholly inside a slide's region of interest


class SlideCanvas:
    """The kept tiles of one slide on its padded low-res grid, read region by region."""

    def __init__(self, images: str, masks: str, slide_id: str, grid: TileGrid, names: Dict[int, str],
                 cache_tiles: int = 64, roi: Optional[list] = None):
        self.images, self.masks, self.id, self.grid = images, masks, slide_id, grid
        # the region of interest (shapes as rings of [x, y] grid px), as a mask of the grid
        self.roi = None if not roi else ShapeMask(
            [Shape("roi", np.asarray(rings[0], np.float64), tuple(np.asarray(h, np.float64) for h in rings[1:]))
             for rings in roi], (grid.n_rows * grid.size, grid.n_cols * grid.size))
        self.names = dict(names)  # tile index -> file name
        self.size = grid.size
        self.box = slide_box(grid)  # (y0, y1, x0, x1): low-res pixels wholly on the slide
        self._cache: "OrderedDict[int, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._cache_tiles = cache_tiles

    def tile(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The RGB uint8 tile and 0/1 mask ``index`` (kept tiles only), through a small cache."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        hit = read_tile_pair(self.images, self.masks, self.names[index])
        self._cache[index] = hit
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return hit

    def _read_inside(self, y0: int, y1: int, x0: int, x1: int) -> Tuple[np.ndarray, np.ndarray]:
        """Grid pixels ``[y0, y1) x [x0, x1)`` (inside the grid), assembled from the tiles."""
        s, n_cols = self.size, self.grid.n_cols
        image = np.full((y1 - y0, x1 - x0, 3), WHITE, np.uint8)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        for row in range(y0 // s, (y1 - 1) // s + 1):
            for col in range(x0 // s, (x1 - 1) // s + 1):
                index = row * n_cols + col
                if index not in self.names:
                    continue
                ty0, ty1 = max(y0, row * s), min(y1, (row + 1) * s)
                tx0, tx1 = max(x0, col * s), min(x1, (col + 1) * s)
                tile_image, tile_mask = self.tile(index)
                src = (slice(ty0 - row * s, ty1 - row * s), slice(tx0 - col * s, tx1 - col * s))
                dst = (slice(ty0 - y0, ty1 - y0), slice(tx0 - x0, tx1 - x0))
                image[dst] = tile_image[src]
                mask[dst] = tile_mask[src]
        return image, mask

    def read(self, y: int, x: int, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
        """The low-res region at grid position ``(y, x)``; what lies off the slide is the
        slide's mirror image (``BORDER_REFLECT_101``, as test_net fills the grid's padding),
        however far off."""
        by0, by1, bx0, bx1 = self.box
        rows = _reflect(np.arange(y, y + height), by0, by1)
        cols = _reflect(np.arange(x, x + width), bx0, bx1)
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        image, mask = self._read_inside(r0, r1, c0, c1)
        if (r0, r1, c0, c1) == (y, y + height, x, x + width):  # wholly on the slide
            return image, mask
        index = np.ix_(rows - r0, cols - c0)
        return image[index], mask[index]

    def roi_share(self, y: int, x: int, size: int) -> float:
        """The share (0..1) of the ``size`` px crop at ``(y, x)`` inside the region of interest
        (sampled every ``size // 32`` px); 1 without one."""
        if self.roi is None:
            return 1.0
        return float(self.roi.window((y, y + size), (x, x + size), max(1, size // 32)).mean())

    def tile_origin(self, index: int) -> Tuple[int, int]:
        """Low-res grid ``(row, col)`` of the top-left pixel of tile ``index``."""
        row, col = divmod(int(index), self.grid.n_cols)
        return row * self.size, col * self.size


def _reflect(positions: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``positions`` mirrored into ``[start, stop)`` without repeating the edge (reflect-101)."""
    n = stop - start
    if n <= 1:
        return np.full_like(positions, start)
    period = 2 * (n - 1)
    p = np.mod(positions - start, period)
    return start + np.where(p >= n, period - p, p)


def slide_canvases(images: str, masks: str, names: Sequence[str], grids: Dict[str, TileGrid],
                   group_of, index_of, rois: Optional[Dict[str, list]] = None) -> List[SlideCanvas]:
    """One :class:`SlideCanvas` per slide of ``names`` (tile file names), in first-seen order;
    ``rois``: the slides' regions of interest as the tiler records them."""
    by_slide: "OrderedDict[str, Dict[int, str]]" = OrderedDict()
    for name in names:
        by_slide.setdefault(group_of(name), {})[index_of(name)] = name
    missing = [g for g in by_slide if g not in grids]
    if missing:
        raise ValueError(f"no grid recorded for {missing[:3]}: tiles made by an older tiles_creator.py; "
                         "rerun it with OVERWRITE True")
    rois = rois or {}
    return [SlideCanvas(images, masks, g, grids[g], tiles, roi=rois.get(g)) for g, tiles in by_slide.items()]


class RandomCropDataset(Dataset):
    """``samples`` random ``(image, mask)`` crops per epoch from the slides' tile grids.

    Items are ``(3, crop, crop)`` float32 images normalised with ``mean``/``std`` (0..1 RGB)
    and ``(1, crop, crop)`` 0/1 masks. ``transform`` (albumentations, image + mask) gets the
    crop with ``margin`` px on each side and must return ``crop x crop``; without a transform
    the centre is cut."""

    def __init__(self, canvases: List[SlideCanvas], crop: int, samples: int, foreground: float, mean, std,
                 transform=None, margin: int = 0, sources: Optional[Dict[str, str]] = None,
                 weights: Optional[Dict[str, float]] = None, copy_paste: float = 0.0):
        if not canvases:
            raise ValueError("no training tiles to sample crops from")
        self.canvases, self.crop, self.samples = canvases, int(crop), int(samples)
        self.foreground, self.margin, self.transform = float(foreground), int(margin), transform
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        # every kept tile (for background draws) and its foreground pixel count
        self.tiles: List[Tuple[int, int]] = []  # (canvas, tile index)
        counts = []
        for c, canvas in enumerate(canvases):
            for index in sorted(canvas.names):
                self.tiles.append((c, index))
                counts.append(int(canvas.tile(index)[1].sum()))
            canvas._cache.clear()  # workers start with an empty cache (no copy per process)
        self.fg_counts = np.asarray(counts, dtype=np.int64)
        self.fg_cumsum = np.cumsum(self.fg_counts)
        self._groups, self._share = self._source_groups(sources or {}, weights or {})
        self.copy_paste = float(copy_paste)

    def _source_groups(self, sources: Dict[str, str], weights: Dict[str, float]):
        """The tiles of each data source (``sources``: slide id -> source) with their foreground
        cumulative sums, and the cumulative share of draws of each (``weights``, 1 when absent).
        One source: one group of every tile (the draws of a single-source run are unchanged)."""
        names = sorted({sources.get(canvas.id, "") for canvas in self.canvases})
        if len(names) < 2:
            return [(np.arange(len(self.tiles)), self.fg_cumsum)], None
        of_tile = np.asarray([names.index(sources.get(self.canvases[c].id, "")) for c, _ in self.tiles])
        groups = []
        for k in range(len(names)):
            members = np.flatnonzero(of_tile == k)
            groups.append((members, np.cumsum(self.fg_counts[members])))
        share = np.asarray([float(weights.get(name, 1.0)) for name in names])
        return groups, np.cumsum(share / share.sum())

    def __len__(self) -> int:
        return self.samples

    @staticmethod
    def _randint(high: int) -> int:
        return int(torch.randint(0, max(1, int(high)), (1,)).item())

    def draw(self) -> Tuple[int, int, int]:
        """``(canvas, y, x)`` of the next crop's top-left corner (grid pixels); inside the slide's
        region of interest when it has one (see the module)."""
        best, best_share = None, -1.0
        for _ in range(ROI_DRAWS):
            c, y, x = self._draw_once()
            share = self.canvases[c].roi_share(y, x, self.crop)
            if share >= 1.0:
                return c, y, x
            if share > best_share:
                best, best_share = (c, y, x), share
        return best

    def _group(self) -> Tuple[np.ndarray, np.ndarray]:
        """The tiles (and their foreground cumulative sums) of a data source drawn by its weight;
        every tile when there is one source (no draw)."""
        if self._share is None:
            return self._groups[0]
        k = int(np.searchsorted(self._share, float(torch.rand(1)), side="right"))
        return self._groups[min(len(self._groups) - 1, k)]

    def _foreground_pixel(self, members: np.ndarray, fg_cumsum: np.ndarray, total: int) -> Tuple[int, int, int]:
        """A foreground pixel drawn uniformly among the ``total`` of the tiles ``members``:
        ``(canvas, y, x)`` in that canvas's coordinates."""
        k = self._randint(total)
        c, index = self.tiles[int(members[int(np.searchsorted(fg_cumsum, k, side="right"))])]
        canvas = self.canvases[c]
        ys, xs = np.nonzero(canvas.tile(index)[1])
        j = self._randint(len(ys))
        ty, tx = canvas.tile_origin(index)
        return c, ty + int(ys[j]), tx + int(xs[j])

    def _draw_once(self) -> Tuple[int, int, int]:
        crop, s = self.crop, self.canvases[0].size
        members, fg_cumsum = self._group()
        total_fg = int(fg_cumsum[-1]) if len(fg_cumsum) else 0
        if total_fg and float(torch.rand(1)) < self.foreground:
            c, fy, fx = self._foreground_pixel(members, fg_cumsum, total_fg)
            jitter = max(1, crop // 4)
            cy = fy + self._randint(2 * jitter + 1) - jitter
            cx = fx + self._randint(2 * jitter + 1) - jitter
        else:  # a uniform point of the kept tissue (of the source)
            c, index = self.tiles[int(members[self._randint(len(members))])]
            ty, tx = self.canvases[c].tile_origin(index)
            cy, cx = ty + self._randint(s), tx + self._randint(s)
        y0, y1, x0, x1 = self.canvases[c].box  # the crop stays on the slide where the slide is big enough
        y = int(np.clip(cy - crop // 2, y0, max(y0, y1 - crop)))
        x = int(np.clip(cx - crop // 2, x0, max(x0, x1 - crop)))
        return c, y, x

    def sample(self) -> Tuple[np.ndarray, np.ndarray]:
        """One raw crop (RGB uint8, 0/1 mask) with its margin, before augmentation (and, with
        probability ``copy_paste``, a glomerulus pasted into it)."""
        c, y, x = self.draw()
        m = self.margin
        image, mask = self.canvases[c].read(y - m, x - m, self.crop + 2 * m, self.crop + 2 * m)
        if self.copy_paste and float(torch.rand(1)) < self.copy_paste:
            image, mask = self.paste(image, mask)
        return image, mask

    def paste(self, image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """A glomerulus from the training set (the ``3/4 crop`` square around a foreground pixel
        drawn as a crop's centre is) pasted at a random place of ``image``: its pixels where its
        mask is (dilated 2 px, edge blurred: sigma 2 px), the rest of the crop unchanged; the mask
        takes the pasted glomerulus's (TumorCP's copy-paste)."""
        members, fg_cumsum = self._group()
        total = int(fg_cumsum[-1]) if len(fg_cumsum) else 0
        side = min(image.shape[0], image.shape[1], max(8, 3 * self.crop // 4))
        if not total:
            return image, mask
        c, fy, fx = self._foreground_pixel(members, fg_cumsum, total)
        patch, patch_mask = self.canvases[c].read(fy - side // 2, fx - side // 2, side, side)
        alpha = cv2.dilate(patch_mask, np.ones((5, 5), np.uint8)).astype(np.float32)
        alpha = cv2.GaussianBlur(alpha, (0, 0), 2.0)[..., None]
        py = self._randint(image.shape[0] - side + 1)
        px = self._randint(image.shape[1] - side + 1)
        image, mask = image.copy(), mask.copy()
        region = image[py:py + side, px:px + side].astype(np.float32)
        image[py:py + side, px:px + side] = np.clip(alpha * patch + (1 - alpha) * region + 0.5, 0, 255).astype(np.uint8)
        mask[py:py + side, px:px + side] |= patch_mask
        return image, mask

    def __getitem__(self, i: int):
        image, mask = self.sample()
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        elif self.margin:
            m = self.margin
            image, mask = image[m:-m, m:-m], mask[m:-m, m:-m]
        if image.shape[:2] != (self.crop, self.crop):
            raise ValueError(f"the training transform returned {image.shape[:2]}, not {self.crop} x {self.crop}")
        return (normalize_tile(image, self.mean, self.std),
                torch.from_numpy(np.ascontiguousarray(mask[None], dtype=np.float32)))


def crop_margin(crop: int, geometric: bool) -> int:
    """Margin read around a crop for the augmentation (a quarter of the crop when it rotates
    and zooms), 0 without geometric augmentation."""
    return max(8, crop // 4) if geometric else 0


class ValidationTiles(TileDataset):
    """The validation tiles as test_net sees their slide: where a tile reaches past the slide into
    the grid's zero padding, the slide's mirror image fills it (as test_net fills the padding, and
    as the training crops see it) and the mask marks it :data:`OUTSIDE` (ignored by the loss and
    the Dice: test_net predicts nothing off the slide). Tiles wholly on the slide are unchanged;
    slides without a recorded grid (tiles of an older tiler) give their tiles as they are."""

    def __init__(self, tiles, names: Sequence[str], mean, std, grids: Dict[str, TileGrid]):
        super().__init__(tiles, names, mean, std, None)
        known = [n for n in self.names if tile_group(n) in grids]
        self.canvases = {c.id: c for c in slide_canvases(tiles.images, tiles.masks, known, grids, tile_group,
                                                          tile_index)}

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        image, mask = super().load(i)
        name = self.names[i]
        canvas = self.canvases.get(tile_group(name))
        if canvas is None:
            return image, mask
        ty, tx = canvas.tile_origin(tile_index(name))
        s = canvas.size
        y0, y1, x0, x1 = canvas.box
        rows = slice(min(s, max(0, y0 - ty)), max(0, min(s, y1 - ty)))
        cols = slice(min(s, max(0, x0 - tx)), max(0, min(s, x1 - tx)))
        if (rows.start, rows.stop, cols.start, cols.stop) == (0, s, 0, s):
            return image, mask
        marked = np.full_like(mask, OUTSIDE)
        marked[rows, cols] = mask[rows, cols]
        return canvas.read(ty, tx, s, s)[0], marked
