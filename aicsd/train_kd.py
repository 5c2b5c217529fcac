"""AICSD ``train_kd.py`` (specs/aicsd.md §2.2, §2.4, §4): distil the DeepLabV3+ R101 teacher into a DeepLabV3+ student.

In the original's order: parse and default the flags (wandb only with ``--wandb``), run folder, loaders; the
teacher strictly loaded from ``--teacher_path`` (``state_dict``), the ImageNet-initialised student; the terms
the λ flags switch on, computed on the ``extract_feature`` view of both networks (no ASPP dropout, §3.4):

* ``--pa_lambda``: the SKD pair-wise loss on the ASPP features (§4.6.1) — what the README's ``--pa_lambda 9500``
  really runs (§2.8);
* ``--pi_lambda``: pixel-wise KD, KL over B·C·H·W (§4.2);
* ``--lo_lambda``: the ICS loss (§4.3; ``--ics-mode code|paper``);
* ``--ic_lambda``: the ICKD-like term, computed and logged, never added (§4.6.2).

Per iteration ``CE + pa + pi + lo``; with ``--ALW`` (the original's two commented-out lines, §4.4)
``α·(CE + lo) + (1 − α)·pi`` with α = epoch / ``--ref-epochs``. The teacher runs in train mode under
``no_grad`` (``--teacher-eval``: eval mode); epoch 0 updates no student weight (``--first-epoch-frozen``,
§6.3). Validation every epoch; a better mIoU saves ``checkpoint.pth.tar`` {epoch, state_dict, best_pred}.
"""
import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import RunLogger
from common.engine.dist import destroy, init_distributed
from common.engine.step import Term, TrainStep
from common.errors import UserError, flag_errors, main_guard
from common.losses.aicsd import SegmentationLoss
from common.methods import MethodContext, build_method, relabel
from common.models.deeplabv3plus import model_name
from common.numerics import set_tf32
from common.recipes import aicsd
from common.recipes.run import RunState, log_args


def parser():
    p = argparse.ArgumentParser(description="PyTorch DeeplabV3Plus Training")
    aicsd.add_common_flags(p, kd=True)
    aicsd.add_kd_flags(p)
    return p


def check_kd_flags(args):
    """ALW needs a positive ``--ref-epochs`` (α = epoch / ref-epochs)."""
    if args.ref_epochs <= 0:
        raise UserError(f"--ref-epochs must be positive, got {args.ref_epochs}")


LOG_NAMES = {"skd.pair": "pa", "aicsd.kd": "pi", "aicsd.ics": "lo", "aicsd.ic": "ic"}  # the original's names
CONTRACT_CROP = 513  # the original's crop: DeepLabV3+ logits at 513x513, ASPP features at 33x33 (§3.4)


def method_spec(args):
    """The catalogue methods and parameters of the λ flags (§2.5, §4.5), in the original's order of the sum:
    ``skd`` (preset "aicsd": pa on the ASPP features, left out under ALW, §4.4), then ``aicsd`` (pi, lo, ic and
    ALW's α on the task loss); a flag that is not given builds nothing."""
    names, params = [], {}
    if args.pa_lambda is not None and not args.ALW:
        names.append("skd")
        params.update({"skd.pair": args.pa_lambda, "skd.pixel": 0.0, "skd.feature": "aspp", "skd.adv": 0.0,
                       "skd.d": 0.0})
    lambdas = (args.pi_lambda, args.lo_lambda, args.ic_lambda)
    if args.ALW or any(value is not None for value in lambdas):
        names.append("aicsd")
        params.update({"aicsd.kd": args.pi_lambda or 0.0, "aicsd.ics": args.lo_lambda or 0.0,
                       "aicsd.ic": args.ic_lambda or 0.0, "aicsd.alw": args.ALW, "aicsd.ref_epochs": args.ref_epochs,
                       "aicsd.ics_mode": args.ics_mode})
    return "+".join(names) or "none", params


def build_parts(args, ctx):
    """Terms (named as the original logs them) and ALW's task weight of the flags, from the catalogue."""
    spec, params = method_spec(args)
    parts = build_method(spec, ctx, **params)
    parts.terms = relabel(parts.terms, LOG_NAMES)
    return parts


