"""``cirkd``: cross-image relational KD (Yang et al., CVPR 2022): the mini-batch pixel-to-pixel relation and the
memory-based pixel-to-pixel and pixel-to-region contrast.

Defaults (specs/cirkd.md §1.3, §3.3–§3.5): 1·mini-batch (τ 0.1, no pooling, ``minibatch_group`` 0 = over the
whole local batch), 0.1·memory p2p, 0.1·memory p2r (T_c 1, τ 0.1; queues of 20000 pixels and 2000 regions per
class; 4096 pixel and 1024 region negatives in all, ``contrast_size // K + 1`` per class), the original's
pixel-enqueue defect kept (``faithful_pixel_enqueue``), on ``feat``. The memory owns the projection head
C_s → C_t (module "memory", BN of the pair when it is plain BN, else ``nn.BatchNorm2d``). Its logit KD is the
``kd`` method: the full objective is ``kd+cirkd`` (§3.5). Preset ``voc``: memory weights 0.01 (the VOC
scripts).
"""
from common.losses.cirkd import MemoryContrast, MiniBatchPixelRelation, per_class_contrast_size
from common.methods.registry import Built, bn_layer, pair_terms, register_method, require, term


@register_method("cirkd", paper="Yang et al., CVPR 2022", spec="cirkd.md §1.3, §3.3-§3.5, §8.1",
                 defaults={"minibatch": 1.0, "memory_pixel": 0.1, "memory_region": 0.1,
                           "contrast_temperature": 0.1, "contrast_kd_temperature": 1.0, "pixel_memory_size": 20000,
                           "region_memory_size": 2000, "pixel_contrast_size": 4096, "region_contrast_size": 1024,
                           "pooling": False, "minibatch_group": 0, "faithful_pixel_enqueue": True,
                           "feature": "feat"},
                 presets={"cirkd": {}, "voc": {"memory_pixel": 0.01, "memory_region": 0.01}},
                 weights=("minibatch", "memory_pixel", "memory_region"),
                 needs="`feature` of both (head for channels) and labels")
def cirkd(ctx, p):
    """Terms "cirkd.minibatch", "cirkd.memory_pixel", "cirkd.memory_region" (the memory computed once)."""
    terms, modules = [], {}
    feat = (f"s.{p.feature}", f"t.{p.feature}")
    if p.minibatch:
        relation = MiniBatchPixelRelation(p.contrast_temperature, pooling=p.pooling,
                                          group_size=p.minibatch_group or None)
        terms.append(term(ctx, "cirkd", "cirkd.minibatch", p.minibatch, relation, feat))
    if p.memory_pixel or p.memory_region:
        require(ctx, "cirkd", *feat)
        k = ctx.num_classes
        for kind in ("pixel", "region"):
            size, per_class = getattr(p, f"{kind}_memory_size"), per_class_contrast_size(
                getattr(p, f"{kind}_contrast_size"), k)
            if size < per_class:
                raise ValueError(f"{kind}_memory_size {size} is smaller than the {per_class} {kind} negatives per "
                                 f"class that {kind}_contrast_size asks for; raise the memory size")
        memory = modules["memory"] = MemoryContrast(
            k, p.pixel_memory_size, p.region_memory_size, per_class_contrast_size(p.region_contrast_size, k),
            per_class_contrast_size(p.pixel_contrast_size, k), p.contrast_kd_temperature, p.contrast_temperature,
            ctx.shape(feat[0])[0], ctx.shape(feat[1])[0], ctx.ignore_index, norm_layer=bn_layer(ctx),
            faithful_pixel_enqueue=p.faithful_pixel_enqueue).to(ctx.device)
        terms += pair_terms(ctx, "cirkd", memory, (*feat, "labels"),
                            [("cirkd.memory_pixel", p.memory_pixel), ("cirkd.memory_region", p.memory_region)])
    return Built(terms=terms, modules=modules)
