"""Segmentation networks and the SAGAN discriminator; ``build_model(name, ...)`` (DESIGN.md, Contract)."""
from . import espnet, pspnet  # noqa: F401 -- importing registers the models
from .discriminator import Discriminator
from .registry import build_model, list_models, register_model

__all__ = ["Discriminator", "build_model", "list_models", "register_model"]
