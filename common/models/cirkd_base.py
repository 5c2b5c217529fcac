"""What CIRKD's segmentation models share (``SegBaseModel``, cirkd.md §2): backbone, aux head, outputs, loading.

A model holds the backbone as ``pretrained`` (ResNet ``v1s``, §2.1, or the dilated MobileNetV2 as
``pretrained.net``, §2.2), its head as ``head`` and, for ResNet backbones, the FCN aux head on c3 as
``auxlayer`` (§2.3). ``forward`` returns ``[logits, aux, feat]`` (``[logits, feat]`` without aux), all at
output stride 8 (§2.6). Norm layers are ``batchnorm`` (default) or ``syncbn`` (§2.7); everything outside the
backbone keeps PyTorch's default init (§11).
"""
import torch.nn as nn

from .mobilenetv2 import CIRKDMobileNetBackbone
from .norm import BN_NORMS, norm_layer
from .resnet import cirkd_resnet
from .weights import load_imagenet_complete

BACKBONES = ("resnet18", "resnet101", "mobilenetv2")
# backbone -> (c3 channels for the aux head or None, c4 channels)
_CHANNELS = {"resnet18": (256, 512), "resnet101": (1024, 2048), "mobilenetv2": (None, 320)}
IMAGENET_FILES = {"resnet18": "resnet18-imagenet.pth", "resnet101": "resnet101-imagenet.pth",
                  "mobilenetv2": "mobilenetv2-imagenet.pth"}


class FCNHead(nn.Module):
    """``_FCNHead``: 3x3 conv (in -> in/4, no bias), norm, ReLU, Dropout(0.1), 1x1 conv (-> classes, bias)."""

    def __init__(self, in_channels, num_classes, norm_layer):
        super().__init__()
        inter = in_channels // 4
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            norm_layer(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )

    def forward(self, x):
        return self.block(x)


class CIRKDSegModel(nn.Module):
    """Backbone ``pretrained``, ``head`` and ``auxlayer``.

    Subclasses set ``head_type`` (``head_type(in_channels, num_classes, norm_layer, channels)``, whose
    forward returns ``(logits, feat)``) and ``resnet101_channels``, the head width on ResNet-101 (128
    on the other backbones).
    """

    head_type = None
    resnet101_channels = None

    def __init__(self, backbone, num_classes=19, norm="batchnorm", aux=True):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"CIRKD backbone must be one of {BACKBONES}, got {backbone!r}")
        layer = norm_layer(norm, choices=BN_NORMS)
        c3, c4 = _CHANNELS[backbone]
        self.backbone_name = backbone
        self.aux = aux and c3 is not None
        if backbone == "mobilenetv2":
            self.pretrained = CIRKDMobileNetBackbone(layer)
        else:
            self.pretrained = cirkd_resnet(int(backbone[len("resnet"):]), layer)
        channels = self.resnet101_channels if backbone == "resnet101" else 128
        self.head = self.head_type(c4, num_classes, layer, channels)
        if self.aux:
            self.auxlayer = FCNHead(c3, num_classes, layer)
        self.output_names = ("logits", "aux", "feat") if self.aux else ("logits", "feat")

    @property
    def imagenet_module(self):
        """The module an ImageNet backbone file loads into (§2.8: ``pretrained`` or ``pretrained.net``)."""
        return self.pretrained.net if self.backbone_name == "mobilenetv2" else self.pretrained

    def forward(self, x):
        if self.backbone_name == "mobilenetv2":
            c3, c4 = None, self.pretrained(x)
        else:
            _, _, c3, c4 = self.pretrained(x)
        logits, feat = self.head(c4)
        outputs = [logits]
        if self.aux:
            outputs.append(self.auxlayer(c3))
        outputs.append(feat)
        return outputs


def load_imagenet(model, path):
    """CIRKD's ImageNet init (§2.8) into ``model.imagenet_module``; incomplete files are a UserError."""
    hint = (f"pass CIRKD's {IMAGENET_FILES[model.backbone_name]} (deep-stem ResNet / MobileNetV2 "
            "``features.*`` layout, cirkd.md §2.8)")
    load_imagenet_complete(model.imagenet_module, path, hint)
    return model
