"""The seeds' old InPlace-ABN API (``libs`` of IFVD/SKD/TorchDistiller, specs/inplace_abn.md §2.2-2.3, §5.2).

Old names and positional orders on top of the modern implementation: ``activation="none"`` is identity,
``slope`` is ``activation_param``, the old ``"elu"`` has alpha 1, ``devices`` is accepted and ignored (with one
warning), the wrappers keep the layer as submodule ``bn``, and ``ABN`` is the old ``Sequential(bn, act)`` with
standard BatchNorm semantics. Old checkpoints (no ``num_batches_tracked``) load with strict=True.
"""
import warnings
from collections import OrderedDict

import torch.nn as nn

from common.abn import abn as _modern
from common.abn import functional as _functional

OLD_ACTIVATIONS = ("leaky_relu", "elu", "none")


def _modern_activation(activation, slope):
    if activation not in OLD_ACTIVATIONS:
        raise _functional.ABNConfigError(f"InPlace-ABN (legacy): unknown activation {activation!r}; choose one of "
                                         f"{', '.join(OLD_ACTIVATIONS)}")
    if activation == "none":
        return "identity", slope
    if activation == "elu":
        return "elu", 1.0
    return "leaky_relu", slope


_warned_devices = False


def _ignore_devices(devices):
    global _warned_devices
    if devices is not None and not _warned_devices:
        warnings.warn("InPlaceABNSync(devices=...) is ignored: synchronisation runs over torch.distributed "
                      "(launch with torchrun for several GPUs)", UserWarning, stacklevel=3)
        _warned_devices = True


# The old default activation: one instance shared by every ABN built without an explicit activation.
_DEFAULT_ACTIVATION = nn.ReLU(inplace=True)


class ABN(nn.Sequential):
    """Old ``ABN``: ``Sequential(bn=BatchNorm2d(num_features, **kwargs), act=activation)`` (standard BN)."""

    def __init__(self, num_features, activation=_DEFAULT_ACTIVATION, **kwargs):
        super().__init__(OrderedDict([("bn", nn.BatchNorm2d(num_features, **kwargs)), ("act", activation)]))


class InPlaceABN(_modern.InPlaceABN):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, activation="leaky_relu", slope=0.01):
        act, param = _modern_activation(activation, slope)
        super().__init__(num_features, eps, momentum, affine, True, act, param)
        self.slope = slope


class InPlaceABNSync(_modern.InPlaceABNSync):
    def __init__(self, num_features, devices=None, eps=1e-5, momentum=0.1, affine=True, activation="leaky_relu",
                 slope=0.01):
        _ignore_devices(devices)
        act, param = _modern_activation(activation, slope)
        super().__init__(num_features, eps, momentum, affine, True, act, param)
        self.devices = devices
        self.slope = slope


class InPlaceABNWrapper(nn.Module):
    """Old wrapper: the layer lives in ``self.bn`` (state_dict keys ``bn.*``)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.bn = InPlaceABN(*args, **kwargs)

    def forward(self, x):
        return self.bn(x)


class InPlaceABNSyncWrapper(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.bn = InPlaceABNSync(*args, **kwargs)

    def forward(self, x):
        return self.bn(x)


class GlobalAvgPool2d(nn.Module):
    """Mean over the flattened spatial dimensions: N x C x ... -> N x C."""

    def forward(self, x):
        return x.view(x.size(0), x.size(1), -1).mean(dim=2)


def inplace_abn(x, weight, bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-05,
                activation="leaky_relu", slope=0.01):
    act, param = _modern_activation(activation, slope)
    return _functional.inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, act, param)


def inplace_abn_sync(x, weight, bias, running_mean, running_var, extra, training=True, momentum=0.1, eps=1e-05,
                     activation="leaky_relu", slope=0.01):
    """``extra`` (the old DataParallel queues) is ignored: statistics are combined over torch.distributed."""
    act, param = _modern_activation(activation, slope)
    return _functional.inplace_abn_sync(x, weight, bias, running_mean, running_var, training, momentum, eps, act,
                                        param)


__all__ = ["ABN", "GlobalAvgPool2d", "InPlaceABN", "InPlaceABNSync", "InPlaceABNSyncWrapper", "InPlaceABNWrapper",
           "inplace_abn", "inplace_abn_sync"]
