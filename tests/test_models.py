import os

import pytest
import timm
import torch
import torch.nn as nn

from config import get_cfg_defaults
from model.build import WeightsError, architectures, build_model, param_groups
from model.checkpoint import CheckpointError, load_checkpoint, load_weights_file, model_from_checkpoint, save_checkpoint
from model.unext import UneXt

TINY_TIMM = "resnet18"  # random init, small
TINY_SMP = "resnet18"


def _cfg(arch, encoder, weights=""):
    cfg = get_cfg_defaults()
    cfg.MODEL.ARCHITECTURE, cfg.MODEL.ENCODER_NAME, cfg.MODEL.ENCODER_WEIGHTS = arch, encoder, weights
    return cfg


SMP_ARCHS = ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "DeepLabV3", "Linknet", "PSPNet", "MAnet", "PAN",
             "UPerNet", "Segformer"]


@pytest.mark.parametrize("arch, encoder", [("UneXt", TINY_TIMM), ("UneXt50", "resnet18"), ("UneXt101", "resnet18")]
                         + [(a, TINY_SMP) for a in SMP_ARCHS])
def test_every_model_forward_backward_same_size(arch, encoder):
    torch.manual_seed(0)
    model = build_model(_cfg(arch, encoder))
    side = 128 if arch == "PAN" else 64  # PAN's pyramid pooling cannot run below 128 px
    x = torch.randn(1, 3, side, side)
    # smp's DeepLabV3(+), PSPNet, PAN and UPerNet batch-normalise a 1x1 pooled map, which training mode
    # cannot do for a batch of one: they take the 1x3x64x64 pass in eval mode, and a batch
    # of two in training mode.
    one_by_one_bn = arch in ("DeepLabV3", "DeepLabV3Plus", "PSPNet", "PAN", "UPerNet")
    model.train(not one_by_one_bn)
    y = model(x)
    assert y.shape == (1, 1, side, side)
    y.float().mean().backward()
    if one_by_one_bn:
        model.train()
        assert model(torch.randn(2, 3, side, side)).shape == (2, 1, side, side)
    groups = param_groups(model)
    assert len(groups) == 2 and groups[0] and groups[1]
    assert sum(p.numel() for g in groups for p in g) == sum(p.numel() for p in model.parameters())


def test_unext_with_group_norm_has_no_batch_statistics_and_round_trips(tmp_path):
    cfg = _cfg("UneXt", "resnet18")
    cfg.MODEL.NORM = "group"
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) > 20  # encoder and decoder
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        # no batch statistics: an image's output does not depend on the rest of its batch
        assert torch.allclose(model(x[:1]), expected[:1], atol=1e-5)
    path = str(tmp_path / "gn.pth")
    save_checkpoint(path, model, {"model": {"ARCHITECTURE": "UneXt", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "",
                                            "NUM_CLASSES": 1, "NORM": "group"},
                                  "input": {"size": 64, "reduce": 4, "mean": [0.5] * 3, "std": [0.2] * 3}})
    loaded, info = model_from_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), expected)
    bn = _cfg("Unet", "resnet18")
    bn.MODEL.NORM = "group"
    with pytest.raises(ValueError, match="only the UneXt family"):
        build_model(bn)


def test_registered_names_cover_the_original_and_smp():
    names = architectures()
    for name in ("UneXt101", "UneXt50", "Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Segformer", "UPerNet"):
        assert name in names
    with pytest.raises(ValueError, match="valid: .*UneXt101.*"):
        build_model(_cfg("UNet3000", "resnet18"))


def test_unext101_default_encoder_and_ssl_tag_names():
    # Building resnext101_32x16d is heavy; check the names it resolves to instead.
    from model.build import TIMM_TAGS

    assert TIMM_TAGS["ssl"] == "fb_ssl_yfcc100m_ft_in1k"
    assert "resnext101_32x16d.fb_ssl_yfcc100m_ft_in1k" in timm.list_pretrained("resnext101_32x16d.*")
    assert get_cfg_defaults().MODEL.ENCODER_NAME == "resnext101_32x16d"


def test_pretrained_weights_offline_give_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as info:
        build_model(_cfg("UneXt", "resnet18", "imagenet"))
    message = str(info.value)
    assert "MODEL.ENCODER_WEIGHTS" in message and "local" in message and "resnet18" in message
    with pytest.raises(WeightsError, match="no such weights"):
        build_model(_cfg("UneXt", "resnet18", "no_such_tag"))


