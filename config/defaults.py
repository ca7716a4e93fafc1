"""Every configuration key of the toolkit, with its default, meaning and unit.

Scripts never read this module's ``_C`` directly: they call :func:`get_cfg_defaults` (a clone),
merge a YAML file and ``KEY VALUE`` overrides on top (see ``config/loader.py``), then freeze it.
Key names follow the original Glomeruli_segmentation toolkit so that its configs carry over.

Conventions: sizes are pixels; a "reduction" is an integer downscale factor applied to the
full-resolution (level 0) slide; colours are RGB; an empty string or list means "not set".
"""
from yacs.config import CfgNode as CN

_C = CN()

# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Architecture name: "UneXt101", "UneXt50", or any segmentation_models_pytorch architecture
# ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", ...).
_C.MODEL.ARCHITECTURE = "UneXt101"
# Encoder (backbone) name, as timm (UneXt) or smp spells it.
_C.MODEL.ENCODER_NAME = "resnext101_32x16d"
# Encoder weights: a tag ("ssl", "imagenet", ...), the path of a local .pth/.safetensors
# file, or "" / null for random initialisation.
_C.MODEL.ENCODER_WEIGHTS = "ssl"
# Whole-model weights to start training from: a checkpoint of this toolkit or the original
# toolkit's UneXt101 state_dict (its enc0..enc4 keys are mapped); "" = none.
_C.MODEL.WEIGHTS = ""
# Normalisation layers of the UneXt family (encoder and decoder): "batch" (BatchNorm, the
# original's) or "group" (GroupNorm, groups of 4 channels: no batch statistics, the same in
# training and inference; for training from scratch with small batches).
_C.MODEL.NORM = "batch"
# Deep supervision (UneXt family, training only): 1x1 heads on the decoder's maps at strides 4,
# 8 and 16 add their loss (the target averaged down to their size) with weights 1/2, 1/4, 1/8
# of the main output's (nnU-Net's scheme, normalised). Inference uses the main output only.
_C.MODEL.DEEP_SUPERVISION = False
# Device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
_C.MODEL.DEVICE = "auto"
# Number of output channels: 1 (binary segmentation; multi-class models are not supported yet).
_C.MODEL.NUM_CLASSES = 1
# Seed of every random number generator (Python, numpy, torch).
_C.MODEL.SEED = 2020

