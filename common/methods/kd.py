"""``kd``: logit distillation (Hinton et al., 2015) in the forms of the segmentation papers.

``form="logit_kd"`` (default, CIRKD's ``CriterionKD``, specs/cirkd.md §3.2): ``T²·KL(p_T ‖ p_S)`` per pixel,
averaged over pixels, weight 1, T = 1. ``form="pixel_kl"`` (IFVD/CWD ``CriterionKD``, ifvd_skd.md §A.4.2,
cwd.md §5.4; AICSD ``pi_loss``, aicsd.md §4.2): the legacy ``KLDivLoss`` mean over N·C·H·W, no T², weight 10.
"""
from common.losses.kd import LogitKD, PixelKL
from common.methods.registry import Built, register_method, same_channels, term

FORMS = {"logit_kd": LogitKD, "pixel_kl": PixelKL}


def logit_loss(form, temperature):
    """The logit-KD loss module of ``form`` (:data:`FORMS`)."""
    return FORMS[form](temperature=temperature)


@register_method("kd", paper="Hinton et al. 2015 (CIRKD's form)", spec="cirkd.md §3.2; ifvd_skd.md §A.4.2",
                 defaults={"weight": 1.0, "temperature": 1.0, "form": "logit_kd"},
                 presets={"cirkd": {}, "ifvd": {"weight": 10.0, "form": "pixel_kl"},
                          "cwd": {"weight": 10.0, "form": "pixel_kl"}},
                 choices={"form": tuple(FORMS)}, weights=("weight",),
                 needs="logits of both (same classes)")
def kd(ctx, p):
    """``weight · KD(z_S, z_T)`` on the logits (term "kd")."""
    if not p.weight:
        return Built()
    if p.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {p.temperature}")
    same_channels(ctx, "kd", "s.logits", "t.logits")
    loss = logit_loss(p.form, p.temperature)
    return Built(terms=[term(ctx, "kd", "kd", p.weight, loss, ("s.logits", "t.logits"))])
