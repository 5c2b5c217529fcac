"""Segmentation networks and the SAGAN discriminator; ``build_model(name, ...)`` (DESIGN.md, Contract).

Every model declares ``output_names``, the names of its output list; ``norm`` names are those of
:mod:`common.models.norm`.
"""
from . import cirkd_pspnet, deeplabv3, deeplabv3plus, espnet, pspnet  # noqa: F401 -- importing registers the models
from .discriminator import Discriminator
from .registry import build_model, list_models, model_factory, register_model

__all__ = ["Discriminator", "build_model", "list_models", "model_factory", "register_model"]