# -----------------------------------------------------------------------------
# INPUT
# -----------------------------------------------------------------------------
_C.INPUT = CN()
# Side of a training tile, in pixels of the downscaled slide.
_C.INPUT.SIZE_TRAIN = 256
# Downscale factor from the full-resolution slide to training tiles (integer >= 1).
_C.INPUT.SIZE_REDUCTION_TRAIN = 16
# Background filter: a pixel is "tissue" when its HSV saturation (0..255, OpenCV) exceeds
# this value.
_C.INPUT.SATURATION_THRESHOLD = 40
# Slide quality control (data.qc, the QC.* keys). tiles_creator: tiles QC flags (pen, blur, fold:
# half of the tile or more) are not written, stats_*.json counts them per reason, TRAIN_FOLDER/qc.csv
# and qc/ pictures. test_net: no prediction on flagged regions (objects there are dropped and counted
# per reason in metrics.json), densities per mm2 of usable tissue, OUTPUT_DIR/qc.csv and qc/ pictures.
_C.INPUT.QC = False
# Stain normalisation of the tiles (data.stain, torch-staintools): "none", "macenko", "reinhard" or
# "vahadane" (its fit takes minutes per slide on a CPU). Fitted per slide on its tissue and applied
# to every tile; the fitted reference goes into the stats file and every checkpoint, and test_net
# applies the checkpoint's normalisation to every slide it predicts (this key is not read there).
_C.INPUT.STAIN_NORM = "none"
# The image to normalise to (its tissue); "" = the built-in Macenko H&E reference (macenko only).
_C.INPUT.STAIN_REFERENCE = ""
# Background filter: a tile is kept when it has more than PIXEL_THRESHOLD * size // 256
# tissue pixels and its pixel sum exceeds the same number (so black padding is dropped).
# A negative value keeps every tile.
_C.INPUT.PIXEL_THRESHOLD = 200
# Pixel size of the training tiles in µm/px; > 0 sets the scale physically: a slide of p µm/px
# is resampled to MPP_TRAIN / SIZE_REDUCTION_TRAIN µm/px, then tiled at SIZE_REDUCTION_TRAIN as
# usual, so slides from scanners of different resolutions give tiles of one physical scale.
# Needs every slide's pixel size (metadata or DATASETS.MPP). 0 = the reduction alone (pixel
# sizes are still recorded, and reach the checkpoints, when known).
_C.INPUT.MPP_TRAIN = 0.0
# Slide reader: "auto" (tifffile for the TIFF family, the fastest here; OpenSlide for MRXS,
# VMS/VMU and for any file tifffile cannot read; wsidicom for DICOM WSI: a folder of .dcm
# instances or a .dcm file), "tifffile", "openslide" or "wsidicom" (tiling and inference).
_C.INPUT.SLIDE_READER = "auto"
# Multi-channel (fluorescence) slides: the three channel indices to read as R, G, B, e.g. [0, 1, 2]
# (tiling and inference). Empty: such slides are refused (the toolkit expects RGB brightfield).
_C.INPUT.CHANNELS = []
# Probability of each augmentation in the training pipeline (0..1).
_C.INPUT.PROB = 0.5
# Training views: 0 = the classic fixed tiles of SIZE_TRAIN px, one pass per epoch; > 0 = a
# fresh random crop of this many px (of the downscaled slide) for every sample, read anywhere on
# a slide's tile grid (across tile borders), SOLVER.SAMPLES_PER_EPOCH of them per epoch.
_C.INPUT.CROP_SIZE = 0
# Random crops: share (0..1) of the crops centred on a foreground (mask) pixel; the rest are
# centred uniformly on the kept tissue. nnU-Net forces 1/3.
_C.INPUT.FOREGROUND_FRACTION = 0.33
# Training augmentation: "classic" (the original toolkit's pipeline) or "histology" (rotations
# by any angle and zoom on a margin around the crop, mild stain/colour jitter for PAS/H&E; see
# data/transforms.py).
_C.INPUT.AUGMENTATION = "classic"
# histology augmentation: scale of the stain and colour jitter ranges (1: +-8 % stain concentrations,
# hue +-6, saturation +-15, value +-10, brightness/contrast +-12 %, gamma 85-115; 2: twice that).
_C.INPUT.STAIN_STRENGTH = 1.0
# Random crops: probability (0..1) that a glomerulus (a foreground pixel's neighbourhood, from any
# training image) is pasted into the crop with a soft edge, its mask with it (copy-paste, as TumorCP).
_C.INPUT.COPY_PASTE = 0.0
# Per-channel RGB mean in 0..1 used to normalise tiles. Empty: use the mean measured by
# tiles_creator.py (stats_<size>_red<r>.json in DATASETS.TRAIN_FOLDER).
_C.INPUT.PIXEL_MEAN = []
# Per-channel RGB standard deviation in 0..1. Empty: use the tiler's measured value.
_C.INPUT.PIXEL_STD = []

