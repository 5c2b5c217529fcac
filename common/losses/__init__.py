"""Distillation and task losses, one module per method (DESIGN.md, Contract).

Each loss takes plain tensors and returns a 0-dim tensor; import it from its module, e.g.
``from common.losses.cwd import ChannelWiseDivergence``.
"""
from .segmentation import CriterionDSN

__all__ = ["CriterionDSN"]
