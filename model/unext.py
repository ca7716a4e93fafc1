"""UneXt: the original toolkit's U-Net on a ResNeXt encoder, on a timm ``features_only`` encoder.

Encoder (5 feature maps at strides 2..32) -> ASPP (small dilations + a global-pool branch)
-> U-Net blocks that upsample by pixel shuffle -> FPN hypercolumn head -> dropout -> 1x1 conv
-> 2x bilinear upsample. Module names (``aspp``, ``dec4``..``dec1``, ``fpn``, ``final_conv``)
are the original's, so its published weights load with only the encoder keys renamed
(:func:`convert_original_state_dict`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UneXt", "ASPP", "FPN", "UnetBlock", "convert_original_state_dict", "is_original_state_dict", "norm_layer",
           "NORMS"]

NORMS = ("batch", "group")


def norm_layer(kind: str = "batch"):
    """``channels -> normalisation module``: BatchNorm (the original's), or GroupNorm with
    groups of 4 channels (at most 32 groups), which does not depend on the batch (Wu & He 2018):
    the same statistics in training and inference, whatever the batch size."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels, **kwargs: nn.GroupNorm(min(32, max(1, channels // 4)), channels, **kwargs)
    raise ValueError(f"MODEL.NORM must be one of {NORMS}, got {kind!r}")


class _ASPPModule(nn.Module):
    def __init__(self, inplanes: int, planes: int, kernel_size: int, padding: int, dilation: int, groups: int = 1,
                 norm=nn.BatchNorm2d):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size=kernel_size, stride=1, padding=padding,
                                     dilation=dilation, bias=False, groups=groups)
        self.bn = norm(planes)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with a global max-pool branch."""

    def __init__(self, inplanes: int, mid_c: int = 256, dilations=(1, 2, 3, 4), out_c: Optional[int] = None,
                 norm=nn.BatchNorm2d):
        super().__init__()
        self.aspps = nn.ModuleList(
            [_ASPPModule(inplanes, mid_c, 1, padding=0, dilation=1, norm=norm)]
            + [_ASPPModule(inplanes, mid_c, 3, padding=d, dilation=d, groups=4, norm=norm) for d in dilations]
        )
        self.global_pool = nn.Sequential(
            nn.AdaptiveMaxPool2d((1, 1)), nn.Conv2d(inplanes, mid_c, 1, stride=1, bias=False),
            norm(mid_c), nn.ReLU(),
        )
        out_c = out_c if out_c is not None else mid_c
        self.out_conv = nn.Sequential(
            nn.Conv2d(mid_c * (2 + len(dilations)), out_c, 1, bias=False), norm(out_c), nn.ReLU(inplace=True)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x):
        xs = [aspp(x) for aspp in self.aspps]
        pool, conv, bn, relu = self.global_pool
        # Broadcast the pooled vector before its BatchNorm: a constant map has the same batch
        # statistics as the 1x1 vector, and training then works with a batch of one.
        x0 = conv(pool(x)).expand(-1, -1, *xs[0].shape[2:])
        x0 = relu(bn(x0))
        return self.out_conv(torch.cat([x0] + xs, dim=1))


class FPN(nn.Module):
    """Hypercolumns: every decoder level upsampled to the last one and concatenated."""

    def __init__(self, input_channels: List[int], output_channels: List[int], norm=nn.BatchNorm2d):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(i, o * 2, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                          norm(o * 2), nn.Conv2d(o * 2, o, kernel_size=3, padding=1))
            for i, o in zip(input_channels, output_channels)
        ])

    def forward(self, xs: List[torch.Tensor], last_layer: torch.Tensor) -> torch.Tensor:
        n = len(self.convs)
        hcs = [F.interpolate(conv(x), scale_factor=2 ** (n - i), mode="bilinear", align_corners=False)
               for i, (conv, x) in enumerate(zip(self.convs, xs))]
        hcs.append(last_layer)
        return torch.cat(hcs, dim=1)


class UnetBlock(nn.Module):
    """Pixel-shuffle upsampling, skip connection (batch-normed), two 3x3 convs."""

    def __init__(self, up_in_c: int, x_in_c: int, nf: Optional[int] = None, norm=nn.BatchNorm2d):
        from fastai.layers import ConvLayer, PixelShuffle_ICNR  # fastai only when a UneXt is built

        super().__init__()
        self.shuf = PixelShuffle_ICNR(up_in_c, up_in_c // 2)
        self.bn = norm(x_in_c)
        ni = up_in_c // 2 + x_in_c
        nf = nf if nf is not None else max(up_in_c // 2, 32)
        self.conv1 = ConvLayer(ni, nf, norm_type=None)
        self.conv2 = ConvLayer(nf, nf, norm_type=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, up_in: torch.Tensor, left_in: torch.Tensor) -> torch.Tensor:
        up_out = self.shuf(up_in)
        cat_x = self.relu(torch.cat([up_out, self.bn(left_in)], dim=1))
        return self.conv2(self.conv1(cat_x))


class UneXt(nn.Module):
    """UneXt on any timm encoder with five feature maps at strides 2, 4, 8, 16, 32.

    ``encoder`` is a timm ``features_only`` model (see ``model.build``). The output is logits
    of shape ``(N, num_classes, H, W)`` for an input ``(N, 3, H, W)`` with H, W multiples of 32.
    With ``deep_supervision``, 1x1 heads on the decoder maps at strides 4, 8 and 16 give logits
    too, and in training mode the output is ``(logits, [stride 4, stride 8, stride 16 logits])``
    (see ``utils.losses.DeepSupervision``); in eval mode it is the logits alone.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 1, stride: int = 1, norm: str = "batch",
                 deep_supervision: bool = False):
        from fastai.layers import ConvLayer

        super().__init__()
        channels = encoder.feature_info.channels()
        reductions = encoder.feature_info.reduction()
        if list(reductions) != [2, 4, 8, 16, 32]:
            raise ValueError(
                f"UneXt needs an encoder with feature maps at strides 2, 4, 8, 16, 32; "
                f"this one has {list(reductions)}"
            )
        self.encoder = encoder
        n = norm_layer(norm)
        self.aspp = ASPP(channels[4], 256, out_c=512, dilations=[stride * 1, stride * 2, stride * 3, stride * 4], norm=n)
        self.drop_aspp = nn.Dropout2d(0.5)
        self.dec4 = UnetBlock(512, channels[3], 256, norm=n)
        self.dec3 = UnetBlock(256, channels[2], 128, norm=n)
        self.dec2 = UnetBlock(128, channels[1], 64, norm=n)
        self.dec1 = UnetBlock(64, channels[0], 32, norm=n)
        self.fpn = FPN([512, 256, 128, 64], [16] * 4, norm=n)
        self.drop = nn.Dropout2d(0.1)
        self.final_conv = ConvLayer(32 + 16 * 4, num_classes, ks=1, norm_type=None, act_cls=None)
        self.aux_heads = (nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in (64, 128, 256))
                          if deep_supervision else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc0, enc1, enc2, enc3, enc4 = self.encoder(x)
        enc5 = self.aspp(enc4)
        dec3 = self.dec4(self.drop_aspp(enc5), enc3)
        dec2 = self.dec3(dec3, enc2)
        dec1 = self.dec2(dec2, enc1)
        dec0 = self.dec1(dec1, enc0)
        x = self.fpn([enc5, dec3, dec2, dec1], dec0)
        x = self.final_conv(self.drop(x))
        logits = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if self.aux_heads is not None and self.training:
            return logits, [head(level) for head, level in zip(self.aux_heads, (dec1, dec2, dec3))]
        return logits


# The original's encoder modules -> timm's ResNet module names.
_ORIGINAL_PREFIXES = (
    ("enc0.0.", "encoder.conv1."),
    ("enc0.1.", "encoder.bn1."),
    ("enc1.1.", "encoder.layer1."),
    ("enc2.", "encoder.layer2."),
    ("enc3.", "encoder.layer3."),
    ("enc4.", "encoder.layer4."),
)


def is_original_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.split(".", 1)[-1].startswith("enc0.") or k.startswith("enc0.") for k in state_dict)


def convert_original_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the original toolkit's UneXt keys (``enc0``..``enc4``; torchvision-style ResNeXt
    inside) to this implementation's (``encoder.conv1``, ``encoder.layer1``...). A
    ``module.`` prefix (DataParallel) is dropped; decoder keys are unchanged."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        for old, new in _ORIGINAL_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
