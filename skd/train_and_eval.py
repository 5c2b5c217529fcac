"""SKD journal code ``train_and_eval.py`` (specs/ifvd_skd.md §B.2.2, §B.4.5, §B.6): structured knowledge
distillation of PSPNet-R101 into PSPNet-R18 on Cityscapes, with evaluation near the end.

Student loss ``CE + 0.4·CE_aux [+ λ_pi·pixel-wise] [+ λ_pa·pair-wise(psp_feat, pool 0.5)]
[+ λ_d·(−mean D(z_S))]``, then one WGAN-GP discriminator step (SGD, G's momentum and weight decay) per G
step (common/engine/distill.py). Poly LR with it = 1..num_steps; the run stops after step num_steps (the
original went on to step 40 001 and crashed on a complex learning rate, §B.9 item 1). Evaluation and the
student snapshot ``CS_scenes_<step>_<mIoU>.pth`` at the original steps (39 326, 39 697, 39 999 by default).
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.engine import (
    Logging,
    LRSchedule,
    PeriodicCheckpoint,
    RunLogger,
    Trainer,
    atomic_save,
    barrier,
    init_distributed,
    psp_kd,
    seed_everything,
)
from common.engine.distill import DistillStep, DistillTerm, build_d_optimizer, build_g_optimizer
from common.errors import UserError, main_guard
from common.losses.segmentation import CriterionDSN
from common.losses.skd import PairWise, PixelWise
from common.models.pspnet import output_side
from common.models.weights import remap_toolbox_teacher
from skd.options import SAVE_PATH, train_parser

CITYSCAPES_TRAIN_IMAGES = 2975  # the original's save_steps = int(2975 / batch_size) (§B.2.2 step 4)
TEACHER_HINT = ("download the SKD teacher (skd/README.md, journal code line) to "
                "./ckpt/Teacher/CS_scenes_38413_0.7832174615268139.pth or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("pass --student-pretrain-model-imgnet ./dataset/resnet18-imagenet.pth (as run_train_val.sh does) "
                 "or train from scratch with --is-student-load-imgnet False")


def check_args(args):
    """Reject flag values the original crashed on, with the fix."""
    psp_kd.check_schedule(args, num_classes_flag="--classes_num", one_based=True)
    if args.save_steps is not None and args.save_steps <= 0:
        raise UserError(f"--save-steps must be positive, got {args.save_steps}")
    if args.pa and not 0 < args.pool_scale <= 1:
        raise UserError(f"--pool-scale must be in (0, 1], got {args.pool_scale}")
    sides = [output_side(c) for c in args.input_size]
    if args.pa and min(int(side * args.pool_scale) for side in sides) < 1:
        raise UserError(f"--pool-scale {args.pool_scale} gives an empty pooling patch for the "
                        f"{sides[0]}x{sides[1]} features of "
                        f"--input-size {args.input_size[0]},{args.input_size[1]}; use a larger crop or scale")
    if args.ho:
        psp_kd.check_adversarial(args, "--ho", args.input_size)


def override_paths(args):
    """The original's post-parse overrides (§B.2.2 step 1): student and D resume folders."""
    args.S_ckpt_path = f"./ckpt/{SAVE_PATH}/Student"
    args.D_ckpt_path = f"./ckpt/{SAVE_PATH}/Distriminator"
    args.gpu_num = len(args.gpu.split(","))


def build_student(args, device, notes):
    """``load_S_model`` (§B.3): ImageNet backbone, else an optional ``model_best.pth.tar`` resume."""
    path = Path(args.S_ckpt_path) / "model_best.pth.tar"
    resume = path if not args.is_student_load_imgnet and args.S_resume and path.is_file() else None
    student = psp_kd.build_student(args, device, num_classes=args.classes_num, hint=IMAGENET_HINT, resume=resume,
                                   resume_flag="model_best.pth.tar", return_features=True)
    if args.is_student_load_imgnet:
        notes.append(f"student backbone initialised from {args.student_pretrain_model_imgnet}")
    elif resume is not None:
        notes.append(f"student resumed from {path}")
    elif args.S_resume:
        notes.append(f"no student checkpoint at {path}: the student starts from random initialisation")
    return student


def build_teacher(args, device):
    """``load_T_model`` (§B.3): toolbox keys remapped (head.0 -> pspmodule, head.1 -> head), then a strict load."""
    return psp_kd.build_teacher(args, args.teacher_model, device, num_classes=args.classes_num, hint=TEACHER_HINT,
                                remap=remap_toolbox_teacher, return_features=True)


def build_discriminator(args, device, notes):
    """D on the 19-channel logits (§B.3, §C.3); an optional ``model_best.pth.tar`` in the D folder."""
    path = Path(args.D_ckpt_path) / "model_best.pth.tar"
    resume = path if args.D_resume and path.is_file() else None
    disc = psp_kd.build_discriminator(args, args.classes_num, device, resume=resume, flag="model_best.pth.tar")
    if resume is not None:
        notes.append(f"discriminator resumed from {path}")
    return disc


