"""Channel-wise distillation (specs/cwd.md §5.2 loss, §5.3 feature adapter; CIRKD's variant specs/cirkd.md §3.7)."""
import torch.nn as nn
import torch.nn.functional as F

from common.abn import norm_layer
from common.numerics import full_precision

NORM_TYPES = ("channel", "spatial", "channel_mean", "none")
DIVERGENCES = ("kl", "mse")


class ChannelWiseDivergence(nn.Module):
    """The original ``CriterionCWD(norm_type, divergence, temperature)`` on (N, C, H, W) maps.

    Normalisation of ``z/τ`` (§5.2 step 1): ``channel`` = softmax over the H·W positions of each
    (n, c); ``spatial`` = softmax over channels at each pixel; ``channel_mean`` = spatial mean per
    (n, c); ``none`` = the raw map of the first sample only. Reduction: ``kl`` = Σ p_T (log p_T − log p_S)
    (from ``log_softmax``, so a vanishing probability gives 0, not NaN), ``mse`` = Σ (s − t)². Divided
    by N·C for channel / channel_mean and by N·H·W otherwise (student's N, C, H, W), times τ².
    τ is the given temperature for ``kl`` and 1 for ``mse``.

    ``kl`` needs a softmax normalisation: with ``channel_mean`` or ``none`` the original takes the log
    of raw values (NaN); those combinations are refused here.

    CIRKD's ``CriterionCWD(s_channels, t_channels, ...)``: given both channel counts, the module owns a
    trainable 1×1 conv adapter (no bias, PyTorch default init) applied to the student when its channel
    count differs from the teacher's (embeddings) and skipped otherwise (logits, same instance); N and C of
    the divisor are read from the student **before** the adapter, so feature CWD is divided by N·C_s
    (§3.7). Without them (the CWD paper's code) the student must already match the teacher.
    """

    def __init__(self, norm_type="channel", divergence="kl", temperature=4.0, s_channels=None, t_channels=None):
        super().__init__()
        if norm_type not in NORM_TYPES:
            raise ValueError(f"unknown CWD norm type {norm_type!r}; use one of {', '.join(NORM_TYPES)}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown CWD divergence {divergence!r}; use one of {', '.join(DIVERGENCES)}")
        if divergence == "kl" and norm_type in ("channel_mean", "none"):
            raise ValueError(f"CWD norm type {norm_type!r} with divergence 'kl' takes the log of raw values and "
                            "gives NaN (as in the original); use --norm-type channel or spatial, or --divergence mse")
        self.norm_type = norm_type
        self.divergence = divergence
        self.temperature = float(temperature) if divergence == "kl" else 1.0
        if (s_channels is None) != (t_channels is None):
            raise ValueError("give both s_channels and t_channels (CIRKD's adapter) or neither")
        self.conv = None if s_channels is None else nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)

    def forward(self, s, t):
        n, c, h, w = s.shape
        if self.conv is not None and c != t.shape[1]:
            s = self.conv(full_precision(s))
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"CWD: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in channels")
        tau = self.temperature
        s = full_precision(s) / tau
        t = full_precision(t.detach()) / tau
        if self.norm_type == "channel":
            s, t, dim = s.flatten(2), t.flatten(2), -1
        elif self.norm_type == "spatial":
            dim = 1
        elif self.norm_type == "channel_mean":
            s, t = s.mean(dim=(2, 3)), t.mean(dim=(2, 3))
        else:
            s, t = s[0], t[0]
        if self.divergence == "kl":
            loss = F.kl_div(F.log_softmax(s, dim=dim), F.log_softmax(t, dim=dim), reduction="sum", log_target=True)
        elif self.norm_type in ("channel", "spatial"):
            loss = (F.softmax(s, dim=dim) - F.softmax(t, dim=dim)).pow(2).sum()
        else:
            loss = (s - t).pow(2).sum()
        denom = n * c if self.norm_type in ("channel", "channel_mean") else n * h * w
        return loss * tau ** 2 / denom


class FeatureAdapter(nn.Sequential):
    """The ``--cwd-feat`` alignment: conv1×1 (no bias) → InPlace-ABN (leaky 0.01) → ReLU (§5.3).

    Maps the student's PSP feature (128 channels) to the teacher's (512).
    """

    def __init__(self, in_channels=128, out_channels=512, norm="auto"):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            norm_layer(norm)(out_channels),
            nn.ReLU(inplace=False),
        )
