"""A predicted mask as a DICOM Segmentation (``highdicom``) of its source DICOM WSI.

The Segmentation is BINARY, at the source's level-0 pixel matrix, tiled like the source (its
``Rows`` x ``Columns`` frames), with only the frames that hold foreground (TILED_SPARSE): the
whole mask is never decoded at once, only one column band of frames at a time. It references
the source's level-0 instance (study, series, SOP instance) and shares its frame of reference,
so DICOM viewers (e.g. QuPath, Slim) lay it over the slide.

The segmented property type is a local code (scheme ``99GLOMSEG``): SNOMED CT's code for the
renal glomerulus could not be checked offline, and a wrong standard code is worse than a
declared local one. The category is SNOMED CT "Anatomical Structure" (91723000).
"""
from __future__ import annotations

import copy
from io import BytesIO
from typing import List, Tuple

import numpy as np

from utils.rle import decode_window
from utils.version import TOOLKIT, VERSION

__all__ = ["write_segmentation", "SEG_INSTALL"]

SEG_INSTALL = "python -m pip install highdicom"


def _frames(runs: np.ndarray, shape: Tuple[int, int], rows: int, cols: int):
    """``(row0, col0, frame)`` of each ``rows`` x ``cols`` frame holding foreground, in
    row-major frame order (frames past the mask's edge are zero padded)."""
    height, width = shape
    found = []
    for col0 in range(0, width, cols):
        band = decode_window(runs, shape, (0, height), (col0, col0 + cols))  # zero past the edge
        for row0 in range(0, height, rows):
            frame = band[row0:row0 + rows]
            if frame.any():
                if frame.shape[0] < rows:
                    frame = np.pad(frame, ((0, rows - frame.shape[0]), (0, 0)))
                found.append((row0, col0, np.ascontiguousarray(frame, dtype=np.uint8)))
    found.sort(key=lambda f: (f[0], f[1]))
    return found


def write_segmentation(source_file: str, runs: np.ndarray, shape: Tuple[int, int], out_path: str,
                       label: str = "Glomerulus", model_name: str = "", model_version: str = "") -> int:
    """Write ``runs`` (a level-0 mask of ``shape``) as a DICOM Segmentation of the WSI instance
    ``source_file`` to ``out_path`` (atomically); returns the number of frames written.

    Provenance: the segment's Algorithm Identification holds the model's name and version
    (``model_name``, ``model_version``: its card's); Software Versions the toolkit's."""
    import highdicom as hd
    import pydicom
    from highdicom.spatial import map_pixel_into_coordinate_system
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from utils.io import atomic_write_bytes

    source = pydicom.dcmread(source_file, stop_before_pixels=True)
    size = (int(source.TotalPixelMatrixRows), int(source.TotalPixelMatrixColumns))
    if tuple(shape) != size:
        raise ValueError(f"{source_file}: the mask is {shape[1]} x {shape[0]} but the DICOM image is "
                         f"{size[1]} x {size[0]} (W x H)")
    rows, cols = int(source.Rows), int(source.Columns)
    origin = source.TotalPixelMatrixOriginSequence[0]
    image_position = (float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem),
                      float(origin.get("ZOffsetInSlideCoordinateSystem", 0.0)))
    orientation = [float(v) for v in source.ImageOrientationSlide]
    spacing = [float(v) for v in source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]

    frames = _frames(runs, size, rows, cols)
    empty = not frames
    if empty:  # an empty prediction: one empty frame at the origin, kept
        frames = [(0, 0, np.zeros((rows, cols), np.uint8))]
    positions: List[object] = []
    for row0, col0, _ in frames:
        x, y, z = map_pixel_into_coordinate_system((col0, row0), image_position, orientation, spacing)
        positions.append(hd.PlanePositionSequence(coordinate_system="SLIDE", image_position=(x, y, z),
                                                  pixel_matrix_position=(col0 + 1, row0 + 1)))
    pixels = np.stack([f for _, _, f in frames])
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept("glomerulus", "99GLOMSEG", label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model_name or TOOLKIT, version=model_version or f"{TOOLKIT} {VERSION}",
            family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Glomeruli_segmentation",
        manufacturer_model_name=TOOLKIT, software_versions=f"{TOOLKIT} {VERSION}",
        device_serial_number="none", plane_positions=positions, omit_empty_frames=not empty,
        content_label="GLOMERULI", content_description=f"{label} predicted by Glomeruli_segmentation",
    )
    # highdicom sizes a sparse tiling by its frames; the mask covers the source's whole matrix
    seg.TotalPixelMatrixOriginSequence = copy.deepcopy(source.TotalPixelMatrixOriginSequence)
    seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns = size
    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(out_path, buffer.getvalue())
    return 0 if empty else len(frames)
