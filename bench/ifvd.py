"""IFVD benchmarks (ratios against baselines measured in the same run; nothing asserted).

1. IFV loss forward+backward: the vectorised :class:`IntraClassFeatureVariation` against the original's
   per-class loop (transcribed below), at 19 and 150 classes, PSPNet-R18 feature size 128x65x65 for
   student and teacher, batch 8, CPU. Also prints the largest difference of values and gradients.
2. Distillation overhead of the full IFVD objective (CE + 0.4·aux + 10·KD + 200·IFV + 0.001·adv and the
   WGAN-GP D step): time of one training step / time of the unavoidable work (teacher forward + student
   forward/backward with the task loss + SGD step, i.e. ``DistillStep`` without terms), PSPNet-R101 ->
   PSPNet-R18, batch 2, crop 512x512 (the smallest crop whose 65x65 logits the discriminator accepts), CPU;
   the two alternate and the median is used (as bench/cwd.py). The discriminator cannot run on smaller
   logits, so the demo-size case (batch 4, crop 192) is reported for KD + IFV only.
"""
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from common.losses.ifvd import IntraClassFeatureVariation

BATCH, CHANNELS, SIDE, LABEL_SIDE = 8, 128, 65, 512


def ifv_class_loop(feat_s, feat_t, target, num_classes):
    """The original ``CriterionIFV.forward`` (specs/ifvd_skd.md §A.4.3), loop over classes."""
    size_f = (feat_s.shape[2], feat_s.shape[3])
    tar_feat_s = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_s.size())
    tar_feat_t = nn.Upsample(size_f, mode="nearest")(target.unsqueeze(1).float()).expand(feat_t.size())
    center_feat_s, center_feat_t = feat_s.clone(), feat_t.clone()
    for i in range(num_classes):
        mask_feat_s = (tar_feat_s == i).float()
        mask_feat_t = (tar_feat_t == i).float()
        center_feat_s = (1 - mask_feat_s) * center_feat_s + mask_feat_s * (
            (mask_feat_s * feat_s).sum(-1).sum(-1) / (mask_feat_s.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
        center_feat_t = (1 - mask_feat_t) * center_feat_t + mask_feat_t * (
            (mask_feat_t * feat_t).sum(-1).sum(-1) / (mask_feat_t.sum(-1).sum(-1) + 1e-6)).unsqueeze(-1).unsqueeze(-1)
    cos = nn.CosineSimilarity(dim=1)
    return F.mse_loss(cos(feat_s, center_feat_s), cos(feat_t, center_feat_t))


def _time_fwd_bwd(fn, feat_s, reps):
    """Best-of-``reps`` seconds of ``fn(feat_s)`` forward + backward, and the last (loss, grad)."""
    times = []
    for _ in range(reps):
        feat_s.grad = None
        start = time.perf_counter()
        loss = fn(feat_s)
        loss.backward()
        times.append(time.perf_counter() - start)
    return min(times), loss.detach(), feat_s.grad.clone()


def bench_ifv(num_classes, ref_reps=1, vec_reps=3):
    g = torch.Generator().manual_seed(num_classes)
    feat_s = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g).requires_grad_(True)
    feat_t = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g)
    # blocky labels (16x16 regions) with an ignored band, like a downsampled segmentation map
    blocks = torch.randint(0, num_classes, (BATCH, LABEL_SIDE // 16, LABEL_SIDE // 16), generator=g)
    target = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    target[:, :40] = 255
    crit = IntraClassFeatureVariation(num_classes)
    t_vec, l_vec, g_vec = _time_fwd_bwd(lambda f: crit(f, feat_t, target), feat_s, vec_reps)
    t_ref, l_ref, g_ref = _time_fwd_bwd(lambda f: ifv_class_loop(f, feat_t, target, num_classes), feat_s, ref_reps)
    print(f"IFV loss fwd+bwd, {num_classes:3d} classes, B={BATCH} {CHANNELS}x{SIDE}x{SIDE}: "
          f"class loop {t_ref * 1e3:8.1f} ms, vectorised {t_vec * 1e3:7.1f} ms, speed-up {t_ref / t_vec:6.1f}x "
          f"(|value diff| {abs(l_ref - l_vec).item():.1e}, max |grad diff| {(g_ref - g_vec).abs().max().item():.1e})",
          flush=True)
    return t_ref / t_vec


def alternate(steps, batch, warmup=1, repeats=2):
    """Median seconds per step of each ``DistillStep``, the variants alternating so load affects all alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch, i)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_overhead(batch=2, crop=512, adv=True):
    from common.engine.distill import DistillStep, build_g_optimizer
    from common.losses.segmentation import CriterionDSN
    from common.models import build_model
    from ifvd.options import train_parser
    from ifvd.train import build_discriminator, build_step

    torch.manual_seed(0)
    args = train_parser().parse_args([] if adv else ["--adv", "False"])
    device = torch.device("cpu")
    student = build_model("pspnet_resnet18", num_classes=19)
    teacher = build_model("pspnet_resnet101", num_classes=19)
    labels = torch.randint(0, 19, (batch, crop, crop))
    labels[:, :32] = 255
    data = (torch.randn(batch, 3, crop, crop), labels.float())
    steps = {
        "baseline": DistillStep(student, teacher, task_loss=CriterionDSN(), terms=[],
                                g_optimizer=build_g_optimizer(student), g_base_lr=0.01, device=device),
        "ifvd": build_step(args, student, teacher, build_discriminator(args, device) if adv else None, device),
    }
    times = alternate(steps, data)
    ratio = times["ifvd"] / times["baseline"]
    what = "full IFVD objective (KD + IFV + adv + WGAN-GP D step)" if adv else "KD + IFV (--adv False)"
    print(f"IFVD training step (CPU, {torch.get_num_threads()} threads, batch {batch}, crop {crop}x{crop}, median): "
          f"unavoidable work (T fwd + S fwd/bwd + CE + SGD) {times['baseline']:.2f} s, {what} {times['ifvd']:.2f} s, "
          f"distillation overhead {ratio:.2f}x", flush=True)
    return ratio


def main():
    speedup_19, speedup_150 = bench_ifv(19), bench_ifv(150)
    overhead_demo = bench_overhead(batch=4, crop=192, adv=False)
    overhead = bench_overhead()
    print(f"summary: IFV loss speed-up {speedup_19:.1f}x (19 classes), {speedup_150:.1f}x (150 classes); "
          f"IFVD distillation overhead {overhead:.2f}x (full objective, 512 crop), {overhead_demo:.2f}x "
          "(KD + IFV, demo 192 crop)")
    return {"ifv_speedup_19": speedup_19, "ifv_speedup_150": speedup_150, "overhead": overhead,
            "overhead_demo_no_adv": overhead_demo}


if __name__ == "__main__":
    main()