def contract_context(num_classes, ipe, crop=CONTRACT_CROP):
    """The DeepLabV3+ pair as its ``extract_feature`` view describes it (§3.4) at ``crop``, with ``ipe`` steps per
    epoch (no dummy forward: the teacher sees only the training batches)."""
    side, aspp = crop, -(-crop // 16)
    outputs = {"logits": (num_classes, side, side), "aspp": (256, aspp, aspp)}
    return MethodContext("student", "teacher", outputs, dict(outputs), num_classes, 255, "batchnorm", None, ipe,
                         (side, side))


def build_terms(args, num_classes, ipe):
    """The terms of :func:`build_parts` for the pair of :func:`contract_context`."""
    return build_parts(args, contract_context(num_classes, ipe)).terms


def method_name(args):
    """``results.json`` method: ``aicsd`` for ALW with ICS and KD, else the terms in the total joined by ``+``
    (``kd`` pixel-wise, ``pa`` pair-wise, ``icsd`` ICS), with ``alw+`` in front under ``--ALW``."""
    if args.ALW and args.lo_lambda is not None and args.pi_lambda is not None:
        return "aicsd"
    parts = [name for name, on in (("pa", args.pa_lambda is not None and not args.ALW),
                                   ("kd", args.pi_lambda is not None), ("icsd", args.lo_lambda is not None)) if on]
    return ("alw+" if args.ALW else "") + ("+".join(parts) or "baseline")


def notes(args):
    """What the flags really compute, for the top of the log (§2.8)."""
    lines = []
    if args.ALW:
        lines.append(f"ALW: loss = alpha*(CE + lo) + (1-alpha)*pi, alpha = epoch/{args.ref_epochs}")
        if args.pa_lambda is not None:
            lines.append("--pa_lambda is computed but not added under --ALW (the original's ALW line has no pa); "
                         "the ICS loss is --lo_lambda")
        if args.epochs > args.ref_epochs:
            warnings.warn(f"--epochs {args.epochs} > --ref-epochs {args.ref_epochs}: alpha exceeds 1 from epoch "
                          f"{args.ref_epochs + 1} and the KD weight turns negative", RuntimeWarning, stacklevel=2)
    if args.pa_lambda is not None and args.lo_lambda is None:
        lines.append("--pa_lambda enables the SKD pair-wise loss on ASPP features, not the ICS loss (--lo_lambda)")
    if args.ic_lambda is not None:
        lines.append("--ic_lambda is computed and logged but never added to the loss, as in the original")
    return lines


@main_guard
def main(argv=None):
    args = aicsd.parse(parser(), argv, kd=True)
    aicsd.check_flags(args)
    check_kd_flags(args)
    set_tf32(args.tf32)
    info = init_distributed(aicsd.resolve_device(args))
    device = info.device
    defaults = aicsd.apply_defaults(args, info)
    wandb = aicsd.init_wandb(args) if info.is_main else None
    saver, train_set, val_set, batch, ipe = aicsd.open_run(args, info)
    num_classes = aicsd.AICSD_NUM_CLASSES[args.dataset]

    teacher = aicsd.load_teacher(args, device)
    student = aicsd.build_network(args, args.backbone, device, return_features=True)
    optimizer = aicsd.make_optimizer(aicsd.param_groups(student, args.lr), args)
    with flag_errors():
        ce = SegmentationLoss(args.loss_type, batch_average=args.ce_batch_average).to(device)
    parts = build_parts(args, contract_context(num_classes, ipe, args.crop_size))
    task = Term("ce", parts.task_weight or 1.0, ce, ("s.logits", "labels"))
    terms = parts.terms
    common = dict(task=task, base_lr=args.lr, device=device, teacher=teacher, terms=terms,
                  teacher_train=not args.teacher_eval, poly_groups="all", total_name="loss", log_adversarial=False)
    step = TrainStep(student, optimizer=optimizer, **common)
    state = RunState(saver.experiment_dir / "training_state.pth", step, info, batch=batch,
                     run={"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
                          "backbone": args.backbone, "dataset": args.dataset, "world_size": info.world_size,
                          "ALW": args.ALW, "first_epoch_frozen": args.first_epoch_frozen})
    best_pred = 0.0
    if saver.resumed:
        start = state.resume(args.resume)
    else:
        if args.resume:
            best_pred = aicsd.resume_original(args.resume, student, None, args)
        start = args.start_epoch * ipe

    step_fn = optimizer_at = None
    if args.first_epoch_frozen and start < ipe:
        frozen = TrainStep(student, optimizer=aicsd.connector_optimizer(args), **common)

        def step_fn(batch_, n):
            return (frozen if n < ipe else step)(batch_, n)

        def optimizer_at(n):
            return frozen.optimizer if n < ipe else optimizer

    logger = RunLogger(saver.experiment_dir, "aicsd.train_kd", enabled=info.is_main, start_step=start)
    log_args(logger, args)
    for line in defaults + notes(args):
        logger.info(line)
    logger.info(f"Teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.3f} M parameters, "
                f"{'eval' if args.teacher_eval else 'train'} mode; student: "
                f"{sum(p.numel() for p in student.parameters()) / 1e6:.3f} M parameters")
    if args.resume:
        logger.info(f"=> loaded checkpoint '{args.resume}' (step {start}, epoch {start // ipe})")
    logger.info(f"{len(train_set)} training and {len(val_set)} val images, {ipe} iterations per epoch")
    aicsd.write_args(saver.experiment_dir, args, info)

    fields = aicsd.run_fields(args, method_name(args), model_name(args.backbone),
                              teacher=model_name(args.teacher_backbone), extra={
        "pa_lambda": args.pa_lambda, "pi_lambda": args.pi_lambda, "lo_lambda": args.lo_lambda,
        "ic_lambda": args.ic_lambda, "ALW": args.ALW, "ref_epochs": args.ref_epochs, "ics_mode": args.ics_mode,
        "teacher_eval": args.teacher_eval, "first_epoch_frozen": args.first_epoch_frozen,
        "teacher_ckpt": args.teacher_path})

    def checkpoint(epoch, best):
        return {"epoch": epoch + 1, "state_dict": student.state_dict(), "best_pred": best}

    aicsd.run_epochs(args, info, saver, logger, step=step, state=state, train_set=train_set, val_set=val_set,
                     batch=batch, ipe=ipe, start=start, best_pred=best_pred, fields=fields, checkpoint=checkpoint,
                     step_fn=step_fn, optimizer_at=optimizer_at, wandb=wandb)
    if wandb is not None:
        wandb.finish()
    logger.close()
    destroy()


if __name__ == "__main__":
    main()
