"""IFVD benchmarks (ratios against baselines measured in the same run; nothing asserted).

1. IFV loss forward+backward: the vectorised :class:`IntraClassFeatureVariation` against the original's
   per-class loop (transcribed below), at 19 and 150 classes, PSPNet-R18 feature size 128x65x65 for
   student and teacher, batch 8, CPU. Also prints the largest difference of values and gradients.
2. Distillation overhead of the full IFVD objective (CE + 0.4·aux + 10·KD + 200·IFV + 0.001·adv and the
   WGAN-GP D step): time of one training step / time of the unavoidable work (teacher forward + student
   forward/backward with the task loss + SGD step: ``ifvd/train.py``'s ``build_step`` with ``--kd False
   --ifv False --adv False``), PSPNet-R101 ->
   PSPNet-R18, batch 2, crop 512x512 (the smallest crop whose 65x65 logits the discriminator accepts), CPU.
   The discriminator cannot run on smaller logits, so the demo-size case (batch 4, crop 192) is reported for
   KD + IFV only.

Both sides of every comparison run interleaved (bench/timing.py); a ratio is the median of the per-round
ratios with its spread, or "not resolved at this size" when the spread is larger than the effect (or, for
an overhead, when the median falls below 1.0: a distillation step does all of the baseline's work).
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from bench import timing
from common.losses.ifvd import IntraClassFeatureVariation

ROUNDS = 5
OVERHEAD_ROUNDS = 3
LOOP_150_ROUNDS = 2  # the 150-class loop costs ~12 s of CPU per call; its speed-up is ~100x, far above any spread
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


def bench_ifv(num_classes, rounds):
    """Class loop against the vectorised loss, fwd+bwd interleaved; returns the speed-up ``Ratio`` (loop / vec)."""
    g = torch.Generator().manual_seed(num_classes)
    feat_s = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g).requires_grad_(True)
    feat_t = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g)
    # blocky labels (16x16 regions) with an ignored band, like a downsampled segmentation map
    blocks = torch.randint(0, num_classes, (BATCH, LABEL_SIDE // 16, LABEL_SIDE // 16), generator=g)
    target = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    target[:, :40] = 255
    crit = IntraClassFeatureVariation(num_classes)
    outputs = {}

    def fwd_bwd(name, fn):
        def run():
            feat_s.grad = None
            loss = fn(feat_s)
            loss.backward()
            outputs[name] = (loss.detach(), feat_s.grad.clone())
        return run

    samples = timing.interleave({
        "loop": fwd_bwd("loop", lambda f: ifv_class_loop(f, feat_t, target, num_classes)),
        "vectorised": fwd_bwd("vectorised", lambda f: crit(f, feat_t, target)),
    }, rounds=rounds, warmup=1)
    (l_ref, g_ref), (l_vec, g_vec) = outputs["loop"], outputs["vectorised"]
    speedup = timing.ratio(samples, "loop", "vectorised")
    loop_ms, vec_ms = samples["loop"].median_wall() * 1e3, samples["vectorised"].median_wall() * 1e3
    print(f"IFV loss fwd+bwd, {num_classes:3d} classes, B={BATCH} {CHANNELS}x{SIDE}x{SIDE}: class loop "
          f"{loop_ms:.1f} ms, vectorised {vec_ms:.1f} ms (median wall; |value diff| {abs(l_ref - l_vec).item():.1e}, "
          f"max |grad diff| {(g_ref - g_vec).abs().max().item():.1e})", flush=True)
    print("  " + speedup.text("speed-up (class loop / vectorised)"), flush=True)
    return speedup


def bench_overhead(rounds, batch=2, crop=512, adv=True):
    from common.models import build_model
    from ifvd.options import train_parser
    from ifvd.train import build_step

    torch.manual_seed(0)
    device = torch.device("cpu")
    student = build_model("pspnet_resnet18", num_classes=19)
    teacher = build_model("pspnet_resnet101", num_classes=19)
    labels = torch.randint(0, 19, (batch, crop, crop))
    labels[:, :32] = 255
    data = (torch.randn(batch, 3, crop, crop), labels.float())
    base_args = train_parser().parse_args(["--kd", "False", "--ifv", "False", "--adv", "False"])
    args = train_parser().parse_args([] if adv else ["--adv", "False"])
    steps = {"baseline": build_step(base_args, student, teacher, device),
             "ifvd": build_step(args, student, teacher, device)}
    samples = timing.interleave({name: (lambda s=step: s(data, 0)) for name, step in steps.items()},
                                rounds=rounds, warmup=1)
    overhead = timing.ratio(samples, "ifvd", "baseline")
    what = "full IFVD objective (KD + IFV + adv + WGAN-GP D step)" if adv else "KD + IFV (--adv False)"
    print(f"IFVD training step (CPU, {torch.get_num_threads()} threads, batch {batch}, crop {crop}x{crop}): "
          f"unavoidable work (T fwd + S fwd/bwd + CE + SGD) {samples['baseline'].median_wall():.2f} s, {what} "
          f"{samples['ifvd'].median_wall():.2f} s (median wall)", flush=True)
    print("  " + overhead.text("distillation overhead (IFVD step / unavoidable work)", floor=1.0), flush=True)
    return overhead


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench ifvd", description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-rounds", type=int, default=OVERHEAD_ROUNDS,
                        help=f"rounds of the 512x512 overhead comparison (default {OVERHEAD_ROUNDS}; each costs "
                             "two PSPNet-R101 -> R18 steps at 512x512)")
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    print(f"bench ifvd: {timing.machine_note()}", flush=True)
    full_rounds = min(args.rounds, args.overhead_rounds)
    results = {"ifv_speedup_19": bench_ifv(19, args.rounds),
               "ifv_speedup_150": bench_ifv(150, min(args.rounds, LOOP_150_ROUNDS)),
               "overhead_demo_no_adv": bench_overhead(args.rounds, batch=4, crop=192, adv=False),
               "overhead": bench_overhead(full_rounds)}
    print("summary:")
    for key, label, floor in (("ifv_speedup_19", "IFV loss speed-up, 19 classes", None),
                              ("ifv_speedup_150", "IFV loss speed-up, 150 classes", None),
                              ("overhead", "IFVD distillation overhead, full objective, 512 crop", 1.0),
                              ("overhead_demo_no_adv", "IFVD distillation overhead, KD + IFV, demo 192 crop", 1.0)):
        print("  " + results[key].text(label, floor=floor))
    return results


if __name__ == "__main__":
    main()
