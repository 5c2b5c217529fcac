"""``dsd``: double similarity distillation (Feng et al., TIP 2021), CIRKD's ``CriterionDoubleSimKD`` baseline.

Defaults (specs/cirkd.md §3.6–§3.7): 1000·PSD (residual attention of ``[out[-2], out[-1], out[0]]``) and
10·CSD (category similarity of the logits, T = 4). ``out[-2]`` is the network's ``aux`` logits when it has
them, else its main logits (the mobile models, §8.15). The six maps must share one size: when the pair's
maps differ in size, each is resized (bilinear) to the size of the student's ``feature`` first.
"""
from common.losses.dsd import DSD
from common.methods.registry import Built, pair_terms, register_method, require, resize_to, same_channels


@register_method("dsd", paper="Feng et al., TIP 2021 (CIRKD's baseline)", spec="cirkd.md §3.6-§3.7, §8.15",
                 defaults={"psd": 1000.0, "csd": 10.0, "temperature": 4.0, "feature": "feat"},
                 presets={"cirkd": {}}, weights=("psd", "csd"),
                 needs="logits (same classes) and `feature` of both; aux if present")
def dsd(ctx, p):
    """Terms "dsd.psd" and "dsd.csd" of one ``DSD`` call."""
    if not (p.psd or p.csd):
        return Built()
    if p.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {p.temperature}")
    same_channels(ctx, "dsd", "s.logits", "t.logits")
    inputs = []
    for who, outputs in (("s", ctx.student_outputs), ("t", ctx.teacher_outputs)):
        second_last = "aux" if "aux" in outputs else "logits"
        inputs += [f"{who}.{second_last}", f"{who}.{p.feature}", f"{who}.logits"]
    require(ctx, "dsd", *inputs)
    size = ctx.shape(f"s.{p.feature}")[1:]
    loss = DSD(temperature=p.temperature)
    if any(ctx.shape(spec)[1:] != size for spec in inputs):
        dsd_loss = loss

        def loss(*maps):
            return dsd_loss(*(resize_to(m, size) for m in maps))

    return Built(terms=pair_terms(ctx, "dsd", loss, tuple(inputs), [("dsd.psd", p.psd), ("dsd.csd", p.csd)]))