# -----------------------------------------------------------------------------
# DATASETS
# -----------------------------------------------------------------------------
_C.DATASETS = CN()
# Input format: "wsi_rle" (whole slides + an RLE CSV), "pairs" (image/mask file pairs) or
# "annotations" (slides or plain images + one annotation file each: QuPath GeoJSON, ASAP or
# ImageScope XML, labelme JSON, DICOM Segmentation or bulk annotations).
_C.DATASETS.FORMAT = "wsi_rle"
# Folder of whole-slide images named <id>.<ext> (.tiff, .tif, .svs, .ome.tif, .ndpi, .mrxs, .dcm,
# DICOM folders, ...); in "annotations" format also plain images (.png, .jpg, .jpeg, .bmp).
_C.DATASETS.WSI_FOLDER = "datasets/hubmap/train"
# annotations: folder of the annotation files, one per slide, named <id>.<ext> (.geojson, .json,
# .xml, .seg.dcm, .ann.dcm, .dcm); the format is recognised from the content. "" = WSI_FOLDER.
_C.DATASETS.ANNOTATIONS_FOLDER = ""
# annotations (and test_net's TEST.ANNOTATIONS_FOLDER): the class names whose shapes are
# foreground (QuPath classification, ASAP PartOfGroup, ImageScope layer Name, labelme label,
# DICOM segment / group label), e.g. ["Glomerulus"]; empty = every class but those below.
_C.DATASETS.ANNOTATION_CLASSES = []
# annotations: class names whose shapes are subtracted from the foreground (e.g. ["exclude"]).
_C.DATASETS.ANNOTATION_EXCLUDE = []
# annotations: class names whose shapes mark the annotated region of a slide (e.g. ["ROI"]); a
# slide that has such shapes is tiled only where tiles lie at least half inside them, and
# training crops stay inside them. They are never foreground.
_C.DATASETS.ANNOTATION_ROI = []
# Folder where tiles_creator.py writes tiles and their stats; training reads it.
_C.DATASETS.TRAIN_FOLDER = "datasets/tiles"
# CSV of masks. wsi_rle: columns "id" and "encoding" (Kaggle HuBMAP RLE at full resolution).
# pairs: optional; an "id" column restricts which pairs are used.
_C.DATASETS.LABELS_CSV = "datasets/hubmap/train.csv"
# pairs: folder holding an images/ and a masks/ subfolder with matching file names (stems).
_C.DATASETS.PAIRS_FOLDER = ""
# pairs: name of the images subfolder of PAIRS_FOLDER.
_C.DATASETS.PAIRS_IMAGES = "images"
# pairs: name of the masks subfolder of PAIRS_FOLDER.
_C.DATASETS.PAIRS_MASKS = "masks"
# pairs: which mask channel holds the label: -1 = the maximum over all channels (works for
# grayscale and for any single-colour mask), 0/1/2 = the R/G/B channel, 3 = alpha.
_C.DATASETS.MASK_CHANNEL = -1
# pairs: a mask pixel is foreground when its (selected) value is greater than this
# (0 for 0/1 masks, 127 for 0/255 or "mask < 128 -> 0, else 1").
_C.DATASETS.MASK_THRESHOLD = 0
# pairs: swap foreground and background after thresholding.
_C.DATASETS.MASK_INVERT = False
# Pixel size (µm/px, level 0) of the training slides or images, when their metadata lacks it or
# is wrong; 0 = from each file's metadata (SVS MPP, OME PhysicalSize, TIFF/NDPI resolution).
_C.DATASETS.MPP = 0.0
# Several data sets in one training (a list; empty = the single source the keys above describe).
# Each entry is a mapping with NAME (required, unique), WEIGHT (> 0: the share of training crops
# drawn from it, relative to the others; default 1) and any of the DATASETS keys above (FORMAT,
# WSI_FOLDER, LABELS_CSV, PAIRS_FOLDER, MASK_*, MPP, ANNOTATIONS_FOLDER, ANNOTATION_*), which
# override the section's own values for that source. Image ids must be unique across sources.
# Folds then hold images of every source; the stats, logs and results report each source.
#   SOURCES:
#     - {NAME: aidpath, FORMAT: pairs, PAIRS_FOLDER: ../shared/data/aidpath, MASK_CHANNEL: 0, MPP: 0.5}
#     - {NAME: hubmap_ftu, FORMAT: annotations, WSI_FOLDER: ../shared/data/hubmap_ftu, MPP: 0.95}
_C.DATASETS.SOURCES = []

# -----------------------------------------------------------------------------
# TILER (tiles_creator.py)
# -----------------------------------------------------------------------------
_C.TILER = CN()
# Worker threads for slide decoding and PNG encoding; 0 = one per CPU core.
_C.TILER.NUM_WORKERS = 0
# PNG compression level of written tiles (0 = none, 9 = smallest; 1 is fastest).
_C.TILER.PNG_COMPRESSION = 1

