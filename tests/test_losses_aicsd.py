"""AICSD losses (specs/aicsd.md §4) against transcriptions of ``distiller.py`` / ``utils/loss.py`` and the
invariants of §10. Everything runs in float64 on tiny maps."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from common.losses.aicsd import (
    InterChannelCorrelation,
    InterClassSimilarity,
    SegmentationLoss,
    adaptive_weight,
    class_similarity_matrix,
    total_loss,
)
from common.losses.kd import PixelKL
from common.losses.skd import PairWise

D = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ---- transcriptions of the original (written from the spec, line by line) -------------------------------


def ref_lo_loss(s_out, t_out, num_classes, temperature=1.0):
    """``distiller.py`` lo_loss branch (§4.3.2), with ``range(21)`` -> ``range(num_classes)``, no ``.cuda()``
    and the matrices in the input dtype; without the λ factor."""
    b, c, h, w = s_out.shape
    s_logit = F.softmax(s_out / temperature, dim=2)
    t_logit = F.softmax(t_out / temperature, dim=2)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    iccs = torch.empty((num_classes, num_classes), dtype=s_out.dtype)
    icct = torch.empty((num_classes, num_classes), dtype=s_out.dtype)
    for i in range(num_classes):
        for j in range(i, num_classes):
            iccs[j, i] = iccs[i, j] = kl(s_logit[:, i], s_logit[:, j])
            icct[j, i] = icct[i, j] = kl(t_logit[:, i], t_logit[:, j])
    iccs = F.normalize(iccs, dim=1)
    icct = F.normalize(icct, dim=1)
    return (iccs - icct).pow(2).mean() / b


def ref_paper_matrix(logits):
    """§4.3.1: M[i, j] = KL(P_j ‖ P_i) with P_c the softmax over the flattened H·W, summed over b, / B."""
    b, c = logits.shape[:2]
    log_p = F.log_softmax(logits.reshape(b, c, -1), dim=2)
    m = torch.empty((c, c), dtype=logits.dtype)
    for i in range(c):
        for j in range(c):
            m[i, j] = F.kl_div(log_p[:, i], log_p[:, j], reduction="sum", log_target=True) / b
    return m


def ref_ce(logit, target, batch_average=True):
    """``SegmentationLosses.CrossEntropyLoss`` (§4.1) by hand: −log softmax at the label, mean over valid, / n."""
    n = logit.shape[0]
    valid = target != 255
    nll = -F.log_softmax(logit, dim=1).gather(1, target.clamp(max=logit.shape[1] - 1).unsqueeze(1)).squeeze(1)
    loss = nll[valid].sum() / valid.sum()
    return loss / n if batch_average else loss


def labels(b, c, h, w, seed=1):
    return torch.randint(0, c, (b, h, w), generator=torch.Generator().manual_seed(seed))


# ---- segmentation loss (§4.1, §10 "Segmentation CE") -----------------------------------------------------


def test_ce_is_valid_pixel_mean_divided_by_batch():
    z, y = randn(3, 4, 5, 6), labels(3, 4, 5, 6)
    y[0, :2] = 255
    torch.testing.assert_close(SegmentationLoss()(z, y), ref_ce(z, y), rtol=1e-12, atol=0)


def test_ce_duplicating_the_batch_halves_the_loss():
    z, y = randn(2, 3, 4, 4), labels(2, 3, 4, 4)
    single = SegmentationLoss()(z, y)
    double = SegmentationLoss()(torch.cat([z, z]), torch.cat([y, y]))
    torch.testing.assert_close(double, single / 2, rtol=1e-12, atol=0)


def test_ce_ignored_pixels_change_neither_value_nor_gradient():
    z, y = randn(2, 3, 4, 4).requires_grad_(), labels(2, 3, 4, 4)
    y[:, 0] = 255
    loss = SegmentationLoss()(z, y)
    loss.backward()
    assert torch.all(z.grad[:, :, 0] == 0)
    z2 = z.detach().clone()
    z2[:, :, 0] = 1e3 * randn(2, 3, 4, seed=5)
    torch.testing.assert_close(SegmentationLoss()(z2, y), loss.detach(), rtol=1e-12, atol=0)


def test_ce_all_ignored_is_zero_with_zero_gradient_not_nan():
    z = randn(2, 3, 4, 4).requires_grad_()
    loss = SegmentationLoss()(z, torch.full((2, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0)


def test_ce_batch_average_false_is_the_plain_mean():
    z, y = randn(3, 4, 5, 6), labels(3, 4, 5, 6)
    torch.testing.assert_close(SegmentationLoss(batch_average=False)(z, y), ref_ce(z, y, False), rtol=1e-12, atol=0)


def test_ce_class_weights_give_the_weighted_mean_over_valid_pixels():
    z, y = randn(2, 3, 4, 4), labels(2, 3, 4, 4)
    y[1, 1] = 255
    w = torch.tensor([0.5, 2.0, 3.0], dtype=D)
    valid = y != 255
    nll = -F.log_softmax(z, 1).gather(1, y.clamp(max=2).unsqueeze(1)).squeeze(1)
    expected = (w[y.clamp(max=2)] * nll)[valid].sum() / w[y.clamp(max=2)][valid].sum() / 2
    torch.testing.assert_close(SegmentationLoss(weight=w)(z, y), expected, rtol=1e-12, atol=0)


def test_focal_is_the_original_formula_on_the_mean_ce():
    z, y = randn(2, 3, 4, 4), labels(2, 3, 4, 4)
    mean_ce = ref_ce(z, y, batch_average=False)
    logpt = -mean_ce
    expected = -((1 - torch.exp(logpt)) ** 2) * (0.5 * logpt) / 2  # γ = 2, α = 0.5, / n (§4.1)
    torch.testing.assert_close(SegmentationLoss("focal")(z, y), expected, rtol=1e-12, atol=0)


def test_unknown_loss_type_is_a_user_error():
    with pytest.raises(ValueError, match="focal"):
        SegmentationLoss("dice")


# ---- pixel KD pi_loss = common.losses.kd.PixelKL (§4.2, §10 "Pixel KD") -------------------------------------


def test_pixel_kd_is_kl_summed_over_b_c_h_w_divided_by_bchw():
    zs, zt = randn(2, 5, 3, 4), randn(2, 5, 3, 4, seed=1)
    p_t = F.softmax(zt, 1)
    expected = (p_t * (torch.log(p_t) - F.log_softmax(zs, 1))).sum() / (2 * 5 * 3 * 4)
    torch.testing.assert_close(PixelKL()(zs, zt), expected, rtol=1e-12, atol=0)


def test_pixel_kd_is_zero_with_zero_gradient_for_equal_logits():
    z = randn(2, 5, 3, 4).requires_grad_()
    loss = PixelKL()(z, z.detach().clone())
    loss.backward()
    assert abs(loss.item()) < 1e-15 and z.grad.abs().max().item() < 1e-15


def test_pixel_kd_is_invariant_to_per_pixel_shifts_and_non_negative():
    zs, zt = randn(2, 5, 3, 4), randn(2, 5, 3, 4, seed=1)
    loss = PixelKL()(zs, zt)
    assert loss.item() > 0
    shifted = PixelKL()(zs + randn(2, 1, 3, 4, seed=2), zt + randn(2, 1, 3, 4, seed=3))
    torch.testing.assert_close(shifted, loss, rtol=1e-12, atol=0)


# ---- ICS, code mode (§4.3.2, §10 "ICS, code-faithful") -------------------------------------------------------


@pytest.mark.parametrize("num_classes", [21, 19])
def test_ics_code_equals_the_original_double_loop_values_and_gradients(num_classes):
    shape = (2, num_classes, 9, 7)
    zs, zt = (3 * randn(*shape)).requires_grad_(), 3 * randn(*shape, seed=1)
    ours = InterClassSimilarity(num_classes)(zs, zt)
    (grad_ours,) = torch.autograd.grad(ours, zs)
    ref = ref_lo_loss(zs, zt, num_classes)
    (grad_ref,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-16)


def test_ics_code_underflowing_softmax_keeps_the_value_and_gets_a_correct_gradient():
    zs = randn(1, 3, 4, 3)
    zs[0, 1, 0] = 2000.0  # softmax over H underflows to exact zeros in that class's other rows
    zs.requires_grad_()
    zt = randn(1, 3, 4, 3, seed=1)
    ref = ref_lo_loss(zs, zt, 3)
    assert not torch.isfinite(torch.autograd.grad(ref, zs)[0]).all()  # the original's gradient is NaN here
    ics = InterClassSimilarity(3)
    torch.testing.assert_close(ics(zs, zt), ref, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda z: ics(z, zt), (zs,))


def test_ics_code_matrix_is_symmetric_negative_with_nonzero_diagonal():
    m = class_similarity_matrix(randn(2, 6, 8, 5), mode="code")
    torch.testing.assert_close(m, m.t(), rtol=0, atol=0)
    assert (m < 0).all() and (m.diagonal() != 0).all()


def test_ics_code_matrix_of_uniform_513_logits_is_minus_w_log_h_minus_one():
    # zero logits: p = 1/H in every column, E_c = W·H·(1/H)·log(1/H) = −W·ln H, G_ij = W·H/H² = W/H = 1 (§4.3.2)
    m = class_similarity_matrix(torch.zeros(1, 2, 513, 513, dtype=D), mode="code")
    torch.testing.assert_close(m, torch.full((2, 2), -513 * math.log(513) - 1, dtype=D), rtol=1e-12, atol=0)


def test_ics_code_is_zero_for_equal_networks_and_positive_otherwise():
    z = randn(2, 5, 6, 4)
    assert InterClassSimilarity(5)(z, z.clone()).item() == 0.0
    assert InterClassSimilarity(5)(z, randn(2, 5, 6, 4, seed=1)).item() > 0


def test_ics_code_duplicating_the_batch_halves_the_loss():
    zs, zt = randn(2, 5, 6, 4), randn(2, 5, 6, 4, seed=1)
    single = InterClassSimilarity(5)(zs, zt)
    double = InterClassSimilarity(5)(torch.cat([zs, zs]), torch.cat([zt, zt]))
    torch.testing.assert_close(double, single / 2, rtol=1e-10, atol=0)


def test_ics_code_is_invariant_to_column_shifts_only():
    zs, zt = randn(2, 5, 6, 4), randn(2, 5, 6, 4, seed=1)
    ics = InterClassSimilarity(5)
    loss = ics(zs, zt)
    column = ics(zs + randn(2, 5, 1, 4, seed=2), zt)  # constant per (b, c, w): softmax over H absorbs it
    torch.testing.assert_close(column, loss, rtol=1e-10, atol=0)
    row = ics(zs + randn(2, 5, 6, 1, seed=3), zt)  # constant per (b, c, h)
    pixel = ics(zs + randn(2, 1, 6, 4, seed=4), zt)  # constant per pixel across classes
    assert abs(row.item() - loss.item()) > 1e-3 * loss.item()
    assert abs(pixel.item() - loss.item()) > 1e-3 * loss.item()


def test_ics_code_changes_when_the_class_order_of_both_networks_is_permuted():
    zs, zt = randn(2, 5, 6, 4), randn(2, 5, 6, 4, seed=1)
    perm = torch.tensor([4, 2, 0, 3, 1])
    ics = InterClassSimilarity(5)
    assert abs(ics(zs[:, perm], zt[:, perm]).item() - ics(zs, zt).item()) > 1e-3 * ics(zs, zt).item()


def test_ics_gradient_reaches_only_the_student():
    zs, zt = randn(1, 3, 5, 4).requires_grad_(), randn(1, 3, 5, 4, seed=1).requires_grad_()
    InterClassSimilarity(3)(zs, zt).backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0


def test_ics_float32_input_is_computed_in_float32_and_half_upcast():
    zs, zt = randn(1, 3, 5, 4).float(), randn(1, 3, 5, 4, seed=1).float()
    assert InterClassSimilarity(3)(zs, zt).dtype == torch.float32
    assert InterClassSimilarity(3)(zs.bfloat16(), zt.bfloat16()).dtype == torch.float32
    assert InterClassSimilarity(3)(zs.double(), zt.double()).dtype == torch.float64


def test_ics_under_cpu_autocast_keeps_float32_matmuls():
    zs, zt = randn(2, 5, 16, 16).float(), randn(2, 5, 16, 16, seed=1).float()
    ics, icc = InterClassSimilarity(5), InterChannelCorrelation()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ics_amp, icc_amp = ics(zs, zt), icc(zs, zt)
    torch.testing.assert_close(ics_amp, ics(zs, zt), rtol=1e-6, atol=0)
    torch.testing.assert_close(icc_amp, icc(zs, zt), rtol=1e-6, atol=0)


def test_ics_rejects_a_class_count_other_than_num_classes():
    with pytest.raises(ValueError, match="21"):
        InterClassSimilarity(21)(randn(1, 19, 4, 4), randn(1, 19, 4, 4))


def test_ics_unknown_mode_is_a_user_error():
    with pytest.raises(ValueError, match="paper"):
        InterClassSimilarity(21, mode="kl")


# ---- ICS, paper mode (§4.3.1, §10 "ICS, paper mode") ---------------------------------------------------------


def test_ics_paper_matrix_equals_the_pairwise_kl_loop():
    z = randn(2, 4, 5, 3)
    torch.testing.assert_close(class_similarity_matrix(z, mode="paper"), ref_paper_matrix(z), rtol=1e-10, atol=1e-13)


def test_ics_paper_matrix_has_zero_diagonal_is_non_negative_and_asymmetric():
    m = class_similarity_matrix(randn(2, 5, 6, 4), mode="paper")
    assert m.diagonal().abs().max().item() < 1e-12
    assert m.min().item() > -1e-12
    assert (m - m.t()).abs().max().item() > 1e-3


def test_ics_paper_is_invariant_to_per_map_shifts_and_equivariant_to_class_permutation():
    zs, zt = randn(2, 5, 6, 4), randn(2, 5, 6, 4, seed=1)
    ics = InterClassSimilarity(5, mode="paper")
    loss = ics(zs, zt)
    torch.testing.assert_close(ics(zs + randn(2, 5, 1, 1, seed=2), zt), loss, rtol=1e-10, atol=0)
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(ics(zs[:, perm], zt[:, perm]), loss, rtol=1e-10, atol=0)


# ---- ic_loss (§4.6.2) ------------------------------------------------------------------------------------


def test_channel_correlation_is_the_ickd_formula():
    zs, zt = randn(2, 4, 3, 5), randn(2, 4, 3, 5, seed=1)
    gs = torch.einsum("bcn,bdn->bcd", zs.reshape(2, 4, -1), zs.reshape(2, 4, -1))
    gt = torch.einsum("bcn,bdn->bcd", zt.reshape(2, 4, -1), zt.reshape(2, 4, -1))
    gs = gs / gs.norm(dim=2, keepdim=True)
    gt = gt / gt.norm(dim=2, keepdim=True)
    expected = ((gs - gt) ** 2).sum() / (4 * 2)
    torch.testing.assert_close(InterChannelCorrelation()(zs, zt), expected, rtol=1e-12, atol=0)


# ---- pa_loss = common.losses.skd.PairWise(scale=0.5) on ASPP features (§4.6.1, §10 "SKD pa_loss") -----------


def test_pair_wise_on_a_33x33_aspp_map_pools_to_9_nodes():
    fs, ft = randn(2, 8, 33, 33), randn(2, 8, 33, 33, seed=1)

    def sim(f):  # 16×16 max-pool, ceil mode: 33 -> 3 (§4.6.1); cosine with the detached norm + 1e-8
        f = F.max_pool2d(f, 16, 16, ceil_mode=True)
        assert f.shape[2:] == (3, 3)
        f = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)).reshape(2, 8, 9)
        return f.transpose(1, 2) @ f

    expected = ((sim(ft) - sim(fs)) ** 2).sum() / 81 / 2
    torch.testing.assert_close(PairWise(scale=0.5)(fs, ft).double(), expected, rtol=1e-5, atol=0)


# ---- ALW (§4.4, §10 "ALW") -------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch, alpha", [(0, 0.0), (60, 0.5), (119, 119 / 120), (120, 1.0)])
def test_adaptive_weight_is_epoch_over_120(epoch, alpha):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert adaptive_weight(epoch) == alpha


def test_adaptive_weight_warns_above_one():
    with pytest.warns(RuntimeWarning, match="> 1"):
        assert adaptive_weight(150) == 1.25


def test_adaptive_weight_reference_epochs():
    assert adaptive_weight(25, ref_epochs=50) == 0.5
    with pytest.raises(ValueError, match="ref-epochs"):
        adaptive_weight(3, ref_epochs=0)


def test_total_loss_without_alw_adds_ce_pa_kd_ics():
    assert total_loss(1.0, pa=2.0, kd=4.0, ics=8.0) == 15.0


def test_total_loss_with_alw_mixes_ce_ics_against_kd_and_drops_pa():
    assert total_loss(1.0, pa=2.0, kd=4.0, ics=8.0, alpha=0.0) == 4.0
    assert total_loss(1.0, pa=2.0, kd=4.0, ics=8.0, alpha=1.0) == 9.0
    assert total_loss(1.0, pa=2.0, kd=4.0, ics=8.0, alpha=0.25) == 0.25 * 9.0 + 0.75 * 4.0
