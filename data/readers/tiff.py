"""TIFF-family slides read with tifffile: TIFF, BigTIFF, tiled or stripped, pyramidal (SubIFDs,
reduced pages, SVS levels), OME-TIFF, NDPI, SCN, BIF; read lazily with tifffile + zarr (or a
memory map for uncompressed contiguous data), so only the tiles or strips a region touches are
decoded. Tiled and stripped pages are streamed by decoding their tiles directly."""
from __future__ import annotations

import logging
import math
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Tuple

import numpy as np

from data.readers.base import NO_DATA, LevelInfo, Slide, SlideError, to_rgb
from data.readers.pixel_size import tiff_pixel_size

__all__ = ["TiffSlide"]

logger = logging.getLogger(__name__)


class _LogCapture(logging.Handler):
    """Collects the errors a library logs (tifffile reports bad IFDs by logging them)."""

    def __init__(self, name: str):
        super().__init__(level=logging.ERROR)
        self.messages: List[str] = []
        self._logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_LogCapture":
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


class TiffSlide(Slide):
    """A TIFF-family slide read lazily with tifffile (+ zarr, or a memory map)."""

    def __init__(self, path: str, workers: int = 0, channels: Tuple[int, ...] = ()):
        import tifffile
        import zarr

        self.path = str(path)
        self._select = tuple(int(c) for c in channels)
        if not os.path.exists(self.path):
            raise SlideError(f"{self.path}: file not found")
        if not os.path.isfile(self.path):
            raise SlideError(f"{self.path}: not a file")
        workers = workers or os.cpu_count() or 1
        problems = _LogCapture("tifffile")
        with problems:
            try:
                self._tif = tifffile.TiffFile(self.path)
            except Exception as exc:
                raise SlideError(f"{self.path}: not a TIFF/SVS slide or corrupt ({exc})") from None
            try:
                len(self._tif.pages)  # walks every IFD: a truncated file shows here
                self._tif.series
            except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, struct.error) as exc:
                # tifffile usually logs the bad IFD too (an error below); else _setup decides
                logger.warning("%s: walking its IFDs failed (%s: %s); reading what can be read", self.path,
                               type(exc).__name__, exc)
        try:
            if problems.messages:
                raise SlideError(
                    f"{self.path}: corrupt or truncated TIFF ({problems.messages[0]})"
                )
            self._setup(tifffile, zarr, workers)
        except SlideError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SlideError(f"{self.path}: unreadable slide ({type(exc).__name__}: {exc})") from None

    def _setup(self, tifffile, zarr, workers: int) -> None:
        if not self._tif.series:
            raise SlideError(f"{self.path}: TIFF without any image")
        series = self._tif.series[0]
        file_size = os.path.getsize(self.path)
        self._workers = workers
        self._arrays = []
        self._direct = []  # per level: the page whose tiles/strips can be decoded directly
        self._index = []
        self._chunk_rows = []
        self.levels = []
        for k, level in enumerate(series.levels):
            axes, shape = level.axes, tuple(level.shape)
            if "Y" not in axes or "X" not in axes:
                raise SlideError(f"{self.path}: not a 2-D image (axes {axes}, shape {shape})")
            # Channels are the S or C axis; failing that (HuBMAP's (1, 1, 3, H, W) pages), the
            # one other non-singleton axis when it has 3 or 4 entries.
            extra = [i for i, (a, n) in enumerate(zip(axes, shape)) if a not in "YX" and n > 1]
            named = [i for i in extra if axes[i] in "SC"]
            if len(named) > 1 or (len(extra) > 1 and not named):
                raise SlideError(
                    f"{self.path}: shape {shape} (axes {axes}): more than one non-spatial axis; "
                    "expected a single 2-D RGB image"
                )
            channel_axis = named[0] if named else (extra[0] if extra and shape[extra[0]] in (3, 4) else None)
            for i in extra:
                if i != channel_axis:
                    raise SlideError(
                        f"{self.path}: {shape[i]} planes along axis {axes[i]!r} (shape {shape}, "
                        f"axes {axes}); expected a single 2-D RGB image"
                    )
            index, kept = [], []
            for i, axis in enumerate(axes):
                if axis in "YX":
                    index.append(None)
                    kept.append(axis)
                elif i == channel_axis:
                    index.append(slice(None))
                    kept.append("C")
                else:
                    index.append(0)
            channels = shape[channel_axis] if channel_axis is not None else 1
            if k == 0:
                self._check_channels(series, level, channels, axes[channel_axis] if channel_axis is not None else "",
                                     tifffile)
                if not self._select:
                    self._check_pixels(level, channels, tifffile)
            add_axis = "C" not in kept
            if add_axis:
                kept.append("C")
            self._channels = channels
            perm = tuple(kept.index(a) for a in "YXC")
            page = level.keyframe
            self._check_truncation(level, file_size)
            offset = level.dataoffset
            if offset is not None and page.compression == 1:
                array = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
                rows = 512
            else:
                array = zarr.open(series.aszarr(level=k, maxworkers=workers), mode="r")
                rows = int(array.chunks[axes.index("Y")])
            chunked = tuple(getattr(page, "chunked", (0, 0, 0)))
            self._direct.append(
                page if not self._select and level.dataoffset is None and len(level.pages) == 1
                and axes in ("YXS", "YX") and len(chunked) == 3 and chunked[-1] == 1
                and len(page.dataoffsets) == len(page.databytecounts) == chunked[0] * chunked[1]
                else None
            )
            self._arrays.append(array)
            self._index.append((tuple(index), perm, axes.index("Y"), axes.index("X"), add_axis))
            self._chunk_rows.append(rows)
            lh, lw = shape[axes.index("Y")], shape[axes.index("X")]
            if k == 0:
                h0, w0 = lh, lw
                self.pixel_size, self.mpp_note = tiff_pixel_size(self._tif, page)
            self.levels.append(LevelInfo((lh, lw), (h0 / lh + w0 / lw) / 2.0))

    def _named_channels(self, n: int) -> Optional[List[str]]:
        """The channels' names when the file gives them (OME-XML ``Channel Name``, PerkinElmer
        QPTIFF ``<Name>`` per page), else None."""
        xml = getattr(self._tif, "ome_metadata", None) if getattr(self._tif, "is_ome", False) else None
        if xml:
            names = re.findall(r'<(?:\w+:)?Channel\b[^>]*?\bName="([^"]*)"', xml)
            if len(names) == n and any(names):
                return names
        names = []
        for page in list(self._tif.pages)[:n]:
            match = re.search(r"<Name>([^<]*)</Name>", getattr(page, "description", "") or "")
            names.append(match.group(1) if match else "")
        return names if any(names) else None

    def _check_channels(self, series, level, channels: int, axis: str, tifffile) -> None:
        """Separate greyscale channels (fluorescence: QPTIFF, OME with named channels, channel
        pages, anything but 3 unnamed planes) are not RGB brightfield: refused, naming them, unless
        ``channels`` picks three to read as R, G, B. RGB(A), planar or interleaved, passes; so do
        3 unnamed greyscale planes (the ``(1, 1, 3, H, W)`` layout of HuBMAP slides), with a warning."""
        photometric = level.keyframe.photometric
        grey = photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
        separate_series = [s for s in self._tif.series[1:] if tuple(s.shape) == tuple(series.shape)
                           and s.keyframe.photometric == photometric and s.dtype == series.dtype]
        if grey and channels == 1 and separate_series:  # one greyscale series per channel
            n = 1 + len(separate_series)
            names = self._named_channels(n) or [f"channel {i}" for i in range(n)]
            raise SlideError(
                f"{self.path}: {n} channels stored as separate greyscale images ({', '.join(names)}): a fluorescence "
                "slide, not RGB brightfield; convert it to one multi-channel OME-TIFF to pick three channels with "
                "INPUT.CHANNELS")
        if self._select and channels <= 1:
            raise SlideError(f"{self.path}: INPUT.CHANNELS {list(self._select)} set, but the slide has one channel")
        named = self._named_channels(channels) if channels > 1 else None
        rgb_names = named is not None and [n.strip().lower()[:1] for n in named] == ["r", "g", "b"]
        fluorescence = (grey and channels > 1 and (channels != 3 or (named is not None and not rgb_names)
                                                    or getattr(self._tif, "is_qpi", False))) \
            or (channels > 4 and photometric != tifffile.PHOTOMETRIC.RGB)
        if not fluorescence and not self._select:
            if grey and channels == 3:
                logger.warning("%s: 3 unnamed greyscale planes read as R, G, B (the HuBMAP layout); if it is a "
                               "fluorescence slide, INPUT.CHANNELS says which channel is which", self.path)
            return
        names = named or [f"channel {i}" for i in range(channels)]
        listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
        if not self._select:
            raise SlideError(
                f"{self.path}: {channels} channels, each greyscale ({listed}): a fluorescence (multi-channel) slide, "
                "not RGB brightfield; set INPUT.CHANNELS to the three channel indices to read as R, G, B "
                "(e.g. [0, 1, 2]) to use it anyway")
        if len(self._select) != 3 or not all(0 <= c < channels for c in self._select):
            raise SlideError(f"{self.path}: INPUT.CHANNELS {list(self._select)}: expected three indices among "
                             f"{listed}")
        if series.dtype != np.uint8:
            raise SlideError(f"{self.path}: unsupported bit depth {series.dtype} (only 8-bit channels are "
                             "supported; convert it to 8 bits per channel)")
        logger.warning("%s: channels %s read as R, G, B (INPUT.CHANNELS)", self.path,
                       ", ".join(names[c] for c in self._select))

    def _check_pixels(self, level, channels: int, tifffile) -> None:
        page = level.keyframe
        photometric = page.photometric
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            raise SlideError(f"{self.path}: palette (indexed-colour) images are not supported; save as RGB")
        if photometric == tifffile.PHOTOMETRIC.SEPARATED:
            raise SlideError(f"{self.path}: CMYK images are not supported; save as RGB")
        if channels == 4 and photometric != tifffile.PHOTOMETRIC.RGB:
            raise SlideError(
                f"{self.path}: 4 channels that are not RGB + alpha: multi-channel "
                "(fluorescence) images are not supported (expected RGB brightfield)"
            )
        if channels not in (1, 3, 4):
            raise SlideError(
                f"{self.path}: {channels} channels: multi-channel (fluorescence) images are not "
                "supported (expected RGB brightfield)"
            )
        if level.dtype != np.uint8:
            raise SlideError(
                f"{self.path}: unsupported bit depth {level.dtype} (only 8-bit RGB slides are "
                "supported; convert it to 8 bits per channel)"
            )
        if channels == 4:
            logger.warning("%s: RGBA slide; the alpha channel is ignored", self.path)
        elif channels == 1:
            logger.warning("%s: grayscale slide; it is read as RGB with equal channels", self.path)

    def _check_truncation(self, level, file_size: int) -> None:
        for page in level.pages:
            if page is None:
                continue
            offsets = getattr(page, "dataoffsets", ()) or ()
            counts = getattr(page, "databytecounts", ()) or ()
            ends = [o + c for o, c in zip(offsets, counts) if c]
            if ends and max(ends) > file_size:
                raise SlideError(
                    f"{self.path}: truncated file: image data ends at byte {max(ends)} but the "
                    f"file has {file_size} bytes"
                )

    def chunk_rows(self, level: int) -> int:
        return self._chunk_rows[level]

    def chunk_cols(self, level: int) -> int:
        page = self._direct[level]
        if page is not None:
            return int(page.chunks[1])
        array = self._arrays[level]
        if isinstance(array, np.memmap):
            return 1  # any columns of a memory map are read without decoding anything else
        return int(array.chunks[self._index[level][3]])

    def iter_strips(
        self, level: int = 0, min_rows: int = 512, reuse_buffer: bool = False, cols: Optional[Tuple[int, int]] = None
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """As :meth:`Slide.iter_strips`; for a tiled or stripped page, its tiles are decoded
        directly with tifffile on a thread pool (faster than going through zarr), the next
        strip's tiles while the caller works on this one; with ``cols``, only the tiles of those
        columns."""
        page = self._direct[level]
        if page is None:
            yield from super().iter_strips(level, min_rows, cols=cols)
            return
        try:
            yield from self._iter_direct(page, level, min_rows, reuse_buffer, cols)
        except SlideError:
            raise
        except Exception as exc:  # a corrupt tile table, a short read...
            raise SlideError(
                f"{self.path}: cannot read level {level} (corrupt or truncated file?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _iter_direct(self, page, level: int, min_rows: int, reuse_buffer: bool, cols=None):
        lh, lw = self.levels[level].shape
        seg_h, seg_w = int(page.chunks[0]), int(page.chunks[1])
        n_down, n_across = int(page.chunked[0]), int(page.chunked[1])
        x0, x1 = cols if cols is not None else (0, lw)
        j0, j1 = x0 // seg_w, min(n_across, -(-x1 // seg_w))  # the tile columns the strips need
        width = x1 - x0  # the buffer holds just the columns asked for: a contiguous strip, no copy
        samples = int(page.samplesperpixel)
        per_strip = max(1, math.ceil(min_rows / seg_h))
        kwargs = {"_fullsize": True}
        if page.jpegtables is not None:
            kwargs["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            kwargs["jpegheader"] = page.jpegheader
        decode, fh = page.decode, self._tif.filehandle
        offsets, counts = page.dataoffsets, page.databytecounts

        def decode_one(index: int, data: bytes):
            try:
                return decode(data, index, **kwargs)[0]
            except Exception as exc:
                raise SlideError(
                    f"{self.path}: cannot decode tile {index} of level {level} (corrupt or "
                    f"truncated file?): {type(exc).__name__}: {exc}"
                ) from exc

        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="decode") as pool:

            def submit(first: int):
                last = min(first + per_strip, n_down)
                futures = []
                for row in range(first, last):
                    for index in range(row * n_across + j0, row * n_across + j1):
                        if counts[index]:
                            fh.seek(offsets[index])
                            futures.append((index, pool.submit(decode_one, index, fh.read(counts[index]))))
                return first, last, futures

            pending = submit(0)
            buffer = None
            while pending is not None:
                first, last, futures = pending
                pending = submit(last) if last < n_down else None
                y0, y1 = first * seg_h, min(last * seg_h, lh)
                if buffer is None or not reuse_buffer:
                    buffer = np.empty((per_strip * seg_h, width, samples), dtype=np.uint8)
                strip = buffer[: y1 - y0]
                if len(futures) < (last - first) * (j1 - j0):
                    strip[:] = NO_DATA  # sparse file: tiles without data
                for i, (index, future) in enumerate(futures):
                    futures[i] = None  # the decoded tile is freed once copied
                    segment = future.result()
                    row, col = divmod(index, n_across)
                    top = row * seg_h - y0
                    h = min(seg_h, y1 - y0 - top)
                    c0, c1 = max(x0, col * seg_w), min(x1, (col + 1) * seg_w)  # level columns kept
                    strip[top:top + h, c0 - x0:c1 - x0] = segment.reshape(
                        seg_h, seg_w, samples
                    )[:h, c0 - col * seg_w:c1 - col * seg_w]
                yield y0, to_rgb(strip, samples)

    def _read_raw(self, level, y0, y1, x0, x1):
        index, perm, y_axis, x_axis, add_axis = self._index[level]
        index = list(index)
        index[y_axis] = slice(y0, y1)
        index[x_axis] = slice(x0, x1)
        region = np.asarray(self._arrays[level][tuple(index)])
        if add_axis:
            region = region[..., None]
        region = np.transpose(region, perm)
        if self._select:
            return np.ascontiguousarray(region[..., list(self._select)])
        return to_rgb(region, self._channels)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None