@pytest.mark.slow
def test_pretrained_weights_fail_fast_with_one_line_when_unreachable(tmp_path):
    """No cache and no connection: the one clear line from our reachability check (not the hub
    client's five retries), and no third-party line printed twice. (How fast: tests/bench.)"""
    import socket
    import subprocess
    import sys

    from model.build import _reachable

    with socket.socket() as sock:  # a local port that refuses connections
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not _reachable(f"https://127.0.0.1:{port}", timeout=2.0)
    # the whole script, as a user runs it: an empty cache and an endpoint that cannot be reached
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               HF_ENDPOINT=f"https://127.0.0.1:{port}", HF_HUB_OFFLINE="0")
    for arch in ("UneXt", "Unet"):
        code = ("from utils.setup import configure_process, setup_logging; configure_process(); setup_logging(); "
                "from model.build import build_model, WeightsError\n"
                f"try:\n    build_model({{'ARCHITECTURE': '{arch}', 'ENCODER_NAME': 'resnet18', "
                "'ENCODER_WEIGHTS': 'imagenet', 'NUM_CLASSES': 1})\n"
                "except WeightsError as e:\n    print(f'|{e}')")
        result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                                env=env, capture_output=True, text=True, timeout=120)
        message = result.stdout.strip().split("|", 1)[1]
        assert "could not obtain the pretrained weights" in message and "cannot be reached" in message
        assert "retry" not in result.stderr.lower()  # failed before the hub client tried to download
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == len(set(lines)), result.stderr


def test_local_weights_file_is_loaded(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    for suffix in (".pth", ".safetensors"):
        path = str(tmp_path / f"w{suffix}")
        if suffix == ".pth":
            torch.save(source.state_dict(), path)
        else:
            from safetensors.torch import save_file
            save_file(source.state_dict(), path)
        model = build_model(_cfg("UneXt", "resnet18", path))
        assert torch.equal(model.encoder.conv1.weight, source.conv1.weight)
        assert torch.equal(model.encoder.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
        smp_model = build_model(_cfg("Unet", "resnet18", path))
        assert torch.equal(smp_model.encoder.conv1.weight, source.conv1.weight)
    with pytest.raises(WeightsError, match="file not found"):
        build_model(_cfg("UneXt", "resnet18", str(tmp_path / "absent.pth")))
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        build_model(_cfg("UneXt", "resnet18", str(tmp_path / "other.pth")))


class _OriginalUneXt(nn.Module):
    """The original toolkit's module naming: enc0 (conv1, bn1, relu), enc1 (maxpool, layer1),
    enc2..enc4 (torchvision-style layer2..layer4), then the decoder of ours."""

    def __init__(self, resnet: nn.Module, decoder: UneXt):
        super().__init__()
        self.enc0 = nn.Sequential(resnet.conv1, resnet.bn1, nn.ReLU(inplace=True))
        self.enc1 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=2, padding=1), resnet.layer1)
        self.enc2, self.enc3, self.enc4 = resnet.layer2, resnet.layer3, resnet.layer4
        for name in ("aspp", "drop_aspp", "dec4", "dec3", "dec2", "dec1", "fpn", "drop", "final_conv"):
            setattr(self, name, getattr(decoder, name))


