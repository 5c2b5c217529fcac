"""Supervised (no-KD) training of teachers and baseline students with the toolbox recipe.

specs/ifvd_skd.md §D.2: the IFVD/SKD teachers presumably came from pytorch-segmentation-toolbox's
``run_local.sh``: SGD lr 1e-2, momentum 0.9, weight decay 5e-4, poly 0.9 (IFVD indexing, it = 0..N-1,
§A.6/§C.7), CE + 0.4·aux (``CriterionDSN``), 40k steps, batch 8, crop 769, random scale and mirror,
ImageNet backbone. Data as §C.5 (one shuffle of the ``num_steps·batch`` repeated list), final
whole-image evaluation on val (§C.6) written to ``results.json``.

    python -m common.train_baseline --model pspnet_resnet101 --data-dir $CITYSCAPES \\
        --restore-from resnet101-imagenet.pth --save-dir runs/teacher
    torchrun --nproc_per_node=4 -m common.train_baseline ...   # --batch-size is the total batch

Writes into ``--save-dir``: ``training_state.pth`` (resumable with ``--resume``), the final weights
``CS_scenes_<num_steps>.pth`` (a bare state_dict, loadable as a teacher), ``results.json``,
``metrics.jsonl`` and ``log.txt``.
"""
import argparse
import os
import time
from pathlib import Path

from common.engine import (
    Logging,
    LRSchedule,
    PeriodicCheckpoint,
    PeriodicEval,
    RunLogger,
    Term,
    Trainer,
    TrainStep,
    atomic_save,
    barrier,
    eval_loader,
    init_distributed,
    make_sgd,
    rank_batch,
    seed_everything,
    train_loader,
)
from common.engine.dist import destroy
from common.errors import UserError, main_guard
from common.numerics import resolve_amp, set_tf32
from common.recipes import psp
from common.recipes.options import add_runtime_flags, finite_float, size_pair
from common.recipes.run import RunState, has_results, log_args, prepare_run_dir, seed_rank

STATE_NAME = "training_state.pth"


