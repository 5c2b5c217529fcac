"""SKD journal-code benchmark: distillation overhead of the full SKD objective (ratio, nothing asserted).

Time of one training step with CE + 0.4·aux + 10·pixel-wise + 0.5·pair-wise (pool scale 0.5) + 0.1·holistic
and the WGAN-GP discriminator step (SGD) / time of (teacher forward + student forward/backward with the task
loss + SGD step), PSPNet-R101 -> PSPNet-R18 with SKD's 7 outputs, batch 2, crop 512x512 (the smallest crop
whose 65x65 logits the discriminator accepts), CPU, same process.
"""
import statistics
import time

import torch


def _median_time(fn, warmup=1, reps=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_overhead(batch=2, crop=512):
    from common.losses.segmentation import CriterionDSN
    from common.models import Discriminator, build_model
    from skd.options import train_parser
    from skd.train_and_eval import build_step

    torch.manual_seed(0)
    args = train_parser().parse_args(["--weight-decay", "5e-4", "--lambda-pa", "0.5", "--pool-scale", "0.5",
                                      "--lambda-pi", "10.0", "--lambda-d", "0.1"])
    device = torch.device("cpu")
    student = build_model("pspnet_resnet18", num_classes=19, return_features=True)
    teacher = build_model("pspnet_resnet101", num_classes=19, return_features=True).eval()
    images = torch.randn(batch, 3, crop, crop)
    labels = torch.randint(0, 19, (batch, crop, crop))
    labels[:, :32] = 255

    task = CriterionDSN()
    sgd = torch.optim.SGD(student.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)

    def baseline():
        with torch.no_grad():
            teacher(images)
        student.train()
        sgd.zero_grad(set_to_none=True)
        task(student(images), labels).backward()
        sgd.step()

    disc = Discriminator(args.preprocess_GAN_mode, args.imsize_for_adv, args.adv_conv_dim, args.classes_num)
    step = build_step(args, student, teacher, disc, device)
    counter = iter(range(10**6))
    t_base = _median_time(baseline)
    t_full = _median_time(lambda: step((images, labels.float()), next(counter)))
    print(f"SKD training step (B={batch}, {crop}x{crop}, CPU): baseline (T fwd + S fwd/bwd + CE) {t_base:.2f} s, "
          f"full SKD objective (Pi+Pa+Ho) {t_full:.2f} s, distillation overhead {t_full / t_base:.2f}x", flush=True)
    return t_full / t_base


def main():
    return bench_overhead()


if __name__ == "__main__":
    main()
