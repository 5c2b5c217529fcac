"""SKD journal-code benchmark: distillation overhead of the full SKD objective (ratio, nothing asserted).

Time of one training step with CE + 0.4·aux + 10·pixel-wise + 0.5·pair-wise (pool scale 0.5) + 0.1·holistic
and the WGAN-GP discriminator step (SGD) / time of the unavoidable work (teacher forward + student
forward/backward with the task loss + SGD step: ``skd/train_and_eval.py``'s ``build_step`` with ``--pi False
--pa False --ho False``), PSPNet-R101 ->
PSPNet-R18 with SKD's 7 outputs, batch 2, crop 512x512 (the smallest crop whose 65x65 logits the
discriminator accepts), CPU, same process. The two run interleaved (bench/timing.py); the ratio is the
median of the per-round ratios with its spread, or "not resolved at this size" when the spread is larger
than the effect or the median is below 1.0 (the SKD step does all of the baseline's work).
"""
import argparse

import torch

from bench import timing

ROUNDS = 3


def bench_overhead(rounds, batch=2, crop=512):
    from common.models import build_model
    from skd.options import train_parser
    from skd.train_and_eval import build_step

    torch.manual_seed(0)
    script = ["--weight-decay", "5e-4", "--lambda-pa", "0.5", "--pool-scale", "0.5", "--lambda-pi", "10.0",
              "--lambda-d", "0.1"]
    args = train_parser().parse_args(script)
    base_args = train_parser().parse_args(script + ["--pi", "False", "--pa", "False", "--ho", "False"])
    device = torch.device("cpu")
    student = build_model("pspnet_resnet18", num_classes=19, return_features=True)
    teacher = build_model("pspnet_resnet101", num_classes=19, return_features=True)
    labels = torch.randint(0, 19, (batch, crop, crop))
    labels[:, :32] = 255
    data = (torch.randn(batch, 3, crop, crop), labels.float())
    steps = {"baseline": build_step(base_args, student, teacher, device),
             "skd": build_step(args, student, teacher, device)}
    samples = timing.interleave({name: (lambda s=step: s(data, 0)) for name, step in steps.items()},
                                rounds=rounds, warmup=1)
    overhead = timing.ratio(samples, "skd", "baseline")
    print(f"SKD training step (CPU, {torch.get_num_threads()} threads, batch {batch}, crop {crop}x{crop}): "
          f"unavoidable work (T fwd + S fwd/bwd + CE + SGD) {samples['baseline'].median_wall():.2f} s, full SKD "
          f"objective (Pi + Pa + Ho + WGAN-GP D step) {samples['skd'].median_wall():.2f} s (median wall)", flush=True)
    print("  " + overhead.text("distillation overhead (SKD step / unavoidable work)", floor=1.0), flush=True)
    return overhead


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench skd_train", description=__doc__.splitlines()[0])
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    print(f"bench skd_train: {timing.machine_note()}", flush=True)
    return bench_overhead(args.rounds)


if __name__ == "__main__":
    main()
