import re

import pytest

from config import ConfigError, get_cfg_defaults, load_cfg
from config.loader import merge_opts
from tests.conftest import REPO, run_script


def test_defaults_are_the_originals():
    cfg = get_cfg_defaults()
    assert cfg.MODEL.ARCHITECTURE == "UneXt101"
    assert cfg.MODEL.ENCODER_NAME == "resnext101_32x16d"
    assert cfg.MODEL.ENCODER_WEIGHTS == "ssl"
    assert cfg.MODEL.DEVICE == "auto"
    assert (cfg.INPUT.SIZE_TRAIN, cfg.INPUT.SIZE_REDUCTION_TRAIN) == (256, 16)
    assert (cfg.INPUT.SATURATION_THRESHOLD, cfg.INPUT.PIXEL_THRESHOLD) == (40, 200)
    assert (cfg.SOLVER.N_FOLDS, cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.IMS_PER_BATCH) == (4, 100, 32)
    assert (cfg.SOLVER.BASE_LR_MIN, cfg.SOLVER.BASE_LR_MAX) == (5e-6, 5e-4)
    assert cfg.TEST.TH < 0  # the thresholds the checkpoints learned (0.45, the original's, when they carry none)
    for section, keys in {
        "MODEL": "ARCHITECTURE ENCODER_NAME ENCODER_WEIGHTS DEVICE NUM_CLASSES SEED",
        "INPUT": "SIZE_TRAIN SIZE_REDUCTION_TRAIN SATURATION_THRESHOLD PIXEL_THRESHOLD PROB PIXEL_MEAN PIXEL_STD",
        "DATASETS": "WSI_FOLDER TRAIN_FOLDER LABELS_CSV FORMAT PAIRS_FOLDER",
        "DATALOADER": "NUM_WORKERS",
        "SOLVER": "LOSS_FUNCTION_NAME MAX_EPOCHS N_FOLDS BASE_LR_MIN BASE_LR_MAX IMS_PER_BATCH",
        "TEST": "IMS_PER_BATCH MODEL_WEIGHTS_FOLDER SIZE TH S_TH P_TH WSI_FOLDER",
    }.items():
        for key in keys.split():
            assert key in cfg[section], f"{section}.{key} missing"
    assert "OUTPUT_DIR" in cfg


def test_every_key_is_commented():
    lines = open(f"{REPO}/config/defaults.py", encoding="utf-8").read().splitlines()
    for n, line in enumerate(lines):
        if re.match(r"^_C\.[A-Z_.]+ = (?!CN\(\))", line):
            assert lines[n - 1].lstrip().startswith("#"), f"no comment above: {line}"


def test_defaults_are_not_shared():
    cfg = get_cfg_defaults()
    cfg.INPUT.SIZE_TRAIN = 1
    assert get_cfg_defaults().INPUT.SIZE_TRAIN == 256


