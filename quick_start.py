"""The whole pipeline on the generated sample: generate, tile, train, predict, evaluate.

    python quick_start.py [--config-file config/sample.yaml] [KEY VALUE ...]

Writes the kidney-like sample slides and their RLE CSVs (data/sample.py) next to
DATASETS.LABELS_CSV, then runs what tiles_creator.py, train_net.py and test_net.py run, with the
same config (config/sample.yaml by default). A rerun keeps what is finished. Ends with where the
tiles, checkpoints, pictures, CSV and Dice went.
"""
import logging
import os
import sys
import time

from utils.setup import add_log_file, configure_process, launch, seed_everything

configure_process()  # before the model imports: their deprecation notices are hidden
from data.sample import generate_sample  # noqa: E402
from data.tiler import create_tiles  # noqa: E402
from model.prediction import predict_slides  # noqa: E402
from model.training import train  # noqa: E402

logger = logging.getLogger("quick_start")


def main(cfg, args):
    start = time.time()
    add_log_file(cfg.OUTPUT_DIR)  # training and prediction save the config beside their outputs
    logger.info("1/4 sample slides")
    generate_sample(os.path.dirname(cfg.DATASETS.LABELS_CSV) or ".")
    logger.info("2/4 tiles (tiles_creator.py)")
    tiles = create_tiles(cfg)
    logger.info("3/4 training (train_net.py)")
    seed_everything(cfg.MODEL.SEED)
    trained = train(cfg)
    logger.info("4/4 prediction and evaluation (test_net.py)")
    predicted = predict_slides(cfg)
    out = cfg.OUTPUT_DIR
    lines = [
        f"Quick start done in {time.time() - start:.0f} s",
        f"  tiles:        {cfg.DATASETS.TRAIN_FOLDER} ({tiles['n_tiles']} of {tiles['n_grid_tiles']} tiles kept)",
        f"  training:     {out}/fold_*/ (curves.png, triplets.png, thresholds.png), checkpoints {out}/*.pth;"
        f" out-of-fold Dice {trained['oof_dice']:.3f}",
        f"  predictions:  {predicted['csv']}; pictures {os.path.join(out, 'predictions')}/*_overlay.png",
    ]
    for slide_id, per in predicted.get("per_slide", {}).items():
        density = (f" on {per['tissue_mm2']:.1f} mm2 of tissue ({per['objects_per_mm2']:.1f} per mm2), median "
                   f"{per['median_area_um2']:.0f} um2" if per.get("objects_per_mm2") is not None
                   and per.get("median_area_um2") is not None else "")
        lines.append(f"  objects:      {slide_id}: {per['objects']} glomeruli{density} -> "
                     f"{predicted.get('objects_csv', os.path.join(out, 'objects.csv'))}")
    if "overall_dice" in predicted:
        lines.append(f"  held-out Dice {predicted['overall_dice']:.3f}, objects found (IoU >= 0.5) "
                     f"{predicted['matched_objects']} of {predicted['true_objects']} (F1 "
                     f"{predicted['object_f1']:.3f}) -> {os.path.join(out, 'dice.csv')}, "
                     f"{os.path.join(out, 'metrics.json')}")
    logger.info("\n".join(lines))
    return predicted


if __name__ == "__main__":
    sys.exit(launch(main, __doc__, default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "config",
                                                               "sample.yaml")))
