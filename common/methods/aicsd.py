"""``aicsd``: adaptive inter-class similarity distillation (Mansourian et al., 2023): the ICS loss, pixel-wise KD
and adaptive loss weighting (ALW).

Defaults: the paper's AICSD run (specs/aicsd.md §2.8, §4.5): ``α·(CE + 9500·ICS) + (1 − α)·10·KD`` with
α = epoch / 120 (0-based epoch of the step, ``steps_per_epoch`` of the context), ICS as the code computes it
(``ics_mode="code"``, §4.3.2), KD = the legacy-mean ``PixelKL`` (§4.2). ``alw=False`` sums ``CE + 9500·ICS +
10·KD``. ``ic`` > 0 adds the ICKD-like term computed and logged (times ``ic``) but never added to the loss, as
the original (§4.6.2); ``ic_added=True`` adds it. AICSD's pair-wise ``pa_loss`` is ``skd`` (preset
``aicsd``). Presets: ``icsd`` (9500·ICS alone), ``icsd_kd`` (ICS + KD without ALW).
"""
from common.engine.step import Term
from common.losses.aicsd import InterChannelCorrelation, InterClassSimilarity, adaptive_weight
from common.methods.kd import logit_loss
from common.methods.registry import Built, register_method, same_channels, term


def epoch_weight(fn, steps_per_epoch):
    """A term weight of the 0-based step from ``fn(epoch)`` (0-based epoch of the step)."""
    return lambda step: fn(step // steps_per_epoch)


@register_method("aicsd", paper="Mansourian et al., 2023", spec="aicsd.md §2.8, §4.2-§4.6",
                 defaults={"ics": 9500.0, "kd": 10.0, "ic": 0.0, "ic_added": False, "alw": True, "ref_epochs": 120,
                           "ics_mode": "code", "temperature": 1.0},
                 presets={"icsd": {"kd": 0.0, "alw": False}, "icsd_kd": {"alw": False}},
                 choices={"ics_mode": InterClassSimilarity.MODES}, weights=("ics", "kd", "ic"),
                 needs="logits of both (same classes); steps per epoch for ALW")
def aicsd(ctx, p):
    """Terms "aicsd.kd", "aicsd.ics", "aicsd.ic" (order of the original's sum) and ALW's task weight α."""
    same_channels(ctx, "aicsd", "s.logits", "t.logits")
    logits = ("s.logits", "t.logits")
    task_weight = None
    kd_weight, ics_weight = p.kd, p.ics
    if p.alw:
        if not ctx.steps_per_epoch:
            raise ValueError("adaptive loss weighting (alw) needs the steps per epoch of the run; give "
                             "steps_per_epoch to the method context or set aicsd.alw=false")
        adaptive_weight(0, p.ref_epochs)  # a bad ref_epochs stops here, not at the first step

        def alpha(epoch):
            return adaptive_weight(epoch, p.ref_epochs)

        task_weight = epoch_weight(alpha, ctx.steps_per_epoch)
        kd_weight = epoch_weight(lambda e: (1 - alpha(e)) * p.kd, ctx.steps_per_epoch)
        ics_weight = epoch_weight(lambda e: alpha(e) * p.ics, ctx.steps_per_epoch)
    terms = []
    if p.kd:
        terms.append(term(ctx, "aicsd", "aicsd.kd", kd_weight, logit_loss("pixel_kl", p.temperature), logits))
    if p.ics:
        ics = InterClassSimilarity(ctx.num_classes, temperature=p.temperature, mode=p.ics_mode)
        terms.append(term(ctx, "aicsd", "aicsd.ics", ics_weight, ics, logits))
    if p.ic:
        ic = InterChannelCorrelation()
        if p.ic_added:
            terms.append(term(ctx, "aicsd", "aicsd.ic", p.ic, ic, logits))
        else:
            logged = term(ctx, "aicsd", "aicsd.ic", 0.0, ic, logits)
            terms.append(Term("aicsd.ic", 0.0, lambda s, t: p.ic * logged.fn(s, t), logits, log_weighted=False))
    return Built(terms=terms, task_weight=task_weight)
