"""Several data sources in one config (DATASETS.SOURCES): tiles and stats per source, folds that
hold every source, crops drawn by the sources' weights, out-of-fold Dice per source; single-source
configs unchanged. Generated images only (no ../shared needed)."""
import json

import cv2
import pytest

from config import load_cfg
from config.loader import ConfigError
from data.datasets import TileSet, kfold_groups, tile_group, tile_index, tile_sources
from data.sample import SampleSpec, draw_slide
from data.sampling import RandomCropDataset, slide_canvases
from data.tiling import TileGrid
from tests.conftest import run_script
from utils.export import mask_polygons

TILES = ["INPUT.SIZE_TRAIN", 64, "INPUT.SIZE_REDUCTION_TRAIN", 4]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Source "pairs": 4 image/mask pairs (PNG) at 0.5 um/px; source "polys": 5 images with labelme
    polygons at 1 um/px."""
    root = tmp_path_factory.mktemp("sources")
    (root / "pairs" / "images").mkdir(parents=True)
    (root / "pairs" / "masks").mkdir()
    (root / "polys").mkdir()
    for k in range(4):  # one glomerulus each (the generator draws one per 1.1 MP)
        image, mask = draw_slide(SampleSpec(f"p{k}", "x", 1100, 1100, 60 + k))
        cv2.imwrite(str(root / "pairs" / "images" / f"p{k}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "pairs" / "masks" / f"p{k}.png"), mask * 255)
    for k in range(5):
        image, mask = draw_slide(SampleSpec(f"q{k}", "x", 1000, 1150, 70 + k))
        cv2.imwrite(str(root / "polys" / f"q{k}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        shapes = [{"label": "glom", "points": r[0][:-1], "shape_type": "polygon"} for r in mask_polygons(mask)]
        (root / "polys" / f"q{k}.json").write_text(json.dumps({"version": "5.0", "shapes": shapes, "imagePath":
                                                               f"q{k}.png", "imageHeight": 1000, "imageWidth": 1150}))
    sources = (f"[{{NAME: pairs, FORMAT: pairs, PAIRS_FOLDER: '{root / 'pairs'}', LABELS_CSV: '', "
               f"MASK_THRESHOLD: 127, MPP: 0.5, WEIGHT: 3}}, {{NAME: polys, FORMAT: annotations, "
               f"WSI_FOLDER: '{root / 'polys'}', MPP: 1.0}}]")
    result = run_script("tiles_creator.py", "DATASETS.SOURCES", sources, "INPUT.MPP_TRAIN", 2.0,
                        "DATASETS.TRAIN_FOLDER", root / "tiles", *TILES)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, sources


def test_tiles_and_stats_record_their_source(two_sources):
    root, _ = two_sources
    stats = json.load(open(root / "tiles" / "stats_64_red4.json"))
    assert {k: v["source"] for k, v in stats["slides"].items()} == {
        **{f"p{k}": "pairs" for k in range(4)}, **{f"q{k}": "polys" for k in range(5)}}
    assert stats["sources"]["pairs"]["slides"] == 4 and stats["sources"]["polys"]["slides"] == 5
    assert stats["sources"]["pairs"]["weight"] == 3.0 and stats["sources"]["polys"]["weight"] == 1.0
    assert stats["sources"]["pairs"]["tile_mpp"] == [2.0] and stats["tile_mpp"] == 2.0  # one physical scale
    assert stats["slides"]["p0"]["resample"] == 1.0 and stats["slides"]["q0"]["resample"] == 0.5  # to 0.5 um/px
    tiles = TileSet(str(root / "tiles"), 64, 4)
    assert tile_sources(tiles) == {k: v["source"] for k, v in stats["slides"].items()}
    assert sum(v["tiles"] for v in stats["sources"].values()) == stats["n_tiles"] == len(tiles.names)


def test_ids_must_be_unique_across_sources(two_sources, tmp_path):
    root, _ = two_sources
    twice = (f"[{{NAME: a, FORMAT: annotations, WSI_FOLDER: '{root / 'polys'}', MPP: 1.0}}, "
             f"{{NAME: b, FORMAT: annotations, WSI_FOLDER: '{root / 'polys'}', MPP: 1.0}}]")
    result = run_script("tiles_creator.py", "DATASETS.SOURCES", twice, "DATASETS.TRAIN_FOLDER", tmp_path / "t", *TILES)
    assert result.returncode == 1 and "image id 'q0' is in two sources (a and b)" in result.stderr
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["log.txt"]  # nothing written but the log


@pytest.mark.parametrize("entries, needle", [
    ("[{NAME: a, FOLDER: x}]", "DATASETS.SOURCES[0]: unknown key 'FOLDER'"),
    ("[{NAME: a}, {NAME: a}]", "DATASETS.SOURCES[1].NAME 'a' names two sources"),
    ("[{FORMAT: pairs}]", "DATASETS.SOURCES[0].NAME must be a plain name"),
    ("[{NAME: a, WEIGHT: -1}]", "DATASETS.SOURCES[0].WEIGHT must be > 0"),
    ("[{NAME: a, MPP: big}]", "DATASETS.SOURCES[0].MPP must be a number"),
    ("[{NAME: a, FORMAT: rle}]", "DATASETS.SOURCES[0].FORMAT must be one of"),
    ("[a, b]", "DATASETS.SOURCES[0] must be a mapping"),
])
def test_bad_source_entries_are_config_errors(entries, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_cfg(None, ["DATASETS.SOURCES", entries])


def test_folds_hold_every_source_and_one_source_is_unchanged():
    groups = [f"a{i}" for i in range(12)] + [g for i in range(88) for g in [f"h{i}"] * 9]
    strata = {**{f"a{i}": "aidpath" for i in range(12)}, **{f"h{i}": "hubmap" for i in range(88)}}
    fold_of = kfold_groups(groups, 4, strata)
    for fold in range(4):
        members = {g for g in fold_of if fold_of[g] == fold}
        assert sum(g.startswith("a") for g in members) == 3 and sum(g.startswith("h") for g in members) == 22
    plain = kfold_groups(groups, 4)
    assert plain == kfold_groups(groups, 4, None) == kfold_groups(groups, 4, {g: "x" for g in strata})
    # where the tile counts alone would put both images of the small source in one fold
    small = ["b0"] * 5 + ["b1"] * 3 + ["b2"] * 3 + ["a0", "a1"]
    unstratified = kfold_groups(small, 2)
    assert unstratified["a0"] == unstratified["a1"]
    stratified = kfold_groups(small, 2, {"a0": "a", "a1": "a", "b0": "b", "b1": "b", "b2": "b"})
    assert stratified["a0"] != stratified["a1"]
    with pytest.raises(ValueError, match="more than the 12 slides/images of source 'aidpath'"):
        kfold_groups(groups, 13, strata)


def test_crops_are_drawn_by_source_weight(two_sources):
    root, _ = two_sources
    tiles = TileSet(str(root / "tiles"), 64, 4)
    stats = json.load(open(root / "tiles" / "stats_64_red4.json"))
    grids = {k: TileGrid(*v["shape"], 64, 4) for k, v in stats["slides"].items()}
    sources = tile_sources(tiles)

    def draws(weights, n=1200, with_sources=True):
        import torch

        torch.manual_seed(0)
        canvases = slide_canvases(tiles.images, tiles.masks, tiles.names, grids, tile_group, tile_index)
        dataset = RandomCropDataset(canvases, 32, n, 0.33, [0.5] * 3, [0.2] * 3,
                                    sources=sources if with_sources else None, weights=weights)
        return [dataset.canvases[dataset.draw()[0]].id for _ in range(n)]

    picked = draws({"pairs": 3.0, "polys": 1.0})
    share = sum(sources[i] == "pairs" for i in picked) / len(picked)
    assert abs(share - 0.75) < 0.04, share
    even = draws({})
    assert abs(sum(sources[i] == "pairs" for i in even) / len(even) - 0.5) < 0.05
    # one source (or no source information): the very draws of a single-source run
    assert draws({"pairs": 3.0}, 200, with_sources=False) == draws({}, 200, with_sources=False)


@pytest.mark.slow
def test_training_reports_out_of_fold_dice_per_source(two_sources, tmp_path):
    root, sources = two_sources
    result = run_script("train_net.py", "DATASETS.SOURCES", sources, "DATASETS.TRAIN_FOLDER", root / "tiles", *TILES,
                        "INPUT.MPP_TRAIN", 2.0, "INPUT.CROP_SIZE", 32, "SOLVER.SAMPLES_PER_EPOCH", 16,
                        "MODEL.ARCHITECTURE", "UneXt", "MODEL.ENCODER_NAME", "resnet10t", "MODEL.ENCODER_WEIGHTS", "",
                        "MODEL.NORM", "group", "SOLVER.N_FOLDS", 2, "SOLVER.MAX_EPOCHS", 3, "SOLVER.EVAL_PERIOD", 2,
                        "SOLVER.IMS_PER_BATCH", 8, "SOLVER.LOSS_FUNCTION_NAME", "bce_dice", "SOLVER.AMP", "off",
                        "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert set(summary["oof_dice_by_source"]) == {"pairs", "polys"}
    assert all(0.0 <= v <= 1.0 for v in summary["oof_dice_by_source"].values())
    assert "Out-of-fold Dice by source" in result.stderr
    fold = json.load(open(tmp_path / "out" / "fold_0" / "result.json"))
    assert set(fold["dice_by_source"]) == {"pairs", "polys"}
    assert {g[0] for g in fold["valid_ids"]} == {"p", "q"}  # the fold holds both sources
    with open(tmp_path / "out" / "fold_0" / "history.csv") as fh:  # validated at epochs 2 and 3 only
        rows = [line.split(",") for line in fh.read().splitlines()[1:]]
    assert [row[2] != "" for row in rows] == [False, True, True]
    assert (tmp_path / "out" / "fold_0" / "curves.png").is_file()
