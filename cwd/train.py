"""CWD ``train.py`` (specs/cwd.md §3.2): distil PSPNet-R101 into PSPNet-R18 on Cityscapes.

Loss of the student: CE + 0.4·CE_aux [+ λ_kd·pixel KD] [+ λ_adv·(−mean D(z_S))] [+ λ_cwd·CWD], with
CWD on the logits or (``--cwd-feat``) on the PSP features through the 128→512 adapter; one D step per
G step with ``--adv`` (common/engine/distill.py). Poly LR on param group 0 of G and D. At every save
point (by default only the last step) the student (``<data_set>_<step>_G.pth``, + ``_D.pth``) is
saved and evaluated on val; the mIoU goes to the log and to ``<run>/results.json``. The plumbing
shared with IFVD and SKD is in common/engine/psp_kd.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
from common.engine.dist import destroy
from common.engine.distill import DistillStep, DistillTerm, build_d_optimizer, build_g_optimizer
from common.engine.options import size_pair
from common.errors import main_guard
from common.losses.cwd import ChannelWiseDivergence, FeatureAdapter
from common.losses.kd import PixelKL
from common.losses.segmentation import CriterionDSN
from cwd.options import resolve_list, train_parser

TEACHER_HINT = ("download teacher_city.pth (README: Quick start) into ./ckpt/ or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("download resnet18-imagenet.pth (README: Quick start) into ./ckpt/, pass "
                 "--student-pretrain-model-imgnet, or train from scratch with --is-student-load-imgnet False")


def check_args(args):
    """Reject flag values the original crashed on, with the fix; returns the crop ``(h, w)``."""
    crop = size_pair(args.input_size)
    if args.cwd:
        ChannelWiseDivergence(args.norm_type, args.divergence, args.temperature)
    psp_kd.check_schedule(args)
    if args.adv:
        psp_kd.check_adversarial(args, "--adv", crop)
    return crop


def build_student(args, device):
    """Student: ImageNet backbone init, optional ``--S_resume`` (raw state_dict or {'state_dict', 'step'})."""
    resume = args.S_ckpt_path if args.S_resume else None
    return psp_kd.build_student(args, device, num_classes=args.num_classes, hint=IMAGENET_HINT, resume=resume)


def build_teacher(args, device):
    """Teacher PSPNet-R101, strict load of ``--T_ckpt_path``."""
    return psp_kd.build_teacher(args, psp_kd.TEACHER, device, num_classes=args.num_classes, hint=TEACHER_HINT)


def build_terms(args, device):
    """The distillation terms of ``NetModel`` in its order (kd, cwd) and the adapter, if any."""
    terms, extra = [], []
    if args.kd:
        kd = PixelKL()
        terms.append(DistillTerm("kd", args.lambda_kd, lambda s, t, y: kd(s[0], t[0])))
    if args.cwd:
        cwd = ChannelWiseDivergence(args.norm_type, args.divergence, args.temperature)
        if args.cwd_feat:
            adapter = FeatureAdapter(128, 512, norm=args.norm).to(device)
            extra.append(adapter)
            terms.append(DistillTerm("cwd", args.lambda_cwd, lambda s, t, y: cwd(adapter(s[2]), t[2])))
        else:
            terms.append(DistillTerm("cwd", args.lambda_cwd, lambda s, t, y: cwd(s[0], t[0])))
    return terms, extra


def build_step(args, student, teacher, device):
    """``NetModel``: the terms, SGD for G (+ the adapter as a second param group) and, with ``--adv``, Adam for D."""
    terms, extra = build_terms(args, device)
    g_opt = build_g_optimizer(student, extra, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    disc = d_opt = None
    if args.adv:
        resume = args.D_ckpt_path if args.D_resume else None
        disc = psp_kd.build_discriminator(args, args.num_classes, device, resume=resume)
        d_opt = build_d_optimizer(disc, "adam", lr=args.lr_d, betas=(0.9, 0.99))
    return DistillStep(student, teacher, task_loss=CriterionDSN(aux_weight=0.4), terms=terms, g_optimizer=g_opt,
                       g_base_lr=args.lr_g, device=device, extra_modules=extra, discriminator=disc,
                       d_optimizer=d_opt, d_base_lr=args.lr_d, adv_type=args.adv_loss_type,
                       lambda_adv=args.lambda_adv, lambda_d=args.lambda_d, lambda_gp=args.lambda_gp, amp=args.amp)


def run_info(args, crop):
    """``results.json`` fields of the run; method e.g. "cwd", "cwd+kd+adv", or "baseline"."""
    method = psp_kd.method_name((("cwd", args.cwd), ("kd", args.kd), ("adv", args.adv)), sep="+")
    return psp_kd.run_fields("cwd", method, args, crop=crop, teacher=psp_kd.TEACHER, extra={
        "level": "feature" if args.cwd_feat else "logits", "run": args.save_name, "norm_type": args.norm_type,
        "divergence": args.divergence, "lambda_cwd": args.lambda_cwd, "temperature": args.temperature,
        "kd": args.kd, "adv": args.adv, "cwd": args.cwd, "teacher_ckpt": args.T_ckpt_path})


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    crop = check_args(args)
    info = init_distributed(args.device)
    device = info.device
    batch = psp_kd.rank_batch(args.batch_size, info)
    seed_everything(args.seed)
    run_dir = Path(args.save_dir) / args.save_name
    student = build_student(args, device)
    teacher = build_teacher(args, device)
    step = build_step(args, student, teacher, device)
    start_step = psp_kd.load_run_state(args.resume, step)["step"] if args.resume else args.last_step

    logger = RunLogger(run_dir, "cwd.train", enabled=info.is_main, start_step=start_step)
    psp_kd.log_args(logger, args)
    if args.resume:
        logger.info(f"resumed from {args.resume} at step {start_step}")
    train_set, val_set = psp_kd.train_val_sets(args, crop=crop, lists=resolve_list)
    loader = psp_kd.train_loader(train_set, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                                 num_workers=args.num_workers)
    logger.info(f"{len(train_set)} images are loaded!")
    vloader = psp_kd.eval_loader(val_set, info)
    logger.info(f"{len(vloader.dataset)} images are loaded!")
    fields = run_info(args, crop)
    psp_kd.write_args_json(run_dir, args, fields, info)
    run = psp_kd.DistillRun(step, info, logger, vloader, num_classes=args.num_classes, outputs_dir=args.outputs_dir,
                            state_path=run_dir / "training_state.pth", state_extra={"run": args.save_name},
                            fields=fields, results_path=run_dir / "results.json")

    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power),
             psp_kd.OriginalLogLine(logger, step, ("kd", "adv", "cwd"), lr_group=-1),
             Logging(logger, device=device, period=20, progress=info.is_main),
             psp_kd.StateEvery(run.save_state, args.state_every, skip=lambda n: n == args.num_steps),
             PeriodicCheckpoint(lambda n: run.save_and_evaluate(n, run_dir / f"{args.data_set}_{n - 1}"),
                                every=args.save_ckpt_every, start=args.save_ckpt_start, final=True)]
    Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks).train()
    logger.close()
    destroy()


if __name__ == "__main__":
    main()
