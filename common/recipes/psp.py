"""The PSP-lineage recipe: what IFVD, CWD and the SKD journal code assemble from the rest of ``common``.

specs/ifvd_skd.md §A.2.1, §A.3, §A.4.6, §B.2.2, §B.3, §C.3–C.8; specs/cwd.md §3.2. The three train scripts
share the checks of the schedule and of the discriminator; building student (PSPNet-R18) and teacher
(PSPNet-R101) from their flags with clear errors; the discriminator flags as parameters of the catalogue's
methods (common/methods builds the terms, D and its optimizer) and a D resume; the G solver; the task loss
CE + 0.4·CE_aux on the named outputs; the Cityscapes sets with the shipped lists; the original per-step log
line; and a save point's weights, evaluation and ``results.json`` (:class:`DistillRun`). What differs per
paper (step indexing, save points and file names, teacher key layout, methods and their presets) stays in the
paper's script and is passed in.
"""
import itertools
import time
from pathlib import Path

from common.datasets.cityscapes import CSTrainValSet, default_list
from common.engine.checkpoint import atomic_save
from common.engine.data import eval_loader
from common.engine.dist import barrier
from common.engine.lr import make_sgd, poly_lr
from common.engine.step import Term
from common.engine.trainer import HookBase
from common.errors import UserError, flag_errors
from common.evaluation import evaluate_main, write_results_json
from common.losses.adversarial import check_adv_type
from common.losses.segmentation import CriterionDSN
from common.methods import build_method, method_context
from common.models import build_model
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
    with flag_errors():
        check_adv_type(args.adv_loss_type)
    if args.imsize_for_adv != 65:
        raise UserError(f"--imsize-for-adv must be 65 (the discriminator has no layer l4 otherwise), "
                        f"got {args.imsize_for_adv}")
    if args.preprocess_GAN_mode not in (1, 2, 3):
        raise UserError(f"--preprocess-GAN-mode must be 1, 2 or 3, got {args.preprocess_GAN_mode}")
    sides = [output_side(c) for c in crop]
    if min(sides) < D_INPUT:
        least = smallest_adv_crop()
        raise UserError(f"{flag} needs logits of at least {D_INPUT}x{D_INPUT} for the discriminator, but --input-size "
                        f"{crop[0]},{crop[1]} gives {sides[0]}x{sides[1]}; use a crop of at least {least},{least} "
                        f"(the original 512,512 gives 65x65) or {flag} False")


def smallest_adv_crop():
    """The smallest crop side whose logits reach the discriminator's 64x64 (503: 512 gives 65x65)."""
    return next(n for n in itertools.count(1) if output_side(n) >= D_INPUT)


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


def adversary_params(args, lambda_adv, on=True):
    """The lineage's discriminator flags as parameters of a catalogue method (common/methods, §C.3–C.4):
    λ_adv = ``lambda_adv``, ``--lambda-d``, ``--lambda-gp``, ``--adv-loss-type``, ``--lr-d``,
    ``--preprocess-GAN-mode``, ``--adv-conv-dim``; without ``on`` no discriminator."""
    if not on:
        return {"adv": 0.0, "d": 0.0}
    return {"adv": lambda_adv, "d": args.lambda_d, "gp": args.lambda_gp, "adv_type": args.adv_loss_type,
            "d_lr": args.lr_d, "d_preprocess": args.preprocess_GAN_mode, "d_conv_dim": args.adv_conv_dim}


def build_parts(args, student, teacher, methods, *, preset, num_classes, crop, d_resume=None,
                d_flag="--D_ckpt_path"):
    """The catalogue's terms, modules and discriminator of ``methods`` (``{name: {param: value}}`` in the
    original's order, None for a method that is off) for the pair at ``crop`` (ignore 255, the run's norm and
    steps); the discriminator loaded from the file ``d_resume`` when given."""
    methods = {name: params for name, params in methods.items() if params is not None}
    params = {f"{name}.{key}": value for name, values in methods.items() for key, value in values.items()}
    ctx = method_context(student, teacher, num_classes=num_classes, ignore_index=255, norm=args.norm,
                         total_steps=args.num_steps, crop=crop)
    parts = build_method("+".join(methods) or "none", ctx, preset=preset if methods else None, **params)
    if parts.adversary is not None and d_resume is not None:
        load_state_dict_strict(parts.adversary.discriminator,
                               load_checkpoint(str(d_resume), f"discriminator checkpoint ({d_flag})"),
                               f"discriminator checkpoint {d_resume}")
    return parts


def load_student(name, path, flag, hint, *, num_classes, norm, device):
    """A trained student for evaluation: strict load of ``path`` (given with ``flag``; ``hint`` says what to pass)."""
    if not path:
        raise UserError(f"no checkpoint given with {flag}; {hint}")
    model = build_model(name, num_classes=num_classes, norm=norm)
    load_state_dict_strict(model, load_checkpoint(path, f"student checkpoint ({flag})", hint),
                           f"student checkpoint {path}")
    return model.to(device)


# ------------------------------------------------------------------------------------------------ data
def resolve_list(path, split, data_dir):
    """``path`` if given, else the shipped ``<split>.lst`` (or ``<data_dir>/lists/<split>.lst``)."""
    return path if path else default_list(split, root=data_dir)


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


