"""Cut whole slides (or image/mask pairs) into PNG training tiles.

    python tiles_creator.py [--config-file FILE.yaml] [KEY VALUE ...]

Reads DATASETS.WSI_FOLDER/<id>.tiff + DATASETS.LABELS_CSV (RLE masks), or the pairs in
DATASETS.PAIRS_FOLDER when DATASETS.FORMAT is "pairs", and writes INPUT.SIZE_TRAIN px tiles at
INPUT.SIZE_REDUCTION_TRAIN x to DATASETS.TRAIN_FOLDER/images_<size>_red<r>/ and
masks_<size>_red<r>/, plus stats_<size>_red<r>.json (mean/std used by training), the merged
config and log.txt. Background tiles are skipped. An interrupted run resumes when started again.
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
