"""CIRKD's relation losses (specs/cirkd.md §3.3, §3.4): the mini-batch pixel-to-pixel relation and the
memory-based pixel-to-pixel / pixel-to-region contrast with its teacher queues."""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from common.engine.dist import is_distributed
from common.losses.ifvd import downsample_labels
from common.losses.precision import promote
from common.numerics import full_precision

__all__ = ["MemoryContrast", "MiniBatchPixelRelation", "per_class_contrast_size"]

CHUNK_ELEMENTS = 2 ** 21  # similarity entries held per chunk by MiniBatchPixelRelation (8 MiB in float32)
PIXEL_UPDATE_FREQ = 16  # the original's pixel_update_freq: at most 16 pixels per image and class are enqueued


def _relation_kl(x_s, x_t, temperature, chunk_rows, need_grad):
    """Σ over all anchors u (B·N rows) and images j of KL(softmax(A^t[u, j]/τ) ‖ softmax(A^s[u, j]/τ)).

    ``x_s`` (B, N, C_s) and ``x_t`` (B, N, C_t) hold unit pixel embeddings; with a leading group dimension,
    (G, B, N, C), each group is its own batch (the similarities never cross groups). The B·N × B·N similarity
    matrices are built ``chunk_rows`` anchors at a time; the softmax runs over the N columns of each image.
    Returns the sum and, if ``need_grad``, its gradient with respect to ``x_s`` (computed in the same pass:
    ∂KL/∂A^s = (softmax(A^s/τ) − softmax(A^t/τ))/τ).
    """
    *groups, b, n, _ = x_s.shape
    cols_s, cols_t = x_s.reshape(*groups, b * n, -1), x_t.reshape(*groups, b * n, -1)
    total = x_s.new_zeros(())
    grad = torch.zeros_like(cols_s) if need_grad else None
    for lo in range(0, b * n, chunk_rows):
        rows_s, rows_t = cols_s[..., lo:lo + chunk_rows, :], cols_t[..., lo:lo + chunk_rows, :]
        log_q = F.log_softmax((rows_s @ cols_s.transpose(-1, -2)).view(*groups, -1, b, n).div_(temperature), dim=-1)
        log_p = F.log_softmax((rows_t @ cols_t.transpose(-1, -2)).view(*groups, -1, b, n).div_(temperature), dim=-1)
        p = log_p.exp()
        total += torch.dot(p.flatten(), log_p.sub_(log_q).flatten())
        if need_grad:  # in place: at most about four chunk-sized buffers are alive at once
            g = log_q.exp_().sub_(p).div_(temperature).view(*groups, rows_s.shape[-2], b * n)
            grad[..., lo:lo + chunk_rows, :] += g @ cols_s
            grad += g.transpose(-1, -2) @ rows_s
    return total, None if grad is None else grad.view_as(x_s)


class _RelationKL(torch.autograd.Function):
    """:func:`_relation_kl` with the gradient computed during the forward pass and scaled in backward:
    nothing of size N×N is kept for the backward pass."""

    @staticmethod
    def forward(ctx, x_s, x_t, temperature, chunk_rows):
        total, grad = _relation_kl(x_s, x_t, temperature, chunk_rows, need_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_output), None, None, None


