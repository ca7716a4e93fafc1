"""Predict whole slides (or images) with trained checkpoints, or the shipped glomerulus model.

    python test_net.py [--config-file FILE.yaml] [KEY VALUE ...]
    python test_net.py TEST.WSI_FOLDER my_slides/ OUTPUT_DIR output/counted   # the shipped model

Every slide (TIFF/SVS/OME-TIFF/NDPI, OpenSlide formats, DICOM WSI folders, PNG/JPEG images) in
TEST.WSI_FOLDER, or every image of TEST.PAIRS_FOLDER, is read at the checkpoints' physical scale
and predicted with the ensemble of TEST.MODEL_WEIGHTS_FOLDER (default: the shipped model):
sliding windows of TEST.SIZE px, TEST.OVERLAP, Gaussian blending, background skipped, threshold
TEST.TH or the one learned in training. TEST.BACKEND auto (default) runs ONNX Runtime on a CPU
from exports cached in TEST.ONNX_CACHE, torch on a GPU. Writes to OUTPUT_DIR: submission.csv
(full-resolution RLE), objects.csv (every object measured, in um when the pixel size is known),
predictions/<id>.geojson (QuPath), masks and overlays, metrics.json (counts, densities, seconds
per stage) and, with labels (TEST.LABELS_CSV or TEST.ANNOTATIONS_FOLDER), dice.csv; DICOM
Segmentations with TEST.DICOM_SEG. TEST.ROI predicts inside regions of interest only;
TEST.SHARDS / TEST.MERGE split the slides over a cluster array job. A rerun skips finished slides.
See docs/inference.md.
"""
from utils.setup import add_log_file, configure_process, exit_now, launch

configure_process()  # before the model imports: their deprecation notices are hidden
from model.prediction import log_file_name, predict_slides  # noqa: E402


def main(cfg, args):
    add_log_file(cfg.OUTPUT_DIR, log_file_name(cfg))
    return predict_slides(cfg)  # writes config_test.yaml beside the CSV once it is written


if __name__ == "__main__":
    exit_now(launch(main, __doc__))  # everything is written: skip tearing down torch (~1 s)
