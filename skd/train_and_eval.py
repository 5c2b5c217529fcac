"""SKD journal code ``train_and_eval.py`` (specs/ifvd_skd.md §B.2.2, §B.4.5, §B.6): structured knowledge
distillation of PSPNet-R101 into PSPNet-R18 on Cityscapes, with evaluation near the end.

Student loss ``CE + 0.4·CE_aux [+ λ_pi·pixel-wise] [+ λ_pa·pair-wise(psp_feat, pool 0.5)]
[+ λ_d·(−mean D(z_S))]``, then one WGAN-GP discriminator step (SGD, G's momentum and weight decay) per G
step (common/engine/step.py). Poly LR with it = 1..num_steps; the run stops after step num_steps (the
original went on to step 40 001 and crashed on a complex learning rate, §B.9 item 1). Evaluation and the
student snapshot ``CS_scenes_<step>_<mIoU>.pth`` at the original steps (39 326, 39 697, 39 999 by default).
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.engine import Logging, LRSchedule, PeriodicCheckpoint, PeriodicEval, RunLogger, Trainer, seed_everything
from common.engine.checkpoint import atomic_save
from common.engine.data import eval_loader, rank_batch, train_loader
from common.engine.dist import all_reduce_sum, barrier, init_distributed
from common.engine.step import TrainStep
from common.errors import UserError, main_guard
from common.io import output_dir
from common.methods import relabel
from common.models.pspnet import output_side
from common.models.weights import remap_toolbox_teacher
from common.numerics import resolve_amp, set_tf32
from common.recipes import psp
from common.recipes.run import (
    RunState,
    log_args,
    method_name,
    prepare_run_dir,
    run_fields,
    seed_rank,
    state_every,
    write_args_json,
)
from skd.options import SAVE_PATH, train_parser

CITYSCAPES_TRAIN_IMAGES = 2975  # the original's save_steps = int(2975 / batch_size) (§B.2.2 step 4)
TEACHER_HINT = ("download the SKD teacher (skd/README.md, journal code line) to "
                "./ckpt/Teacher/CS_scenes_38413_0.7832174615268139.pth or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("pass --student-pretrain-model-imgnet ./dataset/resnet18-imagenet.pth (as run_train_val.sh does) "
                 "or train from scratch with --is-student-load-imgnet False")


def check_args(args):
    """Reject flag values the original crashed on, with the fix."""
    psp.check_schedule(args, num_classes_flag="--classes_num", one_based=True)
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
        psp.check_adversarial(args, "--ho", args.input_size)


def override_paths(args):
    """The original's post-parse overrides (§B.2.2 step 1): student and D resume folders."""
    args.S_ckpt_path = f"./ckpt/{SAVE_PATH}/Student"
    args.D_ckpt_path = f"./ckpt/{SAVE_PATH}/Distriminator"
    args.gpu_num = len(args.gpu.split(","))


