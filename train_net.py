"""Train the segmentation model on the tiles, one checkpoint per cross-validation fold.

    python train_net.py [--config-file FILE.yaml] [KEY VALUE ...]

Reads the tiles of DATASETS.TRAIN_FOLDER (INPUT.SIZE_TRAIN px at INPUT.SIZE_REDUCTION_TRAIN x,
as written by tiles_creator.py), splits them into SOLVER.N_FOLDS folds grouped by slide and
trains MODEL.ARCHITECTURE on each (fastai, one-cycle schedule). Writes to OUTPUT_DIR the
checkpoints, per-fold curves, threshold study and validation pictures, summary.json, the merged
config and log.txt. Rerunning the same command resumes an interrupted run (finished folds are
kept, an unfinished one continues after its last saved epoch); other training settings are
refused, naming the keys that changed.
"""
import logging
import sys

from utils.setup import add_log_file, configure_process, launch, seed_everything

configure_process()  # before the model imports: their deprecation notices are hidden
from model.training import train  # noqa: E402
from utils.distributed import is_main  # noqa: E402


def main(cfg, args):
    if is_main():  # under torchrun only rank 0 writes
        add_log_file(cfg.OUTPUT_DIR)  # train() saves config.yaml once a fold's model is built
    else:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(cfg.MODEL.SEED)
    return train(cfg)


if __name__ == "__main__":
    sys.exit(launch(main, __doc__))
