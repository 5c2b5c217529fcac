"""The catalogue's terms equal the paper trainers' losses configured by hand from the specs, on the same float64
tensors, with the specs' weights (issue 19 items 1, 2, 4); presets, parameter checks and pair refusals."""
import copy

import pytest
import torch

from common.errors import UserError
from common.losses.aicsd import InterClassSimilarity
from common.losses.at import AttentionTransfer
from common.losses.cirkd import MemoryContrast, MiniBatchPixelRelation
from common.losses.cwd import ChannelWiseDivergence
from common.losses.dsd import DSD
from common.losses.fitnet import FitNet
from common.losses.ifvd import IntraClassFeatureVariation
from common.losses.kd import LogitKD, PixelKL
from common.losses.skd import PairWise, PairWiseCos, PixelWise, PixelWiseKD
from common.methods import MethodContext, build_method, list_methods, method_info, method_params

K = 19


def context(s_feat=128, t_feat=512, side=65, t_side=None, crop=(512, 512), aux=True, steps_per_epoch=None,
            norm="batchnorm", ignore_index=255):
    """A pair described by its outputs (``(channels, h, w)``), as :func:`method_context` would."""
    t_side = side if t_side is None else t_side
    s = {"logits": (K, side, side), **({"aux": (K, side, side)} if aux else {}), "feat": (s_feat, side, side)}
    t = {"logits": (K, t_side, t_side), "aux": (K, t_side, t_side), "feat": (t_feat, t_side, t_side)}
    return MethodContext("student", "teacher", s, t, K, ignore_index, norm, 100, steps_per_epoch, crop)


def maps(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


def labels(side, seed=1, ignore=255):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (2, side * 8, side * 8), generator=g)
    y[:, :4] = ignore
    return y


def by_name(parts):
    return {t.name: t for t in parts.terms}


def test_the_catalogue_lists_the_issues_methods():
    assert list_methods() == ["aicsd", "at", "cirkd", "cwd", "dsd", "fitnet", "ifvd", "kd", "none", "skd"]
    paper, spec, weights, _ = method_info("cirkd")
    assert "CVPR 2022" in paper and "cirkd.md" in spec
    assert weights == ("minibatch", "memory_pixel", "memory_region")


def test_kd_forms_and_weights():
    """CIRKD's KD: T²·KL per pixel, weight 1, T 1 (cirkd.md §3.2); IFVD/CWD: legacy-mean PixelKL ×10 (ifvd_skd.md
    §A.4.2, cwd.md §5.4)."""
    zs, zt = maps((2, K, 9, 9), (2, K, 9, 9))
    (kd,) = build_method("kd", context()).terms
    assert (kd.name, kd.weight, kd.inputs) == ("kd", 1.0, ("s.logits", "t.logits"))
    torch.testing.assert_close(kd.fn(zs, zt), LogitKD(1.0)(zs, zt), rtol=1e-12, atol=0)
    (kd,) = build_method("kd", context(), preset="ifvd").terms
    assert kd.weight == 10.0
    torch.testing.assert_close(kd.fn(zs, zt), PixelKL(1.0)(zs, zt), rtol=1e-12, atol=0)
    (kd,) = build_method("kd", context(), temperature=2.0).terms
    torch.testing.assert_close(kd.fn(zs, zt), LogitKD(2.0)(zs, zt), rtol=1e-12, atol=0)


