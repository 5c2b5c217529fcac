"""Train ESPNet / ESPNet-C on CamVid with the SKD conference losses — a reconstruction.

The ``cvpr_19`` branch never released its training script ("coming soon"). This one assembles what the branch
does ship (skd_cvpr19.md §8, ``network/net.py``): loss = weight_l·CE ['label' in --sd_mode]
+ weight_k·pixel-wise KD ['kd'] + weight_s·pair-wise (``CriterionSDcos``) ['sd'], the teacher in eval mode under
no_grad. The schedule is the branch's parser defaults (SGD lr 1e-2, momentum 0.9, weight decay 5e-4, poly 0.9,
40000 steps, batch 8, seed 304); what the spec does not give is a documented choice (skd/README.md, Deviations):
crop 360×480, void (11) ignored in the CE, poly indexed from step 0, final evaluation on the test list.
``--init-from`` starts the student from a checkpoint (e.g. fine-tuning a released ESPNet).

    python skd/train_esp.py --method student_esp_d --data-dir $CAMVID --sd_mode light_label_kd_sd \\
        --teacher_model student_esp_d --teacher-from SD+KD+CITY_65.1.pth --init-from base_57.8.pth --random-mirror
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils import data

from common.datasets.camvid import ESP_MEAN_BGR, ESP_STD_BGR, CamVidLight, find_split_list
from common.datasets.cityscapes import IMG_MEAN_BGR
from common.engine import (
    DistInfo,
    Logging,
    LRSchedule,
    PeriodicCheckpoint,
    PeriodicEval,
    ResumableSampler,
    RunLogger,
    SeededDataset,
    Term,
    Trainer,
    TrainStep,
    atomic_save,
    loader_generator,
    make_sgd,
    seed_everything,
)
from common.engine.dist import resolve_device
from common.errors import UserError, main_guard
from common.io import output_dir
from common.losses.skd import ConferenceCrossEntropy, PairWiseCos
from common.methods import build_method, method_context, relabel
from common.models import build_model
from common.numerics import set_tf32
from common.recipes.run import RunState
from common.tables.schema import make_result, write_results
from skd.eval_esp import METHODS, add, build_esp_model, build_parser, evaluate, load_esp_checkpoint

# Teachers by the original's --teacher_model name; 'sd' reads their output "feat" (1/8 of the input for all).
# The KD upsamples stride-8 logits ×8 (spec §8); ESPNet's logits are already at input size.
TEACHERS = {"psp_dsn": "pspnet_resnet101", "student_res18": "pspnet_resnet18", "student_esp_e": "espnet_c",
            "student_esp_d": "espnet"}

def parse_args(argv=None):
    p = build_parser(__doc__)
    add(p, "--eval-list", default=None, help="list evaluated after training (default: test.txt of --data-dir)")
    add(p, "--sd-loss", default="softmax", choices=PairWiseCos.MODES,
        help="pair-wise form: softmax (CriterionSDcos), raw (CriterionSDcos_no), sigmoid (CriterionSDcos_sig)")
    add(p, "--teacher-norm", default="student", choices=("student", "caffe", "sd"),
        help="teacher input: the student's tensor, BGR minus the Caffe mean, or (BGR - ESP mean)/255 (_sd data)")
    add(p, "--init-from", default=None, help="start the student from this checkpoint (strict load; default: random)")
    add(p, "--resume", default=None, help="training_state.pth of an interrupted run")
    add(p, "--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.set_defaults(input_size="360,480", batch_size=8, num_workers=2)
    return p.parse_args(argv)


def teacher_input(x, mode):
    """Re-normalise the student batch for the teacher (``--teacher-norm``)."""
    if mode == "student":
        return x
    std = torch.tensor(ESP_STD_BGR, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(ESP_MEAN_BGR, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    if mode == "sd":
        return x * std / 255.0
    caffe = torch.tensor(IMG_MEAN_BGR, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * std + mean - caffe


def build_teacher(args, device):
    if args.teacher_model.lower() not in TEACHERS:
        raise UserError(f"--teacher_model {args.teacher_model!r} is not a teacher network of segkd; 'kd'/'sd' in "
                        f"--sd_mode need one of: {', '.join(TEACHERS)}")
    if not args.teacher_from:
        raise UserError("'kd'/'sd' in --sd_mode need a trained teacher: pass --teacher-from <file.pth>")
    teacher = build_model(TEACHERS[args.teacher_model.lower()], num_classes=args.num_classes)
    load_esp_checkpoint(teacher, args.teacher_from, args.teacher_model, flag="--teacher-from")
    return teacher.to(device).eval()


def main(argv=None):
    args = parse_args(argv)
    set_tf32(args.tf32)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device or "auto")
    if not args.data_dir:
        raise UserError("no CamVid data directory: pass --data-dir or set CAMVID")
    try:
        crop = tuple(int(v) for v in args.input_size.split(","))
    except ValueError:
        crop = ()
    if len(crop) != 2 or crop[0] % 8 or crop[1] % 8 or min(crop) <= 0:
        raise UserError(f"--input-size {args.input_size!r} must read H,W with both multiples of 8 (e.g. 360,480)")
    if args.num_steps < 1 or args.batch_size < 1:
        raise UserError("--num-steps and --batch-size must be positive")
    seed_everything(args.random_seed)
    student = build_esp_model(args.method, args.num_classes)
    if args.init_from:
        load_esp_checkpoint(student, args.init_from, args.method, flag="--init-from")
    student.to(device)
    use_kd, use_sd, use_label = ("kd" in args.sd_mode), ("sd" in args.sd_mode), ("label" in args.sd_mode)
    if not (use_kd or use_sd or use_label):
        raise UserError(f"--sd_mode {args.sd_mode!r} enables no loss; it must contain 'label', 'kd' and/or 'sd'")
    teacher = build_teacher(args, device) if (use_kd or use_sd) else None

    train_set = CamVidLight(args.data_dir, args.data_list or find_split_list(args.data_dir, "train"), crop_size=crop,
                            scale=args.random_scale, mirror=args.random_mirror, ignore_label=args.ignore_label,
                            void_to_ignore=True)
    eval_list = args.eval_list or find_split_list(args.data_dir, "test")
    num_samples = args.num_steps * args.batch_size
    repeated = data.ConcatDataset([train_set] * -(-num_samples // len(train_set)))
    optimizer = make_sgd(student.parameters(), args.learning_rate, args.momentum, args.weight_decay)

    # loss = weight_l·CE ['label'] + weight_k·pixel-wise KD ['kd'] + weight_s·pair-wise ['sd'], each logged raw
    terms = []
    if use_label:
        terms.append(Term("label", args.weight_l, ConferenceCrossEntropy(args.ignore_label), ("s.logits", "labels"),
                          log_weighted=False))
    if teacher is not None:
        # the catalogue's skd, preset "cvpr19": the x8-upsampled pixel-wise KD of each stride-8 map, CriterionSDcos
        ctx = method_context(student, teacher, num_classes=args.num_classes, ignore_index=args.ignore_label,
                             total_steps=args.num_steps, crop=crop)
        parts = build_method("skd", ctx, preset="cvpr19", pixel=args.weight_k if use_kd else 0.0,
                             pair=args.weight_s if use_sd else 0.0, temperature=args.tem, cos_mode=args.sd_loss)
        terms += relabel(parts.terms, {"skd.pixel": "kd", "skd.pair": "sd"}, raw=("kd", "sd"))
    step = TrainStep(student, task=None, optimizer=optimizer, base_lr=args.learning_rate, device=device,
                     teacher=teacher, terms=terms, teacher_input=lambda x: teacher_input(x, args.teacher_norm),
                     total_name="loss", log_adversarial=False)

    out_dir = output_dir(args.snapshot_dir, "--snapshot-dir")
    one_process = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    state = RunState(out_dir / "training_state.pth", step, one_process, batch=args.batch_size,
                     run={"seed": args.random_seed, "num_steps": args.num_steps, "batch_size": args.batch_size,
                          "method": args.method, "sd_mode": args.sd_mode, "init_from": args.init_from})
    start = state.resume(args.resume, restore_rng=False) if args.resume else 0
    sampler = ResumableSampler(len(repeated), args.random_seed, start=start * args.batch_size)
    loader = data.DataLoader(SeededDataset(repeated, args.random_seed), batch_size=args.batch_size, sampler=sampler,
                             num_workers=args.num_workers, drop_last=True, generator=loader_generator(args.random_seed),
                             pin_memory=device.type == "cuda")
    data_iter = iter(loader)
    state.restore_rng()

    def save_weights(n):
        atomic_save(student.state_dict(), out_dir / f"{args.method}_{n}.pth")

    logger = RunLogger(out_dir, "skd.train_esp", start_step=start)
    logger.info(f"train_esp: {args.method} with sd_mode={args.sd_mode}, {len(train_set)} train images, "
                f"steps {start}..{args.num_steps - 1}, batch {args.batch_size}, crop {crop}")

    def final_eval(n):
        eval_set = CamVidLight(args.data_dir, eval_list, crop_size=(360, 480))
        cm, count, seconds = evaluate(student, eval_set, args.num_classes, 255, device, progress=False,
                                      channels_last=args.channels_last and device.type == "cpu",
                                      num_workers=args.num_workers)
        student.to(memory_format=torch.contiguous_format)
        logger.info(f"final mIoU {100 * cm.miou():.2f} on {count} images of {eval_list}")
        write_results(out_dir / "results.json", make_result(
            paper="skd", method=f"{args.method}:{args.sd_mode}", model=METHODS[args.method.lower()], dataset="camvid",
            split=Path(eval_list).stem, miou=cm.miou(), iou=cm.iou().tolist(), pixel_acc=cm.pixel_acc(),
            mean_acc=cm.mean_acc(), iterations=args.num_steps, crop=list(crop), batch=args.batch_size,
            seed=args.random_seed, wall_time_s=seconds, images_per_s=count / seconds if seconds else None,
            teacher=args.teacher_model if teacher is not None else None,
            extra={"checkpoint": str(out_dir / f"{args.method}_{args.num_steps}.pth"),
                   "reconstruction": True, "sd_loss": args.sd_loss, "teacher_norm": args.teacher_norm,
                   "init_from": Path(args.init_from).stem if args.init_from else None,
                   "teacher_from": Path(args.teacher_from).stem if teacher is not None else None}))
        return cm.miou()

    every = args.save_every or None
    hooks = [LRSchedule(step.poly_specs(), args.num_steps, args.power, first_index=0),
             Logging(logger, device, period=20),
             PeriodicCheckpoint(state.save, every=every, final=True),
             PeriodicCheckpoint(save_weights, every=every, final=True),
             PeriodicEval(final_eval, final=True)]
    trainer = Trainer(step, data_iter, args.num_steps, start_step=start, hooks=hooks)
    state.restore_hooks(trainer)
    try:
        trainer.train()
    finally:
        logger.close()
    return out_dir


if __name__ == "__main__":
    main_guard(main)()