def build_step(args, student, teacher, disc, device):
    """``NetModel.optimize_parameters`` (§B.4.5): weighted terms, SGD for G and for D (§B.6)."""
    terms = []
    if args.pi:
        pixel_wise = PixelWise()
        terms.append(DistillTerm("pixelwise", args.lambda_pi, lambda s, t, y: pixel_wise(s[0], t[0])))
    if args.pa:
        pair_wise = PairWise(scale=args.pool_scale)
        # feat_ind = -5 of the 7 outputs [logits, dsn, psp_feat, x4, x3, x2, x1] is psp_feat (§B.3)
        terms.append(DistillTerm("pairwise", args.lambda_pa, lambda s, t, y: pair_wise(s[-5], t[-5])))
    g_opt = build_g_optimizer(student, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    d_opt = None
    if disc is not None:
        d_opt = build_d_optimizer(disc, "sgd", lr=args.lr_d, momentum=args.momentum, weight_decay=args.weight_decay)
    return DistillStep(student, teacher, task_loss=CriterionDSN(ignore_index=255, aux_weight=0.4), terms=terms,
                       g_optimizer=g_opt, g_base_lr=args.lr_g, device=device, discriminator=disc, d_optimizer=d_opt,
                       d_base_lr=args.lr_d, adv_type=args.adv_loss_type, lambda_adv=args.lambda_d,
                       lambda_d=args.lambda_d, lambda_gp=args.lambda_gp, amp=args.amp)


def is_eval_step(step, num_steps, save_steps):
    """The original rule on the 1-based step (§B.2.2 step 7): 39 326, 39 697 and 39 999 by default."""
    return (step > 1 and step % save_steps == 0 and step > num_steps - 1000) or step == num_steps - 1


def run_info(args):
    """``results.json`` fields; method as in the reported tables: "pi", "pi_pa", "pi_pa_ho", ... or "baseline"."""
    method = psp_kd.method_name((("pi", args.pi), ("pa", args.pa), ("ho", args.ho)))
    return psp_kd.run_fields("skd", method, args, crop=args.input_size, teacher=args.teacher_model, extra={
        "code": "journal", "pi": args.pi, "pa": args.pa, "ho": args.ho, "lambda_pi": args.lambda_pi,
        "lambda_pa": args.lambda_pa, "lambda_d": args.lambda_d, "pool_scale": args.pool_scale,
        "random_mirror": args.random_mirror, "random_scale": args.random_scale, "teacher_ckpt": args.T_ckpt_path})


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    override_paths(args)
    check_args(args)
    info = init_distributed(args.device)
    device = info.device
    batch = psp_kd.rank_batch(args.batch_size, info)
    if args.seed is not None:
        seed_everything(args.seed)
    data_seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    save_steps = args.save_steps or int(CITYSCAPES_TRAIN_IMAGES / args.batch_size)
    log_dir, snapshot_dir = Path(args.log_dir), Path(args.snapshot_dir)
    train_set, val_set = psp_kd.train_val_sets(args, truncate=False)

    notes = []
    student = build_student(args, device, notes)
    teacher = build_teacher(args, device)
    disc = build_discriminator(args, device, notes) if args.ho else None
    step = build_step(args, student, teacher, disc, device)
    start_step = args.last_step
    if args.resume:
        resumed = psp_kd.load_run_state(args.resume, step)
        start_step = resumed["step"]
        data_seed = int(resumed["extra"].get("data_seed", data_seed))
        notes.append(f"resumed from {args.resume} at step {start_step + 1}")

    logger = RunLogger(log_dir, "skd.train", enabled=info.is_main, start_step=start_step)
    psp_kd.log_args(logger, args)
    for note in notes:
        logger.info(note)
    loader = psp_kd.train_loader(train_set, seed=data_seed, batch=batch, start=start_step * batch, info=info,
                                 num_workers=args.num_workers)
    vloader = psp_kd.eval_loader(val_set, info)
    logger.info(f"{len(train_set)} train and {len(vloader.dataset)} val images are loaded; data seed {data_seed}")
    fields = run_info(args)
    psp_kd.write_args_json(log_dir, args, fields, info)
    run = psp_kd.DistillRun(step, info, logger, vloader, num_classes=args.classes_num, outputs_dir=args.outputs_dir,
                            state_path=log_dir / "training_state.pth", state_extra={"data_seed": data_seed},
                            fields=fields, results_path=snapshot_dir / "results.json")

    def evaluate_and_save(n):
        """Evaluation point (§B.2.2 step 7): val mIoU, then ``CS_scenes_<step>_<mIoU>.pth`` (the student only)."""
        result = run.evaluate()
        logger.info(f"[val 512,512] mean_IU:{result.miou!r}  IU_array:{result.iou.tolist()}")
        path = snapshot_dir / f"CS_scenes_{n}_{float(result.miou)!r}.pth"
        if info.is_main:
            atomic_save(student.state_dict(), path)
        run.write_results(n, result, checkpoint=path.name)
        run.save_state(n)
        barrier()

    def eval_point(n):
        return is_eval_step(n, args.num_steps, save_steps)

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power, first_index=1),
             psp_kd.OriginalLogLine(logger, step, ("pixelwise", "pairwise"), one_based=True),
             Logging(logger, device=device, period=20, progress=info.is_main),
             psp_kd.StateEvery(run.save_state, args.state_every, skip=eval_point),
             PeriodicCheckpoint(evaluate_and_save, final=False, when=eval_point)]
    Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks).train()
    logger.info(f"stopped after step {args.num_steps} (the original crashed at step {args.num_steps + 1})")
    logger.close()


if __name__ == "__main__":
    main()
