"""CIRKD loss benchmarks (``python -m bench cirkd_losses``; specs/cirkd.md §3.3, §3.4; CPU unless CUDA is present).

1. ``MiniBatchPixelRelation`` forward + backward against a transcription of the original
   ``CriterionMiniBatchCrossImagePair`` (a B×B loop of N×N similarity matrices), at the Cityscapes per-GPU
   shape scaled down with its ratios kept (B = 2, C_s = 128, C_t = 256, feature maps of aspect 1:2 like
   64×128). Peak memory of each side is measured in a fresh process (peak RSS on CPU, allocator peak on
   CUDA); the time ratio comes from interleaved rounds (bench/timing.py). Targets: memory <= 0.5x,
   time <= 1.0x, equal values. The memory of both at the full shape (N = 8192) is computed analytically.
2. ``MemoryContrast`` enqueue (all gathered images at once) against the original per-image / per-class loop,
   at 16 gathered images (8 GPUs × 2), 19 classes, 64×128 features, dim 256, Cityscapes queue sizes.
   Target >= 5x faster; pointers and region queue must be equal (the pixel picks are random draws).
"""
import argparse
import multiprocessing
import os
import sys

import torch
import torch.nn.functional as F

from bench import timing
from common.losses.cirkd import CHUNK_ELEMENTS, MemoryContrast, MiniBatchPixelRelation

ROUNDS = 5
BATCH, S_CHANNELS, T_CHANNELS, TAU = 2, 128, 256, 0.1
CITYSCAPES = (64, 128)  # 512×1024 crops at output stride 8
SCALED = ((32, 64), (48, 96))
GATHERED, CLASSES, DIM, PIXEL_MEMORY, REGION_MEMORY = 16, 19, 256, 20000, 2000
MIB = 2 ** 20


def original_minibatch(feat_s, feat_t, temperature):
    """The original ``CriterionMiniBatchCrossImagePair.forward`` (no pooling), CPU instead of ``.cuda()``."""
    b = feat_s.size(0)
    feat_s = F.normalize(feat_s, p=2, dim=1)
    feat_t = F.normalize(feat_t, p=2, dim=1)
    sim_dis = torch.tensor(0.0, device=feat_s.device)
    for i in range(b):
        for j in range(b):
            c_s, c_t = feat_s.shape[1], feat_t.shape[1]
            s_sim_map = torch.mm(feat_s[i].reshape(c_s, -1).T, feat_s[j].reshape(c_s, -1))
            t_sim_map = torch.mm(feat_t[i].reshape(c_t, -1).T, feat_t[j].reshape(c_t, -1))
            p_s = F.log_softmax(s_sim_map / temperature, dim=1)
            p_t = F.softmax(t_sim_map / temperature, dim=1)
            sim_dis = sim_dis + F.kl_div(p_s, p_t, reduction="batchmean")
    return sim_dis / (b * b)


def relation_inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(BATCH, S_CHANNELS, *shape, generator=g).to(device).requires_grad_(True)
    t = torch.randn(BATCH, T_CHANNELS, *shape, generator=g).to(device)
    return s, t


def relation_fns(s, t):
    """One forward + backward of each side (the student gradient is reset first)."""
    def step(loss):
        def run():
            s.grad = None
            loss(s, t).backward()
        return run

    return {"original": step(lambda a, b: original_minibatch(a, b, TAU)), "ours": step(MiniBatchPixelRelation(TAU))}


def analytic_bytes(n, batch=BATCH, s_channels=S_CHANNELS, t_channels=T_CHANNELS, itemsize=4):
    """Dominant fp32 memory of forward + backward (without the ~30 MiB a fresh process adds to any run).

    Original: autograd keeps, for each of the B² pairs, the student log-softmax and the teacher softmax
    (N² each); the backward of a pair adds about five N² temporaries (gradients of the KL, the log-softmax
    and the scaling, the similarities). Ours: about four buffers of one chunk (``CHUNK_ELEMENTS`` similarity
    entries: two log-softmaxes, a probability, a matmul output) plus the inputs, their normalised copies and
    the student gradient (B·N·C each). Both match the peaks measured above within that process overhead.
    """
    original = (2 * batch * batch + 5) * n * n * itemsize
    chunk = min(CHUNK_ELEMENTS, batch * n * batch * n)
    ours = 4 * chunk * itemsize + 3 * batch * n * (s_channels + t_channels) * itemsize
    return original, ours


