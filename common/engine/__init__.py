"""Training-loop pieces shared by every entry point (DESIGN.md, Layout: engine/).

Poly LR and the originals' optimizers (:mod:`.lr`), atomic resumable checkpoints
(:mod:`.checkpoint`), seeding and the resumable sampler (:mod:`.seed`), torch.distributed from
torchrun (:mod:`.dist`), run logging (:mod:`.logger`) and the hook-based loop (:mod:`.trainer`).
"""
from .checkpoint import atomic_save, load_training_state, save_training_state, set_rng_state
from .dist import DistInfo, all_reduce_sum, barrier, init_distributed, resolve_device
from .logger import RunLogger
from .lr import make_adam, make_sgd, poly_lr, set_lr
from .seed import ResumableSampler, SeededDataset, loader_generator, seed_everything, worker_init_fn
from .trainer import FinalEval, HookBase, Logging, LRSchedule, PeriodicCheckpoint, PolySpec, Trainer

__all__ = [
    "DistInfo",
    "FinalEval",
    "HookBase",
    "LRSchedule",
    "Logging",
    "PeriodicCheckpoint",
    "PolySpec",
    "ResumableSampler",
    "RunLogger",
    "SeededDataset",
    "Trainer",
    "all_reduce_sum",
    "atomic_save",
    "barrier",
    "init_distributed",
    "load_training_state",
    "loader_generator",
    "make_adam",
    "make_sgd",
    "poly_lr",
    "resolve_device",
    "save_training_state",
    "seed_everything",
    "set_lr",
    "set_rng_state",
    "worker_init_fn",
]
