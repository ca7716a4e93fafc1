"""``build_model``: any architecture by name, with encoder weights from a tag or a local file.

Architectures: the UneXt family (``UneXt101``, ``UneXt50``, ``UneXt`` = any timm encoder named
by ``MODEL.ENCODER_NAME``) and every segmentation_models_pytorch architecture (``Unet``,
``UnetPlusPlus``, ``FPN``, ``DeepLabV3Plus``, ``Linknet``, ``PSPNet``, ``MAnet``, ``PAN``,
``Segformer``, ``UPerNet``, ...).

``MODEL.ENCODER_WEIGHTS``: ``""`` (random), a tag (``ssl``, ``swsl``, ``imagenet`` or any timm
pretrained tag / smp weights name), or the path of a local ``.pth``/``.safetensors`` file.
Weights that cannot be obtained raise :class:`WeightsError`, never a silent random start.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from model.packaged import encoder_state, packaged, packaged_file
from model.registry import Registry
from model.weights import WeightsError, load_weights_file as _load_weights_file

__all__ = ["MODELS", "WeightsError", "model_spec", "build_model", "check_architecture", "param_groups",
           "architectures", "resolve_device"]

logger = logging.getLogger(__name__)

MODELS = Registry("MODEL.ARCHITECTURE")
# Friendly tags -> timm pretrained tags.
TIMM_TAGS = {"ssl": "fb_ssl_yfcc100m_ft_in1k", "swsl": "fb_swsl_ig1b_ft_in1k"}
WEIGHT_FILE_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def model_spec(cfg_or_model) -> Dict[str, object]:
    """The model keys of a config as plain types (what a checkpoint stores).
    ``DEEP_SUPERVISION`` is there only when on (its heads are in the weights then)."""
    m = getattr(cfg_or_model, "MODEL", cfg_or_model)
    spec = {
        "ARCHITECTURE": str(m["ARCHITECTURE"]),
        "ENCODER_NAME": str(m["ENCODER_NAME"]),
        "ENCODER_WEIGHTS": str(m.get("ENCODER_WEIGHTS", "") or ""),
        "NUM_CLASSES": int(m["NUM_CLASSES"]),
        "NORM": str(m.get("NORM", "batch") or "batch"),  # checkpoints from before the key: BatchNorm
    }
    if m.get("DEEP_SUPERVISION", False):
        spec["DEEP_SUPERVISION"] = True
    return spec


def _is_file(weights: str) -> bool:
    return weights.lower().endswith(WEIGHT_FILE_EXTENSIONS) or os.sep in weights or os.path.exists(weights)


def _offline_hint(what: str, name: str) -> str:
    return (
        f"MODEL.ENCODER_WEIGHTS: could not obtain the pretrained weights {what} ({name}). "
        "Without internet access, download them on another machine and set "
        "MODEL.ENCODER_WEIGHTS to the local .pth/.safetensors file, or set it to \"\" to train "
        "from random weights"
    )


def _load_into(module: nn.Module, state: Dict[str, torch.Tensor], path: str, what: str) -> None:
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if not matched or len(missing) > 0.1 * len(own):
        raise WeightsError(
            f"{path}: does not fit the {what} ({len(matched)} of {len(own)} tensors match; "
            f"missing e.g. {missing[:3]})"
        )
    module.load_state_dict(matched, strict=False)
    if missing:
        logger.warning("%s: %d %s tensors not in the file kept their initial values", path, len(missing), what)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, parsed.port or (443 if parsed.scheme != "http" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str, filenames, revision: Optional[str] = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
                return True
        except (ValueError, OSError) as exc:  # a malformed repo id or cache: treat as not cached
            logger.info("%s/%s: the local cache cannot be read (%s: %s); treated as not cached", repo_id, filename,
                        type(exc).__name__, exc)
            continue
    return False


def check_obtainable(what: str, hub_repo: Optional[str] = None, url: Optional[str] = None,
                     filenames=("model.safetensors", "pytorch_model.bin"), revision: Optional[str] = None) -> None:
    """Fail fast, with the one clear line, when pretrained weights are neither in the local
    cache nor downloadable: a look at the cache, then one connection attempt of a few seconds
    (instead of the hub client's retries, ~25 s)."""
    import os as _os

    if hub_repo and _hub_cached(hub_repo, filenames, revision):
        return
    if url:
        import torch.hub

        if _os.path.isfile(_os.path.join(torch.hub.get_dir(), "checkpoints", _os.path.basename(url.split("?")[0]))):
            return
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE) or _os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    target = constants.ENDPOINT if hub_repo else url
    if offline or not target or not _reachable(target):
        raise WeightsError(_offline_hint(what, "not in the local cache, and " + (
            "HF_HUB_OFFLINE is set" if offline else f"{target} cannot be reached")))


