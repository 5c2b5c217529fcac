"""CWD ``train.py`` (specs/cwd.md §3.2): distil PSPNet-R101 into PSPNet-R18 on Cityscapes.

Loss of the student: CE + 0.4·CE_aux [+ λ_kd·pixel KD] [+ λ_adv·(−mean D(z_S))] [+ λ_cwd·CWD], with
CWD on the logits or (``--cwd-feat``) on the PSP features through the 128→512 adapter; one D step per
G step with ``--adv`` (common/engine/step.py). Poly LR on param group 0 of G and D. At every save
point (by default only the last step) the student (``<data_set>_<step>_G.pth``, + ``_D.pth``) is
saved and evaluated on val; the mIoU goes to the log and to ``<run>/results.json``. The plumbing
shared with IFVD and SKD is in common/recipes/psp.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.engine import Logging, LRSchedule, PeriodicCheckpoint, PeriodicEval, RunLogger, Trainer, seed_everything
from common.engine.data import eval_loader, rank_batch, train_loader
from common.engine.dist import destroy, init_distributed
from common.engine.step import TrainStep
from common.errors import flag_errors, main_guard
from common.io import output_dir
from common.losses.cwd import ChannelWiseDivergence
from common.methods import relabel
from common.numerics import resolve_amp, set_tf32
from common.recipes import psp
from common.recipes.options import size_pair
from common.recipes.run import (
    RunState,
    has_results,
    log_args,
    method_name,
    prepare_run_dir,
    run_fields,
    seed_rank,
    state_every,
    write_args_json,
)
from cwd.options import demo_crop, resolve_list, train_parser

TEACHER_HINT = ("download teacher_city.pth (README: Quick start) into ./ckpt/ or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("download resnet18-imagenet.pth (README: Quick start) into ./ckpt/, pass "
                 "--student-pretrain-model-imgnet, or train from scratch with --is-student-load-imgnet False")


def check_args(args):
    """Reject flag values the original crashed on, with the fix; returns the crop ``(h, w)``."""
    if args.input_size is None:
        args.input_size = demo_crop(args.adv)
    crop = size_pair(args.input_size)
    if args.cwd:
        with flag_errors():
            ChannelWiseDivergence(args.norm_type, args.divergence, args.temperature)
    psp.check_schedule(args)
    if args.adv:
        psp.check_adversarial(args, "--adv", crop)
    return crop


def build_student(args, device):
    """Student: ImageNet backbone init, optional ``--S_resume`` (raw state_dict or {'state_dict', 'step'})."""
    resume = args.S_ckpt_path if args.S_resume else None
    return psp.build_student(args, device, num_classes=args.num_classes, hint=IMAGENET_HINT, resume=resume)


def build_teacher(args, device):
    """Teacher ``--teacher-model`` (the original: PSPNet-R101), strict load of ``--T_ckpt_path``."""
    return psp.build_teacher(args, args.teacher_model, device, num_classes=args.num_classes, hint=TEACHER_HINT)


def build_step(args, student, teacher, device):
    """``NetModel`` from the catalogue: ``kd`` (preset "cwd": the pixel-wise KL) and ``cwd`` (on the logits, or with
    ``--cwd-feat`` on the PSP features through its 128->512 adapter, which joins G's SGD as a second param group;
    with ``--adv`` the WGAN-GP discriminator and its Adam), in the original's order (kd, cwd)."""
    weight = args.lambda_cwd if args.cwd else 0.0
    cwd = {"logits": 0.0 if args.cwd_feat else weight, "feat": weight if args.cwd_feat else 0.0,
           "temperature": args.temperature, "norm_type": args.norm_type, "divergence": args.divergence,
           "adapter": "cwd", **psp.adversary_params(args, args.lambda_adv, on=args.adv)}
    parts = psp.build_parts(args, student, teacher, {"kd": {"weight": args.lambda_kd} if args.kd else None,
                                                     "cwd": cwd if args.cwd or args.adv else None},
                            preset="cwd", num_classes=args.num_classes, crop=size_pair(args.input_size),
                            d_resume=args.D_ckpt_path if args.D_resume else None)
    g_opt = psp.build_g_optimizer(student, parts.modules.values(), lr=args.lr_g, momentum=args.momentum,
                                  weight_decay=args.weight_decay)
    terms = relabel(parts.terms, {"cwd.logits": "cwd", "cwd.feat": "cwd"})
    return TrainStep(student, task=psp.task_term(ignore_index=255), optimizer=g_opt, base_lr=args.lr_g,
                     device=device, teacher=teacher, terms=terms, modules=parts.modules, adversary=parts.adversary,
                     amp=resolve_amp(args.amp, device, args.amp_dtype))


