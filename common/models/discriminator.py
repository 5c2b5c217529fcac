"""SAGAN discriminator of SKD/IFVD/CWD (``networks/sagan_models.py``; specs/ifvd_skd.md §C.3, cwd.md §4.5)."""
import torch
import torch.nn as nn

from .spectral import SpectralNorm


class SelfAttn(nn.Module):
    """SAGAN self-attention: ``softmax(q^T k)`` without 1/sqrt(d), ``y = gamma * out + x``, gamma starts at 0."""

    def __init__(self, in_dim):
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """Returns ``(y, attention)`` with attention B x N x N, N = H*W."""
        b, c, h, w = x.shape
        query = self.query_conv(x).flatten(2).transpose(1, 2)
        key = self.key_conv(x).flatten(2)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)
        value = self.value_conv(x).flatten(2)
        out = torch.bmm(value, attention.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x, attention


class Scale255(nn.Module):
    """Preprocess mode 3 of the original: ``2 * (x / 255 - 0.5)``."""

    def forward(self, x):
        return 2 * (x / 255 - 0.5)


def _sn_block(in_dim, out_dim):
    return nn.Sequential(SpectralNorm(nn.Conv2d(in_dim, out_dim, 4, 2, 1)), nn.LeakyReLU(0.1))


class Discriminator(nn.Module):
    """Input B x num_classes x 65 x 65 raw logits; ``forward`` returns ``[score, attn1, attn2]``.

    ``preprocess_mode``: 1 = ``norm_layer(num_classes)`` (``nn.BatchNorm2d``: batch statistics while D is
    in train mode, as in the original, which never switches D to eval; CIRKD's ``utils/sagan.py`` passes
    ``nn.SyncBatchNorm`` when distributed, specs/cirkd.md §2.7), 2 = tanh, 3 = ``2(x/255 - 0.5)``. The
    original builds ``l4`` only for ``image_size == 65`` and fails at forward otherwise; here that is a
    ValueError. Fully convolutional: a 129x257 input gives a 5x13 score map, CIRKD's 64x128 logits 1x5.

    Layers are created in the original order (l1, l2, l3, l4, last, attn1, attn2, input norm), so a seed
    draws the original's initial weights and spectral-norm u/v, and registered in its order (l4 first),
    so state_dict keys and their order match its checkpoints.
    """

    def __init__(self, preprocess_mode=1, image_size=65, conv_dim=64, num_classes=19, norm_layer=nn.BatchNorm2d):
        super().__init__()
        if preprocess_mode not in (1, 2, 3):
            raise ValueError(f"preprocess_mode must be 1 (bn), 2 (tanh) or 3 (x/255 scaling), got {preprocess_mode}")
        if image_size != 65:
            raise ValueError(f"image_size must be 65 (the original has no layer l4 otherwise), got {image_size}")
        l1 = _sn_block(num_classes, conv_dim)
        l2 = _sn_block(conv_dim, conv_dim * 2)
        l3 = _sn_block(conv_dim * 2, conv_dim * 4)
        self.l4 = _sn_block(conv_dim * 4, conv_dim * 8)
        self.l1, self.l2, self.l3 = l1, l2, l3
        self.last = nn.Sequential(nn.Conv2d(conv_dim * 8, 1, 4))
        self.attn1 = SelfAttn(conv_dim * 4)
        self.attn2 = SelfAttn(conv_dim * 8)
        if preprocess_mode == 1:
            self.preprocess_additional = norm_layer(num_classes)
        elif preprocess_mode == 2:
            self.preprocess_additional = nn.Tanh()
        else:
            self.preprocess_additional = Scale255()

    def forward(self, x):
        out = self.l3(self.l2(self.l1(self.preprocess_additional(x))))
        out, p1 = self.attn1(out)
        out, p2 = self.attn2(self.l4(out))
        return [self.last(out), p1, p2]