# -----------------------------------------------------------------------------
# QC: slide quality control (python -m data.qc; data/qc.py gives each rule and its measurement)
# -----------------------------------------------------------------------------
_C.QC = CN()
# Pixel size (um/px) of the level QC works on; rules measured at 4 um/px (blur is not seen coarser).
# A slide without a pixel size is taken as 0.5 um/px (20x) for QC; an image under ~8k px a side is
# read finer (1024 px on its long side at least).
_C.QC.MPP = 4.0
# Tissue: HSV saturation (0..255) above this ...
_C.QC.TISSUE_SATURATION = 20
# ... or grey levels (0..255) darker than the slide's glass (its 95th brightness percentile) by this.
_C.QC.TISSUE_CONTRAST = 25
# Tissue pieces smaller than this (um^2) are background (dust, debris).
_C.QC.MIN_TISSUE_UM2 = 1000.0
# Blue and green marker: HSV saturation above this (hue 35..125 of OpenCV's 0..180).
_C.QC.PEN_SATURATION = 150
# Red marker: saturation above this (hue within 6 of red); eosin reaches ~200 at 4 um/px.
_C.QC.PEN_RED_SATURATION = 230
# Translucent marker: hue (0..180) at least this far from the slide's mean stain hue (0 disables) ...
_C.QC.PEN_HUE_DISTANCE = 25
# ... with saturation above this.
_C.QC.PEN_TRANSLUCENT_SATURATION = 60
# Black marker: HSV value below this, with saturation under 80 (0 disables).
_C.QC.PEN_BLACK_VALUE = 50
# Pen, fold and blur regions smaller than this (um^2) are ignored (larger than most glomeruli,
# which are dense and dark too).
_C.QC.MIN_ARTEFACT_UM2 = 40000.0
# Fold or dark: tissue whose optical density (summed over R, G, B, averaged over 60 um) exceeds
# this multiple of the 25th percentile of the slide's tissue (one layer); 0 = off, the default:
# 1.5 finds 77-90 % of simulated folds on AIDPATH with no false flag there, but flags clean HuBMAP
# PAS tiles (12 of 15, up to 21 % of their tissue): dense cortex looks like a fold (data/qc.py).
_C.QC.FOLD_OD_RATIO = 0.0
# Blur: local sharpness (data.qc.sharpness) below this; in-focus PAS tissue ~6, blurred by 4 um ~2.3
# (0 disables).
_C.QC.BLUR_SHARPNESS = 3.0
# Verdict: "warn" when pen + blur + fold cover at least this fraction of the tissue ...
_C.QC.WARN_FRACTION = 0.05
# ... and "fail" from this fraction (or when no tissue is found).
_C.QC.FAIL_FRACTION = 0.25

# -----------------------------------------------------------------------------
# DATALOADER
# -----------------------------------------------------------------------------
_C.DATALOADER = CN()
# Worker processes of the training/validation data loaders. Not part of what a run learns: each
# item is seeded by (epoch, index), so any count, 0 included, gives the same weights (tested);
# a resume may use another count.
_C.DATALOADER.NUM_WORKERS = 2

