"""ESPNet and ESPNet-C as in SKD's conference code (skd_cvpr19.md §4, ``network/ESPnet.py`` of ``cvpr_19``).

Module names match the released CamVid/Cityscapes checkpoints exactly (``classifier_1`` for ESPNet's encoder
head, ``classifier`` for ESPNet-C's), so they load with ``strict=True`` once a ``module.`` prefix is stripped.
All convolutions are bias-free, every BN has eps=1e-3, every PReLU is per channel.
"""
import torch
from torch import nn

from common.models.registry import register_model


class C(nn.Module):
    """k×k convolution with padding (k−1)/2, nothing after it."""

    def __init__(self, n_in, n_out, k, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        return self.conv(x)


class CDilated(nn.Module):
    """k×k convolution with dilation d and padding ((k−1)/2)·d."""

    def __init__(self, n_in, n_out, k, stride=1, d=1):
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=((k - 1) // 2) * d, bias=False, dilation=d)

    def forward(self, x):
        return self.conv(x)


class BR(nn.Module):
    """BN(eps=1e-3) → PReLU."""

    def __init__(self, n_out):
        super().__init__()
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x):
        return self.act(self.bn(x))


class CBR(nn.Module):
    """conv → BN(eps=1e-3) → PReLU."""

    def __init__(self, n_in, n_out, k, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _ESPBranches(nn.Module):
    """The shared body of the ESP blocks: c1, then five dilated 3×3 branches fused hierarchically into
    [d1, d2, d2+d4, d2+d4+d8, d2+d4+d8+d16] (n = nOut//5 channels each, d1 takes the rest)."""

    def __init__(self, n_in, n_out, reduce_k, reduce_stride):
        super().__init__()
        n = n_out // 5
        n1 = n_out - 4 * n
        self.c1 = C(n_in, n, reduce_k, reduce_stride)
        self.d1 = CDilated(n, n1, 3, 1, 1)
        self.d2 = CDilated(n, n, 3, 1, 2)
        self.d4 = CDilated(n, n, 3, 1, 4)
        self.d8 = CDilated(n, n, 3, 1, 8)
        self.d16 = CDilated(n, n, 3, 1, 16)

    def _branches(self, x):
        y = self.c1(x)
        add1 = self.d2(y)
        add2 = add1 + self.d4(y)
        add3 = add2 + self.d8(y)
        add4 = add3 + self.d16(y)
        return torch.cat([self.d1(y), add1, add2, add3, add4], 1)


class DownSamplerB(_ESPBranches):
    """Strided ESP block: 3×3 stride-2 c1, branches, BN, PReLU; no residual (§4)."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out, 3, 2)
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x):
        return self.act(self.bn(self._branches(x)))


class DilatedParllelResidualBlockB(_ESPBranches):
    """The ESP block: 1×1 c1, branches, + input if ``add``, then BR (§4; original spelling kept)."""

    def __init__(self, n_in, n_out, add=True):
        super().__init__(n_in, n_out, 1, 1)
        self.bn = BR(n_out)
        self.add = add

    def forward(self, x):
        out = self._branches(x)
        if self.add:
            out = x + out
        return self.bn(out)


class InputProjectionA(nn.Module):
    """``t`` repeated AvgPool2d(3, stride 2, padding 1) of the normalised image."""

    def __init__(self, sampling_times):
        super().__init__()
        self.pool = nn.ModuleList([nn.AvgPool2d(3, stride=2, padding=1) for _ in range(sampling_times)])

    def forward(self, x):
        for pool in self.pool:
            x = pool(x)
        return x


class _Encoder(nn.Module):
    """The ESPNet-C encoder body shared by both networks; ``head`` names the 1×1 classifier attribute."""

    head = "classifier"

    def __init__(self, num_classes, p, q):
        super().__init__()
        self.level1 = CBR(3, 16, 3, 2)
        self.sample1 = InputProjectionA(1)
        self.sample2 = InputProjectionA(2)
        self.b1 = BR(16 + 3)
        self.level2_0 = DownSamplerB(16 + 3, 64)
        self.level2 = nn.ModuleList([DilatedParllelResidualBlockB(64, 64) for _ in range(p)])
        self.b2 = BR(128 + 3)
        self.level3_0 = DownSamplerB(128 + 3, 128)
        self.level3 = nn.ModuleList([DilatedParllelResidualBlockB(128, 128) for _ in range(q)])
        self.b3 = BR(256)
        setattr(self, self.head, C(256, num_classes, 1, 1))

    def encode(self, x):
        """Returns (b1 output, b2 output, b3 output) at 1/2, 1/4, 1/8 (concat orders of §4 kept)."""
        out0 = self.b1(torch.cat([self.level1(x), self.sample1(x)], 1))
        out1_0 = self.level2_0(out0)
        out1 = out1_0
        for layer in self.level2:
            out1 = layer(out1)
        out1 = self.b2(torch.cat([out1, out1_0, self.sample2(x)], 1))
        out2_0 = self.level3_0(out1)
        out2 = out2_0
        for layer in self.level3:
            out2 = layer(out2)
        out2 = self.b3(torch.cat([out2_0, out2], 1))
        return out0, out1, out2


class ESPNetEncoder(_Encoder):
    """ESPNet-C (``ESPNet_Encoder``): forward → [logits at 1/8, b3 features (256 ch, 1/8)]."""

    output_names = ("logits", "feat")

    def forward(self, x):
        feat = self.encode(x)[2]
        return [self.classifier(feat), feat]


class ESPNet(_Encoder):
    """ESPNet with the RUM decoder: forward → [logits at input size, b3 features, encoder logits at 1/8].

    Input height and width must be multiples of 8.
    """

    head = "classifier_1"
    output_names = ("logits", "feat", "encoder_logits")

    def __init__(self, num_classes, p, q):
        super().__init__(num_classes, p, q)
        k = num_classes
        self.level3_C = C(128 + 3, k, 1, 1)
        self.br = nn.BatchNorm2d(k, eps=1e-3)
        self.conv = CBR(19 + k, k, 3, 1)
        self.up_l3 = nn.Sequential(nn.ConvTranspose2d(k, k, 2, stride=2, padding=0, output_padding=0, bias=False))
        self.combine_l2_l3 = nn.Sequential(BR(2 * k), DilatedParllelResidualBlockB(2 * k, k, add=False))
        self.up_l2 = nn.Sequential(nn.ConvTranspose2d(k, k, 2, stride=2, padding=0, output_padding=0, bias=False),
                                   BR(k))
        self.classifier = nn.ConvTranspose2d(k, k, 2, stride=2, padding=0, output_padding=0, bias=False)

    def forward(self, x):
        if x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"ESPNet needs an input height and width divisible by 8, got {tuple(x.shape[2:])}")
        out0, out1, feat = self.encode(x)
        out = self.classifier_1(feat)
        up3 = self.up_l3(self.br(out))
        comb = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(out1), up3], 1)))
        logits = self.classifier(self.conv(torch.cat([comb, out0], 1)))
        return [logits, feat, out]


@register_model
def espnet(num_classes: int = 19, p: int = 2, q: int = 8) -> ESPNet:
    """SKD's ``student_esp_d`` (``get_ESPnet_decoder``): ESPNet with p=2, q=8 (skd_cvpr19.md §2)."""
    return ESPNet(num_classes, p, q)


@register_model
def espnet_c(num_classes: int = 19, p: int = 2, q: int = 8) -> ESPNetEncoder:
    """SKD's ``student_esp_e`` (``get_ESPnet_encoder``): ESPNet-C with p=2, q=8 (skd_cvpr19.md §2)."""
    return ESPNetEncoder(num_classes, p, q)
