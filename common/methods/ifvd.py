"""``ifvd``: intra-class feature variation distillation (Wang et al., ECCV 2020) with its holistic term.

Defaults: the IFVD code (specs/ifvd_skd.md §A.4.3, §A.4.6, §C.4): 200·IFV on ``feat`` (labels at the
feature size, ignore = the pair's ignore index), WGAN-GP discriminator λ_adv 0.001, λ_d 0.1, Adam 4e-4 on the
poly schedule, D called on the student first. Its pixel KD (λ 10) is the ``kd`` method (``kd+ifvd``, preset
``ifvd``). Preset ``cirkd`` (cirkd.md §3.6–§3.7): 20·IFV, hinge D 0.001/0.1, constant lr.
"""
from common.losses.ifvd import IntraClassFeatureVariation
from common.methods import adversarial
from common.methods.registry import Built, register_method, term


@register_method("ifvd", paper="Wang et al., ECCV 2020", spec="ifvd_skd.md §A.4.3, §A.4.6, §C.3-C.4; cirkd.md §3.7",
                 defaults={"ifv": 200.0, "feature": "feat", **adversarial.PARAMS},
                 presets={"ifvd": {}, "cirkd": {"ifv": 20.0, **adversarial.CIRKD}},
                 choices=adversarial.CHOICES, weights=("ifv", *adversarial.WEIGHTS),
                 needs="`feature` of both and labels; D: logits >= 64x64")
def ifvd(ctx, p):
    """Term "ifvd" (``IntraClassFeatureVariation`` of the two features and the labels) and the discriminator."""
    terms = []
    if p.ifv:
        loss = IntraClassFeatureVariation(ctx.num_classes, ignore_index=ctx.ignore_index)
        terms.append(term(ctx, "ifvd", "ifvd", p.ifv, loss, (f"s.{p.feature}", f"t.{p.feature}", "labels")))
    return Built(terms=terms, adversary=adversarial.adversary_builder(ctx, "ifvd", p))
