"""AICSD ``train.py`` (specs/aicsd.md §2.1, §2.3): train DeepLabV3+ without distillation (baselines, the teacher).

In the original's order: parse and default the flags, seed, create the run folder
``<save-dir>/run/<dataset>/<checkname>/experiment_<k>`` with ``parameters.txt``, build the loaders and the
ImageNet-initialised DeepLabV3+, SGD over the backbone (lr) and the ASPP + decoder (10·lr), the CE divided by
the batch, then per epoch: per-iteration poly LR, CE, SGD step; validation every ``--eval-interval`` epochs, and a
better val mIoU saves ``checkpoint.pth.tar`` {epoch, state_dict, optimizer, best_pred} and ``results.json``.
The shared plumbing is in common/recipes/aicsd.py.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import RunLogger
from common.engine.dist import destroy, init_distributed
from common.engine.step import Term, TrainStep
from common.errors import flag_errors, main_guard
from common.losses.aicsd import SegmentationLoss
from common.models.deeplabv3plus import model_name
from common.numerics import set_tf32
from common.recipes import aicsd
from common.recipes.run import RunState, log_args


def parser():
    p = argparse.ArgumentParser(description="PyTorch DeeplabV3Plus Training")
    aicsd.add_common_flags(p, kd=False)
    p.add_argument("--results-method", default=None,
                   help="added: the method name in results.json (default: teacher for resnet101, else baseline)")
    return p


def criterion(args, train_set):
    """``SegmentationLosses(weight).build_loss(--loss-type)`` (§4.1), balanced weights when asked."""
    weight = (aicsd.class_weights(train_set, args, aicsd.AICSD_NUM_CLASSES[args.dataset])
              if args.use_balanced_weights else None)
    with flag_errors():
        return SegmentationLoss(args.loss_type, weight, batch_average=args.ce_batch_average)


@main_guard
def main(argv=None):
    args = aicsd.parse(parser(), argv, kd=False)
    aicsd.check_flags(args)
    set_tf32(args.tf32)
    info = init_distributed(aicsd.resolve_device(args))
    device = info.device
    notes = aicsd.apply_defaults(args, info)
    saver, train_set, val_set, batch, ipe = aicsd.open_run(args, info)

    model = aicsd.build_network(args, args.backbone, device, return_features=False)
    optimizer = aicsd.make_optimizer(aicsd.param_groups(model, args.lr), args)
    loss = criterion(args, train_set).to(device)
    step = TrainStep(model, task=Term("loss", 1.0, loss, ("s.logits", "labels")), optimizer=optimizer,
                     base_lr=args.lr, device=device, poly_groups="all", total_name="loss", log_adversarial=False)
    state = RunState(saver.experiment_dir / "training_state.pth", step, info, batch=batch,
                     run={"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
                          "backbone": args.backbone, "dataset": args.dataset, "world_size": info.world_size})
    best_pred = 0.0
    if saver.resumed:
        start = state.resume(args.resume)
    else:
        if args.resume:
            best_pred = aicsd.resume_original(args.resume, model, optimizer, args)
        start = args.start_epoch * ipe

    logger = RunLogger(saver.experiment_dir, "aicsd.train", enabled=info.is_main, start_step=start)
    log_args(logger, args)
    for line in notes:
        logger.info(line)
    if args.resume:
        logger.info(f"=> loaded checkpoint '{args.resume}' (step {start}, epoch {start // ipe})")
    logger.info(f"{len(train_set)} training and {len(val_set)} val images, {ipe} iterations per epoch")
    aicsd.write_args(saver.experiment_dir, args, info)

    method = args.results_method or ("teacher" if args.backbone == "resnet101" else "baseline")
    fields = aicsd.run_fields(args, method, model_name(args.backbone),
                              extra={"loss_type": args.loss_type, "ce_batch_average": args.ce_batch_average})

    def checkpoint(epoch, best):
        return {"epoch": epoch + 1, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "best_pred": best}

    aicsd.run_epochs(args, info, saver, logger, step=step, state=state, train_set=train_set, val_set=val_set,
                     batch=batch, ipe=ipe, start=start, best_pred=best_pred, fields=fields, checkpoint=checkpoint)
    logger.close()
    destroy()


if __name__ == "__main__":
    main()
