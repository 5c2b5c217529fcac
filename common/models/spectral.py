"""The SAGAN ``SpectralNorm`` wrapper of SKD/IFVD/CWD (specs/ifvd_skd.md §C.3), ported as-is.

``weight`` becomes the trainable ``weight_bar``; ``weight_u``/``weight_v`` are Parameters with
``requires_grad=False`` (in ``state_dict`` and ``parameters()``, filtered out of the optimisers).
One power iteration runs on every call, in train and eval mode. u and v are replaced through
``.data`` as in the original, so a backward pass after several calls sees their latest values.
"""
import torch
import torch.nn as nn


def l2normalize(v, eps=1e-12):
    """``v / (||v|| + eps)``."""
    return v / (v.norm() + eps)


class SpectralNorm(nn.Module):
    """Wrap a convolution; its weight is ``weight_bar / sigma`` with ``sigma = u . (W v)``."""

    def __init__(self, module, name="weight", power_iterations=1):
        super().__init__()
        self.module = module
        self.name = name
        self.power_iterations = power_iterations
        w = getattr(module, name)
        height = w.shape[0]
        width = w.view(height, -1).shape[1]
        u = nn.Parameter(l2normalize(w.data.new_empty(height).normal_(0, 1)), requires_grad=False)
        v = nn.Parameter(l2normalize(w.data.new_empty(width).normal_(0, 1)), requires_grad=False)
        w_bar = nn.Parameter(w.data)
        del module._parameters[name]
        module.register_parameter(name + "_u", u)
        module.register_parameter(name + "_v", v)
        module.register_parameter(name + "_bar", w_bar)

    def normalized_weight(self):
        """Run the power iteration(s) on the detached weight and return ``weight_bar / sigma``."""
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        height = w.shape[0]
        with torch.no_grad():
            for _ in range(self.power_iterations):
                v.data = l2normalize(torch.mv(w.view(height, -1).t(), u)).to(v.dtype)
                u.data = l2normalize(torch.mv(w.view(height, -1), v)).to(u.dtype)
        sigma = u.dot(w.view(height, -1).mv(v))
        return w / sigma

    def forward(self, x):
        return self.module._conv_forward(x, self.normalized_weight(), self.module.bias)
