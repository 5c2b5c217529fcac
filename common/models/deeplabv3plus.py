"""DeepLabV3+ of AICSD / overhaul-distillation / pytorch-deeplab-xception (specs/aicsd.md §3).

``DeepLab(backbone, output_stride, num_classes)`` with the upstream attribute names, so the
state_dict is ``backbone.*``, ``aspp.*``, ``decoder.*`` exactly as the released teacher checkpoint:

* ASPP (§3.1): ``aspp1`` (1x1) and ``aspp2..4`` (3x3, dilations 6/12/18 at OS16, 12/24/36 at OS8),
  each ``atrous_conv`` + ``bn`` + ReLU; ``global_avg_pool`` = [pool, 1x1 conv, BN, ReLU]; concatenation,
  ``conv1`` 1280->256, ``bn1``, ReLU, Dropout(0.5).
* Decoder (§3.1): ``conv1`` low-level -> 48, ``bn1``, ReLU; ASPP output upsampled to the low-level size
  and concatenated (304 channels); ``last_conv`` = [3x3 conv, BN, ReLU, Dropout(0.5), 3x3 conv, BN,
  ReLU, Dropout(0.1), 1x1 conv to C with bias].
* Backbones (§3.2): ``common.models.resnet.aicsd_resnet`` and ``common.models.mobilenetv2.aicsd_mobilenetv2``.

``forward(x)`` returns the logits bilinearly upsampled to the input size (``align_corners=True``), one
tensor as the original; ``extract_feature(x)`` returns the six pre-ReLU features of §3.4 and the logits
by name. With ``return_features=True`` (the distiller's view, §2.5) ``forward`` returns the list
``[logits, layer1, layer2, layer3, layer4, aspp, decoder]`` of ``extract_feature`` instead.
Registered: ``deeplabv3plus_resnet101``, ``deeplabv3plus_resnet18``, ``deeplabv3plus_mobilenetv2``.
"""
import re
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from common.models.mobilenetv2 import aicsd_mobilenetv2
from common.models.norm import BN_NORMS, norm_layer
from common.models.registry import register_model
from common.models.resnet import aicsd_resnet
from common.models.weights import load_checkpoint, load_imagenet_complete, load_state_dict_strict, state_dict_of

# per backbone: (ASPP input channels, decoder low-level channels) (§3.1)
BACKBONES = {"resnet101": (2048, 256), "resnet18": (512, 64), "mobilenet": (320, 24)}
NOT_REBUILT = ("xception", "drn")
ASPP_DILATIONS = {16: (1, 6, 12, 18), 8: (1, 12, 24, 36)}
FEATURE_NAMES = ("layer1", "layer2", "layer3", "layer4", "aspp", "decoder")


