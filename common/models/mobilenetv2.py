"""Dilated MobileNetV2 (width 1.0, ReLU6, no final 1x1 conv to 1280) of CIRKD and AICSD.

Both use the flat block layout ``features.{i}.conv.{0..7}`` of the ImageNet files and differ by parameter:
* CIRKD (cirkd.md §2.2): output stride 8, "CSAIL" dilation (blocks 7-13 at dilation 2, blocks 14-17 at
  4, each former stride-2 depthwise conv at stride 1 and half that dilation), padding = dilation per conv.
* AICSD (aicsd.md §3.2): output stride 16 or 8 by the running-stride rule (the dilation lags one stage),
  every block pads its input "TF-same" and all its convs have padding 0.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

# (expansion t, channels c, blocks n, stride s) of MobileNetV2 (cirkd.md §2.2, aicsd.md §3.2)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn(inp, oup, stride, norm_layer):
    """The stem: 3x3 conv (padding 1, no bias), norm, ReLU6."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), norm_layer(oup), nn.ReLU6(inplace=True))


def fixed_padding(x, dilation, kernel_size=3):
    """TF-same padding of the block input: k_eff - 1 in total, floor half before (aicsd.md §3.2)."""
    total = kernel_size + (kernel_size - 1) * (dilation - 1) - 1
    before = total // 2
    return F.pad(x, (before, total - before, before, total - before))


class InvertedResidual(nn.Module):
    """[1x1 expand, norm, ReLU6,] 3x3 depthwise (stride, dilation), norm, ReLU6, 1x1 project, norm.

    ``tf_padding``: pad the block input (AICSD) instead of each 3x3 conv (CIRKD).
    """

    def __init__(self, inp, oup, stride, dilation, expand_ratio, norm_layer, tf_padding=False):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.stride = stride
        self.dilation = dilation
        self.tf_padding = tf_padding
        self.use_res_connect = stride == 1 and inp == oup
        pad = 0 if tf_padding else dilation
        layers = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), norm_layer(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, pad, dilation, groups=hidden, bias=False),
                   norm_layer(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), norm_layer(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(fixed_padding(x, self.dilation) if self.tf_padding else x)
        return x + out if self.use_res_connect else out


def _init_weights(module, conv_init):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            conv_init(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _fan_out_normal(conv):
    """N(0, sqrt(2 / (k*k*out))) (cirkd.md §2.2)."""
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / n))


def _kaiming_fan_in(conv):
    """``kaiming_normal_`` with PyTorch's defaults (fan_in, gain sqrt 2) (aicsd.md §3.6)."""
    nn.init.kaiming_normal_(conv.weight)


def _features(strides_dilations, norm_layer, tf_padding):
    """``features``: the stem and the 17 blocks with their (stride, dilation)."""
    layers = [conv_bn(3, 32, 2, norm_layer)]
    inp = 32
    blocks = iter(strides_dilations)
    for t, c, n, _ in SETTINGS:
        for _ in range(n):
            stride, dilation = next(blocks)
            layers.append(InvertedResidual(inp, c, stride, dilation, t, norm_layer, tf_padding))
            inp = c
    return nn.Sequential(*layers)


def _plain_strides():
    """Per block (stride, dilation=1) of the undilated network (output stride 32)."""
    return [(s if i == 0 else 1, 1) for _, _, n, s in SETTINGS for i in range(n)]


class CIRKDMobileNetV2(nn.Module):
    """CIRKD's dilated MobileNetV2: ``features.{0..17}`` at output stride 8 (cirkd.md §2.2).

    ``forward(x)`` returns the 320-channel stride-8 feature map. The segmentation models hold it as
    ``pretrained.net`` (checkpoint keys ``pretrained.net.features.*``, §2.8), see :class:`CIRKDMobileNetBackbone`.
    """

    def __init__(self, norm_layer):
        super().__init__()
        strides_dilations = _plain_strides()
        for i in range(7, 14):  # features[7..13] (block i is features[i]); dilate=2
            strides_dilations[i - 1] = (1, 1) if i == 7 else (1, 2)
        for i in range(14, 18):  # dilate=4
            strides_dilations[i - 1] = (1, 2) if i == 14 else (1, 4)
        self.features = _features(strides_dilations, norm_layer, tf_padding=False)
        _init_weights(self, _fan_out_normal)

    def forward(self, x):
        return self.features(x)


class CIRKDMobileNetBackbone(nn.Module):
    """``pretrained`` of CIRKD's mobile models: the dilated network as ``net`` (cirkd.md §2.8)."""

    def __init__(self, norm_layer):
        super().__init__()
        self.net = CIRKDMobileNetV2(norm_layer)

    def forward(self, x):
        return self.net(x)


def aicsd_strides_dilations(output_stride):
    """Per block (stride, dilation) by the running-stride rule of aicsd.md §3.2 (upstream order kept)."""
    current_stride, rate, out = 2, 1, []
    for _, _, n, s in SETTINGS:
        if current_stride == output_stride:
            stride, dilation = 1, rate
            rate *= s
        else:
            stride, dilation = s, 1
            current_stride *= s
        out += [(stride, dilation)] + [(1, dilation)] * (n - 1)
    return out


class AICSDMobileNetV2(nn.Module):
    """The AICSD / pytorch-deeplab-xception MobileNetV2 backbone (aicsd.md §3.2).

    ``features`` holds the stem and the 17 blocks; as upstream, ``low_level_features`` (= features[0:4])
    and ``high_level_features`` (= features[4:]) are registered views of the same modules, so the
    state_dict carries each tensor under both names (parameters are shared and counted once).

    ``forward(x)`` returns ``(high, low, feats)``: ``high`` = the 320-channel output (stride 16 or 8),
    ``low`` = features[0:4] output (24 channels, stride 4) and ``feats`` = ``extract_feature``'s first
    four entries (§3.4): features[4].conv[0:2], features[7].conv[0:2] and features[14].conv[0:2]
    applied to the unpadded inputs of those blocks (144, 192, 576 channels), then ``high``.
    As upstream ``extract_feature``, the extra passes run after the block passes: in training both update
    those norms' running statistics, in that order. With ``return_feats=False`` it returns ``(high, low)``
    and computes none of the extra convs (the upstream ``forward``).
    """

    def __init__(self, output_stride, norm_layer):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"AICSD MobileNetV2 output stride must be 16 or 8, got {output_stride!r}")
        self.features = _features(aicsd_strides_dilations(output_stride), norm_layer, tf_padding=True)
        _init_weights(self, _kaiming_fan_in)
        self.low_level_features = self.features[0:4]
        self.high_level_features = self.features[4:]

    def forward(self, x, return_feats=True):
        low = self.low_level_features(x)
        if not return_feats:
            return self.high_level_features(low), low
        f = self.features
        x7 = f[4:7](low)
        x14 = f[7:14](x7)
        high = f[14:](x14)
        feat0 = f[4].conv[0:2](low)
        feat1 = f[7].conv[0:2](x7)
        feat2 = f[14].conv[0:2](x14)
        return high, low, (feat0, feat1, feat2, high)


def aicsd_mobilenetv2(output_stride, norm_layer):
    """The AICSD MobileNetV2 backbone at ``output_stride`` 16 or 8 (see :class:`AICSDMobileNetV2`)."""
    return AICSDMobileNetV2(output_stride, norm_layer)
