"""CIRKD's DeepLabV3 on the dilated ResNet-18/101 and MobileNetV2 (cirkd.md §2.3, §2.4).

Checkpoint keys (§2.8): ``pretrained.*``, ``head.aspp.b0.{0,1}``, ``head.aspp.b{1,2,3}.block.{0,1}``,
``head.aspp.b4.gap.{1,2}``, ``head.aspp.project.{0,1}``, ``head.block.{0,1,4}``, ``auxlayer.block.{0,1,4}``.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cirkd_base import CIRKDSegModel, load_imagenet
from .registry import register_model


class ASPPConv(nn.Module):
    """3x3 conv at ``rate`` (padding = rate, no bias), norm, ReLU as ``block``."""

    def __init__(self, in_channels, out_channels, rate, norm_layer):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.block(x)


class ASPPPooling(nn.Module):
    """Global average pool, 1x1 conv, norm, ReLU as ``gap``; bilinear (align_corners) back to the input size."""

    def __init__(self, in_channels, out_channels, norm_layer):
        super().__init__()
        self.gap = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return F.interpolate(self.gap(x), x.shape[2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Branches b0 (1x1), b1-b3 (rates 12, 24, 36), b4 (image pool); concat [b0..b4]; 1x1 project + Dropout(0.5)."""

    def __init__(self, in_channels, out_channels, norm_layer, rates=(12, 24, 36)):
        super().__init__()
        self.b0 = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )
        self.b1 = ASPPConv(in_channels, out_channels, rates[0], norm_layer)
        self.b2 = ASPPConv(in_channels, out_channels, rates[1], norm_layer)
        self.b3 = ASPPConv(in_channels, out_channels, rates[2], norm_layer)
        self.b4 = ASPPPooling(in_channels, out_channels, norm_layer)
        self.project = nn.Sequential(
            nn.Conv2d(5 * out_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x):
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabHead(nn.Module):
    """ASPP, then ``block`` = 3x3 conv, norm, ReLU, Dropout(0.1) (-> ``feat``), 1x1 conv with bias (-> logits)."""

    def __init__(self, in_channels, num_classes, norm_layer, channels):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, norm_layer)
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x):
        feat = self.block[0:4](self.aspp(x))
        return self.block[4](feat), feat


class DeepLabV3(CIRKDSegModel):
    """CIRKD ``deeplabv3`` / ``deeplab_mobile``: head width 256 on ResNet-101, else 128 (§2.3, §2.4).

    ``forward`` returns ``[logits, aux, feat]`` (ResNet) or ``[logits, feat]`` (MobileNetV2) at stride 8;
    ``feat`` is the distillation embedding. With ``aux=False`` a ResNet model returns ``[logits, feat]``
    (the v1 code raised NameError there, §2.3).
    """

    head_type = DeepLabHead
    resnet101_channels = 256


def _deeplabv3(backbone, num_classes, norm, aux, pretrained_backbone):
    model = DeepLabV3(backbone, num_classes=num_classes, norm=norm, aux=aux)
    return model if pretrained_backbone is None else load_imagenet(model, pretrained_backbone)


@register_model
def deeplabv3_resnet101(num_classes: int = 19, norm: str = "batchnorm", pretrained_backbone: Optional[str] = None,
                        aux: bool = True) -> DeepLabV3:
    """CIRKD's teacher, DeepLabV3-ResNet101 (61,118,950 parameters for 19 classes, §7.4)."""
    return _deeplabv3("resnet101", num_classes, norm, aux, pretrained_backbone)


@register_model
def deeplabv3_resnet18(num_classes: int = 19, norm: str = "batchnorm", pretrained_backbone: Optional[str] = None,
                       aux: bool = True) -> DeepLabV3:
    """CIRKD's student, DeepLabV3-ResNet18 (13,607,974 parameters for 19 classes, §7.4)."""
    return _deeplabv3("resnet18", num_classes, norm, aux, pretrained_backbone)


@register_model
def deeplabv3_mobilenetv2(num_classes: int = 19, norm: str = "batchnorm",
                          pretrained_backbone: Optional[str] = None) -> DeepLabV3:
    """CIRKD's ``deeplab_mobile``, DeepLabV3-MobileNetV2, no aux head (3,233,171 parameters, §7.4)."""
    return _deeplabv3("mobilenetv2", num_classes, norm, False, pretrained_backbone)
