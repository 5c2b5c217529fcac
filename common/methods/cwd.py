"""``cwd``: channel-wise distillation (Shu et al., ICCV 2021).

Defaults: the documented CWD run (specs/cwd.md §3.1, §5.2): 3·CWD on the logits, channel softmax, KL, τ = 4,
no feature term, no discriminator. ``feat`` > 0 adds CWD on ``feature`` through an adapter: ``adapter="cwd"``
(the CWD code's ``--cwd-feat``, cwd.md §5.3: 1×1 conv → In-Place ABN → ReLU, module "adapter", its norm the
pair's In-Place ABN norm, ``abn`` for plain-BN pairs) or ``adapter="cirkd"`` (CIRKD's ``CriterionCWD``,
cirkd.md §3.7: a bias-free 1×1 conv inside the loss, used only when the channels differ, one instance for
features and logits, module "cwd"). Preset ``cirkd`` (§3.6): 50·feat + 3·logits, τ 4, hinge D 0.001/0.1,
Adam at a constant lr. The discriminator parameters are those of ``skd``/``ifvd`` (cwd.md §5.5).
"""
from common import abn
from common.losses.cwd import DIVERGENCES, NORM_TYPES, ChannelWiseDivergence, FeatureAdapter
from common.methods import adversarial
from common.methods.registry import Built, register_method, require, same_channels, term


@register_method("cwd", paper="Shu et al., ICCV 2021", spec="cwd.md §3.1, §5.2-§5.5; cirkd.md §3.6-§3.7",
                 defaults={"logits": 3.0, "feat": 0.0, "temperature": 4.0, "norm_type": "channel",
                           "divergence": "kl", "adapter": "cwd", "feature": "feat", **adversarial.PARAMS,
                           **adversarial.OFF},
                 presets={"cwd": {}, "cirkd": {"logits": 3.0, "feat": 50.0, "adapter": "cirkd", **adversarial.CIRKD,
                                    "adv": 0.001, "d": 0.1}},
                 choices={"norm_type": NORM_TYPES, "divergence": DIVERGENCES, "adapter": ("cwd", "cirkd"),
                          **adversarial.CHOICES},
                 weights=("logits", "feat", *adversarial.WEIGHTS),
                 needs="logits (same classes); `feature` of both for feat (adapter for channels); D: >= 64x64")
def cwd(ctx, p):
    """Terms "cwd.feat" and "cwd.logits" (in CIRKD's order), the adapter module, the discriminator."""
    terms, modules = [], {}
    feat = (f"s.{p.feature}", f"t.{p.feature}")
    if p.feat:
        require(ctx, "cwd", *feat)
    if p.logits:
        same_channels(ctx, "cwd", "s.logits", "t.logits")
    if p.adapter == "cirkd" and (p.feat or p.logits):
        has_feat = p.feature in ctx.student_outputs and p.feature in (ctx.teacher_outputs or {})
        channels = (ctx.shape(feat[0])[0], ctx.shape(feat[1])[0]) if has_feat else (None, None)
        loss = modules["cwd"] = ChannelWiseDivergence(p.norm_type, p.divergence, p.temperature, *channels)
        loss.to(ctx.device)
        if p.feat:
            terms.append(term(ctx, "cwd", "cwd.feat", p.feat, loss, feat))
    elif p.feat or p.logits:
        loss = ChannelWiseDivergence(p.norm_type, p.divergence, p.temperature)
        if p.feat:
            norm = ctx.norm if ctx.norm in abn.NORMS else "abn"
            adapter = modules["adapter"] = FeatureAdapter(ctx.shape(feat[0])[0], ctx.shape(feat[1])[0],
                                                          norm=norm).to(ctx.device)
            terms.append(term(ctx, "cwd", "cwd.feat", p.feat, lambda fs, ft: loss(adapter(fs), ft), feat))
    if p.logits:
        terms.append(term(ctx, "cwd", "cwd.logits", p.logits, loss, ("s.logits", "t.logits")))
    return Built(terms=terms, modules=modules, adversary=adversarial.adversary_builder(ctx, "cwd", p))
