"""Entry-point plumbing of the PSP-lineage distillation scripts: IFVD, CWD and the SKD journal code.

specs/ifvd_skd.md §A.2.1, §A.3, §B.2.2, §B.3; specs/cwd.md §3.2. The three train scripts share the
checks of the schedule and of the discriminator, building student, teacher and discriminator from
their flags with clear errors, the Cityscapes loaders (resumable sampler, per-sample seeds, a
loader generator so a resumed run draws the same worker seeds), the original per-step log line, the
resumable training state, and a save point's weights, evaluation and ``results.json``
(:class:`DistillRun`). What differs per paper (step indexing, save points and file names, teacher
key layout, D optimizer, terms) stays in the paper's script and is passed in.

Under torchrun the gradients of G and D are averaged over the ranks inside
:class:`common.engine.distill.DistillStep` (:func:`common.engine.distill.average_gradients`).
"""
import itertools
import json
import time
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from common.datasets.cityscapes import CSTrainValSet
from common.engine.checkpoint import atomic_save, load_training_state, save_training_state
from common.engine.dist import barrier
from common.engine.options import resolve_list
from common.engine.seed import ResumableSampler, SeededDataset, loader_generator, worker_init_fn
from common.engine.trainer import HookBase
from common.errors import UserError
from common.evaluation import evaluate_main, write_results_json
from common.losses.adversarial import check_adv_type
from common.models import Discriminator, build_model
from common.models.pspnet import output_side
from common.models.weights import load_checkpoint, load_state_dict_strict

STUDENT = "pspnet_resnet18"
TEACHER = "pspnet_resnet101"
TEACHERS = (TEACHER, STUDENT)  # --teacher-model: the original's, or a small one for the demo and tests
D_INPUT = 64  # the discriminator needs logits of at least 64x64 (its layer l4, §C.3)


# ------------------------------------------------------------------------------------------------ checks
def check_schedule(args, *, num_classes_flag="--num_classes", one_based=False):
    """Batch, steps and classes the originals crashed or hung on (§A.9 items 2, 7, 10).

    ``one_based``: the first step is ``last-step + 1`` (SKD), so ``last-step`` must stay below ``num-steps``.
    """
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size} is too small: batch-norm in training needs at least 2 images")
    relation = "<" if one_based else "<="
    last_ok = args.last_step < args.num_steps if one_based else args.last_step <= args.num_steps
    if args.num_steps <= 0 or args.last_step < 0 or not last_ok:
        raise UserError(f"--num-steps {args.num_steps} / --last-step {args.last_step}: "
                        f"need 0 <= last-step {relation} num-steps")
    num_classes = getattr(args, num_classes_flag.lstrip("-").replace("-", "_"))
    if num_classes < 1:
        raise UserError(f"{num_classes_flag} must be positive, got {num_classes}")


def check_adversarial(args, flag, crop):
    """The discriminator's constraints (§C.3, §C.4): loss type, 65x65 input, preprocess mode, logit size."""
    check_adv_type(args.adv_loss_type)
    if args.imsize_for_adv != 65:
        raise UserError(f"--imsize-for-adv must be 65 (the discriminator has no layer l4 otherwise), "
                        f"got {args.imsize_for_adv}")
    if args.preprocess_GAN_mode not in (1, 2, 3):
        raise UserError(f"--preprocess-GAN-mode must be 1, 2 or 3, got {args.preprocess_GAN_mode}")
    sides = [output_side(c) for c in crop]
    if min(sides) < D_INPUT:
        least = next(n for n in itertools.count(1) if output_side(n) >= D_INPUT)
        raise UserError(f"{flag} needs logits of at least {D_INPUT}x{D_INPUT} for the discriminator, but --input-size "
                        f"{crop[0]},{crop[1]} gives {sides[0]}x{sides[1]}; use a crop of at least {least},{least} "
                        f"(the original 512,512 gives 65x65) or {flag} False")


def rank_batch(batch_size, info):
    """The per-process batch under torchrun: ``--batch-size`` is the total over the processes."""
    if batch_size % info.world_size:
        raise UserError(f"--batch-size {batch_size} must be divisible by the {info.world_size} processes")
    return batch_size // info.world_size


# ---------------------------------------------------------------------------------------------- models
def build_student(args, device, *, num_classes, hint, resume=None, resume_flag="--S_ckpt_path",
                  return_features=False):
    """The student PSPNet-R18 from the flags: the deep-stem ImageNet backbone of ``--student-pretrain-model-imgnet``
    with ``--is-student-load-imgnet`` (§A.3; ``hint`` says how to get it), then the file ``resume`` if given."""
    imagenet = args.student_pretrain_model_imgnet if args.is_student_load_imgnet else None
    if imagenet is not None and (imagenet in ("None", "") or not Path(imagenet).is_file()):
        raise UserError(f"ImageNet weights of the student not found at {imagenet!r}; {hint}")
    student = build_model(STUDENT, num_classes=num_classes, norm=args.norm, pretrained_backbone=imagenet,
                          return_features=return_features).to(device)
    if resume is not None:
        resume_student(student, resume, resume_flag, args)
    return student