def up(x, size):
    """Bilinear resize with ``align_corners=True`` (the only interpolation of the original)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def kaiming_init(module):
    """``_init_weight`` of ASPP and decoder (§3.1): convs ``kaiming_normal_``, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ASPPModule(nn.Module):
    def __init__(self, inplanes, planes, kernel_size, dilation, norm):
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size, stride=1, padding=padding,
                                     dilation=dilation, bias=False)
        self.bn = norm(planes)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (§3.1); ``extract_feature`` skips the Dropout(0.5) (quirk Q7)."""

    def __init__(self, inplanes, output_stride, norm):
        super().__init__()
        d = ASPP_DILATIONS[output_stride]
        self.aspp1 = _ASPPModule(inplanes, 256, 1, d[0], norm)
        self.aspp2 = _ASPPModule(inplanes, 256, 3, d[1], norm)
        self.aspp3 = _ASPPModule(inplanes, 256, 3, d[2], norm)
        self.aspp4 = _ASPPModule(inplanes, 256, 3, d[3], norm)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)),
                                             nn.Conv2d(inplanes, 256, 1, stride=1, bias=False),
                                             norm(256), nn.ReLU())
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = norm(256)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        kaiming_init(self)

    def pre_relu(self, x):
        """The five branches, concatenated, ``conv1`` and ``bn1``: feature 4 of §3.4."""
        if self.training and x.shape[0] == 1 and not _synchronised(self.global_avg_pool[2]):
            raise UserError("DeepLabV3+ cannot train on a batch of 1: the ASPP image-pooling BatchNorm sees a "
                            "single value per channel; use a batch size of at least 2 (and drop a last batch of 1)")
        pooled = up(self.global_avg_pool(x), x.shape[2:])
        x = torch.cat((self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled), dim=1)
        return self.bn1(self.conv1(x))

    def forward(self, x):
        return self.dropout(self.relu(self.pre_relu(x)))


def _synchronised(bn):
    """True when ``bn`` is a SyncBatchNorm that really averages over several processes."""
    return (isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


class Decoder(nn.Module):
    """The DeepLabV3+ decoder (§3.1)."""

    def __init__(self, num_classes, low_level_inplanes, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, 48, 1, bias=False)
        self.bn1 = norm(48)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(nn.Conv2d(304, 256, kernel_size=3, stride=1, padding=1, bias=False),
                                       norm(256), nn.ReLU(), nn.Dropout(0.5),
                                       nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=False),
                                       norm(256), nn.ReLU(), nn.Dropout(0.1),
                                       nn.Conv2d(256, num_classes, kernel_size=1, stride=1))
        kaiming_init(self)

    def extract_feature(self, x, low_level_feat):
        """``(last_conv[0:6] output, logits)``: feature 5 of §3.4 (pre-ReLU) and the decoder's logits."""
        low_level_feat = self.relu(self.bn1(self.conv1(low_level_feat)))
        x = torch.cat((up(x, low_level_feat.shape[2:]), low_level_feat), dim=1)
        feat = self.last_conv[:6](x)
        return feat, self.last_conv[6:](feat)

    def forward(self, x, low_level_feat):
        return self.extract_feature(x, low_level_feat)[1]


class DeepLab(nn.Module):
    """DeepLabV3+ (§3.1) on the ``resnet101``, ``resnet18`` or ``mobilenet`` backbone (the original names).

    ``norm``: ``batchnorm`` (``nn.BatchNorm2d``, the original default) or ``syncbn`` (``nn.SyncBatchNorm``,
    the modern counterpart of ``--sync-bn``, §3.5). ``return_features``: ``forward`` is
    :meth:`extract_feature` as a list, logits first (as the ``Distiller`` sees both networks).
    """

    feature_names = FEATURE_NAMES

    def __init__(self, backbone="resnet18", output_stride=16, num_classes=21, norm="batchnorm",
                 return_features=False):
        super().__init__()
        self.return_features = return_features
        self.output_names = ("logits",) + (FEATURE_NAMES if return_features else ())
        inplanes, low_level_inplanes = _check_backbone(backbone)
        if output_stride not in ASPP_DILATIONS:
            raise UserError(f"output stride {output_stride} is not supported by DeepLabV3+; use 16 or 8")
        norm = norm_layer(norm, choices=BN_NORMS)
        self.backbone_name = backbone
        if backbone == "mobilenet":
            self.backbone = aicsd_mobilenetv2(output_stride, norm)
        else:
            self.backbone = aicsd_resnet(int(backbone[len("resnet"):]), output_stride, norm)
        self.aspp = ASPP(inplanes, output_stride, norm)
        self.decoder = Decoder(num_classes, low_level_inplanes, norm)

    def _backbone(self, x, feats):
        if self.backbone_name == "mobilenet":
            return self.backbone(x, return_feats=feats)
        high, low, block_feats = self.backbone(x)
        return (high, low, block_feats) if feats else (high, low)

    def forward(self, x):
        if self.return_features:
            feats = self.extract_feature(x)
            return [feats[name] for name in self.output_names]
        high, low = self._backbone(x, feats=False)
        return up(self.decoder(self.aspp(high), low), x.shape[2:])

    def extract_feature(self, x):
        """The distiller's view (§3.4): an ordered dict of the six pre-ReLU features ``layer1`` ..
        ``layer4``, ``aspp`` (after ``bn1``), ``decoder`` (``last_conv[0:6]``) and the ``logits``
        upsampled to the input size. The ASPP dropout is skipped, the decoder dropouts are not (Q7)."""
        high, low, block_feats = self._backbone(x, feats=True)
        aspp_feat = self.aspp.pre_relu(high)
        decoder_feat, logits = self.decoder.extract_feature(F.relu(aspp_feat), low)
        feats = OrderedDict(zip(FEATURE_NAMES, (*block_feats, aspp_feat, decoder_feat)))
        feats["logits"] = up(logits, x.shape[2:])
        return feats

    def get_1x_lr_params(self):
        """Parameters of the backbone's conv and BN modules (trained at lr, §6.1)."""
        return _conv_bn_params(self.backbone)

    def get_10x_lr_params(self):
        """Parameters of the ASPP's and decoder's conv and BN modules (trained at 10·lr, §6.1)."""
        return _conv_bn_params(self.aspp, self.decoder)


