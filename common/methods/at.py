"""``at``: attention transfer (Zagoruyko & Komodakis, ICLR 2017), CIRKD's ``CriterionAT`` baseline.

Default weight 10000 on ``feat`` (specs/cirkd.md §3.6–§3.7); the attention maps make any channel counts
comparable.
"""
from common.losses.at import AttentionTransfer
from common.methods.registry import Built, register_method, term


@register_method("at", paper="Zagoruyko & Komodakis, ICLR 2017 (CIRKD's baseline)", spec="cirkd.md §3.6-§3.7",
                 defaults={"weight": 10000.0, "feature": "feat"}, presets={"cirkd": {}}, weights=("weight",),
                 needs="`feature` of both (any channels)")
def at(ctx, p):
    """Term "at": ``mean((a(S) − a(T))²)`` of the two features."""
    if not p.weight:
        return Built()
    inputs = (f"s.{p.feature}", f"t.{p.feature}")
    return Built(terms=[term(ctx, "at", "at", p.weight, AttentionTransfer(), inputs)])
