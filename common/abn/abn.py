"""InPlace-ABN modules with the modern upstream signatures (specs/inplace_abn.md §3.2, §5.2).

All three share InPlace-ABN math (scale = |w| + eps, §1.7) and the state_dict keys of the original
checkpoints: weight, bias, running_mean, running_var. ``num_batches_tracked`` (needed for momentum=None) is a
non-persistent buffer, and a state_dict that contains it still loads with strict=True.
``ABN`` is the pure-PyTorch reference; ``InPlaceABN`` / ``InPlaceABNSync`` run the compiled extension.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.abn import _backend
from common.abn.functional import ACTIVATIONS, check_config, inplace_abn, inplace_abn_sync
from common.errors import UserError


class _ABNBase(nn.Module):
    _version = 2
    _activations = ACTIVATIONS

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="leaky_relu", activation_param=0.01):
        super().__init__()
        check_config(activation, activation_param, eps, momentum, self._activations)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = activation_param
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long), persistent=False)
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None, persistent=False)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _momentum(self):
        """The running-average factor of this call, as nn.BatchNorm computes it (momentum=None: cumulative)."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return self.momentum if self.momentum is not None else 0.0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        tracked = state_dict.pop(prefix + "num_batches_tracked", None)
        if tracked is not None and self.num_batches_tracked is not None:
            self.num_batches_tracked.copy_(tracked)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        rep = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, " \
              f"activation={self.activation}"
        if self.activation in ("leaky_relu", "elu"):
            rep += f"[{self.activation_param}]"
        return rep


class ABN(_ABNBase):
    """Pure-PyTorch reference: F.batch_norm with weight |w|+eps, then the activation (same math, not in place)."""

    _activations = ACTIVATIONS + ("relu",)

    def forward(self, x):
        momentum = self._momentum()
        weight = self.weight.abs() + self.eps if self.weight is not None else None
        x = F.batch_norm(x, self.running_mean, self.running_var, weight, self.bias,
                         self.training or self.running_mean is None, momentum, self.eps)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.activation_param, inplace=True)
        if self.activation == "elu":
            return F.elu(x, self.activation_param, inplace=True)
        if self.activation == "relu":
            return F.relu(x, inplace=True)
        return x


class InPlaceABN(_ABNBase):
    """In-place activated batch norm (compiled extension): returns its input tensor, overwritten (§5.1)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _backend.available():
            raise UserError(f"{type(self).__name__} needs the compiled InPlace-ABN extension, which is "
                                     f"not built or out of date; {_backend.BUILD_HINT}")

    def forward(self, x):
        return inplace_abn(x, self.weight, self.bias, self.running_mean, self.running_var,
                           self.training or not self.track_running_stats, self._momentum(), self.eps,
                           self.activation, self.activation_param)


class InPlaceABNSync(InPlaceABN):
    """InPlaceABN with statistics synchronised over a torch.distributed group (None: WORLD at call time)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="leaky_relu", activation_param=0.01, group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param)
        self.group = group

    def set_group(self, group):
        """Change the process group (never between a forward and its backward)."""
        self.group = group

    def forward(self, x):
        return inplace_abn_sync(x, self.weight, self.bias, self.running_mean, self.running_var,
                                self.training or not self.track_running_stats, self._momentum(), self.eps,
                                self.activation, self.activation_param, self.group)
