"""``fitnet``: FitNet hints (Romero et al., ICLR 2015), CIRKD's ``CriterionFitNet`` baseline.

Default weight 10 on ``feat`` (specs/cirkd.md §3.6–§3.7), with the trainable bias-free 1×1 conv adapter
C_s → C_t (module "fitnet").
"""
from common.losses.fitnet import FitNet
from common.methods.registry import Built, register_method, require, term


@register_method("fitnet", paper="Romero et al., ICLR 2015 (CIRKD's baseline)", spec="cirkd.md §3.6-§3.7",
                 defaults={"weight": 10.0, "feature": "feat"}, presets={"cirkd": {}}, weights=("weight",),
                 needs="`feature` of both (adapter for channels)")
def fitnet(ctx, p):
    """Term "fitnet": ``mean((a(S) − T)²)``."""
    if not p.weight:
        return Built()
    inputs = (f"s.{p.feature}", f"t.{p.feature}")
    require(ctx, "fitnet", *inputs)
    loss = FitNet(ctx.shape(inputs[0])[0], ctx.shape(inputs[1])[0]).to(ctx.device)
    return Built(terms=[term(ctx, "fitnet", "fitnet", p.weight, loss, inputs)], modules={"fitnet": loss})
