"""Cut whole slides (or image/mask pairs) and their labels into PNG training tiles.

    python tiles_creator.py [--config-file FILE.yaml] [KEY VALUE ...]

Reads, by DATASETS.FORMAT: slides in DATASETS.WSI_FOLDER with RLE masks in DATASETS.LABELS_CSV
(wsi_rle, the default); slides with annotation files (QuPath GeoJSON, ASAP / ImageScope XML,
labelme, DICOM SEG; "annotations", with classes, exclusions and regions of interest); or
image/mask pairs in DATASETS.PAIRS_FOLDER ("pairs"); or several sources at once
(DATASETS.SOURCES). Writes INPUT.SIZE_TRAIN px tiles at INPUT.SIZE_REDUCTION_TRAIN x (or at the
physical scale INPUT.MPP_TRAIN um/px) to DATASETS.TRAIN_FOLDER/images_<size>_red<r>/ and
masks_<size>_red<r>/, plus stats_<size>_red<r>.json (mean/std used by training, tiles per slide
and source), the merged config and log.txt. Background tiles are skipped. An interrupted run
resumes when started again. See docs/data.md.
"""
import sys

from utils.setup import add_log_file, configure_process, launch

configure_process(models=False)
from data.tiler import create_tiles  # noqa: E402


def main(cfg, args):
    add_log_file(cfg.DATASETS.TRAIN_FOLDER)
    return create_tiles(cfg)


if __name__ == "__main__":
    sys.exit(launch(main, __doc__))