def test_skd_journal_cirkd_cvpr19_and_aicsd_variants():
    zs, zt, fs, ft = maps((2, K, 65, 65), (2, K, 65, 65), (2, 16, 65, 65), (2, 32, 65, 65))
    parts = build_method("skd", context(s_feat=16, t_feat=32))
    terms = by_name(parts)
    # journal code: 10·pixel-wise, 1·pair-wise (pool scale 0.5), λ_d = 0.1 for G and D, SGD D (ifvd_skd.md §B.6)
    assert (terms["skd.pixel"].weight, terms["skd.pair"].weight) == (10.0, 1.0)
    torch.testing.assert_close(terms["skd.pixel"].fn(zs, zt), PixelWise()(zs, zt), rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["skd.pair"].fn(fs, ft), PairWise(scale=0.5)(fs, ft), rtol=1e-12, atol=0)
    adv = parts.adversary
    assert (adv.adv_type, adv.lambda_adv, adv.lambda_d, adv.lambda_gp, adv.order, adv.poly) == \
        ("wgan-gp", 0.1, 0.1, 10.0, "teacher_first", True)
    group = adv.optimizer.param_groups[0]
    assert isinstance(adv.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (4e-4, 0.9, 5e-4)

    # CIRKD's baseline (cirkd.md §3.6-§3.7): 10·pair-wise 2x2 max-pool, l2 norm; hinge D 0.001/0.1, Adam, constant
    parts = build_method("skd", context(s_feat=16, t_feat=32), preset="cirkd")
    (pair,) = parts.terms
    assert (pair.name, pair.weight) == ("skd.pair", 10.0)
    expected = PairWise(pool_size=2, normalize="l2", detach_teacher=True)(fs, ft)
    torch.testing.assert_close(pair.fn(fs, ft), expected, rtol=1e-12, atol=0)
    adv = parts.adversary
    assert (adv.adv_type, adv.lambda_adv, adv.lambda_d, adv.order, adv.poly) == \
        ("hinge", 0.001, 0.1, "student_first", False)
    assert isinstance(adv.optimizer, torch.optim.Adam)
    assert adv.optimizer.param_groups[0]["betas"] == (0.9, 0.99)

    # the conference code (skd_cvpr19.md §8): x8-upsampled KD of a stride-8 student, CriterionSDcos
    esp = context(side=45, crop=(360, 360), aux=False)
    terms = by_name(build_method("skd", esp, preset="cvpr19"))
    zs, zt, fs, ft = maps((2, K, 45, 45), (2, K, 45, 45), (2, 16, 45, 45), (2, 32, 45, 45))
    expected = PixelWiseKD(upsample=True, upsample_teacher=True)(zs, zt)
    torch.testing.assert_close(terms["skd.pixel"].fn(zs, zt), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["skd.pair"].fn(fs, ft), PairWiseCos("softmax")(fs, ft), rtol=1e-12, atol=0)

    # AICSD's pa_loss (aicsd.md §4.6.1): the journal pair-wise loss on "aspp", nothing else
    aspp = context()
    aspp.student_outputs["aspp"], aspp.teacher_outputs["aspp"] = (256, 33, 33), (256, 33, 33)
    parts = build_method("skd", aspp, preset="aicsd")
    assert [(t.name, t.weight, t.inputs) for t in parts.terms] == [("skd.pair", 1.0, ("s.aspp", "t.aspp"))]
    assert parts.adversary is None


def test_ifvd_values_weights_and_ignore_index():
    fs, ft = maps((2, 128, 9, 9), (2, 512, 9, 9))
    y = labels(9, ignore=255)
    parts = build_method("ifvd", context(side=65))
    (ifv,) = parts.terms
    assert (ifv.name, ifv.weight, ifv.inputs) == ("ifvd", 200.0, ("s.feat", "t.feat", "labels"))
    torch.testing.assert_close(ifv.fn(fs, ft, y), IntraClassFeatureVariation(K, 255)(fs, ft, y), rtol=1e-12, atol=0)
    adv = parts.adversary  # IFVD (ifvd_skd.md §A.6, §C.4): WGAN-GP, Adam 4e-4 poly, student first, 0.001 / 0.1
    assert (adv.adv_type, adv.lambda_adv, adv.lambda_d, adv.order, adv.poly) == \
        ("wgan-gp", 0.001, 0.1, "student_first", True)
    y = labels(9, ignore=-1)
    (ifv,) = build_method("ifvd", context(ignore_index=-1), preset="cirkd").terms
    assert ifv.weight == 20.0
    torch.testing.assert_close(ifv.fn(fs, ft, y), IntraClassFeatureVariation(K, -1)(fs, ft, y), rtol=1e-12, atol=0)


def test_cwd_paper_and_cirkd_adapters():
    zs, zt, fs, ft = maps((2, K, 9, 9), (2, K, 9, 9), (2, 128, 9, 9), (2, 512, 9, 9))
    parts = build_method("cwd", context(side=9))
    (cwd,) = parts.terms  # the documented run (cwd.md §3.1): channel, kl, λ 3, τ 4 on the logits, no D
    assert (cwd.name, cwd.weight, parts.adversary) == ("cwd.logits", 3.0, None)
    torch.testing.assert_close(cwd.fn(zs, zt), ChannelWiseDivergence("channel", "kl", 4.0)(zs, zt), rtol=1e-12,
                               atol=0)

    assert (method_params("cwd")["cirkd"]["adv"], method_params("cwd")["cirkd"]["d"]) == (0.001, 0.1)
    # cirkd.md §3.6: 50·feat + 3·logits, one instance (its discriminator needs 64x64 logits: off here)
    parts = build_method("cwd", context(side=9), preset="cirkd", adv=0, d=0)
    feat, logits = parts.terms
    assert [(t.name, t.weight) for t in parts.terms] == [("cwd.feat", 50.0), ("cwd.logits", 3.0)]
    hand = ChannelWiseDivergence("channel", "kl", 4.0, s_channels=128, t_channels=512).double()
    hand.load_state_dict(parts.modules["cwd"].state_dict())
    parts.modules["cwd"].double()
    torch.testing.assert_close(feat.fn(fs, ft), hand(fs, ft), rtol=1e-12, atol=0)
    torch.testing.assert_close(logits.fn(zs, zt), hand(zs, zt), rtol=1e-12, atol=0)

    parts = build_method("cwd", context(side=9), feat=1.0, logits=0.0)  # the CWD code's --cwd-feat adapter
    (feat,) = parts.terms
    adapter = parts.modules["adapter"].double().eval()
    expected = ChannelWiseDivergence("channel", "kl", 4.0)(adapter(fs), ft)
    torch.testing.assert_close(feat.fn(fs, ft), expected, rtol=1e-12, atol=0)


def test_at_fitnet_dsd_weights_and_values():
    fs, ft, zs, zt, a_s, a_t = maps((2, 128, 9, 9), (2, 512, 9, 9), (2, K, 9, 9), (2, K, 9, 9), (2, K, 9, 9),
                                    (2, K, 9, 9))
    (at,) = build_method("at", context()).terms  # cirkd.md §3.6: AT 10000, FitNet 10, DSD 1000 / 10
    assert at.weight == 10000.0
    torch.testing.assert_close(at.fn(fs, ft), AttentionTransfer()(fs, ft), rtol=1e-12, atol=0)

    parts = build_method("fitnet", context())
    (fit,) = parts.terms
    assert fit.weight == 10.0
    hand = FitNet(128, 512).double()
    hand.load_state_dict(parts.modules["fitnet"].state_dict())
    parts.modules["fitnet"].double()
    torch.testing.assert_close(fit.fn(fs, ft), hand(fs, ft), rtol=1e-12, atol=0)

    psd, csd = build_method("dsd", context()).terms
    assert [(t.name, t.weight) for t in (psd, csd)] == [("dsd.psd", 1000.0), ("dsd.csd", 10.0)]
    assert psd.inputs == ("s.aux", "s.feat", "s.logits", "t.aux", "t.feat", "t.logits")
    expected = DSD(4.0)(a_s, fs, zs, a_t, ft, zt)
    torch.testing.assert_close(psd.fn(a_s, fs, zs, a_t, ft, zt), expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(csd.fn(a_s, fs, zs, a_t, ft, zt), expected[1], rtol=1e-12, atol=0)
    (psd, _) = build_method("dsd", context(aux=False)).terms  # a mobile student: out[-2] is its logits (§8.15)
    assert psd.inputs[:3] == ("s.logits", "s.feat", "s.logits")


def test_cirkd_relation_and_memory():
    fs, ft = maps((2, 128, 9, 9), (2, 256, 9, 9))
    y = labels(9, ignore=-1)
    small = {"pixel_memory_size": 64, "region_memory_size": 16, "pixel_contrast_size": 100,
             "region_contrast_size": 50}
    parts = build_method("cirkd", context(t_feat=256, side=9, ignore_index=-1), **small)
    mb, mp, mr = parts.terms  # cirkd.md §3.5: 1·mini-batch, 0.1·memory p2p, 0.1·memory p2r
    assert [(t.name, t.weight) for t in parts.terms] == [("cirkd.minibatch", 1.0), ("cirkd.memory_pixel", 0.1),
                                                           ("cirkd.memory_region", 0.1)]
    torch.testing.assert_close(mb.fn(fs, ft), MiniBatchPixelRelation(0.1)(fs, ft), rtol=1e-12, atol=0)
    memory = parts.modules["memory"].double()
    hand = MemoryContrast(K, 64, 16, 50 // K + 1, 100 // K + 1, 1.0, 0.1, 128, 256, -1).double()
    hand.load_state_dict(copy.deepcopy(memory.state_dict()))
    assert (memory.pixel_contrast_size, memory.region_contrast_size, memory.faithful_pixel_enqueue) == (6, 3, True)
    torch.manual_seed(5)
    got = mp.fn(fs, ft, y), mr.fn(fs, ft, y)
    torch.manual_seed(5)
    expected = hand(fs, ft, y)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert build_method("cirkd", context(t_feat=256), preset="voc", **small).terms[1].weight == 0.01


def test_aicsd_alw_weights_and_the_ic_quirk():
    zs, zt = maps((2, K, 17, 17), (2, K, 17, 17))
    parts = build_method("aicsd", context(side=17, steps_per_epoch=5), ic=3.0)
    kd, ics, ic = parts.terms
    # aicsd.md §4.4: α = epoch/120; α·(CE + 9500·ICS) + (1 − α)·10·KD; step 12 of 5 per epoch is epoch 2
    assert parts.task_weight(12) == 2 / 120
    assert kd.weight(12) == pytest.approx((1 - 2 / 120) * 10, rel=1e-15)
    assert ics.weight(12) == pytest.approx(2 / 120 * 9500, rel=1e-15)
    assert kd.weight(4) == 10.0 and ics.weight(4) == 0.0
    torch.testing.assert_close(kd.fn(zs, zt), PixelKL(1.0)(zs, zt), rtol=1e-12, atol=0)
    torch.testing.assert_close(ics.fn(zs, zt), InterClassSimilarity(K, 1.0, "code")(zs, zt), rtol=1e-12, atol=0)
    assert (ic.weight, ic.log_weighted) == (0.0, False)  # computed and logged, never added (§4.6.2)
    parts = build_method("aicsd", context(), preset="icsd")
    assert [(t.name, t.weight) for t in parts.terms] == [("aicsd.ics", 9500.0)] and parts.task_weight is None
    with pytest.raises(UserError, match="steps per epoch"):
        build_method("aicsd", context())


def test_combination_qualified_names_and_params():
    parts = build_method("kd+cwd", context(side=9), **{"cwd.logits": 2.0, "kd.temperature": 1.0})
    assert [(t.name, t.weight) for t in parts.terms] == [("kd", 1.0), ("cwd.logits", 2.0)]
    assert parts.params["cwd.logits"] == 2.0 and parts.params["preset"] == "default"
    parts = build_method("kd+cirkd", context(t_feat=256, side=9), preset="cirkd",
                         **{"cirkd.pixel_memory_size": 64, "cirkd.region_memory_size": 16,
                            "cirkd.pixel_contrast_size": 100, "cirkd.region_contrast_size": 50})
    assert [t.name for t in parts.terms][:2] == ["kd", "cirkd.minibatch"]
    assert build_method("kd", context(), weight=0.0).terms == []  # weight 0 builds nothing
    assert method_params("kd")["ifvd"]["weight"] == 10.0


@pytest.mark.parametrize("spec, kwargs, match", [
    ("kdx", {}, "unknown distillation method 'kdx'; choose one of: aicsd, at"),
    ("kd", {"alpha": 1.0}, "method 'kd' has no parameter 'alpha'; its parameters are"),
    ("kd", {"weight": float("nan")}, "kd.weight must be a finite, non-negative weight"),
    ("kd", {"weight": -1.0}, "kd.weight must be a finite, non-negative weight"),
    ("kd", {"form": "kl"}, "kd.form must be one of logit_kd, pixel_kl"),
    ("kd+cwd", {"logits": 1.0}, "must name its method in the combination kd\\+cwd"),
    ("kd", {"cwd.logits": 1.0}, "names method 'cwd', which is not in kd"),
    ("kd+kd", {}, "names a method twice"),
    ("skd+ifvd", {}, "asks for 2 discriminators"),
])
def test_bad_method_or_parameter_is_one_sentence(spec, kwargs, match):
    with pytest.raises(UserError, match=match):
        build_method(spec, context(), **kwargs)
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        build_method("kd", context(), preset="nope")


def test_a_pair_that_cannot_carry_the_method_is_refused_by_name():
    no_feat = MethodContext("espnet_c", "espnet", {"logits": (K, 8, 8), "feat": (256, 8, 8)},
                            {"logits": (K, 64, 64), "aspp": (256, 8, 8)}, K, 255, "batchnorm", 10, None, (64, 64))
    with pytest.raises(UserError, match="method 'ifvd' needs the output 'feat' of the teacher espnet, which has "
                                        "only logits, aspp"):
        build_method("ifvd", no_feat, adv=0, d=0)
    with pytest.raises(UserError, match="method 'skd': the discriminator needs logits of at least 64x64, but the "
                                        "student espnet_c gives 8x8"):
        build_method("skd", no_feat, pair=0)
    other_classes = context()
    other_classes.teacher_outputs["logits"] = (21, 65, 65)
    with pytest.raises(UserError, match="method 'kd' compares s.logits \\(19 channels\\) of the student student "
                                        "with t.logits \\(21 channels\\)"):
        build_method("kd", other_classes)
    with pytest.raises(UserError, match="method 'kd' needs a teacher"):
        build_method("kd", MethodContext("s", None, {"logits": (K, 8, 8)}, None, K, 255, "batchnorm", 1, None,
                                         (64, 64)))


def test_teacher_maps_of_another_size_are_resized_to_the_students():
    """The pair rule (common/methods/registry.py): bilinear, align_corners=False, to the student's size."""
    zs, zt = maps((2, K, 8, 8), (2, K, 16, 16))
    (kd,) = build_method("kd", context(side=8, t_side=16)).terms
    small = torch.nn.functional.interpolate(zt, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(kd.fn(zs, zt), LogitKD(1.0)(zs, small), rtol=1e-12, atol=0)
