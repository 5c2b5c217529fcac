"""The training engine: a small trainer, one training step, hooks with one job each (paper-agnostic).

Modelled on detectron2's ``engine/train_loop.py`` + ``hooks.py``. The engine imports no dataset, model or
loss module (they are passed in); common/recipes/ assemble them per code lineage.

The step (:mod:`.step`)
    :class:`TrainStep` is the one training step of every trainer: student forward, optional frozen teacher,
    a task :class:`Term`, weighted distillation terms, extra trainable modules (adapters, projection heads)
    by name, an optional :class:`Adversary` (its own D step), one mixed-precision rule, gradients averaged
    over the ranks. Supervised training is the same class with no teacher and no terms. Terms read the
    models' outputs by name (``"s.logits"``, ``"t.feat"``): every model declares ``output_names``.
The trainer (:mod:`.trainer`)
    :class:`Trainer` runs ``step(batch, i)`` for ``i = start .. max-1`` and calls the hooks:
    :class:`LRSchedule` (poly on each param group's own initial lr, or the PSP lineage's first group only),
    :class:`PeriodicCheckpoint` (saving only), :class:`PeriodicEval` (evaluation only, optionally keeping the
    best), :class:`Logging`. An epoch-based run is the same loop over :func:`.data.epoch_batches`.
The state (:mod:`.checkpoint`)
    One vocabulary: named ``modules``, named ``optimizers``, ``scaler`` (from ``TrainStep.state_dict()``),
    ``hooks`` (``Trainer.state_dict()``: each stateful hook by name), ``rng``, ``step``, ``data_position``,
    ``run`` (settings a resume must match). A resume with other modules is refused, naming them.
Data (:mod:`.data`), distributed (:mod:`.dist`), seeds (:mod:`.seed`), poly LR (:mod:`.lr`), logs (:mod:`.logger`).

A new supervised trainer in 20 lines::

    info = init_distributed("auto")
    model = build_model("deeplabv3_resnet18", num_classes=19).to(info.device)
    optimizer = make_sgd(model.parameters(), lr=0.01)
    ce = torch.nn.CrossEntropyLoss(ignore_index=-1)
    step = TrainStep(model, task=Term("loss", 1.0, ce, ("s.logits", "labels")), optimizer=optimizer,
                     base_lr=0.01, device=info.device, total_name="loss", log_adversarial=False)
    loader = train_loader(train_set, seed=0, batch=rank_batch(16, info), start=0, info=info, num_workers=4)
    state = RunState("run/training_state.pth", step, info, run={"seed": 0}, batch=rank_batch(16, info))
    logger = RunLogger("run", "my_trainer", enabled=info.is_main)

    def evaluate(n):
        return evaluate_main(model, eval_loader(val_set, info), num_classes=19, device=info.device).miou

    hooks = [LRSchedule(step.poly_specs(), 40000),
             Logging(logger, device=info.device),
             PeriodicCheckpoint(state.save, every=4000),
             PeriodicEval(evaluate, every=4000, on_best=lambda n, miou: atomic_save(model.state_dict(), "best.pth"))]
    trainer = Trainer(step, iter(loader), 40000, hooks=hooks)
    state.restore_hooks(trainer)
    trainer.train()
"""
from .checkpoint import atomic_save, read_training_state, save_training_state, set_rng_state
from .data import epoch_batches, eval_loader, rank_batch, train_loader
from .dist import DistInfo, all_reduce_sum, barrier, init_distributed, resolve_device
from .logger import RunLogger
from .lr import make_adam, make_sgd, poly_lr, set_lr
from .seed import ResumableSampler, SeededDataset, loader_generator, seed_everything, worker_init_fn
from .step import Adversary, NamedOutputs, Term, TrainStep
from .trainer import HookBase, Logging, LRSchedule, PeriodicCheckpoint, PeriodicEval, PolySpec, Trainer

__all__ = [
    "Adversary", "DistInfo", "HookBase", "LRSchedule", "Logging", "NamedOutputs", "PeriodicCheckpoint",
    "PeriodicEval", "PolySpec", "ResumableSampler", "RunLogger", "SeededDataset", "Term", "TrainStep", "Trainer",
    "all_reduce_sum", "atomic_save", "barrier", "epoch_batches", "eval_loader", "init_distributed",
    "loader_generator", "make_adam", "make_sgd", "poly_lr", "rank_batch", "read_training_state",
    "resolve_device", "save_training_state", "seed_everything", "set_lr", "set_rng_state", "train_loader",
    "worker_init_fn",
]
