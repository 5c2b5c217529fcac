"""CIRKD's PSPNet on the dilated ResNet-18 and MobileNetV2 (``psp``, ``psp_mobile``; cirkd.md §2.5).

Not the PSP lineage's PSPNet (common/models/pspnet.py): plain BN, ReLU, concat order ``[c4, p1, p2, p3, p6]``
(§11), keys ``pretrained.*``, ``head.psp.conv{1-4}.{0,1}``, ``head.block.{0,1}``, ``head.classifier``,
``auxlayer.block.{0,1,4}`` (§2.8).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cirkd_base import CIRKDSegModel, load_imagenet
from .registry import register_model


def _psp_conv(in_channels, out_channels, norm_layer):
    """``_PSP1x1Conv``: 1x1 conv (no bias), norm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(out_channels),
                         nn.ReLU(inplace=True))


class PyramidPooling(nn.Module):
    """Average pools to 1, 2, 3, 6, each ``conv{i}`` (in -> in/4), bilinear (align_corners) up; concat with x first."""

    def __init__(self, in_channels, norm_layer, sizes=(1, 2, 3, 6)):
        super().__init__()
        self.sizes = sizes
        for i in range(len(sizes)):
            setattr(self, f"conv{i + 1}", _psp_conv(in_channels, in_channels // 4, norm_layer))

    def forward(self, x):
        size = x.shape[2:]
        pooled = [F.interpolate(getattr(self, f"conv{i + 1}")(F.adaptive_avg_pool2d(x, s)), size, mode="bilinear",
                                align_corners=True) for i, s in enumerate(self.sizes)]
        return torch.cat([x] + pooled, dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling; ``block`` = 3x3 conv (2·in -> C, no bias), norm, ReLU, Dropout(0.1) (-> ``feat``);
    ``classifier`` = 1x1 conv with bias (-> logits)."""

    def __init__(self, in_channels, num_classes, norm_layer, channels):
        super().__init__()
        self.psp = PyramidPooling(in_channels, norm_layer)
        self.block = nn.Sequential(
            nn.Conv2d(2 * in_channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        feat = self.block(self.psp(x))
        return self.classifier(feat), feat


class CIRKDPSPNet(CIRKDSegModel):
    """CIRKD ``psp`` / ``psp_mobile``: embedding width 512 on ResNet-101, else 128 (§2.5).

    ``forward`` returns ``[logits, aux, feat]`` (ResNet, aux) or ``[logits, feat]`` at stride 8.
    """

    head_type = PSPHead
    resnet101_channels = 512


def _psp(backbone, num_classes, norm, aux, pretrained_backbone):
    model = CIRKDPSPNet(backbone, num_classes=num_classes, norm=norm, aux=aux)
    return model if pretrained_backbone is None else load_imagenet(model, pretrained_backbone)


@register_model
def cirkd_pspnet_resnet18(num_classes: int = 19, norm: str = "batchnorm", pretrained_backbone: Optional[str] = None,
                          aux: bool = True) -> CIRKDPSPNet:
    """CIRKD's PSPNet-ResNet18 student (12,919,334 parameters for 19 classes, §7.4)."""
    return _psp("resnet18", num_classes, norm, aux, pretrained_backbone)


@register_model
def cirkd_pspnet_mobilenetv2(num_classes: int = 19, norm: str = "batchnorm",
                             pretrained_backbone: Optional[str] = None) -> CIRKDPSPNet:
    """CIRKD's ``psp_mobile``, PSPNet-MobileNetV2, no aux head (2,654,739 parameters for 19 classes)."""
    return _psp("mobilenetv2", num_classes, norm, False, pretrained_backbone)
