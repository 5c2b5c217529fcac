"""Dilated ResNets of the three code lineages, one implementation with the differences as parameters.

* PSP lineage (specs/ifvd_skd.md §C.1, cwd.md §4.2): deep stem (3x3 convs 3-64-64-128, ceil-mode
  max-pool), output stride 8, every block of a dilated stage at the full dilation, In-Place ABN
  (``activation="identity"``) followed by an explicit ReLU (§C.2), PyTorch's default conv init.
* CIRKD "v1s" (cirkd.md §2.1): deep stem with a floor-mode max-pool, the first block of a dilated
  stage at half the dilation (layer3 1 then 2, layer4 2 then 4), BasicBlock conv2 at the stage
  dilation ("previous_dilation"), kaiming-normal (fan_out) conv init, ``nn.BatchNorm2d``.
* AICSD "overhaul" (aicsd.md §3.2): 7x7 stem, the block-final ReLU moved to the start of the next
  block (blocks return their pre-ReLU sum), multi-grid layer4 (1, 2, 4) for ResNet-101, OS16 or OS8.

Attribute names are the originals', so the released checkpoints load with ``strict=True``.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

FIRST_DILATIONS = ("full", "half")


def conv3x3(in_planes, out_planes, stride=1, dilation=1):
    """3x3 convolution, padding = dilation, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: conv1 at ``dilation``, conv2 at ``previous_dilation`` (default: the same).

    With ``moved_relu`` (aicsd.md §3.2) the block starts with relu(x) and returns the pre-ReLU sum.
    """

    expansion = 1

    def __init__(self, inplanes, planes, norm_layer, stride=1, dilation=1, downsample=None,
                 previous_dilation=None, act_layer=nn.ReLU, moved_relu=False):
        super().__init__()
        self.moved_relu = moved_relu
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.relu = act_layer()
        self.conv2 = conv3x3(planes, planes, 1, dilation if previous_dilation is None else previous_dilation)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        if self.moved_relu:
            x = F.relu(x)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + residual
        return out if self.moved_relu else self.relu(out)


class Bottleneck(nn.Module):
    """ResNet-50/101 block, stride and dilation on the 3x3 ("v1.5"); ``previous_dilation`` is unused."""

    expansion = 4

    def __init__(self, inplanes, planes, norm_layer, stride=1, dilation=1, downsample=None,
                 previous_dilation=None, act_layer=nn.ReLU, moved_relu=False):
        super().__init__()
        self.moved_relu = moved_relu
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = act_layer()
        self.downsample = downsample

    def forward(self, x):
        if self.moved_relu:
            x = F.relu(x)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + residual
        return out if self.moved_relu else self.relu(out)


class ResNet(nn.Module):
    """Stem and layers 1-4; ``forward`` returns ``(x1, x2, x3, x4)``, the outputs of layer1..layer4.

    Args:
        block, layers: ``BasicBlock`` / ``Bottleneck`` and the number of blocks per stage.
        norm_layer: one-argument norm factory (``common.models.norm.norm_layer``).
        strides, dilations: per stage (default: output stride 8, dilations 1, 1, 2, 4).
        first_dilation: "full" (every block at the stage dilation, ifvd_skd.md §C.1) or "half" (the
            first block of a dilated stage at max(1, d // 2), cirkd.md §2.1).
        multi_grid: per-block multipliers of layer4's dilation (aicsd.md §3.2: (1, 2, 4)); its length
            replaces ``layers[3]``.
        stem: "deep" (three 3x3 convs, 128 channels) or "7x7" (one 7x7 conv, 64 channels).
        ceil_mode: of the stem's 3x3/2 max-pool.
        moved_relu: blocks return their pre-ReLU sum and start with a ReLU (aicsd.md §3.2).
        kaiming_init: conv weights ~ N(0, 2 / (k*k*out)) (kaiming-normal, fan_out) and norm weight 1,
            bias 0, as CIRKD's and AICSD's backbones; otherwise PyTorch's default init (PSP lineage).
    """

    def __init__(self, block, layers, norm_layer, act_layer=nn.ReLU, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                 first_dilation="full", multi_grid=None, stem="deep", ceil_mode=True, moved_relu=False,
                 kaiming_init=False):
        super().__init__()
        if first_dilation not in FIRST_DILATIONS:
            raise ValueError(f"first_dilation must be one of {FIRST_DILATIONS}, got {first_dilation!r}")
        self.norm_layer = norm_layer
        self.act_layer = act_layer
        self.first_dilation = first_dilation
        self.moved_relu = moved_relu
        if stem == "deep":
            self.inplanes = 128
            self.conv1 = conv3x3(3, 64, stride=2)
            self.bn1 = norm_layer(64)
            self.relu1 = act_layer()
            self.conv2 = conv3x3(64, 64)
            self.bn2 = norm_layer(64)
            self.relu2 = act_layer()
            self.conv3 = conv3x3(64, 128)
            self.bn3 = norm_layer(128)
            self.relu3 = act_layer()
        elif stem == "7x7":
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(64)
            self.relu = act_layer()
        else:
            raise ValueError(f"stem must be 'deep' or '7x7', got {stem!r}")
        self.stem_type = stem
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=ceil_mode)
        self.layer1 = self._make_layer(block, 64, layers[0], strides[0], dilations[0])
        self.layer2 = self._make_layer(block, 128, layers[1], strides[1], dilations[1])
        self.layer3 = self._make_layer(block, 256, layers[2], strides[2], dilations[2])
        if multi_grid is None:
            self.layer4 = self._make_layer(block, 512, layers[3], strides[3], dilations[3])
        else:
            self.layer4 = self._make_layer(block, 512, len(multi_grid), strides[3], dilations[3], multi_grid)
        if kaiming_init:
            init_backbone_weights(self)

    def _block_dilations(self, blocks, dilation, multi_grid):
        if multi_grid is not None:
            return [dilation * g for g in multi_grid]
        first = max(1, dilation // 2) if self.first_dilation == "half" else dilation
        return [first] + [dilation] * (blocks - 1)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1, multi_grid=None):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                self.norm_layer(planes * block.expansion),
            )
        kw = dict(previous_dilation=dilation, act_layer=self.act_layer, moved_relu=self.moved_relu)
        first, *rest = self._block_dilations(blocks, dilation, multi_grid)
        layers = [block(self.inplanes, planes, self.norm_layer, stride, first, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, self.norm_layer, 1, d, **kw) for d in rest]
        return nn.Sequential(*layers)

    def stem(self, x):
        """The stem convs with norm + activation, then the 3x3/2 max-pool (stride 4)."""
        if self.stem_type == "deep":
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.relu2(self.bn2(self.conv2(x)))
            x = self.relu3(self.bn3(self.conv3(x)))
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward(self, x):
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4


def init_backbone_weights(module):
    """Conv weights ~ N(0, sqrt(2 / (k*k*out))), norm weight 1, bias 0 (cirkd.md §2.1, aicsd.md §3.6)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cirkd_resnet(depth, norm_layer):
    """CIRKD's ``resnet{18,101}_v1s`` (cirkd.md §2.1): deep stem, output stride 8, half-dilated first blocks."""
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, norm_layer, first_dilation="half", ceil_mode=False, kaiming_init=True)


_DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 101: (Bottleneck, [3, 4, 23, 3])}
_AICSD_STAGES = {16: ((1, 2, 2, 1), (1, 1, 1, 2)), 8: ((1, 2, 1, 1), (1, 1, 2, 4))}


