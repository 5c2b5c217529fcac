"""Cost of the AICSD distillation step against the floor (``make bench``; issue 11 item 9; CPU, one process).

The floor is ``aicsd/train_kd.py``'s step with no λ flag: teacher DeepLabV3+ R101 forward (train mode under
``no_grad``, the original's default) + student DeepLabV3+ R18 forward/backward on the ``extract_feature`` view
with the CE only + the SGD step. The other rows are the same step built from the flags the way ``main`` builds
it (``build_terms``, the ALW-weighted CE, ``TrainStep``), on the same models and batch:

* ``aicsd``: the paper's AICSD, ``--lo_lambda 9500 --pi_lambda 10 --ALW`` (CE + ICS + pixel KD, ALW weights);
* ``seed``: the README seed command, ``--pa_lambda 1 --pi_lambda 100`` (CE + SKD pair-wise on ASPP + pixel KD).

Shapes: VOC's batch 6 and 21 classes, the 513x513 crop scaled down (``--crop``, default 129 = 512 / 4 + 1,
features 9x9 at output stride 16 as 33x33 at 513). The step index is mid-run (epoch 60 of ``--ref-epochs``
120, α = 0.5), so every ALW weight is non-zero. Models have random weights (timing only). Steps run
interleaved (bench/timing.py); each ratio is the median of per-round ratios, "not resolved" when the spread
is larger than the effect.
"""
import argparse

import torch

from bench import timing
from common.engine.dist import DistInfo
from common.engine.step import Term, TrainStep
from common.losses.aicsd import SegmentationLoss
from common.recipes import aicsd

ROUNDS = 5
BATCH, CLASSES, CROP = 6, 21, 129
IPE = 1464 // BATCH  # VOC train iterations per epoch at batch 6 (only fixes which epoch the step index falls in)
EPOCH = 60  # α = 60 / 120 = 0.5
VARIANTS = {
    "floor": [],
    "aicsd": ["--lo_lambda", "9500", "--pi_lambda", "10", "--ALW"],
    "seed": ["--pa_lambda", "1", "--pi_lambda", "100"],
}
LABELS = {"aicsd": "AICSD (--lo_lambda 9500 --pi_lambda 10 --ALW)",
          "seed": "README seed (--pa_lambda 1 --pi_lambda 100)"}
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def parse_flags(flags, crop=CROP, batch=BATCH, teacher_backbone="resnet101"):
    """``train_kd.py``'s flags after its checks and defaults (one CPU process, no ImageNet file)."""
    from aicsd import train_kd

    args = train_kd.parser().parse_args(["--crop-size", str(crop), "--base-size", str(crop), "--batch-size",
                                         str(batch), "--device", "cpu", "--imagenet-weights", "none",
                                         "--teacher-backbone", teacher_backbone, *flags])
    aicsd.check_flags(args)
    train_kd.check_kd_flags(args)
    aicsd.apply_defaults(args, CPU)
    return args


def build_models(args):
    """Student (``--backbone``, the distiller's feature view) and teacher (``--teacher-backbone``), random weights."""
    student = aicsd.build_network(args, args.backbone, CPU.device, return_features=True)
    teacher = aicsd.build_network(args, args.teacher_backbone, CPU.device, return_features=True, pretrained=False)
    return student, teacher


def make_step(args, student, teacher, ipe=IPE):
    """The TrainStep of ``train_kd.main`` after epoch 0 (the real optimizer, not the frozen epoch's)."""
    from aicsd import train_kd

    optimizer = aicsd.make_optimizer(aicsd.param_groups(student, args.lr), args)
    ce = SegmentationLoss(args.loss_type, batch_average=args.ce_batch_average)
    parts = train_kd.build_parts(args, train_kd.contract_context(aicsd.AICSD_NUM_CLASSES[args.dataset], ipe))
    task = Term("ce", parts.task_weight or 1.0, ce, ("s.logits", "labels"))
    terms = parts.terms
    return TrainStep(student, optimizer=optimizer, task=task, base_lr=args.lr, device=CPU.device, teacher=teacher,
                     terms=terms, teacher_train=not args.teacher_eval, poly_groups="all", total_name="loss",
                     log_adversarial=False)


def composition(step, index):
    """``name x weight`` of every loss the step sums at ``index`` (CE first)."""
    parts = [step.task, *step.terms]
    return " + ".join(f"{t.weight_at(index):g}*{t.name}" for t in parts)


def make_batch(batch, crop, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, crop, crop, generator=g)
    labels = torch.randint(0, CLASSES, (batch, crop, crop), generator=g)
    labels[torch.rand(batch, crop, crop, generator=g) < 0.05] = 255  # VOC's ignored borders
    return images, labels.float()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench aicsd_step", description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=CROP, help=f"square crop side (default {CROP}; VOC: 513)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"images per step (default {BATCH}, as VOC)")
    parser.add_argument("--teacher-backbone", default="resnet101", choices=("resnet101", "resnet18", "mobilenet"),
                        help="teacher backbone (default resnet101, as the paper; resnet18 if R101 is too slow)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = timing.add_arguments(parser, rounds=ROUNDS).parse_args([] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = {name: parse_flags(f, args.crop, args.batch, args.teacher_backbone) for name, f in VARIANTS.items()}
    student, teacher = build_models(flags["floor"])
    steps = {name: make_step(a, student, teacher) for name, a in flags.items()}
    index = EPOCH * IPE
    batch = make_batch(args.batch, args.crop)
    samples = timing.interleave({name: (lambda s=step: s(batch, index)) for name, step in steps.items()},
                                rounds=args.rounds, warmup=1)
    side = (args.crop - 1) // 16 + 1
    floor = samples["floor"]
    print(f"AICSD step cost (CPU, {torch.get_num_threads()} threads, batch {args.batch}, {CLASSES} classes, crop "
          f"{args.crop}x{args.crop} (VOC 513 scaled), OS16 features {side}x{side}; teacher DeepLabV3+ "
          f"{args.teacher_backbone} (train mode, no_grad), student DeepLabV3+ {flags['floor'].backbone}; step at "
          f"epoch {EPOCH} of ref {flags['floor'].ref_epochs}; {timing.machine_note()})")
    print(f"  floor = {composition(steps['floor'], index)} (teacher fwd + student fwd/bwd + SGD): median "
          f"{floor.median_wall() * 1e3:.0f} ms wall, {floor.median_cpu() * 1e3:.0f} ms CPU")
    results = {}
    for name in VARIANTS:
        if name == "floor":
            continue
        results[name] = timing.ratio(samples, name, "floor")
        print(f"  {LABELS[name]} = {composition(steps[name], index)}")
        print(f"    {results[name].text(f'{name} / floor', floor=1.0)}")
    return results


if __name__ == "__main__":
    main()
