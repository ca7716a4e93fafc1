"""Plain values that config checks and the code that uses them share: ``config`` imports nothing
else from the project, so the readers, the losses and the model registry take these from here
(and a test checks that each list matches its implementation)."""
from __future__ import annotations

__all__ = ["STAIN_METHODS", "SLIDE_READERS", "MAX_MPP", "LOSS_NAMES", "ARCHITECTURES", "SMP_ARCHITECTURES", "SAME_SCALE_TOLERANCE", "BACKENDS",
           "TRAINING_SECTIONS", "NOT_LEARNED"]

# INPUT.SLIDE_READER: which library reads slides (data.readers.open_slide).
SLIDE_READERS = ("auto", "tifffile", "openslide", "wsidicom")

# Largest plausible pixel size (µm/px): a 100 µm pixel is already coarser than a glomerulus.
MAX_MPP = 100.0

# SOLVER.LOSS_FUNCTION_NAME (utils.losses.LOSSES).
LOSS_NAMES = ("symmetric_lovasz", "lovasz_hinge", "dice_coef_loss", "sym_lovasz_dice", "loss_focal_corrected",
              "loss_sym_lovasz_focal_corrected", "sym_lovasz_focal_dice", "bce", "bce_dice")

# MODEL.ARCHITECTURE: the toolkit's own (model.build.MODELS) and segmentation_models_pytorch's
# (0.6.0, matched case-insensitively, as smp does).
ARCHITECTURES = ("UneXt101", "UneXt50", "UneXt")
SMP_ARCHITECTURES = ("DPT", "DeepLabV3", "DeepLabV3Plus", "FPN", "Linknet", "MAnet", "PAN", "PSPNet", "Segformer",
                     "Unet", "UnetPlusPlus", "UPerNet")

# Two scales (downsamples, resampling factors, pixel sizes) are "the same scale" when they differ
# by at most this share of the larger (SVS levels are often 4.0003x rather than 4x; scanners of
# one model report 0.499 or 0.5025 um/px): a pyramid level counts as below a downscale, a factor
# as an integer (read without a resize), slides' or checkpoints' pixel sizes as one. 1 % of
# scale is far below what the training augmentation varies (data.readers.base.same_scale).
SAME_SCALE_TOLERANCE = 0.01

# INPUT.STAIN_NORM (data.stain).
STAIN_METHODS = ("none", "macenko", "reinhard", "vahadane")

# TEST.BACKEND: what runs the model at inference (model.prediction).
BACKENDS = ("auto", "torch", "onnx")

# What a fold learns from (model.training.training_settings): every key of these sections, and
# DATASETS.TRAIN_FOLDER, except the keys named in NOT_LEARNED. A key added to one of these
# sections later counts by itself; only a key declared here may change between a run and its
# resume (or the rerun that keeps its finished folds).
TRAINING_SECTIONS = ("MODEL", "INPUT", "SOLVER", "DATALOADER")
NOT_LEARNED = frozenset({
    "MODEL.DEVICE", "SOLVER.AMP",  # recorded as what they resolve to: the device kind and the precision
    "DATALOADER.NUM_WORKERS",      # items are seeded by (epoch, index): any count draws the same (tested)
    "SOLVER.FOLDS", "SOLVER.FINAL_MODEL", "SOLVER.CROSS_VALIDATION",  # which folds run, not what one learns
    "SOLVER.CHECKPOINT_PERIOD", "SOLVER.KEEP_RESUME_STATES", "SOLVER.RESUME",  # bookkeeping
    "INPUT.SLIDE_READER",          # which library reads the slides: the same pixels (tiles are in TRAIN_FOLDER)
    "INPUT.QC",                    # test_net's slide QC: training does not read it (yet)
})