class OverhaulResNet(ResNet):
    """The AICSD / overhaul-distillation ResNet (aicsd.md §3.2), a ResNet with ``moved_relu``.

    ``forward(x)`` returns ``(high, low, feats)``: ``high`` = relu(layer4 output) (stride 16 or 8),
    ``low`` = relu(layer1 output) (stride 4) and ``feats`` = the pre-ReLU outputs of layer1..layer4,
    ``extract_feature``'s first four entries (§3.4); ``return_feats=False`` returns ``(high, low)``.
    """

    def forward(self, x, return_feats=True):
        feats = super().forward(x)
        high, low = F.relu(feats[3]), F.relu(feats[0])
        return (high, low, feats) if return_feats else (high, low)


def aicsd_resnet(depth, output_stride, norm_layer):
    """The AICSD backbone ResNet-101 (multi-grid layer4) or ResNet-18 at ``output_stride`` 16 or 8 (§3.2)."""
    if depth not in _DEPTHS:
        raise ValueError(f"AICSD ResNet depth must be 18 or 101, got {depth!r}")
    if output_stride not in _AICSD_STAGES:
        raise ValueError(f"AICSD ResNet output stride must be 16 or 8, got {output_stride!r}")
    block, layers = _DEPTHS[depth]
    strides, dilations = _AICSD_STAGES[output_stride]
    return OverhaulResNet(block, layers, norm_layer, strides=strides, dilations=dilations,
                          multi_grid=(1, 2, 4) if depth == 101 else None, stem="7x7", ceil_mode=False,
                          moved_relu=True, kaiming_init=True)