def evaluate_split(model, dataset, *, num_classes, device, mode, outputs_dir):
    """Whole image, scale 1.0, no flip (§C.6): mode "val" scores ``dataset`` (trainId PNGs into ``outputs_dir``),
    mode "test" only writes labelId PNGs for the server."""
    return evaluate_main(model, eval_loader(dataset), num_classes=num_classes, device=device, whole=True, mode=mode,
                         output_dir=outputs_dir or None)


# ------------------------------------------------------------------------------------------------ step
def task_term(ignore_index=255, aux_weight=0.4):
    """The task loss ``CE(logits) + 0.4·CE(aux)`` (``CriterionDSN``, §C.2) on the named outputs, logged as "mc"."""
    dsn = CriterionDSN(ignore_index=ignore_index, aux_weight=aux_weight)
    return Term("mc", 1.0, lambda logits, aux, labels: dsn([logits, aux], labels), ("s.logits", "s.aux", "labels"))


def build_g_optimizer(student, extra_modules=(), lr=0.01, momentum=0.9, weight_decay=5e-4):
    """The originals' ``G_solver``: SGD over the student's trainable parameters (group 0), each extra
    module (e.g. CWD's feature adapter) as one more group with the same lr, momentum and weight decay
    (specs/cwd.md §5.3). Every group carries ``initial_lr``."""
    extra = [{"params": [p for p in m.parameters() if p.requires_grad]} for m in extra_modules]
    return make_sgd(student.parameters(), lr, momentum=momentum, weight_decay=weight_decay, extra_groups=extra)


class OriginalLogLine(HookBase):
    """The originals' per-step log-file line
    ``step:{:5d} G_lr:{:.6f} G_loss:{:.5f}(mc:{:.5f} <terms>) D_lr:{:.6f} D_loss:{:.5f}``.

    ``names``: the terms printed after ``mc`` (IFVD kd adv ifv, §A.2.1 step 7.4; SKD pixelwise pairwise,
    §B.2.2 step 6.4; CWD kd adv cwd, cwd.md §3.2 e), with five decimals and ``last_digits`` for the last
    one (IFVD/CWD print it with six). ``one_based``: SKD numbers the step from 1. ``lr_group``: the param
    group whose lr is printed (CWD prints the last one). Without a discriminator the originals still decayed
    and printed the D lr: ``d_lr(step_index)`` gives it.
    """

    def __init__(self, logger, step, names, *, d_lr, one_based=False, lr_group=0, last_digits=5):
        self.logger = logger
        self.step = step
        self.names = tuple(names)
        self.d_lr = d_lr
        self.one_based = one_based
        self.lr_group = lr_group
        self.last_digits = last_digits

    def after_step(self):
        t, losses = self.trainer, self.trainer.losses
        g_lr = self.step.optimizer.param_groups[self.lr_group]["lr"]
        adversary = self.step.adversary
        d_lr = adversary.optimizer.param_groups[self.lr_group]["lr"] if adversary is not None else self.d_lr(t.step)
        digits = [5] * (len(self.names) - 1) + [self.last_digits]
        terms = " ".join(f"{name}:{losses.get(name, 0.0):.{d}f}" for name, d in zip(self.names, digits))
        self.logger.debug(f"step:{t.step + self.one_based:5d} G_lr:{g_lr:.6f} G_loss:{losses['loss_G']:.5f}"
                          f"(mc:{losses['mc']:.5f} {terms}) D_lr:{d_lr:.6f} D_loss:{losses['loss_D']:.5f}")


def decayed_lr(base_lr, num_steps, power, first_index=0):
    """``step_index -> poly(base_lr)`` with the lineage's step indexing (§C.7), for :class:`OriginalLogLine`."""
    return lambda step: poly_lr(base_lr, step + first_index, num_steps, power)


class DistillRun:
    """The files of one distillation run: weights at the save points, val evaluations and ``results.json``.

    Rank 0 writes; every rank evaluates its shard of val (the metric sums are reduced over ranks).
    ``state`` is the run's :class:`~common.recipes.run.RunState`, ``fields`` its results fields
    (:func:`common.recipes.run.run_fields`).
    """

    def __init__(self, step, state, info, logger, vloader, *, num_classes, outputs_dir, fields, results_path):
        self.step = step
        self.state = state
        self.info = info
        self.logger = logger
        self.vloader = vloader
        self.num_classes = num_classes
        self.outputs_dir = outputs_dir or None
        self.fields = fields
        self.results_path = Path(results_path)
        self.started = time.perf_counter()

    def save_weights(self, n, prefix):
        """IFVD/CWD save point (§A.2.1 step 7.5): ``<prefix>_G.pth`` (+ ``_D.pth`` with a discriminator) and
        the training state."""
        if self.info.is_main:
            atomic_save(self.step.student.state_dict(), f"{prefix}_G.pth")
            if self.step.adversary is not None:
                atomic_save(self.step.adversary.discriminator.state_dict(), f"{prefix}_D.pth")
        self.state.save(n)

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

    def evaluate_point(self, n):
        """IFVD/CWD evaluation at a save point: the val mIoU, its original log line and ``results.json``."""
        result = self.evaluate()
        self.logger.info(f"mean_IU: {result.miou:.6f}  IU_array: {result.iou.tolist()}")
        self.write_results(n, result)
        barrier()
        return result.miou