def _status_bytes(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _peak_child(variant, shape, device, queue):
    """In a fresh process: peak memory of one forward + backward above what the inputs already use."""
    torch.set_num_threads(1)
    s, t = relation_inputs(shape, device)
    fn = relation_fns(s, t)[variant]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - before)
        return
    before = _status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS mark to the current RSS
    fn()
    queue.put(_status_bytes("VmHWM:") - before)


def peak_bytes(variant, shape, device):
    """:func:`_peak_child` in a spawned process. glibc there serves every block >= 64 KiB by mmap and returns it on
    free (a fixed ``MALLOC_MMAP_THRESHOLD_``), so the peak RSS follows the tensors alive, not heap fragmentation."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    try:
        child = ctx.Process(target=_peak_child, args=(variant, shape, device, queue))
        child.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    peak = queue.get()
    child.join()
    return peak


def bench_relation(shape, device, rounds):
    s, t = relation_inputs(shape, device)
    value_ours = MiniBatchPixelRelation(TAU)(s, t)
    grad_ours = torch.autograd.grad(value_ours, s)[0]
    value_orig = original_minibatch(s, t, TAU)
    grad_orig = torch.autograd.grad(value_orig, s)[0]
    rel_value = abs(value_ours.item() - value_orig.item()) / abs(value_orig.item())
    rel_grad = ((grad_ours - grad_orig).abs().max() / grad_orig.abs().max()).item()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    fns = relation_fns(s, t)
    samples = timing.interleave(fns, rounds=rounds, warmup=1, sync=sync)
    ratio = timing.ratio(samples, "ours", "original")
    mem = {name: peak_bytes(name, shape, device) for name in fns}
    n = shape[0] * shape[1]
    analytic = analytic_bytes(n)
    print(f"  {shape[0]}x{shape[1]} (N = {n}): value {value_ours.item():.6f} vs original {value_orig.item():.6f} "
          f"(rel diff {rel_value:.1e}, grad max rel diff {rel_grad:.1e})")
    print(f"    time: original {samples['original'].median_wall() * 1e3:.1f} ms, ours "
          f"{samples['ours'].median_wall() * 1e3:.1f} ms; {ratio.text('ours / original')} (target <= 1.0)")
    print(f"    peak memory: original {mem['original'] / MIB:.1f} MiB, ours {mem['ours'] / MIB:.1f} MiB, ratio "
          f"{mem['ours'] / mem['original']:.3f}x (target <= 0.5); analytic {analytic[0] / MIB:.1f} vs "
          f"{analytic[1] / MIB:.1f} MiB")
    return {"time": ratio, "memory": mem["ours"] / mem["original"], "rel_value": rel_value}


def gathered_batch(device):
    """16 normalised teacher embeddings and label maps made of 8×8-pixel blocks (one class each, 10% ignored),
    like a Cityscapes label map downsampled to 64×128."""
    g = torch.Generator().manual_seed(1)
    h, w = CITYSCAPES
    keys = F.normalize(torch.randn(GATHERED, DIM, h, w, generator=g), dim=1).to(device)
    blocks = torch.randint(0, CLASSES, (GATHERED, h // 8, w // 8), generator=g)
    blocks[torch.rand(blocks.shape, generator=g) < 0.1] = -1
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2).to(device)
    return keys, labels


def original_enqueue(q, keys, labels, ignore=-1):
    """The original ``StudentSegContrast._dequeue_and_enqueue`` after the all-gather (faithful pixel picks)."""
    segment_queue, pixel_queue = q["teacher_segment_queue"], q["teacher_pixel_queue"]
    batch_size, feat_dim, _, _ = keys.size()
    for bs in range(batch_size):
        this_feat = keys[bs].contiguous().view(feat_dim, -1)
        this_label = labels[bs].contiguous().view(-1)
        this_label_ids = [x for x in torch.unique(this_label) if x != ignore]
        for lb in this_label_ids:
            idxs = (this_label == lb).nonzero()
            lb = int(lb.item())
            feat = torch.mean(this_feat[:, idxs], dim=1).squeeze(1)
            ptr = int(q["segment_queue_ptr"][lb])
            segment_queue[lb, ptr, :] = F.normalize(feat.view(-1), p=2, dim=0)
            q["segment_queue_ptr"][lb] = (q["segment_queue_ptr"][lb] + 1) % REGION_MEMORY
            num_pixel = idxs.shape[0]
            perm = torch.randperm(num_pixel)
            k = min(num_pixel, 16)
            feat = torch.transpose(this_feat[:, perm[:k]], 0, 1)
            ptr = int(q["pixel_queue_ptr"][lb])
            if ptr + k >= PIXEL_MEMORY:
                pixel_queue[lb, -k:, :] = F.normalize(feat, p=2, dim=1)
                q["pixel_queue_ptr"][lb] = 0
            else:
                pixel_queue[lb, ptr:ptr + k, :] = F.normalize(feat, p=2, dim=1)
                q["pixel_queue_ptr"][lb] = (q["pixel_queue_ptr"][lb] + k) % PIXEL_MEMORY


def bench_enqueue(device, rounds):
    torch.manual_seed(0)
    module = MemoryContrast(CLASSES, PIXEL_MEMORY, REGION_MEMORY, 54, 216, 1.0, TAU, 128, DIM, -1).to(device)
    q = {name: buf.clone() for name, buf in module.named_buffers() if not name.startswith("project_head")}
    keys, labels = gathered_batch(device)
    module._dequeue_and_enqueue(keys, labels)
    original_enqueue(q, keys, labels)
    same_ptr = all(torch.equal(module.get_buffer(n), q[n]) for n in ("segment_queue_ptr", "pixel_queue_ptr"))
    region_diff = (module.teacher_segment_queue - q["teacher_segment_queue"]).abs().max().item()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    samples = timing.interleave({"original": lambda: original_enqueue(q, keys, labels),
                                 "ours": lambda: module._dequeue_and_enqueue(keys, labels)},
                                rounds=rounds, warmup=1, sync=sync)
    ratio = timing.ratio(samples, "ours", "original")
    speedup = 1.0 / ratio.wall.median
    pairs = sum(labels[i][labels[i] >= 0].unique().numel() for i in range(GATHERED))
    print(f"  {GATHERED} images x {CLASSES} classes, {CITYSCAPES[0]}x{CITYSCAPES[1]}, dim {DIM} ({pairs} image/class "
          f"pairs): original loop {samples['original'].median_wall() * 1e3:.1f} ms, vectorised "
          f"{samples['ours'].median_wall() * 1e3:.1f} ms, speed-up {speedup:.1f}x (target >= 5)")
    print(f"    {ratio.text('vectorised / loop')}")
    print(f"    pointers equal: {same_ptr}; region queue max |diff| {region_diff:.1e}; pixel rows are random draws "
          "(their sources are checked in tests/test_losses_cirkd.py)")
    return {"speedup": speedup, "ratio": ratio, "same_pointers": same_ptr, "region_diff": region_diff}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench cirkd_losses", description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    print(f"CIRKD losses on {device} (1 thread; {timing.machine_note()})")
    print(f"MiniBatchPixelRelation fwd+bwd, B={BATCH}, C_s={S_CHANNELS}, C_t={T_CHANNELS}, tau={TAU}:")
    relation = {shape: bench_relation(shape, device, args.rounds) for shape in SCALED}
    full = analytic_bytes(CITYSCAPES[0] * CITYSCAPES[1])
    print(f"  full Cityscapes shape {CITYSCAPES[0]}x{CITYSCAPES[1]} (N = 8192), analytic fp32: original "
          f"{full[0] / 2 ** 30:.2f} GiB, ours {full[1] / MIB:.0f} MiB ({full[1] / full[0]:.3f}x)")
    print("MemoryContrast enqueue (one step, gathered batch):")
    enqueue = bench_enqueue(device, args.rounds)
    return {"relation": relation, "relation_full_analytic": full, "enqueue": enqueue}


if __name__ == "__main__":
    main(sys.argv[1:])