def build_student(args, device, notes):
    """``load_S_model`` (§B.3): ImageNet backbone, else an optional ``model_best.pth.tar`` resume."""
    path = Path(args.S_ckpt_path) / "model_best.pth.tar"
    resume = path if not args.is_student_load_imgnet and args.S_resume and path.is_file() else None
    student = psp.build_student(args, device, num_classes=args.classes_num, hint=IMAGENET_HINT, resume=resume,
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
    return psp.build_teacher(args, args.teacher_model, device, num_classes=args.classes_num, hint=TEACHER_HINT,
                                remap=remap_toolbox_teacher, return_features=True)


def build_step(args, student, teacher, device, notes=None):
    """``NetModel.optimize_parameters`` (§B.4.5) from the catalogue's ``skd`` (journal defaults): pixel-wise, pair-wise
    on ``psp_feat`` (the original's feat_ind = -5 of [logits, dsn, psp_feat, x4, x3, x2, x1], §B.3; logged without
    λ_pa, §B.2.2 step 6.4) and, with ``--ho``, the WGAN-GP discriminator with SGD (G's momentum and weight decay,
    §B.6) called on the teacher first; an optional ``model_best.pth.tar`` in the D folder (``notes`` says so)."""
    skd = {"pixel": args.lambda_pi if args.pi else 0.0, "pair": args.lambda_pa if args.pa else 0.0,
           "pool_scale": args.pool_scale, "d_momentum": args.momentum, "d_weight_decay": args.weight_decay,
           **psp.adversary_params(args, args.lambda_d, on=args.ho)}
    path = Path(args.D_ckpt_path) / "model_best.pth.tar"
    resume = path if args.ho and args.D_resume and path.is_file() else None
    parts = psp.build_parts(args, student, teacher, {"skd": skd}, preset=None, num_classes=args.classes_num,
                            crop=args.input_size, d_resume=resume, d_flag="model_best.pth.tar")
    if parts.adversary is not None and resume is not None and notes is not None:
        notes.append(f"discriminator resumed from {path}")
    g_opt = psp.build_g_optimizer(student, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    terms = relabel(parts.terms, {"skd.pixel": "pixelwise", "skd.pair": "pairwise"}, raw=("pairwise",))
    return TrainStep(student, task=psp.task_term(ignore_index=255), optimizer=g_opt, base_lr=args.lr_g,
                     device=device, teacher=teacher, terms=terms, adversary=parts.adversary,
                     amp=resolve_amp(args.amp, device, args.amp_dtype))


def shared_random_seed(info):
    """A random data seed drawn on rank 0 and shared by every rank (the sampler needs the same permutation)."""
    seed = torch.tensor([int.from_bytes(os.urandom(4), "little") if info.is_main else 0], dtype=torch.int64,
                        device=info.device)
    return int(all_reduce_sum(seed).item())


def is_eval_step(step, num_steps, save_steps):
    """The original rule on the 1-based step (§B.2.2 step 7): 39 326, 39 697 and 39 999 by default."""
    return (step > 1 and step % save_steps == 0 and step > num_steps - 1000) or step == num_steps - 1


def run_info(args):
    """``results.json`` fields; method as in the reported tables: "pi", "pi_pa", "pi_pa_ho", ... or "baseline"."""
    method = method_name((("pi", args.pi), ("pa", args.pa), ("ho", args.ho)))
    return run_fields("skd", method, model=psp.STUDENT, dataset="cityscapes", iterations=args.num_steps,
                      crop=args.input_size, batch=args.batch_size, seed=args.seed, teacher=args.teacher_model, extra={
        "code": "journal", "pi": args.pi, "pa": args.pa, "ho": args.ho, "lambda_pi": args.lambda_pi,
        "lambda_pa": args.lambda_pa, "lambda_d": args.lambda_d, "pool_scale": args.pool_scale,
        "random_mirror": args.random_mirror, "random_scale": args.random_scale, "teacher_ckpt": args.T_ckpt_path})


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    override_paths(args)
    check_args(args)
    set_tf32(args.tf32)
    info = init_distributed(args.device)
    device = info.device
    batch = rank_batch(args.batch_size, info)
    if args.seed is not None:
        seed_everything(args.seed)
    data_seed = args.seed if args.seed is not None else shared_random_seed(info)
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    save_steps = args.save_steps or int(CITYSCAPES_TRAIN_IMAGES / args.batch_size)
    log_dir = prepare_run_dir(args.log_dir, "--log-dir", info)
    snapshot_dir = prepare_run_dir(args.snapshot_dir, "--snapshot-dir", info)
    if args.outputs_dir:
        output_dir(args.outputs_dir, "--outputs-dir")
    train_set, val_set = psp.train_val_sets(args, truncate=False)

    notes = []
    student = build_student(args, device, notes)
    teacher = build_teacher(args, device)
    step = build_step(args, student, teacher, device, notes)
    state = RunState(log_dir / "training_state.pth", step, info, batch=batch,
                     run={"seed": args.seed, "num_steps": args.num_steps, "batch_size": args.batch_size,
                          "world_size": info.world_size},
                     extra={"data_seed": data_seed})
    start_step = args.last_step
    if args.resume:
        start_step = state.resume(args.resume)
        data_seed = int(state.extra["data_seed"])
        notes.append(f"resumed from {args.resume} at step {start_step + 1}")
    seed_rank(data_seed, info, start_step)

    logger = RunLogger(log_dir, "skd.train", enabled=info.is_main, start_step=start_step)
    log_args(logger, args)
    for note in notes:
        logger.info(note)
    loader = train_loader(train_set, seed=data_seed, batch=batch, start=start_step * batch, info=info,
                          num_workers=args.num_workers)
    vloader = eval_loader(val_set, info)
    logger.info(f"{len(train_set)} train and {len(vloader.dataset)} val images are loaded; data seed {data_seed}")
    fields = run_info(args)
    write_args_json(log_dir, args, fields, info)
    run = psp.DistillRun(step, state, info, logger, vloader, num_classes=args.classes_num,
                         outputs_dir=args.outputs_dir, fields=fields, results_path=snapshot_dir / "results.json")

    def evaluate_and_snapshot(n):
        """Evaluation point (§B.2.2 step 7): val mIoU, then ``CS_scenes_<step>_<mIoU>.pth`` (the student only)."""
        result = run.evaluate()
        logger.info(f"[val 512,512] mean_IU:{result.miou!r}  IU_array:{result.iou.tolist()}")
        path = snapshot_dir / f"CS_scenes_{n}_{float(result.miou)!r}.pth"
        if info.is_main:
            atomic_save(student.state_dict(), path)
        run.write_results(n, result, checkpoint=path.name)
        barrier()
        return result.miou

    def eval_point(n):
        return is_eval_step(n, args.num_steps, save_steps)

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power, first_index=1),
             psp.OriginalLogLine(logger, step, ("pixelwise", "pairwise"), one_based=True,
                                 d_lr=psp.decayed_lr(args.lr_d, args.num_steps, args.power, first_index=1)),
             Logging(logger, device=device, period=20, progress=info.is_main),
             PeriodicCheckpoint(state.save, final=False, when=state_every(args.state_every, skip=eval_point)),
             PeriodicEval(evaluate_and_snapshot, final=False, when=eval_point),
             PeriodicCheckpoint(state.save, final=False, when=eval_point)]
    trainer = Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks)
    state.restore_hooks(trainer)
    trainer.train()
    logger.info(f"stopped after step {args.num_steps} (the original crashed at step {args.num_steps + 1})")
    logger.close()


if __name__ == "__main__":
    main()
