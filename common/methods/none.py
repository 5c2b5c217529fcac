"""``none``: no distillation term; the student trains on the task loss alone (the supervised baseline)."""
from common.methods.registry import Built, register_method


@register_method("none", paper="supervised baseline", spec="cirkd.md §3.6 (Baseline)", defaults={},
                 needs="nothing (no teacher)")
def none(ctx, p):
    """The baseline row of specs/cirkd.md §3.6: CE (+0.4 aux), no teacher term."""
    return Built()
