"""IFVD ``train.py`` (specs/ifvd_skd.md §A.2.1, §A.4.6, §A.6): distil PSPNet-R101 into PSPNet-R18.

Student loss ``CE + 0.4·CE_aux + 10·KD + 0.001·(−mean D(z_S)) + 200·IFV``, then one WGAN-GP
discriminator step (Adam) per G step, both on the poly schedule with it = 0..N-1
(common/engine/distill.py). Seeds 0 and deterministic cuDNN, as the original sets at import. At
each save point (by default only step 39 999) it writes ``<data_set>_<step>_G.pth`` (+ ``_D.pth``
with ``--adv``), evaluates the student on val (whole image) and writes ``results.json`` beside them.
The plumbing shared with CWD and SKD is in common/engine/psp_kd.py.
"""
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
    init_distributed,
    psp_kd,
    seed_everything,
)
from common.engine.distill import DistillStep, DistillTerm, build_d_optimizer, build_g_optimizer
from common.engine.options import apply_gpu
from common.errors import UserError, main_guard
from common.losses.ifvd import IntraClassFeatureVariation
from common.losses.kd import PixelKL
from common.losses.segmentation import CriterionDSN
from ifvd.options import train_parser

TEACHER_HINT = ("download teacher_city.pth (ifvd/README.md, Quick start) into ./ckpt/ or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("download resnet18-imagenet.pth (ifvd/README.md, Quick start) into ./ckpt/, pass "
                 "--student-pretrain-model-imgnet, or train from scratch with --is-student-load-imgnet False")


def check_args(args):
    """Reject flag values the original crashed or hung on, with the fix (§A.9 items 2, 7, 10)."""
    psp_kd.check_schedule(args)
    if args.save_ckpt_every <= 0:
        raise UserError(f"--save-ckpt-every must be positive, got {args.save_ckpt_every}")
    if args.adv:
        psp_kd.check_adversarial(args, "--adv", args.input_size)


def build_student(args, device):
    """Student: ImageNet backbone init (§A.3), optional ``--S_resume`` (raw state_dict or {'state_dict', 'step'})."""
    resume = args.S_ckpt_path if args.S_resume else None
    return psp_kd.build_student(args, device, num_classes=args.num_classes, hint=IMAGENET_HINT, resume=resume)


def build_teacher(args, device):
    """Teacher ``--teacher-model``: strict load of IFVD-named keys (§A.3)."""
    return psp_kd.build_teacher(args, args.teacher_model, device, num_classes=args.num_classes, hint=TEACHER_HINT)


def build_discriminator(args, device):
    """D on the 19-channel student/teacher logits (§A.3 "Discriminator"), optionally resumed."""
    resume = args.D_ckpt_path if args.D_resume else None
    return psp_kd.build_discriminator(args, args.num_classes, device, resume=resume)


def build_step(args, student, teacher, disc, device):
    """``NetModel.optimize_parameters`` (§A.4.6): the weighted terms, SGD for G and Adam for D (§A.6)."""
    terms = []
    if args.kd:
        kd = PixelKL(temperature=1.0)
        terms.append(DistillTerm("kd", args.lambda_kd, lambda s, t, y: kd(s[0], t[0])))
    if args.ifv:
        ifv = IntraClassFeatureVariation(args.num_classes, ignore_index=255)
        terms.append(DistillTerm("ifv", args.lambda_ifv, lambda s, t, y: ifv(s[2], t[2], y)))
    g_opt = build_g_optimizer(student, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    d_opt = build_d_optimizer(disc, "adam", lr=args.lr_d, betas=(0.9, 0.99)) if disc is not None else None
    return DistillStep(student, teacher, task_loss=CriterionDSN(ignore_index=255, aux_weight=0.4), terms=terms,
                       g_optimizer=g_opt, g_base_lr=args.lr_g, device=device, discriminator=disc, d_optimizer=d_opt,
                       d_base_lr=args.lr_d, adv_type=args.adv_loss_type, lambda_adv=args.lambda_adv,
                       lambda_d=args.lambda_d, lambda_gp=args.lambda_gp, amp=args.amp)


def run_info(args):
    """``results.json`` fields of the run; method "ifvd" for the full objective, e.g. "kd_ifv" otherwise."""
    method = psp_kd.method_name((("kd", args.kd), ("ifv", args.ifv), ("adv", args.adv)), full="ifvd")
    return psp_kd.run_fields("ifvd", method, args, crop=args.input_size, teacher=args.teacher_model, extra={
        "run": args.save_name, "kd": args.kd, "ifv": args.ifv, "adv": args.adv, "lambda_kd": args.lambda_kd,
        "lambda_ifv": args.lambda_ifv, "lambda_adv": args.lambda_adv, "random_mirror": args.random_mirror,
        "random_scale": args.random_scale, "teacher_ckpt": args.T_ckpt_path})


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    seed_everything(args.seed)  # the original seeds 0 at import, before parsing (§A.2.1 step 1)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    check_args(args)
    apply_gpu(args.gpu)
    info = init_distributed(args.device)
    device = info.device
    batch = psp_kd.rank_batch(args.batch_size, info)
    run_dir = Path(args.save_dir) / args.save_name
    train_set, val_set = psp_kd.train_val_sets(args)

    student = build_student(args, device)
    teacher = build_teacher(args, device)
    disc = build_discriminator(args, device) if args.adv else None
    step = build_step(args, student, teacher, disc, device)
    start_step = psp_kd.load_run_state(args.resume, step)["step"] if args.resume else args.last_step

    logger = RunLogger(run_dir, "ifvd.train", enabled=info.is_main, start_step=start_step)
    psp_kd.log_args(logger, args)
    if args.resume:
        logger.info(f"resumed from {args.resume} at step {start_step}")
    loader = psp_kd.train_loader(train_set, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                                 num_workers=args.num_workers)
    vloader = psp_kd.eval_loader(val_set, info)
    logger.info(f"{len(train_set)} train and {len(vloader.dataset)} val images are loaded")
    fields = run_info(args)
    psp_kd.write_args_json(run_dir, args, fields, info)
    run = psp_kd.DistillRun(step, info, logger, vloader, num_classes=args.num_classes, outputs_dir=args.outputs_dir,
                            state_path=run_dir / "training_state.pth", state_extra={"run": args.save_name},
                            fields=fields, results_path=run_dir / "results.json")

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power, first_index=0),
             psp_kd.OriginalLogLine(logger, step, ("kd", "adv", "ifv")),
             Logging(logger, device=device, period=20, progress=info.is_main),
             psp_kd.StateEvery(run.save_state, args.state_every, skip=lambda n: n == args.num_steps),
             PeriodicCheckpoint(lambda n: run.save_and_evaluate(n, run_dir / f"{args.data_set}_{n - 1}"),
                                every=args.save_ckpt_every, start=args.save_ckpt_start, final=True)]
    Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks).train()
    logger.close()


if __name__ == "__main__":
    main()
