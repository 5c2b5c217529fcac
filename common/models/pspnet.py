"""PSPNet on the deep-stem dilated ResNet, as in IFVD/CWD/SKD (specs/ifvd_skd.md §C.1, §A.3, §B.3)."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import ABN_NORMS, norm_layer
from .registry import register_model
from .resnet import BasicBlock, Bottleneck, ResNet
from .weights import load_imagenet_backbone


class PSPModule(nn.Module):
    """Pyramid pooling (bins 1, 2, 3, 6) + 3x3 bottleneck -> ABN (leaky 0.01) -> Dropout2d(0.1)."""

    def __init__(self, features, out_features, norm_layer, sizes=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Conv2d(features, out_features, 1, bias=False),
                          norm_layer(out_features))
            for size in sizes
        ])
        self.bottleneck = nn.Sequential(
            nn.Conv2d(features + len(sizes) * out_features, out_features, 3, padding=1, bias=False),
            norm_layer(out_features),
            nn.Dropout2d(0.1),
        )

    def forward(self, feats):
        size = feats.shape[2:]
        priors = [F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=True)
                  for stage in self.stages]
        return self.bottleneck(torch.cat(priors + [feats], 1))


class PSPNet(ResNet):
    """``Res_pspnet``: backbone, ``pspmodule``, 1x1 ``head`` and the layer3 ``dsn`` head (§C.1 "Heads").

    ``forward`` returns ``[logits, dsn_logits, psp_feat]`` at output stride 8 (no softmax, no
    upsampling); with ``return_features`` (SKD, §B.3) it appends ``x4, x3, x2, x1``. ``norm`` is one
    of the In-Place ABN names of :mod:`common.models.norm`; the backbone norms have no activation
    (an explicit ReLU follows, §C.2), the head norms a leaky ReLU 0.01.
    """

    def __init__(self, block, layers, num_classes=19, norm="auto", return_features=False):
        super().__init__(block, layers, norm_layer(norm, choices=ABN_NORMS))
        head_norm = norm_layer(norm, activation="leaky_relu", choices=ABN_NORMS)
        channels = 512 * block.expansion
        out = channels // 4
        self.return_features = return_features
        self.output_names = ("logits", "aux", "feat") + (("layer4", "layer3", "layer2", "layer1")
                                                         if return_features else ())
        self.pspmodule = PSPModule(channels, out, head_norm)
        self.head = nn.Conv2d(out, num_classes, kernel_size=1, bias=True)
        self.dsn = nn.Sequential(
            nn.Conv2d(channels // 2, out, kernel_size=3, padding=1),
            head_norm(out),
            nn.Dropout2d(0.1),
            nn.Conv2d(out, num_classes, kernel_size=1, bias=True),
        )

    def forward(self, x):
        x1, x2, x3, x4 = super().forward(x)
        x_dsn = self.dsn(x3)
        psp_feat = self.pspmodule(x4)
        outputs = [self.head(psp_feat), x_dsn, psp_feat]
        if self.return_features:
            outputs += [x4, x3, x2, x1]
        return outputs


def output_side(n):
    """Side of the stride-8 outputs for an input side ``n``: stride-2 stem conv, ceil-mode 3x3/2 max-pool,
    stride-2 layer2 (§C.1; 512 -> 65, the discriminator's input size)."""
    n = (n - 1) // 2 + 1
    n = -(-(n - 1) // 2) + 1
    return (n - 1) // 2 + 1


def _pspnet(block, layers, num_classes, norm, pretrained_backbone, return_features):
    model = PSPNet(block, layers, num_classes=num_classes, norm=norm, return_features=return_features)
    if pretrained_backbone is not None:
        load_imagenet_backbone(model, pretrained_backbone)
    return model


@register_model
def pspnet_resnet18(num_classes: int = 19, norm: str = "auto", pretrained_backbone: Optional[str] = None,
                    return_features: bool = False) -> PSPNet:
    """The IFVD/CWD/SKD student, PSPNet on deep-stem ResNet-18 (13,068,262 parameters for 19 classes)."""
    return _pspnet(BasicBlock, [2, 2, 2, 2], num_classes, norm, pretrained_backbone, return_features)


@register_model
def pspnet_resnet101(num_classes: int = 19, norm: str = "auto", pretrained_backbone: Optional[str] = None,
                     return_features: bool = False) -> PSPNet:
    """The IFVD/CWD/SKD teacher, PSPNet on deep-stem ResNet-101 (70,437,350 parameters for 19 classes)."""
    return _pspnet(Bottleneck, [3, 4, 23, 3], num_classes, norm, pretrained_backbone, return_features)
