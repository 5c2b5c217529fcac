"""CIRKD's KD, mini-batch pixel relation and memory contrast losses against line-by-line transcriptions of the
original code (specs/cirkd.md §3.2-§3.4, float64, values and gradients) and the invariants of §9."""
import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from common.losses.cirkd import MemoryContrast, MiniBatchPixelRelation, per_class_contrast_size
from common.losses.kd import LogitKD
from tests.helpers_dist import free_port

# ---- transcriptions of the original (losses/loss.py, losses/memory_loss.py at 7e0d21f), CPU instead of .cuda()


def ref_kd(pred, soft, temperature=1.0):
    """``CriterionKD.forward``."""
    _, c, _, _ = soft.size()
    scale_pred = pred.permute(0, 2, 3, 1).contiguous().view(-1, c)
    scale_soft = soft.permute(0, 2, 3, 1).contiguous().view(-1, c)
    p_s = F.log_softmax(scale_pred / temperature, dim=1)
    p_t = F.softmax(scale_soft / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * (temperature ** 2)


def ref_pair_wise_sim_map(fea_0, fea_1):
    c = fea_0.size(0)
    fea_0 = fea_0.reshape(c, -1).transpose(0, 1)
    fea_1 = fea_1.reshape(c, -1).transpose(0, 1)
    return torch.mm(fea_0, fea_1.transpose(0, 1))


def ref_minibatch(feat_s, feat_t, temperature, pooling=False):
    """``CriterionMiniBatchCrossImagePair.forward`` (with the May-2022 pooling lines when ``pooling``)."""
    b = feat_s.size(0)
    if pooling:
        avgpool = nn.AvgPool2d(kernel_size=(2, 2), stride=(2, 2), padding=0, ceil_mode=True)
        feat_s = avgpool(feat_s)
        feat_t = avgpool(feat_t)
    feat_s = F.normalize(feat_s, p=2, dim=1)
    feat_t = F.normalize(feat_t, p=2, dim=1)
    sim_dis = torch.tensor(0.0, dtype=feat_s.dtype)
    for i in range(b):
        for j in range(b):
            s_sim_map = ref_pair_wise_sim_map(feat_s[i], feat_s[j])
            t_sim_map = ref_pair_wise_sim_map(feat_t[i], feat_t[j])
            p_s = F.log_softmax(s_sim_map / temperature, dim=1)
            p_t = F.softmax(t_sim_map / temperature, dim=1)
            sim_dis = sim_dis + F.kl_div(p_s, p_t, reduction="batchmean")
    return sim_dis / (b * b)


def ref_enqueue(q, keys, labels, ignore, faithful=True):
    """``StudentSegContrast._dequeue_and_enqueue`` for one process; ``q`` holds the four buffers (updated in
    place). ``faithful=False`` indexes the class-c pixels (``idxs[perm[:K]]``) instead of positions 0..n-1."""
    segment_queue, pixel_queue = q["teacher_segment_queue"], q["teacher_pixel_queue"]
    region_size, pixel_size = segment_queue.shape[1], pixel_queue.shape[1]
    batch_size, feat_dim, _, _ = keys.size()
    for bs in range(batch_size):
        this_feat = keys[bs].contiguous().view(feat_dim, -1)
        this_label = labels[bs].contiguous().view(-1)
        this_label_ids = torch.unique(this_label)
        this_label_ids = [x for x in this_label_ids if x != ignore]
        for lb in this_label_ids:
            idxs = (this_label == lb).nonzero()
            lb = int(lb.item())
            feat = torch.mean(this_feat[:, idxs], dim=1).squeeze(1)
            ptr = int(q["segment_queue_ptr"][lb])
            segment_queue[lb, ptr, :] = F.normalize(feat.view(-1), p=2, dim=0)
            q["segment_queue_ptr"][lb] = (q["segment_queue_ptr"][lb] + 1) % region_size
            num_pixel = idxs.shape[0]
            perm = torch.randperm(num_pixel)
            k = min(num_pixel, 16)
            feat = this_feat[:, perm[:k]] if faithful else this_feat[:, idxs[perm[:k]].squeeze(1)]
            feat = torch.transpose(feat, 0, 1)
            ptr = int(q["pixel_queue_ptr"][lb])
            if ptr + k >= pixel_size:
                pixel_queue[lb, -k:, :] = F.normalize(feat, p=2, dim=1)
                q["pixel_queue_ptr"][lb] = 0
            else:
                pixel_queue[lb, ptr:ptr + k, :] = F.normalize(feat, p=2, dim=1)
                q["pixel_queue_ptr"][lb] = (q["pixel_queue_ptr"][lb] + k) % pixel_size


def ref_sample_negative(queue, index):
    class_num, _, feat_size = queue.shape
    contrast_size = index.size(0)
    x = torch.zeros((class_num * contrast_size, feat_size), dtype=queue.dtype)
    sample_ptr = 0
    for ii in range(class_num):
        x[sample_ptr:sample_ptr + contrast_size, ...] = queue[ii, index, :]
        sample_ptr += contrast_size
    return x


def ref_contrast_sim_kd(s_logits, t_logits, tc):
    p_s = F.log_softmax(s_logits / tc, dim=1)
    p_t = F.softmax(t_logits / tc, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * tc ** 2


def ref_memory(head, q, s_feats, t_feats, labels, m_p, m_r, tc, tau, ignore, faithful=True):
    """``StudentSegContrast.forward``; ``q`` holds the buffers (updated in place)."""
    t_feats = t_feats.detach()
    s_feats = F.normalize(head(s_feats), p=2, dim=1)
    t_feats = F.normalize(t_feats, p=2, dim=1)
    labels = labels.unsqueeze(1).float().clone()
    labels = F.interpolate(labels, (s_feats.shape[2], s_feats.shape[3]), mode="nearest").squeeze(1).long()
    ori_t_fea, ori_labels = t_feats, labels
    labels = labels.contiguous().view(-1)
    idxs = labels != ignore
    s_feats = s_feats.permute(0, 2, 3, 1).contiguous().view(-1, s_feats.shape[1])[idxs, :]
    t_feats = t_feats.permute(0, 2, 3, 1).contiguous().view(-1, t_feats.shape[1])[idxs, :]
    ref_enqueue(q, ori_t_fea.detach().clone(), ori_labels.detach().clone(), ignore, faithful)
    if idxs.sum() == 0:
        return 0.0 * (s_feats ** 2).mean(), 0.0 * (s_feats ** 2).mean()
    pixel_index = torch.randperm(q["teacher_pixel_queue"].shape[1])[:m_p]
    t_x_pixel = ref_sample_negative(q["teacher_pixel_queue"], pixel_index)
    t_pixel_logits = torch.div(torch.mm(t_feats, t_x_pixel.T), tau)
    s_pixel_logits = torch.div(torch.mm(s_feats, t_x_pixel.T), tau)
    region_index = torch.randperm(q["teacher_segment_queue"].shape[1])[:m_r]
    t_x_region = ref_sample_negative(q["teacher_segment_queue"], region_index)
    t_region_logits = torch.div(torch.mm(t_feats, t_x_region.T), tau)
    s_region_logits = torch.div(torch.mm(s_feats, t_x_region.T), tau)
    return (ref_contrast_sim_kd(s_pixel_logits, t_pixel_logits.detach(), tc),
            ref_contrast_sim_kd(s_region_logits, t_region_logits.detach(), tc))


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers() if not k.startswith("project_head")}


def make_memory(num_classes=4, pixel_memory=64, region_memory=8, m_r=100, m_p=100, s_ch=3, t_ch=6, tc=1.0,
                tau=0.1, **kw):
    torch.manual_seed(0)
    return MemoryContrast(num_classes, pixel_memory, region_memory, m_r, m_p, tc, tau, s_ch, t_ch, -1, **kw).double()


def memory_inputs(images=3, h=4, w=5, s_ch=3, t_ch=6, num_classes=4, seed=1, label_scale=2):
    """Embeddings at h×w and labels at (label_scale·h)×(label_scale·w) with ignored pixels; every (image,
    class) has at most 16 pixels at h×w, so the original selects all of them (a deterministic set)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(images, s_ch, h, w, generator=g, dtype=torch.float64)
    t = torch.randn(images, t_ch, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, num_classes, (images, h * label_scale, w * label_scale), generator=g)
    return s, t, labels


def small_labels(labels, h, w):
    """Legacy nearest downsampling, written out: row ``floor(i·H/h)``, column ``floor(j·W/w)``."""
    rows = [i * labels.shape[1] // h for i in range(h)]
    cols = [j * labels.shape[2] // w for j in range(w)]
    return labels[:, rows][:, :, cols]


def sorted_rows(x):
    return x[torch.argsort(x[:, 0])]


# ---- logit KD (§3.2)


def test_logit_kd_matches_transcription_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    for temperature in (1.0, 4.0):
        ours = LogitKD(temperature)(s, t)
        ref = ref_kd(s, t, temperature)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0],
                                   rtol=1e-10, atol=1e-15)


def test_logit_kd_zero_for_identical_and_per_pixel_shifted_logits():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 19, 4, 4, generator=g, dtype=torch.float64)
    shift = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) * 5
    assert LogitKD()(z, z).item() == 0.0
    assert abs(LogitKD()(z + shift, z).item()) < 1e-14
    assert LogitKD()(torch.randn(2, 19, 4, 4, generator=g), z.float()).item() > 0


def test_logit_kd_tends_to_the_t_squared_limit():
    # softmax(z/T) ≈ (1 + (z - z̄)/T)/K for large T, so T²·KL → Σ_c (d_c - d̄)² / (2K) with d = z_t - z_s
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 4, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(1, 4, 2, 3, generator=g, dtype=torch.float64)
    d = t - s
    limit = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).mean() / (2 * 4)
    assert LogitKD(1000.0)(s, t).item() == pytest.approx(limit.item(), rel=1e-3)


# ---- mini-batch pixel-to-pixel relation (§3.3)


@pytest.mark.parametrize("pooling", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 4, 10])
def test_minibatch_matches_transcription_values_and_gradients(pooling, chunk_rows):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 8, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 16, 5, 7, generator=g, dtype=torch.float64)
    ours = MiniBatchPixelRelation(0.1, pooling, chunk_rows=chunk_rows)(s, t)
    ref = ref_minibatch(s, t, 0.1, pooling)
    assert ours.dim() == 0 and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0],
                               rtol=1e-9, atol=1e-15)


def test_minibatch_pooling_is_a_ceil_mode_2x2_average():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    pooled_s = torch.stack([torch.stack([s[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3)) for j in range(4)], -1)
                            for i in range(3)], -2)  # windows clipped at the border: 5×7 → 3×4
    pooled_t = torch.stack([torch.stack([t[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3)) for j in range(4)], -1)
                            for i in range(3)], -2)
    assert pooled_s.shape[2:] == (3, 4)
    torch.testing.assert_close(MiniBatchPixelRelation(0.1, pooling=True)(s, t),
                               MiniBatchPixelRelation(0.1)(pooled_s, pooled_t), rtol=1e-12, atol=1e-14)


def test_minibatch_zero_when_student_is_a_positive_per_pixel_rescaling():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)
    scale = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64) + 0.1
    assert abs(MiniBatchPixelRelation()(t * scale, t).item()) < 1e-12


def test_minibatch_invariant_to_per_pixel_scaling_and_joint_permutations():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 4, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randn(3, 6, 3, 4, generator=g, dtype=torch.float64)
    loss = MiniBatchPixelRelation()
    base = loss(s, t).item()
    assert base > 0
    scale = torch.rand(3, 1, 3, 4, generator=g, dtype=torch.float64) + 0.5
    assert loss(s * scale, t).item() == pytest.approx(base, rel=1e-12)
    assert loss(s, t * scale).item() == pytest.approx(base, rel=1e-12)
    images = torch.tensor([2, 0, 1])
    assert loss(s[images], t[images]).item() == pytest.approx(base, rel=1e-12)
    pixels = torch.randperm(12, generator=g)
    perm_s = s.flatten(2)[:, :, pixels].view_as(s)
    perm_t = t.flatten(2)[:, :, pixels].view_as(t)
    assert loss(perm_s, perm_t).item() == pytest.approx(base, rel=1e-12)


def test_minibatch_single_image_is_the_intra_image_relation():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(1, 5, 2, 3, generator=g, dtype=torch.float64)
    fs, ft = F.normalize(s, dim=1).view(3, 6), F.normalize(t, dim=1).view(5, 6)
    p = F.softmax(ft.T @ ft / 0.1, dim=1)
    q = F.softmax(fs.T @ fs / 0.1, dim=1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert MiniBatchPixelRelation(0.1)(s, t).item() == pytest.approx(expected.item(), rel=1e-12)


def test_minibatch_gradient_reaches_the_student_only():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 6, 3, 3, requires_grad=True)
    MiniBatchPixelRelation()(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_minibatch_half_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    value = MiniBatchPixelRelation()(s.bfloat16(), t.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(MiniBatchPixelRelation()(s.bfloat16().float(), t.bfloat16().float()).item(),
                                         rel=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_minibatch_groups_of_2_are_the_originals_8_gpus(chunk_rows):
    # §3.3, §6: the paper's 16 images as 8 GPUs × 2; each rank's loss is the transcription on its own 2 images and
    # DDP averages the gradients, so one process must give the mean of the 8 losses and its gradient
    g = torch.Generator().manual_seed(9)
    s = torch.randn(16, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(16, 5, 3, 4, generator=g, dtype=torch.float64)
    ours = MiniBatchPixelRelation(0.1, chunk_rows=chunk_rows, group_size=2)(s, t)
    per_gpu = [ref_minibatch(s[2 * r:2 * r + 2], t[2 * r:2 * r + 2], 0.1) for r in range(8)]
    expected = sum(per_gpu) / 8
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(expected, s)[0],
                               rtol=1e-9, atol=1e-15)
    whole = ref_minibatch(s, t, 0.1)
    assert abs(ours.item() - whole.item()) > 1e-3 * whole.item()  # the 16-image relation is another loss


def test_minibatch_group_of_the_whole_batch_is_the_default():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(4, 3, 3, 4, generator=g), torch.randn(4, 5, 3, 4, generator=g)
    assert torch.equal(MiniBatchPixelRelation(0.1, group_size=4)(s, t), MiniBatchPixelRelation(0.1)(s, t))


def test_minibatch_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        MiniBatchPixelRelation(0.0)
    with pytest.raises(ValueError, match="group size"):
        MiniBatchPixelRelation(group_size=0)
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        MiniBatchPixelRelation(group_size=4)(torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="same batch and spatial size"):
        MiniBatchPixelRelation()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 4))


# ---- memory contrast (§3.4)


def test_per_class_contrast_sizes_of_the_scripts():
    # §3.4: Cityscapes 216 / 54 (4104 and 1026 negatives), VOC 196 / 49, CamVid 373 / 94
    assert (per_class_contrast_size(4096, 19), per_class_contrast_size(1024, 19)) == (216, 54)
    assert (19 * per_class_contrast_size(4096, 19), 19 * per_class_contrast_size(1024, 19)) == (4104, 1026)
    assert (per_class_contrast_size(4096, 21), per_class_contrast_size(1024, 21)) == (196, 49)
    assert (per_class_contrast_size(4096, 11), per_class_contrast_size(1024, 11)) == (373, 94)


def test_memory_construction_buffers_and_keys():
    module = MemoryContrast(19, 200, 20, 54, 216, 1.0, 0.1, 8, 16, -1)
    assert list(module.state_dict()) == [  # a module's own buffers come before its children's entries
        "teacher_segment_queue", "segment_queue_ptr", "teacher_pixel_queue", "pixel_queue_ptr",
        "project_head.0.weight", "project_head.1.weight", "project_head.1.bias", "project_head.1.running_mean",
        "project_head.1.running_var", "project_head.1.num_batches_tracked", "project_head.3.weight"]
    assert module.teacher_pixel_queue.shape == (19, 200, 16) and module.teacher_segment_queue.shape == (19, 20, 16)
    for queue in (module.teacher_pixel_queue, module.teacher_segment_queue):
        torch.testing.assert_close(queue.norm(dim=2), torch.ones(queue.shape[:2]))
    assert module.pixel_queue_ptr.tolist() == [0] * 19 and module.segment_queue_ptr.tolist() == [0] * 19
    assert isinstance(module.project_head[1], nn.BatchNorm2d)
    assert module.project_head[0].bias is None and module.project_head[3].bias is None
    assert sum(p.numel() for p in module.parameters()) == 8 * 16 + 2 * 16 + 16 * 16


def test_memory_negatives_are_k_times_m_class_major():
    module = MemoryContrast(19, 300, 60, 54, 216, 1.0, 0.1, 4, 8, -1)
    torch.manual_seed(0)
    pixel = module._sample_negatives(module.teacher_pixel_queue, 216)
    region = module._sample_negatives(module.teacher_segment_queue, 54)
    assert pixel.shape == (4104, 8) and region.shape == (1026, 8)
    torch.manual_seed(0)
    index = torch.randperm(300)[:216]
    torch.testing.assert_close(pixel[216 * 5:216 * 6], module.teacher_pixel_queue[5, index])


def test_memory_one_step_pointers_and_queue_contents():
    module = make_memory(pixel_memory=64, region_memory=8)
    before = buffers(module)
    s, t, labels = memory_inputs()
    module(s, t, labels)
    small = small_labels(labels, 4, 5)
    z_t = F.normalize(t, dim=1)
    for c in range(4):
        images = [i for i in range(3) if (small[i] == c).any()]
        counts = [int((small[i] == c).sum()) for i in images]
        assert module.segment_queue_ptr[c].item() == len(images) % 8
        assert module.pixel_queue_ptr[c].item() == sum(min(n, 16) for n in counts) % 64
        for slot, i in enumerate(images):  # region r of this step = normalised mean of the image's class-c z_t
            mean = z_t[i][:, small[i] == c].mean(1)
            torch.testing.assert_close(module.teacher_segment_queue[c, slot], mean / mean.norm(), rtol=1e-12,
                                       atol=1e-14)
        torch.testing.assert_close(module.teacher_segment_queue[c, len(images):], before["teacher_segment_queue"][
            c, len(images):], rtol=0, atol=0)
        # faithful defect: the n picks of image i are raster positions 0..n-1, whatever their class
        expected = torch.cat([z_t[i].flatten(1)[:, :n].T for i, n in zip(images, counts)])
        written = module.teacher_pixel_queue[c, :sum(counts)]
        offset = 0
        for n in counts:
            block = slice(offset, offset + n)
            torch.testing.assert_close(sorted_rows(written[block]), sorted_rows(expected[block]),
                                       rtol=1e-12, atol=1e-14)
            offset += n
        torch.testing.assert_close(written.norm(dim=1), torch.ones(sum(counts), dtype=torch.float64))


def test_memory_fixed_enqueue_takes_pixels_of_the_class():
    module = make_memory(faithful_pixel_enqueue=False)
    s, t, labels = memory_inputs()
    module(s, t, labels)
    small = small_labels(labels, 4, 5)
    z_t = F.normalize(t, dim=1)
    for c in range(4):
        expected = torch.cat([z_t[i][:, small[i] == c].T for i in range(3)])
        written = module.teacher_pixel_queue[c, :expected.shape[0]]
        torch.testing.assert_close(sorted_rows(written), sorted_rows(expected), rtol=1e-12, atol=1e-14)


def test_memory_enqueue_takes_at_most_16_random_pixels_per_image_and_class():
    module = make_memory(num_classes=2, pixel_memory=200, faithful_pixel_enqueue=False)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[1, :, :2] = 1  # image 0: 36 pixels of class 0; image 1: 24 of class 0, 12 of class 1
    t = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    module(torch.randn(2, 3, 6, 6, dtype=torch.float64), t, labels)
    assert module.pixel_queue_ptr.tolist() == [32, 12]
    z_t = F.normalize(t, dim=1).flatten(2)
    first = module.teacher_pixel_queue[0, :16]
    distances = torch.cdist(first, z_t[0].T)  # each written row is one distinct pixel of image 0
    assert (distances.min(1).values < 1e-6).all() and distances.argmin(1).unique().numel() == 16


def test_memory_pixel_overflow_writes_the_last_k_slots_and_resets():
    module = make_memory(num_classes=2, pixel_memory=16, region_memory=8)
    module.pixel_queue_ptr.copy_(torch.tensor([14, 15]))
    labels = torch.full((2, 2, 2), -1)
    labels[0, 0, :] = 0
    labels[0, 1, 0] = 0  # class 0, image 0: k = 3, ptr 14 + 3 >= 16 → slots [13, 16), ptr 0
    labels[1, 1, 1] = 0  # class 0, image 1: k = 1 → slot [0, 1), ptr 1
    labels[1, 0, 0] = 1  # class 1, image 1: k = 1, ptr 15 + 1 >= 16 → slot [15, 16), ptr 0
    t = torch.randn(2, 6, 2, 2, dtype=torch.float64)
    before = buffers(module)
    module(torch.randn(2, 3, 2, 2, dtype=torch.float64), t, labels)
    z_t = F.normalize(t, dim=1).flatten(2)
    queue = module.teacher_pixel_queue
    assert module.pixel_queue_ptr.tolist() == [1, 0]
    # faithful: the picks are raster positions 0..n-1 of the image
    torch.testing.assert_close(sorted_rows(queue[0, 13:16]), sorted_rows(z_t[0, :, :3].T), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(queue[0, 0], z_t[1, :, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(queue[1, 15], z_t[1, :, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(queue[0, 1:13], before["teacher_pixel_queue"][0, 1:13], rtol=0, atol=0)
    torch.testing.assert_close(queue[1, :15], before["teacher_pixel_queue"][1, :15], rtol=0, atol=0)


def test_duplicate_queue_slots_keep_the_last_write():
    from common.losses.cirkd import _last_writes
    assert _last_writes(torch.tensor([3, 1, 3, 2, 1, 3])).tolist() == [False, False, False, True, True, True]


def test_memory_region_queue_wraps_and_the_later_image_wins():
    module = make_memory(num_classes=2, region_memory=1)
    labels = torch.zeros(3, 2, 2, dtype=torch.long)
    t = torch.randn(3, 6, 2, 2, dtype=torch.float64)
    module(torch.randn(3, 3, 2, 2, dtype=torch.float64), t, labels)
    mean = F.normalize(t, dim=1)[2].flatten(1).mean(1)
    torch.testing.assert_close(module.teacher_segment_queue[0, 0], mean / mean.norm(), rtol=1e-12, atol=1e-14)
    assert module.segment_queue_ptr.tolist() == [0, 0]


@pytest.mark.parametrize("faithful", [True, False])
def test_memory_enqueue_matches_transcription_over_steps(faithful):
    module = make_memory(pixel_memory=200, region_memory=5, faithful_pixel_enqueue=faithful)
    q = buffers(module)
    for step in range(3):
        s, t, labels = memory_inputs(seed=10 + step)
        module(s, t, labels)
        ref_enqueue(q, F.normalize(t, dim=1), small_labels(labels, 4, 5), -1, faithful)
    assert module.segment_queue_ptr.tolist() == q["segment_queue_ptr"].tolist()
    assert module.pixel_queue_ptr.tolist() == q["pixel_queue_ptr"].tolist()
    torch.testing.assert_close(module.teacher_segment_queue, q["teacher_segment_queue"], rtol=1e-12, atol=1e-14)
    for c in range(4):  # same rows per class; their order inside one (image, class) block is random
        torch.testing.assert_close(sorted_rows(module.teacher_pixel_queue[c]), sorted_rows(q["teacher_pixel_queue"][c]),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("faithful", [True, False])
def test_memory_losses_match_transcription_values_and_gradients(faithful):
    # every queue row is a negative (contrast size >= memory size), so the loss does not depend on the draws
    module = make_memory(pixel_memory=40, region_memory=6, m_p=40, m_r=6, tc=2.0, faithful_pixel_enqueue=faithful)
    ref_head = copy.deepcopy(module.project_head)
    q = buffers(module)
    s, t, labels = memory_inputs()
    s_ref = s.clone().requires_grad_(True)
    s.requires_grad_(True)
    ours = module(s, t, labels)
    ref = ref_memory(ref_head, q, s_ref, t, labels, 40, 6, 2.0, 0.1, -1, faithful)
    for a, b in zip(ours, ref):
        assert a.dim() == 0 and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    (ours[0] + 3 * ours[1]).backward()
    (ref[0] + 3 * ref[1]).backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-9, atol=1e-13)
    for p, p_ref in zip(module.project_head.parameters(), ref_head.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-13)


def _identity_head(module):
    with torch.no_grad():
        for conv in (module.project_head[0], module.project_head[3]):
            conv.weight.copy_(torch.eye(conv.weight.shape[0], dtype=conv.weight.dtype).view_as(conv.weight))
    module.project_head.eval()  # BN with running statistics 0/1: a positive scaling


def test_memory_losses_zero_when_projected_student_equals_teacher():
    module = make_memory(s_ch=6)
    _identity_head(module)
    _, t, labels = memory_inputs()
    t = t.abs()  # the head's ReLU keeps non-negative features
    pixel, region = module(t.clone(), t, labels)
    assert abs(pixel.item()) < 1e-12 and abs(region.item()) < 1e-12


def test_memory_losses_non_negative_and_depend_only_on_valid_anchors():
    module = make_memory()
    module.project_head.eval()
    state = copy.deepcopy(module.state_dict())
    s, t, labels = memory_inputs()
    torch.manual_seed(5)
    base = module(s, t, labels)
    assert base[0].item() > 0 and base[1].item() > 0
    ignored = (small_labels(labels, 4, 5) == -1).unsqueeze(1).expand_as(s)
    s2 = torch.where(ignored, torch.randn_like(s) * 10, s)
    module.load_state_dict(state)
    torch.manual_seed(5)
    again = module(s2, t, labels)
    for a, b in zip(base, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_memory_all_ignored_batch_returns_zeros_that_keep_the_graph():
    module = make_memory()
    s, t, labels = memory_inputs()
    s.requires_grad_(True)
    pixel, region = module(s, t, torch.full_like(labels, -1))
    assert pixel.item() == 0.0 and region.item() == 0.0
    (pixel + region).backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in module.project_head.parameters())
    assert module.pixel_queue_ptr.tolist() == [0] * 4


def test_memory_gradients_reach_student_and_head_only():
    module = make_memory()
    s, t, labels = memory_inputs()
    s.requires_grad_(True)
    t.requires_grad_(True)
    pixel, region = module(s, t, labels)
    (pixel + region).backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in module.project_head.parameters() if p.dim() == 4)
    assert not any(b.requires_grad for b in module.buffers())


def test_memory_state_dict_resumes_the_queues():
    module = make_memory()
    s, t, labels = memory_inputs()
    module(s, t, labels)
    resumed = make_memory()
    resumed.load_state_dict(module.state_dict())
    for name, value in buffers(module).items():
        assert torch.equal(resumed.get_buffer(name), value)
    torch.manual_seed(3)
    a = module(s, t, labels)
    torch.manual_seed(3)
    b = resumed(s, t, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(module.teacher_pixel_queue, resumed.teacher_pixel_queue)


def test_memory_half_inputs_are_computed_in_float32():
    module = make_memory().float()
    s, t, labels = memory_inputs()
    pixel, region = module(s.bfloat16().float(), t.bfloat16(), labels)
    assert pixel.dtype == torch.float32 and region.dtype == torch.float32


def test_memory_bad_arguments():
    with pytest.raises(ValueError, match="pixel_memory_size must be at least 16"):
        MemoryContrast(19, 15, 20, 54, 216, 1.0, 0.1, 8, 16, -1)
    with pytest.raises(ValueError, match="region_memory_size"):
        MemoryContrast(19, 20, 0, 54, 216, 1.0, 0.1, 8, 16, -1)
    with pytest.raises(ValueError, match="contrast_temperature"):
        MemoryContrast(19, 20, 20, 54, 216, 1.0, 0.0, 8, 16, -1)
    module = make_memory()
    s, t, labels = memory_inputs()
    with pytest.raises(ValueError, match="teacher channels"):
        module(s, t[:, :4], labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        module(s, t, labels.clamp(min=0) + 1)


# ---- distributed: queues identical on every rank (§6)


def _memory_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        module = make_memory()
        assert isinstance(module.project_head[1], nn.BatchNorm2d)  # gloo: no SyncBN on CPU
        s, t, labels = memory_inputs(images=4)
        torch.manual_seed(100 + rank)  # different default generators on the two ranks
        for _ in range(2):
            losses = module(s[2 * rank:2 * rank + 2], t[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2])
        torch.save({**buffers(module), "losses": torch.stack(losses).detach()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_queues_equal_to_one_process(tmp_path):
    mp.spawn(_memory_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = make_memory()
    s, t, labels = memory_inputs(images=4)
    torch.manual_seed(100)  # rank 0's generator seeds the shared selection
    for _ in range(2):
        single(s, t, labels)
    for name, value in buffers(single).items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], value), name
    assert not torch.equal(ranks[0]["losses"], ranks[1]["losses"])  # each rank's loss is on its local batch


def test_minibatch_without_grad_gives_the_same_value():
    s = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        value = MiniBatchPixelRelation()(s, t)
    assert value.grad_fn is None
    torch.testing.assert_close(value, MiniBatchPixelRelation()(s, t).detach(), rtol=1e-13, atol=0)


def test_memory_contrast_logits_are_not_autocast():
    module = make_memory().float()
    g = torch.Generator().manual_seed(6)
    anchors_s, anchors_t = F.normalize(torch.randn(2, 30, 6, generator=g), dim=2)
    negatives = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    plain = module._contrast_kd(anchors_s, anchors_t, negatives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module._contrast_kd(anchors_s, anchors_t, negatives)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    s, t = torch.randn(2, 4, 6, 8, dtype=torch.float64), torch.randn(2, 6, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(MiniBatchPixelRelation()(s.cuda(), t.cuda()).cpu(), MiniBatchPixelRelation()(s, t))
    cpu, gpu = make_memory(), make_memory().cuda()
    s, t, labels = memory_inputs()
    cpu(s, t, labels)
    gpu(s.cuda(), t.cuda(), labels.cuda())
    for name in ("segment_queue_ptr", "pixel_queue_ptr", "teacher_segment_queue"):
        torch.testing.assert_close(gpu.get_buffer(name).cpu(), cpu.get_buffer(name))