def _conv_bn_params(*modules):
    """The trainable parameters of the ``Conv2d`` and BN modules, each shared module once (upstream)."""
    seen = set()
    out = []
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) and id(m) not in seen:
                seen.add(id(m))
                out += [p for p in m.parameters() if p.requires_grad]
    return out


def lr_param_groups(model, lr):
    """The SGD groups of ``train.py`` (§2.3 step 4): backbone at ``lr``, ASPP + decoder at ``10·lr``."""
    return [{"params": model.get_1x_lr_params(), "lr": lr}, {"params": model.get_10x_lr_params(), "lr": lr * 10}]


def _check_backbone(backbone):
    if backbone in NOT_REBUILT:
        raise UserError(f"--backbone {backbone} is not rebuilt in segkd (AICSD's distillation never ran on it "
                        f"and its tables do not use it); choose one of: {', '.join(BACKBONES)}")
    if backbone not in BACKBONES:
        raise UserError(f"--backbone {backbone!r} is not a DeepLabV3+ backbone; choose one of: "
                        f"{', '.join(BACKBONES)}")
    return BACKBONES[backbone]


def model_name(backbone):
    """The registered model name for the original ``--backbone`` choice, e.g. ``resnet18`` ->
    ``deeplabv3plus_resnet18``; ``xception``, ``drn`` and unknown names are a :class:`UserError`."""
    _check_backbone(backbone)
    return "deeplabv3plus_" + ("mobilenetv2" if backbone == "mobilenet" else backbone)


# ---- ImageNet initialisation from local files (§3.6) ------------------------------------------------------

_TV_MNV2_T6 = {"conv.0.0": "conv.0", "conv.0.1": "conv.1", "conv.1.0": "conv.3", "conv.1.1": "conv.4",
               "conv.2": "conv.6", "conv.3": "conv.7"}
_TV_MNV2_T1 = {"conv.0.0": "conv.0", "conv.0.1": "conv.1", "conv.1": "conv.3", "conv.2": "conv.4"}
_TV_MNV2_KEY = re.compile(r"features\.(\d+)\.(conv\.\d(?:\.\d)?)\.(\w+)$")


def remap_torchvision_mobilenet_v2(state_dict):
    """torchvision ``mobilenet_v2`` keys -> the flat ``features.N.conv.{0..7}`` layout (§3.6).

    ``features.0.*`` is kept, ``features.1`` (t = 1) maps conv.0.0/conv.0.1/conv.1/conv.2 to
    conv.0/1/3/4, the t = 6 blocks map conv.0.0/0.1/1.0/1.1/2/3 to conv.0/1/3/4/6/7; ``features.18``
    and ``classifier.*`` are dropped.
    """
    out = OrderedDict()
    for key, value in state_dict.items():
        match = _TV_MNV2_KEY.match(key)
        if key.startswith("features.0."):
            out[key] = value
        elif match and 1 <= int(match.group(1)) <= 17:
            index, conv, leaf = match.groups()
            table = _TV_MNV2_T1 if index == "1" else _TV_MNV2_T6
            if conv in table:
                out[f"features.{index}.{table[conv]}.{leaf}"] = value
    return out


def _is_torchvision_mobilenet_v2(state_dict):
    return "features.1.conv.0.0.weight" in state_dict