def get_parser():
    p = argparse.ArgumentParser(prog="python -m common.train_baseline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="pspnet_resnet101", help="registered model name (common.models)")
    p.add_argument("--num-classes", type=int, default=19, help="number of classes")
    p.add_argument("--restore-from", default=None, help="ImageNet backbone weights (e.g. resnet101-imagenet.pth)")
    p.add_argument("--data-dir", default=os.environ.get("CITYSCAPES"), help="Cityscapes root (default $CITYSCAPES)")
    p.add_argument("--data-list", default=None, help="train list (default: the shipped train.lst)")
    p.add_argument("--data-listval", default=None, help="val list (default: the shipped val.lst)")
    p.add_argument("--ignore-label", type=int, default=255, help="label value ignored by the loss and the metric")
    p.add_argument("--input-size", type=size_pair, default=(769, 769), help="train crop H,W")
    p.add_argument("--batch-size", type=int, default=8, help="total over all processes")
    p.add_argument("--num-steps", type=int, default=40000, help="training steps")
    p.add_argument("--learning-rate", type=finite_float, default=1e-2, help="SGD learning rate (poly schedule)")
    p.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=finite_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--power", type=finite_float, default=0.9, help="poly learning-rate power")
    p.add_argument("--random-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="random rescale of the training crops")
    p.add_argument("--random-mirror", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip")
    p.add_argument("--save-dir", default="snapshots", help="output folder (state, weights, results.json, logs)")
    p.add_argument("--save-every", type=int, default=2000, help="write training_state.pth every N steps (0: end only)")
    add_runtime_flags(p, training=True, seed_help="seed of random/numpy/torch", added="")
    p.add_argument("--log-every", type=int, default=20, help="console line every N steps")
    p.add_argument("--paper", default="ifvd", help="results.json `paper`: the table of the run (ifvd, cwd, skd)")
    p.add_argument("--method", default="baseline", choices=["baseline", "teacher"],
                   help="results.json `method`: 'baseline' (no-KD student) or 'teacher' (the tables' row names)")
    return p


def _check_args(args):
    for name in ("num_steps", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.save_every < 0:
        raise UserError(f"--save-every must be >= 0, got {args.save_every}")
    if not args.data_dir:
        raise UserError("no Cityscapes root given; pass --data-dir or set CITYSCAPES")
    if not Path(args.data_dir).is_dir():
        raise UserError(f"Cityscapes root {args.data_dir} does not exist; pass --data-dir or set CITYSCAPES")
    if args.resume and not Path(args.resume).is_file():
        raise UserError(f"resume checkpoint {args.resume} does not exist; pass the {STATE_NAME} of an earlier run")
    from common.models import list_models
    from common.tables.schema import PAPERS

    if args.model not in list_models():
        raise UserError(f"unknown model {args.model!r}; choose one of: {', '.join(list_models())}")

    if args.paper not in PAPERS:
        raise UserError(f"--paper {args.paper!r} is not a results paper; choose one of {', '.join(PAPERS)}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    _check_args(args)
    from common.evaluation import evaluate_main, write_results_json
    from common.losses.segmentation import CriterionDSN
    from common.models import build_model

    t_start = time.time()
    seed_everything(args.seed)
    set_tf32(args.tf32)
    info = init_distributed(args.device)
    device = info.device
    batch = rank_batch(args.batch_size, info)
    save_dir = prepare_run_dir(args.save_dir, "--save-dir", info)
    train_set, val_set = psp.train_val_sets(args, ignore_label=args.ignore_label)
    model = build_model(args.model, num_classes=args.num_classes, norm=args.norm,
                        pretrained_backbone=args.restore_from).to(device)
    optimizer = make_sgd(model.parameters(), args.learning_rate, args.momentum, args.weight_decay)
    dsn = CriterionDSN(ignore_index=args.ignore_label, aux_weight=0.4)
    task = Term("loss", 1.0, lambda logits, aux, labels: dsn([logits, aux], labels), ("s.logits", "s.aux", "labels"))
    step = TrainStep(model, task=task, optimizer=optimizer, base_lr=args.learning_rate, device=device,
                     amp=resolve_amp(args.amp, device, args.amp_dtype), total_name="loss", log_adversarial=False)
    state = RunState(save_dir / STATE_NAME, step, info, batch=batch,
                     run={"model": args.model, "seed": args.seed, "num_steps": args.num_steps,
                          "batch_size": args.batch_size, "world_size": info.world_size}, extra={"elapsed_s": 0.0})
    start_step = state.resume(args.resume) if args.resume else 0
    seed_rank(args.seed, info, start_step)
    elapsed_before = float(state.extra["elapsed_s"])
    logger = RunLogger(save_dir, "train_baseline", enabled=info.is_main, start_step=start_step)
    log_args(logger, args)
    logger.info(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, device {device}, "
                f"{info.world_size} process(es), batch {batch}/process, steps {start_step}..{args.num_steps}")
    loader = train_loader(train_set, seed=args.seed, batch=batch, start=start_step * batch, info=info,
                          num_workers=args.num_workers)
    final_weights = save_dir / f"CS_scenes_{args.num_steps}.pth"

    def save_state(n):
        state.extra["elapsed_s"] = elapsed_before + time.time() - t_start
        state.save(n)
        logger.info(f"saved {save_dir / STATE_NAME} at step {n}")

    def save_final_weights(n):
        if info.is_main:
            atomic_save(model.state_dict(), final_weights)
        barrier()

    def final_eval(n):
        result = evaluate_main(model, eval_loader(val_set, info), num_classes=args.num_classes, device=device,
                               ignore_label=args.ignore_label, progress=info.is_main)
        logger.info(f"mean_IU: {result.miou:.6f}  IU_array: {[round(float(v), 4) for v in result.iou]}")
        if info.is_main:
            fields = result.result_fields()
            fields["wall_time_s"] = elapsed_before + time.time() - t_start  # the whole run, across resumes
            path = write_results_json(
                save_dir / "results.json", paper=args.paper, method=args.method, model=args.model,
                dataset="cityscapes", split="val", iterations=args.num_steps, crop=list(args.input_size),
                batch=args.batch_size, seed=args.seed,
                extra={"recipe": "toolbox (specs/ifvd_skd.md §D.2)", "norm": args.norm,
                       "world_size": info.world_size},
                **fields)
            logger.info(f"wrote {path}")
        return result.miou

    hooks = [
        LRSchedule(step.poly_specs(), args.num_steps, power=args.power),
        Logging(logger, device=device, period=args.log_every),
        PeriodicCheckpoint(save_state, every=args.save_every or None, start=0, final=True),
        PeriodicCheckpoint(save_final_weights, final=True, done=final_weights.is_file),
        PeriodicEval(final_eval, final=True, done=lambda: has_results(save_dir / "results.json", args.num_steps)),
    ]
    trainer = Trainer(step, iter(loader), args.num_steps, start_step=start_step, hooks=hooks)
    state.restore_hooks(trainer)
    try:
        trainer.train()
    finally:
        logger.close()
        destroy()


if __name__ == "__main__":
    main_guard(main)()