def timm_encoder(name: str, weights: str = "", norm: str = "batch") -> nn.Module:
    """A timm ``features_only`` encoder with weights from a tag, a file, or none; ``norm
    group`` swaps its BatchNorm for GroupNorm (for training from scratch with small batches:
    pretrained BatchNorm weights would not fit it)."""
    import timm

    kwargs = dict(features_only=True, out_indices=(0, 1, 2, 3, 4))
    if norm != "batch":
        from model.unext import norm_layer

        kwargs["norm_layer"] = norm_layer(norm)
    if not weights:
        return timm.create_model(name, pretrained=False, **kwargs)
    row = packaged(name, weights)
    if row is not None:  # ImageNet weights carried by an installed package: no network
        if norm != "batch":
            raise WeightsError(f"MODEL.ENCODER_WEIGHTS imagenet for {name}: pretrained BatchNorm weights need "
                               f"MODEL.NORM batch (not {norm!r})")
        path = packaged_file(row)
        encoder = timm.create_model(name, pretrained=False, **kwargs)
        encoder.load_state_dict(encoder_state(row, encoder, path))
        logger.info("Encoder %s: ImageNet weights from the package %s (%s)", name, row.package, path)
        return encoder
    if _is_file(weights):
        encoder = timm.create_model(name, pretrained=False, **kwargs)
        state = _load_weights_file(weights)
        _load_into(encoder, {k.replace("encoder.", "", 1): v for k, v in state.items()}, weights,
                   f"{name} encoder")
        return encoder
    tag = TIMM_TAGS.get(weights, "" if weights == "imagenet" else weights)
    full = f"{name}.{tag}" if tag else name
    if not timm.list_pretrained(full if tag else f"{name}*"):
        available = [n.split(".", 1)[-1] for n in timm.list_pretrained(f"{name}.*")]
        raise WeightsError(
            f"MODEL.ENCODER_WEIGHTS {weights!r}: timm has no such weights for {name}; "
            f"available tags: {available or 'none'} (or a local file path)"
        )
    logger.info("Loading pretrained encoder weights timm %s (offline? set MODEL.ENCODER_WEIGHTS to a local file)", full)
    try:
        pretrained = timm.models.get_pretrained_cfg(full)
    except (RuntimeError, KeyError, ValueError) as exc:  # an unusual name: let timm say what is wrong
        logger.info("timm %s: no pretrained config (%s: %s); asking timm for the weights directly", full,
                    type(exc).__name__, exc)
        pretrained = None
    if pretrained is not None:
        check_obtainable(f"timm {full}", getattr(pretrained, "hf_hub_id", None) or None,
                         getattr(pretrained, "url", None) or None)
    try:
        return timm.create_model(full, pretrained=True, **kwargs)
    except Exception as exc:
        raise WeightsError(_offline_hint(f"timm {full}", type(exc).__name__)) from None


def _unext(spec, encoder_name: str, weights: str) -> nn.Module:
    from model.unext import UneXt

    norm = spec.get("NORM", "batch")
    return UneXt(timm_encoder(encoder_name, weights, norm), num_classes=spec["NUM_CLASSES"], norm=norm,
                 deep_supervision=bool(spec.get("DEEP_SUPERVISION", False)))


@MODELS.register("UneXt101")
def build_unext101(spec) -> nn.Module:
    """UneXt on resnext101_32x16d ('ssl' = timm's fb_ssl_yfcc100m_ft_in1k)."""
    return _unext(spec, spec["ENCODER_NAME"] or "resnext101_32x16d", spec["ENCODER_WEIGHTS"])


@MODELS.register("UneXt50")
def build_unext50(spec) -> nn.Module:
    """UneXt on resnext50_32x4d."""
    name = spec["ENCODER_NAME"]
    return _unext(spec, name if name and name != "resnext101_32x16d" else "resnext50_32x4d", spec["ENCODER_WEIGHTS"])