# -----------------------------------------------------------------------------
# SOLVER
# -----------------------------------------------------------------------------
_C.SOLVER = CN()
# Loss name, as registered in utils/losses.py (e.g. "symmetric_lovasz", "bce").
_C.SOLVER.LOSS_FUNCTION_NAME = "symmetric_lovasz"
# Focal loss: weight of the foreground class (0..1; negative disables the weighting).
_C.SOLVER.FOCAL_ALPHA = 0.25
# Focal loss: focusing exponent gamma (>= 0).
_C.SOLVER.FOCAL_GAMMA = 2.0
# Soft Dice loss: smoothing added to numerator and denominator (pixels).
_C.SOLVER.DICE_SMOOTH = 1.0
# Epochs per fold.
_C.SOLVER.MAX_EPOCHS = 100
# Number of cross-validation folds (grouped by slide id).
_C.SOLVER.N_FOLDS = 4
# Learning rate of the encoder (the lower end of the discriminative slice).
_C.SOLVER.BASE_LR_MIN = 5e-6
# Learning rate of the decoder and head (the upper end of the slice).
_C.SOLVER.BASE_LR_MAX = 5e-4
# Samples per epoch with random crops (INPUT.CROP_SIZE > 0); 0 = as many as training tiles.
# The run's length is MAX_EPOCHS x SAMPLES_PER_EPOCH samples, whatever the machine's speed.
_C.SOLVER.SAMPLES_PER_EPOCH = 0
# Share (0..1) of the run spent warming the learning rate up before its cosine decay (fastai
# one-cycle's pct_start).
_C.SOLVER.WARMUP_FRACTION = 0.25
# Decoupled weight decay of the Adam optimiser.
_C.SOLVER.WEIGHT_DECAY = 0.01
# Weight averaging: "none", "ema" (exponential moving average of the weights after every step,
# decay EMA_DECAY) or "swa" (equal average of the weights at the end of each epoch from SWA_START
# of the run on). The averaged weights are the ones validated, and saved.
_C.SOLVER.AVERAGE = "none"
# EMA decay per step (0..1); it warms up as min(decay, (1 + n) / (10 + n)) over the first steps.
_C.SOLVER.EMA_DECAY = 0.99
# SWA: share (0..1) of the epochs after which each epoch's weights join the average.
_C.SOLVER.SWA_START = 0.75
# Batches of training samples run through the averaged model at the end to recompute its
# BatchNorm statistics (torch.optim.swa_utils.update_bn); 0 = keep the averaged statistics.
_C.SOLVER.BN_UPDATE_BATCHES = 16
# What each fold saves: "best" (the epoch with the best validation Dice) or "final" (the
# weights, averaged when AVERAGE is set, at the end of the run: no choice made on the
# validation images).
_C.SOLVER.SAVE = "best"
# After the folds, also train one model on every slide/image with the same schedule
# (checkpoint model_<arch>_<encoder>_all.pth, threshold from the out-of-fold study).
_C.SOLVER.FINAL_MODEL = False
# Keep each fold's resume states (fold_<k>/*.state: weights + optimizer) once it has finished.
_C.SOLVER.KEEP_RESUME_STATES = False
# Mixed precision: "auto" (float16 on CUDA, as the original; bfloat16 on a CPU that computes it
# natively, AMX or AVX512-BF16; float32 elsewhere), "bf16" (bfloat16 autocast on any device),
# "off" (float32).
_C.SOLVER.AMP = "auto"
# Training batch size (tiles per step).
_C.SOLVER.IMS_PER_BATCH = 32
# Folds to train (e.g. [0, 2]); empty: all N_FOLDS folds.
_C.SOLVER.FOLDS = []
# False: no folds, only the model on every image (needs FINAL_MODEL True; threshold 0.5, or
# TEST.TH): fine-tuning a model on a few corrected slides (config/finetune.yaml), where holding
# slides out would leave too few to learn from.
_C.SOLVER.CROSS_VALIDATION = True
# Kept for the original configs: a rerun of the same command always resumes (finished folds
# are kept, an unfinished fold continues after its last saved epoch); with True, finished
# folds are also kept when the settings changed.
_C.SOLVER.RESUME = False
# Save the resume state (weights + optimizer) every this many epochs (and after the last).
_C.SOLVER.CHECKPOINT_PERIOD = 1
# Validate each fold every this many epochs (and after the last): the curves and SAVE best see
# only those epochs. Raise it when the validation images are many (it costs a pass over them).
_C.SOLVER.EVAL_PERIOD = 1

