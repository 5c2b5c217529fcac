"""The catalogue of distillation methods (DESIGN.md, Layout; README "Distillation methods").

``build_method("kd+cwd", method_context(student, teacher, num_classes=19), **{"cwd.logits": 3.0})`` ->
:class:`MethodParts`. One module per method; importing this package registers them all.
"""
from . import aicsd, at, cirkd, cwd, dsd, fitnet, ifvd, kd, none, skd  # noqa: F401 -- importing registers the methods
from .registry import (
    MethodContext,
    MethodParts,
    build_method,
    list_methods,
    method_context,
    method_info,
    method_params,
    register_method,
    relabel,
)

__all__ = ["MethodContext", "MethodParts", "build_method", "list_methods", "method_context", "method_info",
           "method_params", "register_method", "relabel"]