def test_original_unext_state_dict_maps_onto_ours(tmp_path):
    torch.manual_seed(1)
    resnet = timm.create_model("resnet18", pretrained=False)
    decoder = build_model(_cfg("UneXt", "resnet18"))
    original = _OriginalUneXt(resnet, decoder)
    state = original.state_dict()
    assert any(k.startswith("enc0.0.") for k in state) and any(k.startswith("enc1.1.") for k in state)
    path = str(tmp_path / "original.pth")
    torch.save({"module." + k: v for k, v in state.items()}, path)  # as saved from DataParallel
    fresh = build_model(_cfg("UneXt", "resnet18"))
    load_weights_file(fresh, path)
    assert torch.equal(fresh.encoder.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert torch.equal(fresh.encoder.bn1.running_mean, resnet.bn1.running_mean)
    x = torch.randn(2, 3, 64, 64)
    fresh.eval()
    decoder.eval()
    # the same weights -> the same function as the original-named model
    reference = build_model(_cfg("UneXt", "resnet18"))
    reference.encoder.load_state_dict({k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")})
    for name in ("aspp", "dec4", "dec3", "dec2", "dec1", "fpn", "final_conv"):
        getattr(reference, name).load_state_dict(getattr(decoder, name).state_dict())
    reference.eval()
    assert torch.allclose(fresh(x), reference(x), atol=1e-5)


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = build_model(_cfg("UneXt", "resnet18"))
    info = {"model": {"ARCHITECTURE": "UneXt", "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1},
            "input": {"size": 64, "reduce": 4, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]},
            "threshold": 0.4, "fold": 0, "metrics": {"dice": 0.8}}
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, model, info)
    loaded, ckpt = model_from_checkpoint(path)
    assert ckpt["threshold"] == 0.4 and ckpt["input"]["reduce"] == 4
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    loaded.eval()
    assert torch.equal(model(x), loaded(x))
    # truncated file
    data = open(path, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path / "cut.pth"))
    # another architecture under the same file
    other = build_model(_cfg("Unet", "resnet18"))
    save_checkpoint(str(tmp_path / "o.pth"), other, info)
    with pytest.raises(CheckpointError, match="do not fit UneXt"):
        model_from_checkpoint(str(tmp_path / "o.pth"))
    # a pickle that would run code is refused
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pth"
    torch.save({"format": "glomeruli/1", "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(str(evil))
    assert not (tmp_path / "pwned").exists()


def _small_info(arch):
    """A checkpoint's info for a random-init resnet18 model of ``arch``."""
    return {"model": {"ARCHITECTURE": arch, "ENCODER_NAME": "resnet18", "ENCODER_WEIGHTS": "", "NUM_CLASSES": 1},
            "input": {"size": 64, "reduce": 1, "mean": [0.5] * 3, "std": [0.2] * 3}, "threshold": 0.5, "fold": 0}


@pytest.mark.parametrize("arch", ["UneXt", "Unet", "DeepLabV3Plus", "Segformer"])
def test_checkpoint_model_built_without_random_init_is_the_same_model(tmp_path, arch):
    """model_from_checkpoint builds on the meta device and takes the checkpoint's tensors:
    the result holds no meta tensor and computes exactly what the saved model computed."""
    torch.manual_seed(1)
    model = build_model(_cfg(arch, "resnet18")).eval()
    save_checkpoint(str(tmp_path / "m.pth"), model, _small_info(arch))
    loaded, _ = model_from_checkpoint(str(tmp_path / "m.pth"))
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert tensors and not any(t.is_meta for t in tensors.values())
    assert all(t.device.type == "cpu" and t.dtype == model.state_dict()[k].dtype
               for k, t in loaded.state_dict().items())
    assert all(p.requires_grad for p in loaded.parameters())  # fine-tuning from it still trains
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))


class _WithHiddenState(nn.Module):
    """A model with a non-persistent buffer (not in its state_dict)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, x):
        return self.conv(x) * self.scale


class _NeedsRealTensors(nn.Module):
    """A model whose constructor computes on tensors (impossible on the meta device)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.rate = float(torch.linspace(0, 1, 3)[1].item())

    def forward(self, x):
        return self.conv(x) * self.rate


@pytest.mark.parametrize("cls", [_WithHiddenState, _NeedsRealTensors])
def test_checkpoint_model_falls_back_to_an_ordinary_build(tmp_path, monkeypatch, cls):
    import model.build as build
    import model.checkpoint as checkpoint

    torch.manual_seed(2)
    model = cls().eval()
    save_checkpoint(str(tmp_path / "m.pth"), model, _small_info("Unet"))
    # model.checkpoint imports build_model where it builds (it loads without torch's model code)
    monkeypatch.setattr(build, "build_model", lambda spec, weights=True: cls())
    loaded, _ = checkpoint.model_from_checkpoint(str(tmp_path / "m.pth"))
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))


def test_deep_supervision_heads_in_training_only_and_they_leave_the_main_output_alone(tmp_path):
    cfg = _cfg("UneXt", "resnet10t")
    cfg.MODEL.NORM = "group"
    torch.manual_seed(0)
    plain = build_model(cfg, weights=False)
    cfg.MODEL.DEEP_SUPERVISION = True
    deep = build_model(cfg, weights=False)
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("aux_heads.") for k in missing)
    x = torch.randn(2, 3, 96, 64)
    deep.train()
    logits, heads = deep(x)
    assert logits.shape == (2, 1, 96, 64)
    assert [tuple(h.shape) for h in heads] == [(2, 1, 24, 16), (2, 1, 12, 8), (2, 1, 6, 4)]  # strides 4, 8, 16
    deep.eval(), plain.eval()
    with torch.no_grad():
        out = deep(x)
        assert isinstance(out, torch.Tensor) and torch.equal(out, plain(x))
    # the checkpoint says so and rebuilds the heads; a model without the key has none
    from model.build import model_spec

    spec = model_spec(cfg)
    assert spec["DEEP_SUPERVISION"] is True and "DEEP_SUPERVISION" not in model_spec(_cfg("UneXt", "resnet10t"))
    path = str(tmp_path / "ds.pth")
    save_checkpoint(path, deep, {"model": spec, "input": {"size": 64, "reduce": 4, "mean": [0.5] * 3, "std": [0.2] * 3}})
    loaded, _ = model_from_checkpoint(path)
    assert loaded.aux_heads is not None
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), out)
    with pytest.raises(ValueError, match="only the UneXt family"):
        build_model({**model_spec(_cfg("Unet", "resnet18")), "DEEP_SUPERVISION": True})