def resume_student(student, path, flag, args):
    """Strict load of a student file (a state_dict or ``{'state_dict', 'step'}``); its step becomes
    ``args.last_step`` unless a ``--resume`` training state gives the step."""
    state = load_checkpoint(str(path), f"student checkpoint ({flag})")
    load_state_dict_strict(student, state, f"student checkpoint {path}")
    if "step" in state and args.resume is None:
        args.last_step = int(state["step"])


def build_teacher(args, name, device, *, num_classes, hint, remap=None, return_features=False):
    """The teacher ``name`` strictly loaded from ``--T_ckpt_path`` (a missing file is an error, §A.9 item 8;
    ``hint`` says how to get it); ``remap`` renames the keys first (SKD's toolbox layout)."""
    teacher = build_model(name, num_classes=num_classes, norm=args.norm, return_features=return_features)
    state = load_checkpoint(args.T_ckpt_path, "teacher checkpoint (--T_ckpt_path)", hint)
    if remap is not None:
        state = remap(state["state_dict"] if isinstance(state.get("state_dict"), dict) else state)
    load_state_dict_strict(teacher, state, f"teacher checkpoint {args.T_ckpt_path}")
    return teacher.to(device)


def build_discriminator(args, num_classes, device, resume=None, flag="--D_ckpt_path"):
    """D on the ``num_classes``-channel logits (§C.3), optionally loaded from the file ``resume``."""
    disc = Discriminator(args.preprocess_GAN_mode, args.imsize_for_adv, args.adv_conv_dim, num_classes)
    if resume is not None:
        load_state_dict_strict(disc, load_checkpoint(str(resume), f"discriminator checkpoint ({flag})"),
                               f"discriminator checkpoint {resume}")
    return disc.to(device)


def load_student(name, path, flag, hint, *, num_classes, norm, device):
    """A trained student for evaluation: strict load of ``path`` (given with ``flag``; ``hint`` says what to pass)."""
    if not path:
        raise UserError(f"no checkpoint given with {flag}; {hint}")
    model = build_model(name, num_classes=num_classes, norm=norm)
    load_state_dict_strict(model, load_checkpoint(path, f"student checkpoint ({flag})", hint),
                           f"student checkpoint {path}")
    return model.to(device)


# ------------------------------------------------------------------------------------------------ data
def train_val_sets(args, *, crop=None, lists=resolve_list, ignore_label=255, **train_kw):
    """The training set (the list repeated to num-steps·batch samples, §C.5) and the whole-image val set.

    ``lists(path, split, data_dir)`` resolves ``--data-list`` / ``--data-listval``.
    """
    train_set = CSTrainValSet(args.data_dir, lists(args.data_list, "train", args.data_dir),
                              max_iters=args.num_steps * args.batch_size, crop_size=crop or args.input_size,
                              scale=args.random_scale, mirror=args.random_mirror, ignore_label=ignore_label,
                              **train_kw)
    val_set = CSTrainValSet(args.data_dir, lists(args.data_listval, "val", args.data_dir), crop_size=None,
                            ignore_label=ignore_label)
    return train_set, val_set


def train_loader(dataset, *, seed, batch, start, info, num_workers):
    """One fixed shuffle from ``seed``, started at sample ``start`` (resume), this rank's shard of it."""
    dataset = SeededDataset(dataset, seed)
    sampler = ResumableSampler(len(dataset), seed, start=start, rank=info.rank, world_size=info.world_size)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda", drop_last=False, worker_init_fn=worker_init_fn,
                      generator=loader_generator(seed))


def eval_loader(dataset, info=None):
    """One image per batch, in list order; under torchrun each rank takes every world-size-th image."""
    if info is not None and info.world_size > 1:
        dataset = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)


def evaluate_split(model, dataset, *, num_classes, device, mode, outputs_dir):
    """Whole image, scale 1.0, no flip (§C.6): mode "val" scores ``dataset`` (trainId PNGs into ``outputs_dir``),
    mode "test" only writes labelId PNGs for the server."""
    return evaluate_main(model, eval_loader(dataset), num_classes=num_classes, device=device, whole=True, mode=mode,
                         output_dir=outputs_dir or None)


# ------------------------------------------------------------------------------------------------- run
def method_name(flags, *, sep="_", full=None):
    """``results.json`` method from the ``(name, on)`` terms: ``full`` when all are on, else the names that
    are on joined by ``sep``, or "baseline" for none."""
    parts = [name for name, on in flags if on]
    if full is not None and len(parts) == len(flags):
        return full
    return sep.join(parts) or "baseline"


def run_fields(paper, method, args, *, crop, teacher, extra):
    """The ``results.json`` fields a training run knows before its first evaluation (DESIGN.md, Results)."""
    return {"paper": paper, "method": method, "model": STUDENT, "dataset": "cityscapes", "split": "val",
            "iterations": args.num_steps, "crop": list(crop), "batch": args.batch_size, "seed": args.seed,
            "teacher": teacher, "extra": extra}