# -----------------------------------------------------------------------------
# TEST (test_net.py)
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Inference batch size (tiles per forward pass).
_C.TEST.IMS_PER_BATCH = 8
# Folder of trained checkpoints (every *.pth in it joins the ensemble), or one .pth file. The
# default is the shipped glomerulus model (model/checkpoints/, see its README.md: PAS kidney, tiles
# of 2 um/px), found inside the toolkit when the path does not exist from where you run.
_C.TEST.MODEL_WEIGHTS_FOLDER = "model/checkpoints"
# Side of the sliding-window tile, in pixels of the downscaled slide.
_C.TEST.SIZE = 256
# Pixel size (µm/px, level 0) of the slides or images to predict, when their metadata lacks it
# or is wrong; 0 = from each file's metadata. With a pixel size here and in the checkpoints,
# each slide is read at the checkpoints' physical scale (any real factor); without one, at the
# checkpoints' reduction (with a warning).
_C.TEST.MPP = 0.0
# Measure every predicted object: objects.csv, the GeoJSON outlines with their measurements, the
# numbered overlay, median areas in metrics.json. Objects are the 8-connected components of the
# full-resolution mask either way: False still counts them (per-slide counts and densities,
# object-level scores with labels), without measuring or outlining them.
_C.TEST.MEASURE = True
# Probability threshold (0..1) that turns the predicted probability into the mask. Negative:
# the threshold each checkpoint learned in training, averaged over the ensemble (0.45 for a
# checkpoint that carries none). The log says which threshold was used and where it came from.
_C.TEST.TH = -1.0
# Background filter at inference: saturation threshold (0..255), as INPUT.SATURATION_THRESHOLD.
_C.TEST.S_TH = 40
# Background filter at inference: pixel threshold per 256 px of tile side, as
# INPUT.PIXEL_THRESHOLD.
_C.TEST.P_TH = 200
# Folder of slides to predict.
_C.TEST.WSI_FOLDER = "datasets/hubmap/test"
# Overlap of neighbouring sliding windows, as a fraction of the window (0 <= overlap < 1).
_C.TEST.OVERLAP = 0.5
# Blending of overlapping windows: "gaussian" or "constant".
_C.TEST.BLEND = "gaussian"
# Average the predictions of the tile and its horizontal and vertical flips.
_C.TEST.TTA = False
# Upsampling of the low-res probability map to full resolution before the threshold:
# "bilinear" (smooth contours) or "nearest" (each low-res pixel a reduce x reduce block).
_C.TEST.UPSAMPLE = "bilinear"
# Remove predicted objects smaller than this many level-0 pixels (0 = keep all).
_C.TEST.MIN_AREA = 0
# Remove predicted objects smaller than this many µm² (0 = keep all): the same physical size on
# slides of any pixel size (needs each slide's pixel size; the larger of this and MIN_AREA applies).
_C.TEST.MIN_AREA_UM2 = 0.0
# Also write each DICOM WSI slide's prediction as a DICOM Segmentation
# (predictions/<id>.seg.dcm, highdicom) that references the slide's level-0 instance; slides in
# other formats get none (a warning lists them).
_C.TEST.DICOM_SEG = False
# Output CSV (id,predicted); "" = OUTPUT_DIR/submission.csv.
_C.TEST.OUTPUT_CSV = ""
# Slides: CSV of true masks (id,encoding) to score the predictions with; "" = no scoring.
# Pairs (TEST.PAIRS_FOLDER): a CSV whose "id" column picks the images to predict; "" = all.
_C.TEST.LABELS_CSV = ""
# Slides: folder of annotation files (<id>.<ext>, any DATASETS.FORMAT annotations format) that
# label the slides for scoring, instead of TEST.LABELS_CSV; the classes are DATASETS.ANNOTATION_*.
# Slides without a file are predicted but not scored (a warning lists them).
_C.TEST.ANNOTATIONS_FOLDER = ""
# Slides: class names of TEST.ANNOTATIONS_FOLDER's shapes that mark the region of interest: a slide
# that has such shapes is predicted, measured and scored only inside them (the rest stays empty).
_C.TEST.ROI = []
# Predict the images of an image/mask pairs folder (laid out as DATASETS.PAIRS_FOLDER, with
# the DATASETS mask encoding; masks optional, scored when present) instead of slides.
_C.TEST.PAIRS_FOLDER = ""
# Inference backend: "auto" (ONNX Runtime on a CPU, from the checkpoints' ONNX exports made once
# and cached in TEST.ONNX_CACHE; torch on a GPU, or where onnxruntime is missing: model.backend),
# "torch" (the *.pth checkpoints) or "onnx" (the *.onnx files of TEST.MODEL_WEIGHTS_FOLDER with
# their model cards, written by python -m model.export; CPU, or CUDA with the onnxruntime-gpu package).
_C.TEST.BACKEND = "auto"
# TEST.BACKEND auto: the folder of cached ONNX exports (<checkpoint sha256>-<exporter>.onnx and its
# card); "" = $XDG_CACHE_HOME/glomeruli_segmentation/onnx (~/.cache/glomeruli_segmentation/onnx).
_C.TEST.ONNX_CACHE = ""
# ONNX Runtime: threads per model run; 0 = ONNX Runtime's default (the physical cores).
_C.TEST.ONNX_THREADS = 0
# Split the slides into TEST.SHARDS shares (deterministic, balanced by file size) and predict
# share TEST.SHARD_INDEX (0-based) in this process: one task of a cluster array job, no torchrun.
# 0 / -1 = from the environment: SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID (minus
# SLURM_ARRAY_TASK_MIN), or JOB_COMPLETION_INDEX (Kubernetes; TEST.SHARDS must then be set); 1 / 0
# when none is set. A shard writes its slides' outputs and records; TEST.MERGE assembles them.
_C.TEST.SHARDS = 0
# This process's shard, 0 .. TEST.SHARDS - 1 (-1: from the environment, as above).
_C.TEST.SHARD_INDEX = -1
# Assemble submission.csv, objects.csv, dice.csv and metrics.json from every slide's record
# (after the shards finish), predicting nothing; slides without a record are named and it fails.
_C.TEST.MERGE = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Folder of training and inference outputs (checkpoints, logs, predictions).
_C.OUTPUT_DIR = "output"
# Allow a run to replace the outputs of an earlier run with different settings.
_C.OVERWRITE = False


def get_cfg_defaults() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()