def test_yaml_base_and_opts_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("INPUT:\n  SIZE_TRAIN: 512\nSOLVER:\n  MAX_EPOCHS: 3\n")
    (tmp_path / "child.yaml").write_text(
        "_BASE_: base.yaml\nSOLVER:\n  MAX_EPOCHS: 7\nMODEL:\n  ENCODER_WEIGHTS: null\nTEST:\n  TH: 1\n"
    )
    cfg = load_cfg(str(tmp_path / "child.yaml"), ["INPUT.SIZE_REDUCTION_TRAIN", "4",
                                                   "DATASETS.FORMAT", "pairs",
                                                   "INPUT.PIXEL_MEAN", "[0.5, 0.4, 0.3]"])
    assert cfg.INPUT.SIZE_TRAIN == 512  # from the base
    assert cfg.SOLVER.MAX_EPOCHS == 7  # child overrides base
    assert cfg.INPUT.SIZE_REDUCTION_TRAIN == 4  # opts override files
    assert cfg.MODEL.ENCODER_WEIGHTS == ""  # null means not set
    assert cfg.TEST.TH == 1.0 and isinstance(cfg.TEST.TH, float)
    assert cfg.DATASETS.FORMAT == "pairs"
    assert list(cfg.INPUT.PIXEL_MEAN) == [0.5, 0.4, 0.3]
    assert cfg.is_frozen()


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("INPUT:\n  SIZE_TRAINN: 3\n", "unknown config key INPUT.SIZE_TRAINN"),
        ("NOPE: 1\n", "unknown config key NOPE"),
        ("INPUT:\n  SIZE_TRAIN: big\n", "INPUT.SIZE_TRAIN must be an integer"),
        ("INPUT:\n  SIZE_TRAIN: 2.5\n", "INPUT.SIZE_TRAIN must be an integer"),
        ("OVERWRITE: 1\n", "OVERWRITE must be true or false"),
        ("INPUT: 3\n", "INPUT is a section"),
        ("INPUT:\n  SIZE_TRAIN: 0\n", "bad.yaml: INPUT.SIZE_TRAIN must be > 0"),
        ("TEST:\n  MPP: -0.5\n", "bad.yaml: TEST.MPP must be 0 (from the metadata) or a pixel size > 0"),
        ("DATASETS:\n  MPP: 250\n", "bad.yaml: DATASETS.MPP must be 0 (from the metadata) or a pixel size > 0"),
        ("INPUT:\n  MPP_TRAIN: -1\n", "bad.yaml: INPUT.MPP_TRAIN must be 0"),
        # the keys the original toolkit had but never used: an error that says what replaced them
        ("INPUT:\n  SIZE_TEST: 512\n", "INPUT.SIZE_TEST was removed: the sliding window's side is TEST.SIZE"),
        ("INPUT:\n  SIZE_REDUCTION_TEST: 4\n", "INPUT.SIZE_REDUCTION_TEST was removed: test_net reads at the "
                                                "checkpoints' scale"),
        ("TEST:\n  REDUCE: 4\n", "TEST.REDUCE was removed"),
        ("TEST:\n  TH: 1.5\n", "TEST.TH must be within 0..1"),
        ("DATASETS:\n  FORMAT: csv\n", "DATASETS.FORMAT must be one of"),
        ("INPUT:\n  PIXEL_MEAN: [0.1, 0.2]\n", "INPUT.PIXEL_MEAN must be empty or have 3 values"),
        ("MODEL:\n  DEVICE: gpu\n", "MODEL.DEVICE must be"),
        ("INPUT:\n  CROP_SIZE: -8\n", "INPUT.CROP_SIZE must be >= 0"),
        ("INPUT:\n  FOREGROUND_FRACTION: 1.5\n", "INPUT.FOREGROUND_FRACTION must be within 0..1"),
        ("INPUT:\n  AUGMENTATION: heavy\n", "INPUT.AUGMENTATION must be 'classic' or 'histology'"),
        ("SOLVER:\n  AVERAGE: polyak\n", "SOLVER.AVERAGE must be 'none', 'ema' or 'swa'"),
        ("SOLVER:\n  SAVE: last\n", "SOLVER.SAVE must be 'best' or 'final'"),
        ("SOLVER:\n  EMA_DECAY: 1.0\n", "SOLVER.EMA_DECAY must be >= 0 and < 1"),
        ("SOLVER:\n  WARMUP_FRACTION: 1\n", "SOLVER.WARMUP_FRACTION must be >= 0 and < 1"),
        ("- a\n- b\n", "expected a mapping"),
        ("INPUT: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_refused_with_key_and_file(tmp_path, yaml_text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_cfg(str(path))
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "opts, needle",
    [
        (["INPUT.NOPE", "1"], "unknown config key INPUT.NOPE"),
        (["NOPE.X", "1"], "unknown config key NOPE.X"),
        (["INPUT.SIZE_TRAIN"], "has no value"),
        (["INPUT.SIZE_TRAIN", "abc"], "INPUT.SIZE_TRAIN must be an integer"),
        (["INPUT", "1"], "INPUT is a section"),
        (["TEST.REDUCE", "8"], "command line: TEST.REDUCE was removed"),
    ],
)
def test_bad_opts_are_refused(opts, needle):
    cfg = get_cfg_defaults()
    with pytest.raises(ConfigError) as info:
        merge_opts(cfg, opts)
    assert needle in str(info.value)