def load_run_state(path, step):
    """Restore a ``training_state.pth`` into the step's models and optimizers; returns its dict (step, extra)."""
    return load_training_state(path, step.state_models(), step.state_optimizers())


def log_args(logger, args):
    """The originals' ``key : value`` lines of the sorted arguments at the top of the log."""
    for key, value in sorted(vars(args).items()):
        logger.debug(f"{key} : {value}")


def write_args_json(folder, args, fields, info):
    """``<folder>/args.json``: the arguments and the run's results fields (val.py reads them back)."""
    if info.is_main:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "args.json").write_text(json.dumps({**vars(args), "run_info": fields}, indent=2) + "\n")


class OriginalLogLine(HookBase):
    """The originals' per-step log-file line ``step G_lr G_loss(mc <terms>) D_lr D_loss``.

    ``names``: the terms printed after ``mc`` (IFVD kd adv ifv, §A.2.1 step 7.4; SKD pixelwise pairwise,
    §B.2.2 step 6.4; CWD kd adv cwd, cwd.md §3.2 e). ``one_based``: SKD prints ``step + 1`` unpadded.
    ``lr_group``: the param group whose lr is printed (CWD prints the last one).
    """

    def __init__(self, logger, step, names, *, one_based=False, lr_group=0):
        self.logger = logger
        self.step = step
        self.names = tuple(names)
        self.one_based = one_based
        self.lr_group = lr_group

    def after_step(self):
        t, losses = self.trainer, self.trainer.losses
        g_lr = self.step.g_optimizer.param_groups[self.lr_group]["lr"]
        d_opt = self.step.d_optimizer
        d_lr = d_opt.param_groups[self.lr_group]["lr"] if d_opt is not None else 0.0
        n = f"{t.step + 1}" if self.one_based else f"{t.step:5d}"
        terms = " ".join(f"{name}:{losses.get(name, 0.0):.5f}" for name in self.names)
        self.logger.debug(f"step:{n} G_lr:{g_lr:.6f} G_loss:{losses['loss_G']:.5f}(mc:{losses['mc']:.5f} {terms}) "
                          f"D_lr:{d_lr:.6f} D_loss:{losses['loss_D']:.5f}")


class StateEvery(HookBase):
    """``save_state(n)`` every ``every`` completed steps (0: never), except where ``skip(n)`` (the save
    points write the state themselves)."""

    def __init__(self, save_state, every, skip):
        self.save_state = save_state
        self.every = every
        self.skip = skip

    def after_step(self):
        n = self.trainer.step + 1
        if self.every and n % self.every == 0 and not self.skip(n):
            self.save_state(n)


class DistillRun:
    """The files of one distillation run: training state, weights, val evaluations and ``results.json``.

    Rank 0 writes; every rank evaluates its shard of val (the metric sums are reduced over ranks).
    ``fields`` are the run's results fields (:func:`run_fields`), ``state_extra`` goes into the state.
    """

    def __init__(self, step, info, logger, vloader, *, num_classes, outputs_dir, state_path, state_extra, fields,
                 results_path):
        self.step = step
        self.info = info
        self.logger = logger
        self.vloader = vloader
        self.num_classes = num_classes
        self.outputs_dir = outputs_dir or None
        self.state_path = state_path
        self.state_extra = state_extra
        self.fields = fields
        self.results_path = results_path
        self.started = time.perf_counter()

    def save_state(self, n):
        """``training_state.pth`` after ``n`` completed steps (models, optimizers, RNG, data position)."""
        if self.info.is_main:
            save_training_state(self.state_path, step=n, models=self.step.state_models(),
                                optimizers=self.step.state_optimizers(), extra=self.state_extra)

    def evaluate(self):
        """Whole-image val evaluation of the student (§C.6), prediction PNGs into ``outputs_dir``."""
        return evaluate_main(self.step.student, self.vloader, num_classes=self.num_classes, device=self.step.device,
                             whole=True, output_dir=self.outputs_dir, progress=self.info.is_main)

    def write_results(self, n, result, **extra):
        """``results.json`` of the evaluation after ``n`` steps; ``extra`` joins the run's extra fields."""
        if self.info.is_main:
            fields = {**self.fields, **result.result_fields(), "iterations": n}
            fields["extra"] = {**fields["extra"], **extra, "train_wall_time_s": time.perf_counter() - self.started}
            write_results_json(self.results_path, **fields)

    def save_and_evaluate(self, n, prefix):
        """IFVD/CWD save point (§A.2.1 step 7.5): ``<prefix>_G.pth`` (+ ``_D.pth`` with a discriminator) and
        the state, then the val evaluation, its log line and ``results.json``."""
        if self.info.is_main:
            atomic_save(self.step.student.state_dict(), f"{prefix}_G.pth")
            if self.step.discriminator is not None:
                atomic_save(self.step.discriminator.state_dict(), f"{prefix}_D.pth")
        self.save_state(n)
        result = self.evaluate()
        self.logger.info(f"mean_IU: {result.miou:.6f}  IU_array: {result.iou.tolist()}")
        self.write_results(n, result)
        barrier()