def run_info(args, crop):
    """``results.json`` fields of the run; method e.g. "cwd", "cwd+kd+adv", or "baseline"."""
    method = method_name((("cwd", args.cwd), ("kd", args.kd), ("adv", args.adv)), sep="+")
    return run_fields("cwd", method, model=psp.STUDENT, dataset="cityscapes", iterations=args.num_steps, crop=crop,
                      batch=args.batch_size, seed=args.seed, teacher=args.teacher_model, extra={
        "level": "feature" if args.cwd_feat else "logits", "run": args.save_name, "norm_type": args.norm_type,
        "divergence": args.divergence, "lambda_cwd": args.lambda_cwd, "temperature": args.temperature,
        "kd": args.kd, "adv": args.adv, "cwd": args.cwd, "teacher_ckpt": args.T_ckpt_path})


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    crop = check_args(args)
    set_tf32(args.tf32)
    torch.backends.cudnn.deterministic = True  # the original's cudnn settings (cwd.md §3.2 a)
    torch.backends.cudnn.benchmark = False
    info = init_distributed(args.device)
    device = info.device
    batch = rank_batch(args.batch_size, info)
    seed_everything(args.seed)
    run_dir = prepare_run_dir(Path(args.save_dir) / args.save_name, "--save-dir", info)
    if args.outputs_dir:
        output_dir(args.outputs_dir, "--outputs-dir")
    student = build_student(args, device)
    teacher = build_teacher(args, device)
    step = build_step(args, student, teacher, device)
    state = RunState(run_dir / "training_state.pth", step, info, batch=batch,
                     run={"seed": args.seed, "num_steps": args.num_steps, "batch_size": args.batch_size,
                          "world_size": info.world_size}, extra={"run": args.save_name})
    start_step = state.resume(args.resume) if args.resume else args.last_step
    seed_rank(args.seed, info, start_step)

    logger = RunLogger(run_dir, "cwd.train", enabled=info.is_main, start_step=start_step)
    log_args(logger, args)
    if args.resume:
        logger.info(f"resumed from {args.resume} at step {start_step}")
    train_set, val_set = psp.train_val_sets(args, crop=crop, lists=resolve_list)
    loader = train_loader(train_set, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                          num_workers=args.num_workers)
    logger.info(f"{len(train_set)} images are loaded!")
    vloader = eval_loader(val_set, info)
    logger.info(f"{len(vloader.dataset)} images are loaded!")
    fields = run_info(args, crop)
    write_args_json(run_dir, args, fields, info)
    run = psp.DistillRun(step, state, info, logger, vloader, num_classes=args.num_classes,
                         outputs_dir=args.outputs_dir, fields=fields, results_path=run_dir / "results.json")

    def prefix(n):
        return run_dir / f"{args.data_set}_{n - 1}"

    save_points = {"every": args.save_ckpt_every, "start": args.save_ckpt_start, "final": True}
    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power),
             psp.OriginalLogLine(logger, step, ("kd", "adv", "cwd"), lr_group=-1, last_digits=6,
                                 d_lr=psp.decayed_lr(args.lr_d, args.num_steps, args.power)),
             Logging(logger, device=device, period=20, progress=info.is_main),
             PeriodicCheckpoint(state.save, final=False,
                                when=state_every(args.state_every, skip=lambda n: n == args.num_steps)),
             PeriodicCheckpoint(lambda n: run.save_weights(n, prefix(n)), **save_points,
                                done=lambda: Path(f"{prefix(args.num_steps)}_G.pth").is_file()),
             PeriodicEval(run.evaluate_point, **save_points,
                          done=lambda: has_results(run.results_path, args.num_steps))]
    trainer = Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks)
    state.restore_hooks(trainer)
    trainer.train()
    logger.close()
    destroy()


if __name__ == "__main__":
    main()
