"""Deep-stem dilated ResNet of the IFVD/CWD/SKD PSPNet (specs/ifvd_skd.md §C.1, cwd.md §4.2).

Backbone norms are InPlace-ABN with ``activation="identity"`` followed by an explicit ReLU (§C.2);
attribute names are the original ones so checkpoints load with ``strict=True``.
"""
import torch.nn as nn


def conv3x3(in_planes, out_planes, stride=1, dilation=1):
    """3x3 convolution, padding = dilation, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block; both 3x3 convs carry the layer's dilation (§C.1 "Blocks")."""

    expansion = 1

    def __init__(self, inplanes, planes, norm_layer, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes, activation="identity")
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes, activation="identity")
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """ResNet-50/101 block, stride and dilation on the 3x3 ("v1.5"; §C.1 "Blocks")."""

    expansion = 4

    def __init__(self, inplanes, planes, norm_layer, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes, activation="identity")
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes, activation="identity")
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * 4, activation="identity")
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """Deep stem (3x3 convs 3-64-64-128, ceil-mode max-pool) and layers 1-4 at output stride 8.

    ``forward`` returns ``(x1, x2, x3, x4)``, the outputs of layer1..layer4. Every block of a
    dilated layer, including the first, uses the full dilation (§C.1 "_make_layer").
    """

    def __init__(self, block, layers, norm_layer):
        super().__init__()
        self.norm_layer = norm_layer
        self.inplanes = 128
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = norm_layer(64, activation="identity")
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(64, 64)
        self.bn2 = norm_layer(64, activation="identity")
        self.relu2 = nn.ReLU()
        self.conv3 = conv3x3(64, 128)
        self.bn3 = norm_layer(128, activation="identity")
        self.relu3 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                self.norm_layer(planes * block.expansion, activation="identity"),
            )
        layers = [block(self.inplanes, planes, self.norm_layer, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, self.norm_layer, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x):
        """conv1..conv3 with BN+ReLU, then the ceil-mode max-pool (stride 4)."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def forward(self, x):
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4