def test_impossible_value_names_its_source(tmp_path):
    """A value that merges but is impossible names where it was set: the file, or the command line."""
    (tmp_path / "base.yaml").write_text("INPUT:\n  SIZE_TRAIN: 0\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_EPOCHS: 3\n")
    with pytest.raises(ConfigError, match=r"child.yaml: INPUT.SIZE_TRAIN must be > 0, got 0"):
        load_cfg(str(tmp_path / "child.yaml"))
    with pytest.raises(ConfigError, match=r"^command line: TEST.MPP must be 0"):
        load_cfg(None, ["TEST.MPP", "0"] + ["TEST.MPP", "101"])


@pytest.mark.parametrize("opts, needle", [
    (["INPUT.CROP_SIZE", "100"], "INPUT.CROP_SIZE must be a multiple of 32 px"),
    (["SOLVER.FOLDS", "[0, 5]"], "SOLVER.FOLDS [5]: folds are numbered 0..3"),
    (["SOLVER.LOSS_FUNCTION_NAME", "dice_losss"], "SOLVER.LOSS_FUNCTION_NAME: unknown loss 'dice_losss'"),
    (["MODEL.ARCHITECTURE", "Unett"], "MODEL.ARCHITECTURE: unknown architecture 'Unett'"),
    (["MODEL.NUM_CLASSES", "3"], "MODEL.NUM_CLASSES must be 1"),
    (["MODEL.ARCHITECTURE", "Unet", "MODEL.DEEP_SUPERVISION", "True"],
     "MODEL.DEEP_SUPERVISION: only the UneXt family has it, not 'Unet'"),
])
def test_checks_that_need_no_file_run_at_load_time(opts, needle):
    """What train() used to check after reading the tiles is refused when the config loads."""
    with pytest.raises(ConfigError) as info:
        load_cfg(None, opts)
    assert str(info.value).startswith(f"command line: {needle}")


def test_architecture_names_are_matched_as_smp_matches_them():
    assert load_cfg(None, ["MODEL.ARCHITECTURE", "unetplusplus"]).MODEL.ARCHITECTURE == "unetplusplus"
    assert load_cfg(None, ["MODEL.ARCHITECTURE", "UneXt50"]).MODEL.ARCHITECTURE == "UneXt50"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_cfg(str(tmp_path / "absent.yaml"))


def test_script_help_and_config_errors(tmp_path):
    result = run_script("tiles_creator.py", "--help")
    assert result.returncode == 0 and "--config-file" in result.stdout and "KEY VALUE" in result.stdout
    result = run_script("tiles_creator.py", "INPUT.SIZE_TRAINN", "3", "DATASETS.TRAIN_FOLDER", tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "unknown config key INPUT.SIZE_TRAINN" in errors[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    result = run_script("train_net.py", "INPUT.CROP_SIZE", "100", "OUTPUT_DIR", tmp_path / "out",
                        "DATASETS.TRAIN_FOLDER", tmp_path / "no_tiles")
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert result.returncode == 2 and len(errors) == 1 and "INPUT.CROP_SIZE must be a multiple of 32" in errors[0]
    assert not any(tmp_path.iterdir())


RECIPES = sorted(name for name in __import__("os").listdir(__import__("os").path.join(REPO, "config"))
                 if name.endswith(".yaml"))


def test_every_recipe_is_tested():
    assert {"sample.yaml", "aidpath.yaml", "hubmap.yaml", "endovis.yaml", "drone.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_builds_its_model_and_loss(name):
    """Every YAML in config/ merges strictly, and its model (random init: no download here) and
    loss build and run: a recipe cannot rot silently."""
    import os

    import torch

    from model.build import build_model
    from utils.losses import build_loss

    cfg = load_cfg(os.path.join(REPO, "config", name), ["MODEL.ENCODER_WEIGHTS", ""])
    model = build_model(cfg).eval()
    size = 64
    with torch.no_grad():
        logits = model(torch.rand(1, 3, size, size))
    assert logits.shape == (1, cfg.MODEL.NUM_CLASSES, size, size)
    target = (torch.rand(1, 1, size, size) > 0.7).float()
    loss = build_loss(cfg)(logits, target)
    assert torch.isfinite(loss) and loss.item() > 0
