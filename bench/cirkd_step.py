"""Cost of the CIRKD step and of each baseline method against the floor (``make bench``; issue 14 item 7; CPU).

The floor is the step with every distillation weight 0: teacher DeepLabV3-R101 forward (eval, no_grad) +
student DeepLabV3-R18 forward/backward with the task loss + the SGD step. Each method is the same step built
by ``cirkd/train_kd.py``'s own ``build_terms`` from its script's weights (specs/cirkd.md §3.6), on the same
models and batch. Shapes: Cityscapes' per-GPU batch 2 and the 1:2 crop ratio of 512x1024, scaled down
(``--crop``, default 64x128 -> 8x16 features); queues and contrast sizes are the original's (20000/2000,
4096/1024). The adversarial parts of SKD/IFVD/CWD need logits of at least 64x64 (crop 512x512) and are left
out at these shapes; their rows time the other terms. Steps run interleaved (bench/timing.py); each ratio is
the median of per-round ratios, "not resolved" when the spread is larger than the effect.
"""
import argparse

import torch

from bench import timing
from common.engine.lr import make_sgd
from common.engine.step import TrainStep
from common.models import build_model
from common.recipes import cirkd

ROUNDS = 5
OFF = ["--lambda-kd", "0", "--lambda-minibatch-pixel", "0", "--lambda-memory-pixel", "0", "--lambda-memory-region",
       "0"]
CIRKD_OFF = OFF[2:]
VARIANTS = {  # §3.6 weights (adversarial parts dropped, see the docstring)
    "floor": OFF,
    "kd": CIRKD_OFF,
    "cirkd": [],
    "at": CIRKD_OFF + ["--lambda-at", "10000"],
    "fitnet": CIRKD_OFF + ["--lambda-fitnet", "10"],
    "skd": CIRKD_OFF + ["--lambda-skd", "10"],
    "ifvd": CIRKD_OFF + ["--lambda-ifv", "20"],
    "cwd": CIRKD_OFF + ["--lambda-cwd-fea", "50", "--lambda-cwd-logit", "3"],
    "dsd": OFF + ["--lambda-psd", "1000", "--lambda-csd", "10"],
}


def make_step(flags, student, teacher, device):
    from cirkd import train_kd

    args = train_kd.build_parser().parse_args(["--teacher-pretrained", "unused", *flags])
    terms, modules = train_kd.build_terms(args, 19, True, 128, 256, "batchnorm")
    params = [*student.parameters(), *(p for m in modules.values() for p in m.parameters())]
    optimizer = make_sgd(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return TrainStep(student, task=cirkd.task_term(True), optimizer=optimizer, base_lr=args.lr, device=device,
                     teacher=teacher, terms=terms, modules=modules, total_name="loss", log_adversarial=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench cirkd_step", description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, nargs=2, default=[64, 128], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    h, w = args.crop
    student, teacher = build_model("deeplabv3_resnet18"), build_model("deeplabv3_resnet101")
    batch = (torch.randn(args.batch, 3, h, w), torch.randint(-1, 19, (args.batch, h, w)).float())
    steps = {name: make_step(flags, student, teacher, torch.device("cpu")) for name, flags in VARIANTS.items()}
    samples = timing.interleave({name: (lambda s=step: s(batch, 0)) for name, step in steps.items()},
                                rounds=args.rounds, warmup=1)
    floor = samples["floor"]
    print(f"CIRKD step cost (CPU, {torch.get_num_threads()} threads, batch {args.batch}, crop {h}x{w}, features "
          f"{h // 8}x{w // 8}; {timing.machine_note()})")
    print(f"  floor (teacher fwd + student fwd/bwd + task loss + SGD): median {floor.median_wall() * 1e3:.0f} ms "
          f"wall, {floor.median_cpu() * 1e3:.0f} ms CPU")
    results = {}
    for name in VARIANTS:
        if name == "floor":
            continue
        results[name] = timing.ratio(samples, name, "floor")
        target = " (target <= 1.15)" if name == "cirkd" else ""
        print(f"  {results[name].text(f'{name} / floor', floor=1.0)}{target}")
    return results


if __name__ == "__main__":
    main()
