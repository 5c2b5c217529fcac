"""SKD journal-code benchmark: distillation overhead of the full SKD objective (ratio, nothing asserted).

Time of one training step with CE + 0.4·aux + 10·pixel-wise + 0.5·pair-wise (pool scale 0.5) + 0.1·holistic
and the WGAN-GP discriminator step (SGD) / time of the unavoidable work (teacher forward + student
forward/backward with the task loss + SGD step, i.e. ``DistillStep`` without terms), PSPNet-R101 ->
PSPNet-R18 with SKD's 7 outputs, batch 2, crop 512x512 (the smallest crop whose 65x65 logits the
discriminator accepts), CPU, same process; the two alternate and the median is used (as bench/cwd.py).
"""
import torch

from bench.ifvd import alternate


def bench_overhead(batch=2, crop=512):
    from common.engine.distill import DistillStep, build_g_optimizer
    from common.losses.segmentation import CriterionDSN
    from common.models import build_model
    from skd.options import train_parser
    from skd.train_and_eval import build_discriminator, build_step

    torch.manual_seed(0)
    args = train_parser().parse_args(["--weight-decay", "5e-4", "--lambda-pa", "0.5", "--pool-scale", "0.5",
                                      "--lambda-pi", "10.0", "--lambda-d", "0.1"])
    device = torch.device("cpu")
    student = build_model("pspnet_resnet18", num_classes=19, return_features=True)
    teacher = build_model("pspnet_resnet101", num_classes=19, return_features=True)
    labels = torch.randint(0, 19, (batch, crop, crop))
    labels[:, :32] = 255
    data = (torch.randn(batch, 3, crop, crop), labels.float())
    steps = {
        "baseline": DistillStep(student, teacher, task_loss=CriterionDSN(), terms=[],
                                g_optimizer=build_g_optimizer(student, weight_decay=5e-4), g_base_lr=0.01,
                                device=device),
        "skd": build_step(args, student, teacher, build_discriminator(args, device, []), device),
    }
    times = alternate(steps, data)
    ratio = times["skd"] / times["baseline"]
    print(f"SKD training step (CPU, {torch.get_num_threads()} threads, batch {batch}, crop {crop}x{crop}, median): "
          f"unavoidable work (T fwd + S fwd/bwd + CE + SGD) {times['baseline']:.2f} s, full SKD objective "
          f"(Pi + Pa + Ho + WGAN-GP D step) {times['skd']:.2f} s, distillation overhead {ratio:.2f}x", flush=True)
    return ratio


def main():
    return bench_overhead()


if __name__ == "__main__":
    main()
