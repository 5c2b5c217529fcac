"""Model registry (timm style): typed keyword factories registered by name (DESIGN.md, Contract)."""
from common.errors import UserError

_MODELS = {}


def register_model(fn):
    """Register a factory ``fn(num_classes=19, **kwargs) -> nn.Module`` under ``fn.__name__``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models():
    """The registered model names, sorted."""
    return sorted(_MODELS)


def model_factory(name):
    """The factory registered as ``name``; an unknown name is a :class:`UserError` listing the names."""
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name]


def build_model(name, num_classes=19, **kwargs):
    """Build the registered model ``name`` (see :func:`model_factory`)."""
    return model_factory(name)(num_classes=num_classes, **kwargs)
