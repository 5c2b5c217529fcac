"""``skd``: structured knowledge distillation (Liu et al., CVPR 2019 / TPAMI 2020): pixel-wise, pair-wise and
holistic (adversarial) terms.

Defaults: the journal code (specs/ifvd_skd.md §B.4.2, §B.4.3, §B.4.5, §C.4, §C.8) — pixel-wise cross-entropy
``CriterionPixelWise`` ×10, pair-wise ``CriterionPairWiseforWholeFeatAfterPool`` (pool scale 0.5) ×1 on
``feat``, WGAN-GP discriminator with λ_adv = λ_d = 0.1, SGD for D (momentum 0.9, weight decay 5e-4), the D step
calling D on the teacher first. Presets: ``cirkd`` (CIRKD's SKD baseline, cirkd.md §3.6–§3.7: no pixel term,
10·pair-wise with a 2×2 max-pool and ℓ2-normalised features, hinge D 0.001/0.1, Adam, constant lr),
``cvpr19`` (the conference code for ESPNet, skd_cvpr19.md §8: ``CriterionKD`` with ×8 upsampling of stride-8
maps and ``CriterionSDcos`` on full feature maps, no D), ``aicsd`` (AICSD's ``pa_loss``, aicsd.md §4.6.1:
the journal pair-wise loss on the ASPP features, nothing else).
"""
from common.engine.step import Term
from common.losses.skd import PairWise, PairWiseCos, PixelWise, PixelWiseKD
from common.methods import adversarial
from common.methods.registry import Built, register_method, require, same_channels, term

PIXEL_LOSSES = ("cross_entropy", "kl_upsampled")
PAIR_LOSSES = ("pooled", "pooled_l2", "cosine")


def _pixel_term(ctx, p):
    if p.pixel_loss == "cross_entropy":
        same_channels(ctx, "skd", "s.logits", "t.logits")
        return term(ctx, "skd", "skd.pixel", p.pixel, PixelWise(), ("s.logits", "t.logits"))
    # the conference KD upsamples a stride-8 map x8 to the input size, each network's own (skd_cvpr19.md §8)
    require(ctx, "skd", "s.logits", "t.logits")
    s_side, t_side = ctx.shape("s.logits")[1:], ctx.shape("t.logits")[1:]
    s_up, t_up = s_side != ctx.crop, t_side != ctx.crop
    sizes = [tuple(8 * x if up else x for x in side) for side, up in ((s_side, s_up), (t_side, t_up))]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the x8-upsampled pixel-wise KD needs logits at the input size or at 1/8 of it, but "
                         f"{ctx.network('s')} gives {s_side} and {ctx.network('t')} {t_side} at crop {ctx.crop}")
    loss = PixelWiseKD(upsample=s_up, temperature=p.temperature, upsample_teacher=t_up)
    return Term("skd.pixel", p.pixel, loss, ("s.logits", "t.logits"))


def _pair_loss(ctx, p, feat):
    if p.pair_loss == "pooled_l2":
        return PairWise(pool_size=2, normalize="l2", detach_teacher=True)
    if p.pair_loss == "cosine":
        return PairWiseCos(p.cos_mode)
    h, w = ctx.shape(f"s.{feat}")[1:]
    if not 0 < p.pool_scale <= 1 or min(int(h * p.pool_scale), int(w * p.pool_scale)) < 1:
        raise ValueError(f"pool_scale {p.pool_scale} gives an empty pooling patch for the {h}x{w} '{feat}' of "
                         f"{ctx.network('s')}; use a scale in (0, 1] and a larger crop")
    return PairWise(scale=p.pool_scale)


@register_method("skd", paper="Liu et al., CVPR 2019 / TPAMI 2020 (journal code)",
                 spec="ifvd_skd.md §B.4.2-B.4.5, §C.3-C.8; skd_cvpr19.md §8; cirkd.md §3.7",
                 defaults={"pixel": 10.0, "pair": 1.0, "pixel_loss": "cross_entropy", "temperature": 1.0,
                           "pair_loss": "pooled", "pool_scale": 0.5, "cos_mode": "softmax", "feature": "feat",
                           **adversarial.PARAMS, **adversarial.SKD, "adv": 0.1, "d": 0.1},
                 presets={"cirkd": {"pixel": 0.0, "pair": 10.0, "pair_loss": "pooled_l2", **adversarial.CIRKD,
                                    "adv": 0.001, "d": 0.1, "d_optimizer": "adam", "d_weight_decay": 0.0,
                                    "d_order": "student_first"},
                          "cvpr19": {"pixel": 1.0, "pair": 1.0, "pixel_loss": "kl_upsampled", "pair_loss": "cosine",
                                     **adversarial.OFF},
                          "aicsd": {"pixel": 0.0, "pair": 1.0, "feature": "aspp", **adversarial.OFF}},
                 choices={"pixel_loss": PIXEL_LOSSES, "pair_loss": PAIR_LOSSES, "cos_mode": PairWiseCos.MODES,
                          **adversarial.CHOICES},
                 weights=("pixel", "pair", *adversarial.WEIGHTS),
                 needs="logits (pixel; D: >= 64x64); `feature` of both (pair)")
def skd(ctx, p):
    """Terms "skd.pixel", "skd.pair" and the discriminator, each only with a nonzero weight."""
    terms = []
    if p.pixel:
        terms.append(_pixel_term(ctx, p))
    if p.pair:
        feat = p.feature
        require(ctx, "skd", f"s.{feat}", f"t.{feat}")
        terms.append(term(ctx, "skd", "skd.pair", p.pair, _pair_loss(ctx, p, feat), (f"s.{feat}", f"t.{feat}")))
    return Built(terms=terms, adversary=adversarial.adversary_builder(ctx, "skd", p))