@MODELS.register("UneXt")
def build_unext(spec) -> nn.Module:
    """UneXt on any timm encoder named by MODEL.ENCODER_NAME."""
    return _unext(spec, spec["ENCODER_NAME"], spec["ENCODER_WEIGHTS"])


def _smp_architectures() -> Dict[str, str]:
    from segmentation_models_pytorch import MODEL_ARCHITECTURES_MAPPING

    return {name.lower(): name for name in MODEL_ARCHITECTURES_MAPPING}


def architectures() -> List[str]:
    import segmentation_models_pytorch as smp

    smp_names = [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]
    return MODELS.names() + sorted(smp_names)


def _build_smp(spec) -> nn.Module:
    import segmentation_models_pytorch as smp

    arch, encoder, weights = spec["ARCHITECTURE"], spec["ENCODER_NAME"], spec["ENCODER_WEIGHTS"]
    if spec.get("NORM", "batch") != "batch":
        raise ValueError(f"MODEL.NORM {spec['NORM']!r}: only the UneXt family takes another normalisation; "
                         f"{arch} keeps BatchNorm (MODEL.NORM batch)")
    if spec.get("DEEP_SUPERVISION", False):
        raise ValueError(f"MODEL.DEEP_SUPERVISION: only the UneXt family has it, not {arch}")
    file = weights if weights and _is_file(weights) else None
    row = packaged(encoder[3:], weights) if encoder.startswith("tu-") else None
    if row is not None:  # ImageNet weights carried by an installed package: built bare, then loaded
        file, weights = packaged_file(row), ""
    elif weights and not file:
        _check_smp_weights(encoder, weights)
    download = None if file or not weights else weights
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=download, classes=spec["NUM_CLASSES"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"MODEL: cannot build {arch} with encoder {encoder!r}: {exc}") from None
    except Exception as exc:
        if download is None:  # nothing was to be downloaded: the build's own error, as it is
            raise
        raise WeightsError(_offline_hint(f"smp {encoder} {weights!r}", type(exc).__name__)) from None
    if row is not None:
        model.encoder.model.load_state_dict(encoder_state(row, model.encoder.model, file))
        logger.info("Encoder %s: ImageNet weights from the package %s (%s)", encoder, row.package, file)
    elif file:
        state = _load_weights_file(file)
        _load_into(model.encoder, {k.replace("encoder.", "", 1): v for k, v in state.items()}, file,
                   f"{encoder} encoder")
    return model


def _check_smp_weights(encoder: str, weights: str) -> None:
    """The local cache or a connection for smp's pretrained encoder weights, before smp tries."""
    if encoder.startswith("tu-"):
        return  # timm's own names: timm_encoder's check covers the UneXt family; smp passes True
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder, {}).get("pretrained_settings", {}).get(weights)
    if settings and settings.get("repo_id"):
        check_obtainable(f"smp {encoder} {weights!r}", settings["repo_id"], filenames=("model.safetensors",),
                         revision=settings.get("revision"))


def check_architecture(arch: str) -> None:
    """Raise the error that lists the valid names when ``arch`` is not one."""
    if arch not in MODELS and arch.lower() not in _smp_architectures():
        raise ValueError(f"MODEL.ARCHITECTURE: unknown architecture {arch!r}; valid: {', '.join(architectures())}")


def build_model(cfg_or_spec, weights: Optional[bool] = True) -> nn.Module:
    """Build the model of a config (or a checkpoint's spec).

    ``weights=False`` skips the encoder's pretrained weights (a checkpoint brings its own).
    """
    spec = model_spec(cfg_or_spec)
    if not weights:
        spec["ENCODER_WEIGHTS"] = ""
    arch = spec["ARCHITECTURE"]
    check_architecture(arch)
    return MODELS.get(arch)(spec) if arch in MODELS else _build_smp(spec)


def resolve_device(name: str) -> torch.device:
    """``MODEL.DEVICE``: 'auto' = CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"MODEL.DEVICE {name!r}: no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def param_groups(model: nn.Module) -> List[List[nn.Parameter]]:
    """``[encoder parameters, everything else]``: discriminative learning rates with
    ``slice(BASE_LR_MIN, BASE_LR_MAX)``."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return [list(model.parameters())]
    ids = {id(p) for p in encoder.parameters()}
    return [list(encoder.parameters()), [p for p in model.parameters() if id(p) not in ids]]