def load_imagenet(model, path):
    """Initialise ``model.backbone`` from the ImageNet file at ``path``, never a download (§3.6).

    ResNets: a torchvision-layout state_dict (``resnet18-5c106cde.pth`` / ``resnet101-5d3b4d8f.pth`` or
    IMAGENET1K_V1); keys the backbone lacks (``fc.*``) are dropped. MobileNetV2: torchvision's
    ``mobilenet_v2`` IMAGENET1K_V1 (remapped by :func:`remap_torchvision_mobilenet_v2`) or the original
    flat layout. A backbone tensor the file lacks (other than ``num_batches_tracked``) or a shape
    mismatch is a :class:`UserError`: no silent random initialisation.
    """
    name = "mobilenet_v2" if model.backbone_name == "mobilenet" else model.backbone_name
    hint = f"pass a local torchvision {name} IMAGENET1K_V1 file (segkd never downloads weights)"
    if model.backbone_name != "mobilenet":
        load_imagenet_complete(model.backbone, path, hint)
        return model
    what = "ImageNet backbone weights"
    state_dict = state_dict_of(load_checkpoint(path, what, hint), what)
    if _is_torchvision_mobilenet_v2(state_dict):
        state_dict = remap_torchvision_mobilenet_v2(state_dict)
    features = model.backbone.features  # low_level_features / high_level_features share its modules
    own = features.state_dict()
    kept = OrderedDict((k[len("features."):], v) for k, v in state_dict.items()
                       if k.startswith("features.") and k[len("features."):] in own)
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    shapes = [f"features.{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in kept.items()
              if v.shape != own[k].shape]
    if missing or shapes:
        problem = (f"lack {len(missing)} backbone tensors (e.g. features.{', features.'.join(missing[:3])})"
                   if missing else f"do not fit the backbone ({', '.join(shapes[:3])})")
        raise UserError(f"{what} at {path} {problem}; {hint}")
    features.load_state_dict(kept, strict=False)
    return model


# ---- checkpoints of the original train.py / train_kd.py (§2.9) -------------------------------------------

def _numpy_scalar_globals():
    """What a ``best_pred`` numpy float64 needs under ``weights_only=True`` (§9 deprecated APIs): the
    scalar constructor under its numpy 1.x and 2.x names, ``numpy.dtype`` and the float64 dtype class."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            type(np.dtype(np.float64))]


def load_original_checkpoint(model, path, what="teacher checkpoint",
                             hint="pass the checkpoint.pth.tar / model_best.pth.tar written by AICSD's train.py"):
    """Load a checkpoint of the original code (``{'epoch', 'state_dict', 'optimizer', 'best_pred'}``, §2.9)
    into ``model`` strictly and return the whole dict.

    Read with ``weights_only=True``; only numpy scalars (the original saved ``best_pred`` as a numpy
    float64) are allowed beyond tensors and plain containers. A missing ``state_dict`` entry, missing
    or unexpected keys are a :class:`UserError`.
    """
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
        checkpoint = load_checkpoint(path, what, hint)
    if "state_dict" not in checkpoint and not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise UserError(f"{what} at {path} has no 'state_dict' entry (it holds {', '.join(map(repr, checkpoint))}); "
                        f"{hint}")
    load_state_dict_strict(model, checkpoint, what)
    return checkpoint


def _build(backbone, num_classes, output_stride, norm, pretrained_backbone, return_features):
    model = DeepLab(backbone, output_stride, num_classes, norm, return_features)
    if pretrained_backbone is not None:
        load_imagenet(model, pretrained_backbone)
    return model


@register_model
def deeplabv3plus_resnet101(num_classes=21, output_stride=16, norm="batchnorm", pretrained_backbone=None,
                            return_features=False):
    """The AICSD teacher: DeepLabV3+ on the multi-grid overhaul ResNet-101 (§3.2, §3.7)."""
    return _build("resnet101", num_classes, output_stride, norm, pretrained_backbone, return_features)


@register_model
def deeplabv3plus_resnet18(num_classes=21, output_stride=16, norm="batchnorm", pretrained_backbone=None,
                           return_features=False):
    """The AICSD ResNet-18 student (§3.2)."""
    return _build("resnet18", num_classes, output_stride, norm, pretrained_backbone, return_features)


@register_model
def deeplabv3plus_mobilenetv2(num_classes=21, output_stride=16, norm="batchnorm", pretrained_backbone=None,
                              return_features=False):
    """The AICSD MobileNetV2 student (§3.2)."""
    return _build("mobilenet", num_classes, output_stride, norm, pretrained_backbone, return_features)
