"""IFVD ``train.py`` (specs/ifvd_skd.md §A.2.1, §A.4.6, §A.6): distil PSPNet-R101 into PSPNet-R18.

Student loss ``CE + 0.4·CE_aux + 10·KD + 0.001·(−mean D(z_S)) + 200·IFV``, then one WGAN-GP
discriminator step (Adam) per G step, both on the poly schedule with it = 0..N-1
(common/engine/step.py). Seeds 0 and deterministic cuDNN, as the original sets at import. At
each save point (by default only step 39 999) it writes ``<data_set>_<step>_G.pth`` (+ ``_D.pth``
with ``--adv``), evaluates the student on val (whole image) and writes ``results.json`` beside them.
The plumbing shared with CWD and SKD is in common/recipes/psp.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.engine import Logging, LRSchedule, PeriodicCheckpoint, PeriodicEval, RunLogger, Trainer, seed_everything
from common.engine.data import eval_loader, rank_batch, train_loader
from common.engine.dist import init_distributed
from common.engine.step import TrainStep
from common.errors import UserError, main_guard
from common.io import output_dir
from common.methods import relabel
from common.numerics import resolve_amp, set_tf32
from common.recipes import psp
from common.recipes.options import apply_gpu
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
from ifvd.options import train_parser

TEACHER_HINT = ("download teacher_city.pth (ifvd/README.md, Quick start) into ./ckpt/ or pass --T_ckpt_path; "
                "training against a random teacher is refused")
IMAGENET_HINT = ("download resnet18-imagenet.pth (ifvd/README.md, Quick start) into ./ckpt/, pass "
                 "--student-pretrain-model-imgnet, or train from scratch with --is-student-load-imgnet False")


def check_args(args):
    """Reject flag values the original crashed or hung on, with the fix (§A.9 items 2, 7, 10)."""
    psp.check_schedule(args)
    if args.save_ckpt_every <= 0:
        raise UserError(f"--save-ckpt-every must be positive, got {args.save_ckpt_every}")
    if args.adv:
        psp.check_adversarial(args, "--adv", args.input_size)


def build_student(args, device):
    """Student: ImageNet backbone init (§A.3), optional ``--S_resume`` (raw state_dict or {'state_dict', 'step'})."""
    resume = args.S_ckpt_path if args.S_resume else None
    return psp.build_student(args, device, num_classes=args.num_classes, hint=IMAGENET_HINT, resume=resume)


def build_teacher(args, device):
    """Teacher ``--teacher-model``: strict load of IFVD-named keys (§A.3)."""
    return psp.build_teacher(args, args.teacher_model, device, num_classes=args.num_classes, hint=TEACHER_HINT)


def build_step(args, student, teacher, device):
    """``NetModel.optimize_parameters`` (§A.4.6) from the catalogue: ``kd`` (preset "ifvd": the pixel-wise KL) and
    ``ifvd`` (IFV on the PSP features, the WGAN-GP discriminator with Adam, §A.6), SGD for G; the D optionally
    resumed from ``--D_ckpt_path``."""
    ifvd = {"ifv": args.lambda_ifv if args.ifv else 0.0, **psp.adversary_params(args, args.lambda_adv, on=args.adv)}
    parts = psp.build_parts(args, student, teacher, {"kd": {"weight": args.lambda_kd} if args.kd else None,
                                                     "ifvd": ifvd if args.ifv or args.adv else None},
                            preset="ifvd", num_classes=args.num_classes, crop=args.input_size,
                            d_resume=args.D_ckpt_path if args.D_resume else None)
    g_opt = psp.build_g_optimizer(student, lr=args.lr_g, momentum=args.momentum, weight_decay=args.weight_decay)
    return TrainStep(student, task=psp.task_term(ignore_index=255), optimizer=g_opt, base_lr=args.lr_g,
                     device=device, teacher=teacher, terms=relabel(parts.terms, {"ifvd": "ifv"}),
                     adversary=parts.adversary, amp=resolve_amp(args.amp, device, args.amp_dtype))


def run_info(args):
    """``results.json`` fields of the run; method "ifvd" for the full objective, e.g. "kd_ifv" otherwise."""
    method = method_name((("kd", args.kd), ("ifv", args.ifv), ("adv", args.adv)), full="ifvd")
    return run_fields("ifvd", method, model=psp.STUDENT, dataset="cityscapes", iterations=args.num_steps,
                      crop=args.input_size, batch=args.batch_size, seed=args.seed, teacher=args.teacher_model, extra={
        "run": args.save_name, "kd": args.kd, "ifv": args.ifv, "adv": args.adv, "lambda_kd": args.lambda_kd,
        "lambda_ifv": args.lambda_ifv, "lambda_adv": args.lambda_adv, "random_mirror": args.random_mirror,
        "random_scale": args.random_scale, "teacher_ckpt": args.T_ckpt_path})


@main_guard
def main(argv=None):
    args = train_parser().parse_args(argv)
    seed_everything(args.seed)  # the original seeds 0 at import, before parsing (§A.2.1 step 1)
    set_tf32(args.tf32)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    check_args(args)
    apply_gpu(args.gpu)
    info = init_distributed(args.device)
    device = info.device
    batch = rank_batch(args.batch_size, info)
    run_dir = prepare_run_dir(Path(args.save_dir) / args.save_name, "--save-dir", info)
    if args.outputs_dir:
        output_dir(args.outputs_dir, "--outputs-dir")
    train_set, val_set = psp.train_val_sets(args)

    student = build_student(args, device)
    teacher = build_teacher(args, device)
    step = build_step(args, student, teacher, device)
    state = RunState(run_dir / "training_state.pth", step, info, batch=batch,
                     run={"seed": args.seed, "num_steps": args.num_steps, "batch_size": args.batch_size,
                          "world_size": info.world_size}, extra={"run": args.save_name})
    start_step = state.resume(args.resume) if args.resume else args.last_step
    seed_rank(args.seed, info, start_step)

    logger = RunLogger(run_dir, "ifvd.train", enabled=info.is_main, start_step=start_step)
    log_args(logger, args)
    if args.resume:
        logger.info(f"resumed from {args.resume} at step {start_step}")
    loader = train_loader(train_set, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                          num_workers=args.num_workers)
    vloader = eval_loader(val_set, info)
    logger.info(f"{len(train_set)} train and {len(vloader.dataset)} val images are loaded")
    fields = run_info(args)
    write_args_json(run_dir, args, fields, info)
    run = psp.DistillRun(step, state, info, logger, vloader, num_classes=args.num_classes,
                         outputs_dir=args.outputs_dir, fields=fields, results_path=run_dir / "results.json")

    def prefix(n):
        return run_dir / f"{args.data_set}_{n - 1}"

    save_points = {"every": args.save_ckpt_every, "start": args.save_ckpt_start, "final": True}
    hooks = [LRSchedule(step.poly_specs(), args.num_steps, power=args.power, first_index=0),
             psp.OriginalLogLine(logger, step, ("kd", "adv", "ifv"), last_digits=6,
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


if __name__ == "__main__":
    main()
