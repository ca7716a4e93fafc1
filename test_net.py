"""Predict whole slides with the trained checkpoints: RLE CSV, pictures and Dice.

    python test_net.py [--config-file FILE.yaml] [KEY VALUE ...]

Every slide in TEST.WSI_FOLDER is read at the checkpoints' scale and predicted with the
ensemble of every checkpoint in TEST.MODEL_WEIGHTS_FOLDER (sliding windows of TEST.SIZE px,
TEST.OVERLAP, Gaussian blending, background skipped, threshold TEST.TH). Writes the
full-resolution RLE CSV (OUTPUT_DIR/submission.csv or TEST.OUTPUT_CSV), a mask and an overlay
picture per slide, and with TEST.LABELS_CSV the Dice. A rerun skips finished slides.
"""
from utils.setup import add_log_file, configure_process, exit_now, launch

configure_process()  # before the model imports: their deprecation notices are hidden
from model.prediction import log_file_name, predict_slides  # noqa: E402


def main(cfg, args):
    add_log_file(cfg.OUTPUT_DIR, log_file_name(cfg))
    return predict_slides(cfg)  # writes config_test.yaml beside the CSV once it is written


if __name__ == "__main__":
    exit_now(launch(main, __doc__))  # everything is written: skip tearing down torch (~1 s)