class MiniBatchPixelRelation(nn.Module):
    """``CriterionMiniBatchCrossImagePair`` (§3.3): ``(1/B²) Σ_{i,j} (1/N) Σ_u KL(softmax(A^t_ij[u]/τ) ‖
    softmax(A^s_ij[u]/τ))`` with ``A_ij = norm(F_i)ᵀ norm(F_j)`` over every ordered pair of images of the
    local batch, self-pairs included; no τ² factor, no ignore mask; C_s may differ from C_t.

    ``pooling=True``: ``AvgPool2d(2, 2, ceil_mode=True)`` on both embeddings first (N → ⌈h/2⌉·⌈w/2⌉).
    ``group_size=g``: the relation within each run of g consecutive images of the batch, averaged over the B/g
    groups: the original's loss on B/g GPUs of g images each, whose DDP-averaged gradient is that of the mean
    (§3.3, §6). None (default): the whole batch is one group, as the original computes it per process.
    Exact, but computed in chunks of anchor rows with the student gradient formed in the same pass, so
    no B² N×N matrices are materialised (at 512×1024 crops N = 8192). Gradient reaches the student only;
    not twice differentiable. ``chunk_rows`` (default: ``CHUNK_ELEMENTS / (B·N)``) only trades speed for
    memory.
    """

    def __init__(self, temperature=0.1, pooling=False, chunk_rows=None, group_size=None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the mini-batch relation temperature must be positive, got {temperature}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"the mini-batch relation group size must be a positive number of images, "
                             f"got {group_size}")
        self.temperature = float(temperature)
        self.pooling = pooling
        self.chunk_rows = chunk_rows
        self.group_size = group_size

    def forward(self, emb_s, emb_t):
        if emb_s.dim() != 4 or emb_t.dim() != 4:
            raise ValueError(f"expected B×C×h×w embeddings, got {tuple(emb_s.shape)} and {tuple(emb_t.shape)}")
        if emb_s.shape[0] != emb_t.shape[0] or emb_s.shape[2:] != emb_t.shape[2:]:
            raise ValueError(f"student {tuple(emb_s.shape)} and teacher {tuple(emb_t.shape)} embeddings need the "
                             "same batch and spatial size")
        if self.group_size is not None and emb_s.shape[0] % self.group_size:
            raise ValueError(f"a batch of {emb_s.shape[0]} images does not split into groups of {self.group_size}")
        emb_s, emb_t = promote(emb_s, emb_t.detach())
        with torch.autocast(emb_s.device.type, enabled=False):
            return self._relation(emb_s, emb_t)

    def _relation(self, emb_s, emb_t):
        if self.pooling:
            emb_s = F.avg_pool2d(emb_s, 2, 2, 0, ceil_mode=True)
            emb_t = F.avg_pool2d(emb_t, 2, 2, 0, ceil_mode=True)
        b = emb_s.shape[0]
        x_s = F.normalize(emb_s, p=2, dim=1).flatten(2).transpose(1, 2)
        x_t = F.normalize(emb_t, p=2, dim=1).flatten(2).transpose(1, 2)
        n = x_s.shape[1]
        chunk_rows = self.chunk_rows or max(1, CHUNK_ELEMENTS // (b * n))
        g = b
        if self.group_size is not None and self.group_size != b:
            g = self.group_size
            x_s, x_t = x_s.reshape(b // g, g, n, -1), x_t.reshape(b // g, g, n, -1)
        if torch.is_grad_enabled() and x_s.requires_grad:
            total = _RelationKL.apply(x_s, x_t, self.temperature, chunk_rows)
        else:
            total = _relation_kl(x_s, x_t, self.temperature, chunk_rows, need_grad=False)[0]
        return total / (n * g * b)


def per_class_contrast_size(contrast_size, num_classes):
    """The per-class number of negatives the trainer hands to :class:`MemoryContrast` (§3.4):
    ``contrast_size // K + 1`` (Cityscapes: 4096 → 216 pixel, 1024 → 54 region negatives per class)."""
    return contrast_size // num_classes + 1


def _concat_all_gather(tensor):
    """Concatenate ``tensor`` over the ranks in rank order (identity for one process; equal shapes required)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _shared_generator(device):
    """A generator on ``device`` seeded from the default CPU generator of rank 0 (one broadcast under DDP), so
    every rank draws the same enqueue selection; reproducible with ``torch.manual_seed`` in one process."""
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    if is_distributed():
        seed = seed.to(device)
        dist.broadcast(seed, src=0)
    return torch.Generator(device=device).manual_seed(int(seed.item()))


def _default_norm_layer():
    """``nn.SyncBatchNorm`` under an NCCL process group (the original hard-codes it), else ``nn.BatchNorm2d``:
    PyTorch's SyncBatchNorm has no CPU path, so gloo (CPU) runs normalise per process."""
    if is_distributed() and dist.get_backend() == "nccl":
        return nn.SyncBatchNorm
    return nn.BatchNorm2d


def _last_writes(index):
    """Mask of the entries of ``index`` that are the last write to their slot (a later duplicate wins)."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    mask = torch.empty_like(last)
    mask[order] = last
    return mask


def _pixel_slots(ptr, pair_class, pair_k, memory_size):
    """First pixel-queue slot of each (image, class) pair's k rows and the new pointers (§3.4 step 4).

    The original's rule: if ``ptr + k >= memory_size`` write the last k slots and reset the pointer to 0,
    else write ``[ptr, ptr + k)``. A sequential recurrence over at most G·K integers, run on the host.
    """
    ptr = ptr.tolist()
    starts = []
    for c, k in zip(pair_class.tolist(), pair_k.tolist()):
        if ptr[c] + k >= memory_size:
            starts.append(memory_size - k)
            ptr[c] = 0
        else:
            starts.append(ptr[c])
            ptr[c] += k
    return starts, ptr


class MemoryContrast(nn.Module):
    """``StudentSegContrast`` (§3.4): memory-based pixel-to-pixel and pixel-to-region distillation.

    Arguments are the original's. ``pixel_contrast_size`` / ``region_contrast_size`` are the **per-class**
    numbers of negatives (the trainer passes :func:`per_class_contrast_size` of its flags); ``ignore_label``
    is CIRKD's −1. ``forward(s_feat, t_feat, labels)`` with student/teacher embeddings B×C×h×w and labels
    B×H×W returns ``(L_mp, L_mr)``:

    1. ``z_s = norm(g(s_feat))`` (g = 1×1 conv → ``norm_layer`` → ReLU → 1×1 conv, no biases),
       ``z_t = norm(t_feat)`` (detached); labels resized to h×w by legacy nearest interpolation.
    2. Enqueue first (so this batch's teacher features can be negatives): the teacher embeddings and labels
       of all ranks are gathered; per image and present class the normalised class mean goes to the region
       queue and ``min(n, 16)`` random pixels to the pixel queue (overflow: last k slots, pointer reset).
       ``faithful_pixel_enqueue=True`` keeps the original's defect: the random picks are positions
       ``0..n−1`` of the image, whatever their class (§8.1); ``False`` takes pixels of that class.
    3. Negatives: one random index set per queue, shared by all classes, K·m rows class-major;
       ``L = T_c² · mean_u KL(softmax(z_t·V/(τ·T_c)) ‖ softmax(z_s·V/(τ·T_c)))`` over valid anchors.

    All-ignored labels return true zeros that keep the graph (the original returns NaN, §3.4 step 5).
    Queues and pointers are buffers (in ``state_dict``, so a run resumes). ``norm_layer`` defaults to
    ``nn.SyncBatchNorm`` when an NCCL process group exists at construction (the original hard-codes it),
    else ``nn.BatchNorm2d``.

    Distributed: each rank computes its loss on its local batch; the queues stay identical on every rank
    without the original's per-step broadcast of rank 0's buffers, because every rank applies the same
    update (same gathered batch, same selection from a generator seeded by rank 0 each step). Their
    initial values must agree: wrap the module in DDP (its constructor broadcasts rank 0's buffers; then
    ``broadcast_buffers=False`` suffices) or load the same state on every rank.
    """

    def __init__(self, num_classes, pixel_memory_size, region_memory_size, region_contrast_size, pixel_contrast_size,
                 contrast_kd_temperature, contrast_temperature, s_channels, t_channels, ignore_label,
                 norm_layer=None, faithful_pixel_enqueue=True):
        super().__init__()
        sizes = {"num_classes": num_classes, "pixel_memory_size": pixel_memory_size,
                 "region_memory_size": region_memory_size, "region_contrast_size": region_contrast_size,
                 "pixel_contrast_size": pixel_contrast_size, "s_channels": s_channels, "t_channels": t_channels}
        for name, value in sizes.items():
            if int(value) < 1:
                raise ValueError(f"the memory contrast's {name} must be at least 1, got {value}")
        if int(pixel_memory_size) < PIXEL_UPDATE_FREQ:
            raise ValueError(f"the memory contrast's pixel_memory_size must be at least {PIXEL_UPDATE_FREQ} (the "
                             f"pixels enqueued per image and class), got {pixel_memory_size}")
        for name, value in (("contrast_kd_temperature", contrast_kd_temperature),
                            ("contrast_temperature", contrast_temperature)):
            if value <= 0:
                raise ValueError(f"the memory contrast's {name} must be positive, got {value}")
        self.num_classes = int(num_classes)
        self.pixel_memory_size = int(pixel_memory_size)
        self.region_memory_size = int(region_memory_size)
        self.pixel_contrast_size = int(pixel_contrast_size)
        self.region_contrast_size = int(region_contrast_size)
        self.contrast_kd_temperature = float(contrast_kd_temperature)
        self.contrast_temperature = float(contrast_temperature)
        self.s_channels, self.dim = int(s_channels), int(t_channels)
        self.ignore_label = ignore_label
        self.faithful_pixel_enqueue = faithful_pixel_enqueue
        if norm_layer is None:
            norm_layer = _default_norm_layer()
        self.project_head = nn.Sequential(
            nn.Conv2d(self.s_channels, self.dim, 1, bias=False),
            norm_layer(self.dim),
            nn.ReLU(True),
            nn.Conv2d(self.dim, self.dim, 1, bias=False),
        )
        k = self.num_classes
        self.register_buffer("teacher_segment_queue", F.normalize(torch.randn(k, self.region_memory_size, self.dim),
                                                                  p=2, dim=2))
        self.register_buffer("segment_queue_ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("teacher_pixel_queue", F.normalize(torch.randn(k, self.pixel_memory_size, self.dim),
                                                                p=2, dim=2))
        self.register_buffer("pixel_queue_ptr", torch.zeros(k, dtype=torch.long))

    def forward(self, s_feat, t_feat, labels):
        self._check_inputs(s_feat, t_feat, labels)
        z_s = F.normalize(full_precision(self.project_head(s_feat)), p=2, dim=1)
        z_t = F.normalize(full_precision(t_feat.detach()), p=2, dim=1)
        labels = downsample_labels(labels, z_s.shape[2:]).long()
        self._dequeue_and_enqueue(z_t, labels)
        valid = labels.flatten() != self.ignore_label
        if not valid.any():
            zero = 0.0 * z_s.sum()
            return zero, zero
        dtype = torch.promote_types(torch.promote_types(z_s.dtype, z_t.dtype), self.teacher_pixel_queue.dtype)
        anchors_s = z_s.permute(0, 2, 3, 1).reshape(-1, self.dim)[valid].to(dtype)
        anchors_t = z_t.permute(0, 2, 3, 1).reshape(-1, self.dim)[valid].to(dtype)
        pixel_negatives = self._sample_negatives(self.teacher_pixel_queue, self.pixel_contrast_size).to(dtype)
        region_negatives = self._sample_negatives(self.teacher_segment_queue, self.region_contrast_size).to(dtype)
        return (self._contrast_kd(anchors_s, anchors_t, pixel_negatives),
                self._contrast_kd(anchors_s, anchors_t, region_negatives))

    def _check_inputs(self, s_feat, t_feat, labels):
        if s_feat.dim() != 4 or t_feat.dim() != 4 or labels.dim() != 3:
            raise ValueError(f"expected B×C×h×w embeddings and B×H×W labels, got {tuple(s_feat.shape)}, "
                             f"{tuple(t_feat.shape)} and {tuple(labels.shape)}")
        if s_feat.shape[1] != self.s_channels or t_feat.shape[1] != self.dim:
            raise ValueError(f"expected {self.s_channels} student and {self.dim} teacher channels, got "
                             f"{s_feat.shape[1]} and {t_feat.shape[1]}")
        if s_feat.shape[0] != t_feat.shape[0] or s_feat.shape[2:] != t_feat.shape[2:] \
                or labels.shape[0] != s_feat.shape[0]:
            raise ValueError(f"student {tuple(s_feat.shape)}, teacher {tuple(t_feat.shape)} and labels "
                             f"{tuple(labels.shape)} need the same batch (and the embeddings the same size)")

    def _contrast_kd(self, anchors_s, anchors_t, negatives):
        """``T_c² · KL(softmax(a_t/T_c) ‖ softmax(a_s/T_c))`` averaged over anchors, ``a = z·Vᵀ/τ`` (step 9),
        with autocast off (the logits stay in the anchors' precision)."""
        tc = self.contrast_kd_temperature
        with torch.autocast(anchors_s.device.type, enabled=False):
            logits_s = anchors_s @ negatives.T / self.contrast_temperature
            logits_t = anchors_t @ negatives.T / self.contrast_temperature
            log_q = F.log_softmax(logits_s / tc, dim=1)
            log_p = F.log_softmax(logits_t / tc, dim=1)
            return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * tc ** 2

    def _sample_negatives(self, queue, per_class):
        """``queue[:, randperm(M)[:m]]`` flattened class-major to (K·m, dim) (steps 6 and 8)."""
        index = torch.randperm(queue.shape[1])[:per_class].to(queue.device)
        return queue[:, index].reshape(-1, queue.shape[2])

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys, labels):
        """Step 4 for all gathered images at once; the original loops over images and their classes."""
        keys, labels = _concat_all_gather(keys), _concat_all_gather(labels)
        images, dim, h, w = keys.shape
        n_pix, k = h * w, self.num_classes
        feats = keys.reshape(images, dim, n_pix)  # channels first: no transposed copy of the gathered batch
        labels = labels.reshape(images, n_pix)
        valid = labels != self.ignore_label
        if ((labels[valid] < 0) | (labels[valid] >= k)).any():
            raise ValueError(f"labels must lie in [0, {k}) or equal the ignore label {self.ignore_label}")
        positions = valid.flatten().nonzero().squeeze(1)  # flat (image, raster position) of the valid pixels
        group = positions // n_pix * k + labels.flatten()[positions]  # (image, class) id, the original loop order
        counts = torch.bincount(group, minlength=images * k)
        pairs = counts.nonzero().squeeze(1)
        if pairs.numel() == 0:
            return
        pair_image, pair_class = pairs // k, pairs % k
        pair_of_group = torch.full_like(counts, -1)
        pair_of_group[pairs] = torch.arange(pairs.numel(), device=pairs.device)

        # regions: class sums per image (ignored pixels in an extra bin); the r-th image containing class c in
        # this step writes slot ptr[c] + r
        bins = torch.where(valid, labels, k).unsqueeze(1).expand(-1, dim, -1)
        sums = feats.new_zeros(images, dim, k + 1).scatter_add_(2, bins, feats)
        regions = F.normalize(sums[pair_image, :, pair_class] / counts[pairs, None].to(sums.dtype), p=2, dim=1)
        present = (counts.view(images, k) > 0).long()
        occurrence = (present.cumsum(0) - 1).view(-1)[pairs]
        region_slot = (self.segment_queue_ptr[pair_class] + occurrence) % self.region_memory_size
        self._write(self.teacher_segment_queue, pair_class * self.region_memory_size + region_slot, regions)
        self.segment_queue_ptr.copy_((self.segment_queue_ptr + present.sum(0)) % self.region_memory_size)

        # pixels: a random min(n, 16) of each pair's n pixels, in random order
        generator = _shared_generator(keys.device)
        by_group = torch.argsort(group, stable=True)  # pixels grouped by pair, raster order inside
        sorted_group = group[by_group]
        group_start = counts.cumsum(0) - counts
        shuffle = torch.randperm(by_group.numel(), generator=generator, device=keys.device)
        picks = shuffle[torch.argsort(sorted_group[shuffle], stable=True)]  # grouped by pair, random inside
        pick_group = sorted_group[picks]
        rank = picks - group_start[pick_group]  # index of the pick in its pair's raster-ordered pixel list
        taken = torch.arange(picks.numel(), device=picks.device) - group_start[pick_group]  # draw order
        keep = taken < counts[pick_group].clamp(max=PIXEL_UPDATE_FREQ)
        picks, pick_group, rank, taken = picks[keep], pick_group[keep], rank[keep], taken[keep]
        if self.faithful_pixel_enqueue:
            source = pick_group // k * n_pix + rank  # the defect: rank r read as raster position r of the image
        else:
            source = positions[by_group[picks]]
        pair_k = counts[pairs].clamp(max=PIXEL_UPDATE_FREQ)
        starts, new_ptr = _pixel_slots(self.pixel_queue_ptr, pair_class, pair_k, self.pixel_memory_size)
        pick_pair = pair_of_group[pick_group]
        slot = torch.tensor(starts, device=keys.device)[pick_pair] + taken
        rows = feats[source // n_pix, :, source % n_pix]
        self._write(self.teacher_pixel_queue, pair_class[pick_pair] * self.pixel_memory_size + slot,
                    F.normalize(rows, p=2, dim=1))
        self.pixel_queue_ptr.copy_(torch.tensor(new_ptr))

    @staticmethod
    def _write(queue, flat_slot, rows):
        """``queue[c, slot] = row`` for flat slots ``c·M + slot`` in write order (a later duplicate wins)."""
        last = _last_writes(flat_slot)
        queue.view(-1, queue.shape[2]).index_copy_(0, flat_slot[last], rows[last].to(queue.dtype))
